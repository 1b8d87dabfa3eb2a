"""Typed job configuration: dataclass sections loaded from TOML, then ``--section.key=value`` overrides.

Loading is strict: an unknown section or key, or a value of the wrong type, is an error naming it. The config
declares what each component takes without importing the components: the one that owns a section checks the
values only it knows (the model its presets, the loss its methods; ``lacy_stream.trainer.train.check_config``
asks each), so a dataloader worker that reads ``DataConfig`` loads no loss, model or trainer.
Override values are parsed as TOML values (``--data.seq_len=128``, ``--data.allow_pipe=true``); a value
that is not valid TOML is taken as a string (``--data.shards=shards/demo``). ``--config`` takes a TOML file
or the name of a shipped run config (``tiny_cpu``), from any directory.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    pass


RUN_CONFIGS = Path(__file__).parent / "runs"
"""Shipped job configs: the paper's runs (``334m.toml``, ``1.3b.toml`` and their baselines) and ``tiny_cpu.toml``."""


@dataclass
class DataConfig:
    shards: str = "shards/demo"
    """Shard URL spec: a file, a directory with manifest.json, file:// or http(s):// URLs, brace ranges
    (``wiki-{000000..000127}.tar``), several joined with ``::``; ``pipe:CMD`` needs ``allow_pipe``."""
    seq_len: int = 1024
    """Tokens per training window (a window holds ``seq_len + 1`` ids: inputs and shifted targets)."""
    batch_size: int = 8
    """Windows per micro-batch on each rank."""
    num_workers: int = 2
    """Dataloader worker processes per rank (0: read in the training process)."""
    seed: int = 0
    """Seed of the per-epoch shard shuffle."""
    max_doc_chars: int = 1_000_000
    """Longer documents are split into parts (spaCy's limit) at paragraph or sentence boundaries."""
    allow_pipe: bool = False
    """Allow ``pipe:`` shard URLs, which run a shell command."""
    http_timeout_s: float = 30.0
    """Connect and read timeout of http(s) shards, in seconds (each socket read, not the whole download)."""
    http_deadline_s: float = 600.0
    """How long one http request may wait for the server in all (connecting, the answer, the reads of its
    body; not the time spent between reads), in seconds; past it the request is cut off like a timeout."""
    http_retries: int = 3
    """Retries after a failed or dropped http request."""
    max_skip_ratio: float = 1.0
    """A dataloader worker fails when, at the end of an epoch, it skipped more than this share of its shards
    or documents (1.0: only when it read nothing); above 5% it warns."""
    prefetch_factor: int = 2
    """Batches each dataloader worker prepares ahead of the trainer."""


@dataclass
class AnnotationConfig:
    enabled: bool = True
    """Label facts with spaCy and the paper's rules; off: every token is "other" (runs that need no facts)."""
    labeler: str = "spacy"
    """``spacy``, or ``student:PATH``: a student distilled from spaCy's labels (``lacy-stream distill-labeler``)."""
    student_dtype: str = "auto"
    """A student labels in ``bf16`` (1.3x faster at width 96, 1.6x at 128; its labels differ from fp32's on
    ~0.04% of pieces) or ``fp32``; ``auto``: bf16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX),
    else fp32."""
    spacy_model: str = "en_core_web_sm"
    """A spaCy package name or model directory."""
    batch_size: int = 64
    """Documents per ``nlp.pipe`` batch in each worker."""
    cache: bool = True
    """Write labels through to the label cache so that later epochs skip spaCy."""
    cache_dir: str = ""
    """Label cache root; empty: ``$LACY_CACHE_DIR/labels`` or ``~/.cache/lacy-stream/labels``."""
    audit_ratio: float = 0.02
    """With a student labeler, the share of documents the dataloader workers also label with spaCy, to report
    how well the student agrees (``annotation/student_agreement`` in the metrics); 0: no audit."""
    audit_min_agreement: float = 0.9
    """Warn when the audited agreement falls below this."""


