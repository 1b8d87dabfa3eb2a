"""``train`` and ``demo``: LaCy pretraining from a job config, and the whole job on the embedded demo corpus."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..config.job_config import JobConfig, load_job_config, parse_overrides
from ..inference.call_policy import DEFAULT_CALL_RATE, DEFAULT_POLICY, policy_from_name
from ..shards.make_shards import HELDOUT_DIRECTORY
from ..shards.specs import MANIFEST_NAME
from .exit_status import EXIT_INTERRUPTED
from .shards import document_texts

DEMO_CONFIG = "tiny_cpu"
DEMO_DIR = Path("shards/demo")
DEMO_HELDOUT_DOCS = 8
"""The demo corpus's last articles, held out (``train.val_shards`` of tiny_cpu)."""
DEMO_VOCAB_SIZE = 8000
SAMPLE_PROMPT = "Alabama is a state"
SAMPLE_TOKENS = 32
TOUR_TEXT = "Marie Curie was born in Warsaw in 1867."
BASELINE_STEPS = 50
"""Steps of the tour's baseline: enough for ``compare`` to score it."""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Pretrain with the LaCy loss. Any config value can be overridden with --section.key=value; "
                          "--loss.method picks one of the methods below.")
    parser.epilog = _methods_epilog()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", help="a TOML job config, or a shipped run config's name (tiny_cpu, 334m, ...)")


def _methods_epilog() -> str:
    from ..loss.masks import METHODS

    with_reference = " and ".join(name for name, method in METHODS.items() if method.needs_reference)
    lines = [f"methods (--loss.method=NAME; {with_reference} need --loss.reference=RUN):"]
    for method in METHODS.values():
        ignore = f"; ignore: {method.ignore_mask}" if method.ignore_mask != "none" else ""
        lines.append(f"  {method.name:<17} call: {method.call_mask}{ignore}")
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    from ..trainer.train import train

    summary = train(load_job_config(args.config, args.overrides))
    print(json.dumps(summary))
    return _interrupted(summary) if summary["interrupted"] else 0


def _interrupted(summary: dict) -> int:
    """Tells on stderr that training stopped on a signal and that the same command continues it."""
    signal_name = summary["stop_signal"]
    if summary["step"] == summary["first_step"]:
        done = f"stopped on {signal_name} before training a step (nothing new to save)"
    else:
        done = f"stopped on {signal_name} after saving the checkpoint of step {summary['checkpoint_step']}"
    print(f"lacy-stream: {done}; run the same command to continue (exit status {EXIT_INTERRUPTED})", file=sys.stderr)
    return EXIT_INTERRUPTED


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        f"The main job on the embedded demo corpus: builds the demo shards in {DEMO_DIR} (gensim's English Wikipedia "
        f"excerpt, its last {DEMO_HELDOUT_DOCS} articles held out in {DEMO_DIR / HELDOUT_DIRECTORY}) and an "
        f"{DEMO_VOCAB_SIZE:,}-piece tokenizer, trains the tiny model with LaCy, then prints the losses on the "
        "held-out articles, a cascade sample and the commands to try next. Run it again to resume (raise "
        "--train.steps to train on). Any config key can be set with --section.key=value (the list below)."
    )
    parser.add_argument("--config", help=f"a TOML job config or a shipped run config's name (default: {DEMO_CONFIG})")


def run_demo(args: argparse.Namespace) -> int:
    from ..trainer.train import train

    config = load_job_config(args.config or DEMO_CONFIG, args.overrides)
    _build_demo_data(config)
    print(f"training the {config.model.preset} model with {config.loss.method} to step {config.train.steps} in "
          f"{config.train.run_dir} (spaCy annotates in {config.data.num_workers} dataloader workers)", flush=True)
    summary = train(config)
    if summary["interrupted"]:
        return _interrupted(summary)
    run_dir = Path(summary["run_dir"])
    _print_losses(run_dir, config.train.val_shards)
    print(f"checkpoints: {run_dir / 'checkpoints'}\nmetrics:     {run_dir / 'metrics.jsonl'} "
          f"(tensorboard --logdir {run_dir / 'tensorboard'})")
    if summary["hf_dir"]:
        print(f"model:       {summary['hf_dir']} (Hugging Face GPT-2 + tokenizer)")
        _print_cascade_sample(run_dir, f"hf:{summary['hf_dir']}")
    print("\nnext:")
    for purpose, command in tour_commands(args.config, args.overrides, config, summary["hf_dir"]):
        print(f"  # {purpose}\n  {command}")
    return 0


