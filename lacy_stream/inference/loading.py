"""Load a trained LaCy model and its tokenizer for inference and evaluation.

``load_lacy(path)`` accepts any of what a training run leaves behind:

* a Hugging Face export directory (``run_dir/hf``: ``config.json``, ``model.safetensors`` and our
  ``sentencepiece.model``), read without transformers and without unpickling;
* a run directory: its ``hf`` export, or its latest complete checkpoint when there is no export or the
  checkpoint is newer;
* one checkpoint directory (``run_dir/checkpoints/step-00001200``), whose model weights are read with DCP
  on one process; the architecture and tokenizer come from the run's resolved ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..checkpoint import (
    COMPLETE_MARKER,
    CheckpointManager,
    SafeFileSystemReader,
    check_model_fits,
    reading_checkpoint,
    single_process_quietly,
)
from ..models.hf_export import SENTENCEPIECE_FILE, WEIGHTS_FILE, state_dict_from_gpt2
from ..models.gpt2 import ModelArgs, Transformer, model_args
from ..tokenizer import Tokenizer

HF_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")  # both are GPT-2's tanh GELU, which our MLP computes


@dataclasses.dataclass
class LacyModel:
    model: Transformer
    tokenizer: Tokenizer
    source: Path

    @property
    def call_id(self) -> int:
        return self.tokenizer.call_id

    @property
    def device(self) -> torch.device:
        return self.model.output_weight.device


def load_lacy(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LacyModel:
    """The model at ``path`` (see the module docstring) in eval mode on ``device``."""
    source = resolve_model_path(Path(path))
    if (source / WEIGHTS_FILE).is_file():
        model, tokenizer = _from_hf_export(source)
    else:
        model, tokenizer = _from_checkpoint(source, run_dir=source.parent.parent)
    model.to(device=device, dtype=dtype).eval()
    return LacyModel(model=model, tokenizer=tokenizer, source=source)


def resolve_model_path(path: Path) -> Path:
    """The export or checkpoint directory ``path`` stands for.

    For a run directory: its ``hf`` export, unless a checkpoint was completed after it (a run resumed for
    more steps and stopped before its new export), in which case that checkpoint.
    """
    if (path / WEIGHTS_FILE).is_file() or (path / COMPLETE_MARKER).is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    export = path / "hf" / WEIGHTS_FILE
    checkpoints = CheckpointManager(path)
    step = checkpoints.latest()
    checkpoint = checkpoints.path(step) if step is not None else None
    if checkpoint is not None and (
        not export.is_file() or (checkpoint / COMPLETE_MARKER).stat().st_mtime > export.stat().st_mtime
    ):
        return checkpoint
    if export.is_file():
        return export.parent
    raise FileNotFoundError(
        f"{path} is neither a Hugging Face export ({WEIGHTS_FILE}), a checkpoint directory ({COMPLETE_MARKER}) "
        "nor a run directory with an hf/ export or complete checkpoints"
    )


def tokenizer_path_of(path: str | Path) -> Path:
    """The SentencePiece model of the model at ``path`` (as :func:`load_lacy` reads it), without its weights."""
    source = resolve_model_path(Path(path))
    if (source / WEIGHTS_FILE).is_file():
        return source / SENTENCEPIECE_FILE
    return Path(_run_config(source.parent.parent)["tokenizer"]["path"])


def _run_config(run_dir: Path) -> dict:
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} missing: a checkpoint is read with its run's resolved config")
    return json.loads(config_path.read_text())


def check_loadable(path: str | Path) -> None:
    """Everything :func:`load_lacy` would refuse in the files at ``path`` (a checkpoint index that is not DCP's
    own or would unpickle an object, tensors of another shape, weights that are not a safetensors file), found
    without reading the weights: for a caller that hands the path to other processes."""
    source = resolve_model_path(Path(path))
    if (source / WEIGHTS_FILE).is_file():
        _safetensors_header(source / WEIGHTS_FILE)
        return
    args, _ = _checkpoint_args(source.parent.parent)
    with torch.device("meta"):
        state = {f"model.{name}": tensor for name, tensor in Transformer(args).state_dict().items()}
    check_model_fits(SafeFileSystemReader.checked(source), state, source)


def _safetensors_header(path: Path) -> None:
    """Refuses ``path`` unless it is a safetensors file (a format of raw tensors that nothing executes)."""
    try:
        with safe_open(str(path), framework="pt") as weights:
            weights.keys()
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a safetensors file ({error}); refusing to load it") from None


def _from_hf_export(directory: Path) -> tuple[Transformer, Tokenizer]:
    _safetensors_header(directory / WEIGHTS_FILE)
    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") != "gpt2":
        raise ValueError(f"{directory} holds a {config.get('model_type')!r} model, not an exported GPT-2")
    if config.get("activation_function") not in HF_ACTIVATIONS:
        raise ValueError(f"{directory}: activation {config.get('activation_function')!r} is not GPT-2's tanh GELU")
    tokenizer_path = directory / SENTENCEPIECE_FILE
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} missing: export the model with lacy-stream to keep its tokenizer")
    args = ModelArgs(
        dim=config["n_embd"],
        n_heads=config["n_head"],
        n_layers=config["n_layer"],
        vocab_size=config["vocab_size"],
        max_seq_len=config["n_positions"],
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        vocab_multiple=1,  # exports hold the real vocabulary, without padding rows
    )
    model = _empty_model(args)
    state = state_dict_from_gpt2(load_file(str(directory / WEIGHTS_FILE)), args.n_layers)
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    return model, _matching_tokenizer(tokenizer_path, args)


def _checkpoint_args(run_dir: Path) -> tuple[ModelArgs, Path]:
    """The architecture of a run's checkpoints and its tokenizer, from the run's resolved ``config.json``."""
    config = _run_config(run_dir)
    tokenizer_path = Path(config["tokenizer"]["path"])
    # Runs from before the padded vocabulary have no vocab_multiple in their config: their embedding is unpadded.
    overrides = {"vocab_size": Tokenizer(tokenizer_path).vocab_size,
                 "vocab_multiple": config["model"].get("vocab_multiple", 1)}
    if config["model"].get("max_seq_len"):
        overrides["max_seq_len"] = config["model"]["max_seq_len"]
    return model_args(config["model"]["preset"], **overrides), tokenizer_path


def _from_checkpoint(checkpoint: Path, *, run_dir: Path) -> tuple[Transformer, Tokenizer]:
    args, tokenizer_path = _checkpoint_args(run_dir)
    model = _empty_model(args)
    # The trainer checkpoints its TrainingModule, which holds the transformer as ``model``. DCP loads in
    # place, into the state dict's tensors, which share their storage with the parameters.
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    reader = SafeFileSystemReader.checked(checkpoint)
    check_model_fits(reader, state, checkpoint)
    with reading_checkpoint(checkpoint), single_process_quietly():
        dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return model, _matching_tokenizer(tokenizer_path, args)


def _empty_model(args: ModelArgs) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    return model.to_empty(device="cpu")


def _matching_tokenizer(path: Path, args: ModelArgs) -> Tokenizer:
    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size != args.vocab_size:
        raise ValueError(f"tokenizer {path} has {tokenizer.vocab_size} ids with <CALL>, the model {args.vocab_size}")
    return tokenizer