@dataclass
class TokenizerConfig:
    path: str = "shards/demo/tokenizer.model"
    """A SentencePiece model; ``<CALL>`` gets the id after its last piece."""


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """``tiny`` (CPU), ``334m`` or ``1.3b`` (the paper's Table 3)."""
    max_seq_len: int = 0
    """Positions the model can read (its position embeddings); 0: the preset's. The vocabulary always comes
    from the tokenizer (+ <CALL>)."""
    vocab_multiple: int = 128
    """The embedding's rows are the vocabulary rounded up to a multiple of this, for aligned output-projection
    matmuls (padding rows are never a token); 1: no padding, the shape of runs before padding existed."""


@dataclass
class LossConfig:
    method: str = "lacy"
    """One of the paper's Table 5 methods (``lacy_stream.loss.METHODS``; ``lacy-stream train --help``)."""
    call_ratio: float = 0.15
    """Share of each micro-batch's tokens that become ``<CALL>`` targets."""
    ignore_ratio: float = 0.15
    """``lacy_ignore``'s budget: the share of each micro-batch's tokens left out of the loss, remaining facts first."""
    implementation: str = "auto"
    """``auto`` (``chunked`` on CUDA, ``torch`` elsewhere: ``lacy_stream.loss.implementation.AUTO``), ``chunked``
    or ``torch``."""
    reference: str = ""
    """The frozen reference model of ``rho1`` and ``spacy_refloss``: a run directory, checkpoint or Hugging
    Face export of a lacy-stream model with the same tokenizer."""


@dataclass
class OptimizerConfig:
    lr: float = 2e-4
    """Peak learning rate of AdamW, reached after ``warmup_steps``."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay, on matrices and embeddings (not on biases and LayerNorm weights)."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0: no clipping."""
    warmup_steps: int = 2560
    """Steps of linear warmup from 0 to ``lr``."""
    schedule: str = "constant"
    """After warmup: ``constant`` (the paper) or ``cosine`` down to ``min_lr_ratio`` x lr."""
    min_lr_ratio: float = 0.1
    """The ``cosine`` schedule ends at this fraction of ``lr``."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps of the whole run; a resumed run trains until it has made this many."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step over all ranks; a multiple of ranks x batch_size x seq_len (gradient
    accumulation fills the rest). 0: one micro-batch per rank."""
    dtype: str = "auto"
    """Compute dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32`` (with TF32 matmuls on GPU).
    Parameters, gradients and optimizer state are fp32 either way; gradients are reduced in fp32."""
    compile: bool = False
    """``torch.compile`` each transformer block."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them (less memory)."""
    seed: int = 0
    """Seed of the initial weights and of the methods' random choices."""
    run_dir: str = "runs/demo"
    """Where checkpoints, metrics.jsonl, tensorboard logs, the resolved config and the hf/ export go."""
    log_every: int = 10
    """Steps between metric records (and progress lines when stderr is not a terminal)."""
    val_shards: str = ""
    """Held-out shard spec for periodic validation loss (``val/loss`` in the metrics); empty: no validation."""
    val_every: int = 500
    """Steps between validations; the last step is validated too."""
    val_batches: int = 20
    """Held-out micro-batches of each validation, the same ones every time."""
    probe_windows: int = 0
    """Windows of the first validation micro-batch whose per-token losses and call decisions every validation
    records in run_dir/probes (loss trajectories, plotted by compare); 0: none."""


@dataclass
class CheckpointConfig:
    every: int = 500
    """Steps between checkpoints; the last step is saved too."""
    keep: int = 3
    """How many of the newest checkpoints to keep; older ones are deleted."""
    resume: bool = True
    """Continue from the newest checkpoint in ``train.run_dir`` when there is one."""
    export_hf: bool = True
    """Export the final model in the Hugging Face GPT-2 format."""
    allow_config_change: bool = False
    """Resume even when the settings that define the run (model, tokenizer, loss, data, optimizer) differ from
    those it was started with (``lacy_stream.trainer.run_directory.FIXED_ON_RESUME``)."""