def _build_demo_data(config: JobConfig) -> None:
    """The demo shards, their held-out split and a tokenizer, where the config reads them and they are missing."""
    from ..data.loader import stream_options
    from ..shards.make_shards import make_shards
    from ..tokenizer import train_tokenizer

    if config.data.shards == str(DEMO_DIR) and not all(
        (directory / MANIFEST_NAME).exists() for directory in (DEMO_DIR, DEMO_DIR / HELDOUT_DIRECTORY)
    ):
        print(f"building the demo shards (gensim's English Wikipedia excerpt) in {DEMO_DIR}, the last "
              f"{DEMO_HELDOUT_DOCS} articles held out in {DEMO_DIR / HELDOUT_DIRECTORY}")
        make_shards([], DEMO_DIR, docs_per_shard=16, demo=True, prefix="wiki", heldout_docs=DEMO_HELDOUT_DOCS)
    tokenizer_path = Path(config.tokenizer.path)
    if not tokenizer_path.exists():
        print(f"training a {DEMO_VOCAB_SIZE}-piece SentencePiece tokenizer on {config.data.shards} -> {tokenizer_path}")
        texts = document_texts(config.data.shards, stream_options(config.data))
        train_tokenizer(texts, tokenizer_path, DEMO_VOCAB_SIZE)


def _print_losses(run_dir: Path, val_shards: str) -> None:
    """The last logged training losses and, with held-out shards, the last validation against the first."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = next(record for record in reversed(records) if "loss" in record)
    print(f"step {last['step']}: loss {last['loss']:.3f}, non-call loss {last['noncall_loss']:.3f}, "
          f"call ratio {last['call_ratio']:.3f}, fact ratio {last['fact_ratio']:.3f}, "
          f"{last['tokens_per_s']:.0f} tokens/s, data wait {last['data_wait_share']:.0%} of the step time")
    validations = [record for record in records if "val/loss" in record]
    if validations:
        first, latest = validations[0], validations[-1]
        earlier = f" (step {first['step']}: {first['val/loss']:.3f})" if first is not latest else ""
        print(f"held out ({val_shards}): val/loss {latest['val/loss']:.3f} at step {latest['step']}{earlier}, "
              f"non-call {latest['val/noncall_loss']:.3f}, call {latest['val/call_loss']:.3f}")


def _print_cascade_sample(run_dir: Path, partner: str) -> None:
    """What ``generate`` prints for the tour's command: the model's calls answered by its own export."""
    from ..inference.generate import generate, render
    from ..inference.loading import load_lacy
    from ..inference.partners import Cascade, partner_from_spec
    from .inference import generation_summary

    lacy = load_lacy(run_dir)
    policy = policy_from_name(DEFAULT_POLICY, lacy.tokenizer, DEFAULT_CALL_RATE)
    generation = generate(lacy.model, lacy.tokenizer, SAMPLE_PROMPT, policy,
                          delegate=Cascade(partner_from_spec(partner), lacy.tokenizer), max_new_tokens=SAMPLE_TOKENS)
    print(f"\na cascade sample: the {DEFAULT_POLICY} policy calls at {DEFAULT_CALL_RATE:.0%} of the steps, {partner} "
          "answers, [[its tokens]] marked:")
    print(render(generation, lacy.tokenizer, color=sys.stdout.isatty()))
    print(generation_summary(generation))


def tour_commands(
    config_name: str | None, overrides: list[str], config: JobConfig, hf_dir: str | None
) -> list[tuple[str, str]]:
    """The commands of the README's tour for this run, each after what it shows: they read its run directory and
    held-out shards, and the baseline is trained with the same config and overrides."""
    run_dir = config.train.run_dir
    heldout = config.train.val_shards or config.data.shards
    baseline = f"{run_dir}-baseline"
    given = [(f"{section}.{key}", text) for section, key, text in parse_overrides(overrides)]

    def overrides_but(*names: str) -> list[str]:
        return [f"--{name}={text}" for name, text in given if name not in names]

    steps = config.train.steps
    cascade = ["--cascade", f"hf:{hf_dir}"] if hf_dir else []
    return [
        ("the words the fact rules mark", shlex.join(["lacy-stream", "annotate", "--text", TOUR_TEXT])),
        ("the sample above; try your own --prompt",
         shlex.join(["lacy-stream", "generate", "--ckpt", run_dir, *cascade, "--prompt", SAMPLE_PROMPT,
                     "--max-new-tokens", str(SAMPLE_TOKENS)])),
        (f"call and non-call loss on held-out text -> {run_dir}/eval/report.md",
         shlex.join(["lacy-stream", "eval", "--ckpt", run_dir, "--out", f"{run_dir}/eval", "--heldout", heldout,
                     "--sections", "validation", "--limit", "8"])),
        ("the same model trained without calls, for compare",
         shlex.join(["lacy-stream", "train", "--config", config_name or DEMO_CONFIG,
                     *overrides_but("loss.method", "train.run_dir", "train.steps"), "--loss.method=baseline",
                     f"--train.run_dir={baseline}", f"--train.steps={min(BASELINE_STEPS, steps)}"])),
        (f"both runs on the same held-out windows -> {run_dir}-compare/comparison.md",
         shlex.join(["lacy-stream", "compare", "--runs", run_dir, baseline, "--val-shards", heldout,
                     "--out", f"{run_dir}-compare", "--batches", "2"])),
        (f"train on: resumes from step {steps}",
         shlex.join(["lacy-stream", "demo", *(["--config", config_name] if config_name else []),
                     *overrides_but("train.steps"), f"--train.steps={2 * steps}"])),
    ]
