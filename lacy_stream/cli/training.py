"""``train`` and ``demo``: LaCy pretraining from a job config, and the whole job on the embedded demo corpus."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config.job_config import RUN_CONFIGS, load_job_config
from .exit_status import EXIT_INTERRUPTED
from .shards import document_texts

DEMO_DIR = Path("shards/demo")
DEMO_VOCAB_SIZE = 8000


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
    parser.add_argument("--config", help="a TOML job config or a shipped run config's name (default: tiny_cpu)")


def run_demo(args: argparse.Namespace) -> int:
    from ..data.loader import stream_options
    from ..shards.make_shards import make_shards
    from ..tokenizer import train_tokenizer
    from ..trainer.train import train

    config = load_job_config(args.config or RUN_CONFIGS / "tiny_cpu.toml", args.overrides)
    shards = Path(config.data.shards)
    if config.data.shards == str(DEMO_DIR) and not (shards / "manifest.json").exists():
        print(f"building the demo shards (gensim's English Wikipedia excerpt) in {shards}")
        make_shards([], shards, docs_per_shard=16, demo=True, prefix="wiki")
    tokenizer_path = Path(config.tokenizer.path)
    if not tokenizer_path.exists():
        print(f"training a {DEMO_VOCAB_SIZE}-piece SentencePiece tokenizer on {config.data.shards} -> {tokenizer_path}")
        texts = document_texts(config.data.shards, stream_options(config.data))
        train_tokenizer(texts, tokenizer_path, DEMO_VOCAB_SIZE)
    print(f"training the {config.model.preset} model with {config.loss.method} for {config.train.steps} steps "
          f"(spaCy annotates in {config.data.num_workers} dataloader workers)")
    summary = train(config)
    if summary["interrupted"]:
        return _interrupted(summary)
    run_dir = Path(summary["run_dir"])
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    print(json.dumps(summary))
    print(f"last logged step {last['step']}: loss {last['loss']:.3f}, non-call loss {last['noncall_loss']:.3f}, "
          f"call ratio {last['call_ratio']:.3f}, fact ratio {last['fact_ratio']:.3f}, "
          f"{last['tokens_per_s']:.0f} tokens/s, data wait {last['data_wait_share']:.0%} of the step time")
    print(f"checkpoints: {run_dir / 'checkpoints'}\nmetrics:     {run_dir / 'metrics.jsonl'} "
          f"(tensorboard --logdir {run_dir / 'tensorboard'})")
    if summary["hf_dir"]:
        print(f"model:       {summary['hf_dir']} (Hugging Face GPT-2 + tokenizer)")
    return 0