@dataclass
class MetricsConfig:
    wandb: bool = False
    """Mirror metrics.jsonl and the validation samples to Weights & Biases (needs ``pip install
    'lacy-stream[tracking]'``); tensorboard and metrics.jsonl are written either way."""
    wandb_project: str = "lacy-stream"
    """The W&B project of the run."""
    wandb_entity: str = ""
    """The W&B team or user; empty: your default entity."""
    wandb_run_name: str = ""
    """The run's name in W&B; empty: the name of ``train.run_dir``."""
    wandb_mode: str = ""
    """``online``, ``offline`` (files under ``train.run_dir``/wandb, ``wandb sync`` uploads them later); empty:
    ``$WANDB_MODE``, else online."""


@dataclass
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# Values that are checked beyond their type: (section, key) -> allowed choices or (low, high) bounds.
_CHOICES = {
    ("optimizer", "schedule"): ("constant", "cosine"),
    ("train", "dtype"): ("auto", "bf16", "fp32"),
    ("annotation", "student_dtype"): ("auto", "bf16", "fp32"),
}
_POSITIVE = {("data", "seq_len"), ("data", "batch_size"), ("data", "max_doc_chars"), ("annotation", "batch_size"),
             ("model", "vocab_multiple"),
             ("train", "steps"), ("train", "log_every"), ("train", "val_every"), ("train", "val_batches"),
             ("checkpoint", "every"), ("checkpoint", "keep"), ("optimizer", "lr")}
_NON_NEGATIVE = {("data", "num_workers"), ("model", "max_seq_len"), ("optimizer", "weight_decay"),
                 ("optimizer", "grad_clip"), ("optimizer", "warmup_steps"), ("train", "global_batch_tokens"),
                 ("train", "probe_windows")}
_FRACTIONS = {("optimizer", "beta1"), ("optimizer", "beta2"), ("optimizer", "min_lr_ratio")}
_CLOSED_FRACTIONS = {("loss", "call_ratio"), ("loss", "ignore_ratio"), ("data", "max_skip_ratio"),
                     ("annotation", "audit_ratio"), ("annotation", "audit_min_agreement")}  # may be 1


def validate(config: JobConfig) -> None:
    """Value checks that types alone do not catch; raises ConfigError naming the key."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for item in dataclasses.fields(values):
            key = (section.name, item.name)
            value = getattr(values, item.name)
            name = f"{section.name}.{item.name}"
            if key in _CHOICES and value not in _CHOICES[key]:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(_CHOICES[key])}")
            if key in _POSITIVE and not value > 0:
                raise ConfigError(f"{name}: must be positive, got {value!r}")
            if key in _NON_NEGATIVE and value < 0:
                raise ConfigError(f"{name}: must not be negative, got {value!r}")
            if key in _FRACTIONS and not 0 <= value < 1:
                raise ConfigError(f"{name}: must be in [0, 1), got {value!r}")
            if key in _CLOSED_FRACTIONS and not 0 <= value <= 1:
                raise ConfigError(f"{name}: must be in [0, 1], got {value!r}")


def load_job_config(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    raw: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(resolve_config_path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found; shipped run configs: {', '.join(run_config_names())}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    for section, key, text in parse_overrides(overrides):
        raw.setdefault(section, {})[key] = _parse_value(text, _field_type(JobConfig, section, key))
    config = build_dataclass(JobConfig, raw, "")
    validate(config)
    return config


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it exists, else the shipped run config it names (``tiny_cpu`` or ``tiny_cpu.toml``)."""
    path = Path(path)
    if path.exists() or len(path.parts) != 1:
        return path
    return RUN_CONFIGS / (path.name if path.suffix == ".toml" else f"{path.name}.toml")  # "1.3b" has a dot


def run_config_names() -> list[str]:
    return sorted(config.stem for config in RUN_CONFIGS.glob("*.toml"))


@dataclass(frozen=True)
class ConfigKey:
    """One key of the job config, as ``--help`` lists it."""

    name: str
    """``section.key``, as an override names it."""
    type: str
    value: object
    """Its value in the config described."""
    meaning: str
    """The first sentence of the key's docstring in this module."""


def config_keys(config: JobConfig | None = None) -> list[ConfigKey]:
    """Every key in file order, with its value in ``config`` (default: the dataclass defaults)."""
    config = config if config is not None else JobConfig()
    docstrings = _attribute_docstrings()
    keys = []
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        hints = typing.get_type_hints(type(values))
        for item in dataclasses.fields(values):
            meaning = _first_sentence(docstrings.get((type(values).__name__, item.name), ""))
            keys.append(ConfigKey(f"{section.name}.{item.name}", hints[item.name].__name__, getattr(values, item.name),
                                  meaning))
    return keys


@functools.cache
def _attribute_docstrings() -> dict[tuple[str, str], str]:
    """(class name, attribute name) -> the string literal under the attribute in this module's source."""
    docstrings = {}
    for node in ast.parse(Path(__file__).read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for statement, following in zip(node.body, node.body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docstrings[node.name, statement.target.id] = following.value.value
    return docstrings


def _first_sentence(docstring: str) -> str:
    """The docstring's first sentence on one line, its ``literals`` as plain text."""
    text = re.sub(r"``(.+?)``", r"\1", " ".join(inspect.cleandoc(docstring).split()))
    return re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0]


def config_toml(config: JobConfig) -> str:
    """``config`` as a TOML job file that loads back to the same config (``--print-config``)."""
    tables = []
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        lines = [f"{item.name} = {toml_value(getattr(values, item.name))}" for item in dataclasses.fields(values)]
        tables.append("\n".join([f"[{section.name}]", *lines]))
    return "\n\n".join(tables) + "\n"


def toml_value(value: object) -> str:
    """A config value as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # floats included: 0.0002, 1e-08, inf and nan are TOML too
    if isinstance(value, str):
        # JSON's escapes are TOML's; TOML also wants DEL escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise TypeError(f"no TOML literal for {value!r}")


def parse_overrides(arguments: list[str]) -> list[tuple[str, str, str]]:
    """``["--data.seq_len=128", "--data.shards", "x"]`` -> ``[("data", "seq_len", "128"), ("data", "shards", "x")]``."""
    parsed = []
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if not argument.startswith("--") or "." not in argument.partition("=")[0]:
            raise ConfigError(f"expected an override --section.key=value, got {argument!r}")
        name, has_value, text = argument[2:].partition("=")
        if not has_value:
            if index + 1 >= len(arguments):
                raise ConfigError(f"override --{name} has no value")
            index += 1
            text = arguments[index]
        section, _, key = name.partition(".")
        parsed.append((section, key, text))
        index += 1
    return parsed


def _field_type(cls: type, section: str, key: str) -> object:
    section_type = typing.get_type_hints(cls).get(section)
    if section_type is None or not dataclasses.is_dataclass(section_type):
        return None
    return typing.get_type_hints(section_type).get(key)


def _parse_value(text: str, kind: object) -> object:
    """A TOML value; for string fields an unquoted text is the string itself (``--data.shards=a/b``)."""
    if kind is str and not text.startswith(('"', "'")):
        return text
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def build_dataclass(cls: type, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where or 'top level'}]; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        qualified = f"{where}.{name}" if where else name
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = build_dataclass(kind, value, qualified)
        else:
            values[name] = _check_type(value, kind, qualified)
    return cls(**values)


def _check_type(value: object, kind: object, name: str) -> object:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            if option is type(None) and value is None:
                return None
            try:
                return _check_type(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} is not a {kind}")
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_check_type(item, item_kind, f"{name}[]") for item in value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value
