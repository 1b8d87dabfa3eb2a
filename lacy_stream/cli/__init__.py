"""The ``lacy-stream`` command line.

Exit statuses (docs/operations.md): 0 done; 1 an error, named on stderr; 2 the arguments or the config
were not understood (argparse's errors, ``UsageError``, ``ConfigError``); 65 (EX_DATAERR) no usable document was read, or more was skipped than
``--max-skip-ratio`` allows; 75 (EX_TEMPFAIL) training stopped on SIGTERM after saving a checkpoint, so the
same command continues it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from .. import logs, stop_signals
from ..bench import gpu_check
from ..config.job_config import ConfigError, config_toml, load_job_config
from ..shards.documents import TooManySkipsError
from ..shards.make_shards import ShardInputError
from ..shards.streams import PipeNotAllowedError, ShardOpenError
from . import annotate, bench, environment, evaluation, inference, shards, training
from .arguments import add_job_config_options
from .exit_status import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TOO_MANY_SKIPS, EXIT_USAGE, UsageError

__all__ = ["COMMANDS", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_TOO_MANY_SKIPS", "EXIT_USAGE", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace], int]
    """The handler: returns the exit status; imports the modules it needs itself, to keep the start fast."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    help: str
    takes_config_overrides: bool = False
    """``--section.key=value`` arguments may follow: the command reads a job config (``--config``), lists its keys
    in ``--help`` and prints it resolved with ``--print-config``."""
    default_config: str | None = None
    """The job config read without ``--config``; None: the defaults of ``JobConfig``."""
    saves_on_stop_signals: bool = False
    """SIGTERM and SIGINT save a checkpoint and exit with ``EXIT_INTERRUPTED``; other commands stop at once."""


@dataclass(frozen=True)
class CommandGroup:
    help: str
    commands: dict[str, Command]


COMMANDS: dict[str, Command | CommandGroup] = {
    "make-shards": Command(
        shards.run_make_shards, shards.add_make_shards_arguments,
        "build webdataset shards from jsonl, jsonl.zst, parquet, hf: or --demo",
    ),
    "train-tokenizer": Command(
        shards.run_train_tokenizer, shards.add_train_tokenizer_arguments, "train a SentencePiece tokenizer on shards"
    ),
    "inspect": Command(
        shards.run_inspect, shards.add_inspect_arguments,
        "read shards as the trainer would and count documents, tokens, skips",
    ),
    "demo": Command(
        training.run_demo, training.add_demo_arguments,
        "the main job on the embedded default: demo shards and tokenizer, then a tiny LaCy training run",
        takes_config_overrides=True, default_config=training.DEMO_CONFIG,
    ),
    "train": Command(
        training.run_train, training.add_train_arguments, "pretrain with the LaCy loss (one process, or under torchrun)",
        takes_config_overrides=True, saves_on_stop_signals=True,
    ),
    "annotate": Command(
        annotate.run_annotate, annotate.add_annotate_arguments,
        "label facts: --text (highlighted), --input jsonl, or --shards offline",
    ),
    "distill-labeler": Command(
        annotate.run_distill_labeler, annotate.add_distill_labeler_arguments,
        "train a student fact labeler on spaCy's labels (see docs/benchmarks.md)",
    ),
    "generate": Command(
        inference.run_generate, inference.add_generate_arguments,
        "greedy generation, calls answered by a cascade partner (partner tokens highlighted)",
    ),
    "eval": Command(
        evaluation.run_eval, evaluation.add_eval_arguments,
        "evaluate a model into report.json, .md and .html: losses, NLU, acceptability, fact leakage, FactScore",
    ),
    "compare": Command(
        evaluation.run_compare, evaluation.add_compare_arguments,
        "finished runs of several methods side by side on the same held-out windows",
    ),
    "bench": CommandGroup("benchmarks", {
        "annotate": Command(
            bench.run_bench_annotate, bench.add_bench_annotate_arguments,
            "annotation throughput per core, scaling over workers, cache",
        ),
        "stream": Command(
            bench.run_bench_stream, bench.add_bench_stream_arguments, "loader throughput: shards -> packed batches",
            takes_config_overrides=True,
        ),
        "loss": Command(
            bench.run_bench_loss, bench.add_bench_loss_arguments,
            "the LaCy loss implementations side by side: time, peak memory, multiple of the matmul floor",
        ),
        "gpu": Command(
            bench.run_bench_gpu, gpu_check.add_arguments,
            "every GPU figure: kernel correctness and speed, training throughput (report)",
        ),
    }),
    "info": Command(
        environment.run_info, environment.add_info_arguments,
        "versions of torch, CUDA, triton, spaCy and its model, transformers; the GPU; the label cache's path and size",
    ),
    "cache": CommandGroup("the label cache", {
        "clear": Command(
            environment.run_cache_clear, environment.add_cache_arguments,
            "delete the label cache's entries (spaCy labels and reference losses): later runs label again",
        ),
    }),
}
"""Every command (and the commands of each group) in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lacy-stream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    _add_commands(parser, COMMANDS, dest="command")
    return parser


def _add_commands(parser: argparse.ArgumentParser, commands: dict[str, Command | CommandGroup], *, dest: str) -> None:
    subparsers = parser.add_subparsers(dest=dest, required=True)
    for name, command in commands.items():
        subparser = subparsers.add_parser(name, help=command.help)
        if isinstance(command, CommandGroup):
            _add_commands(subparser, command.commands, dest=name)
        else:
            command.add_arguments(subparser)
            if command.takes_config_overrides:
                add_job_config_options(subparser, command.default_config)
            subparser.set_defaults(chosen_command=command, command_parser=subparser)
        # -v also after the command's name
        subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    command: Command = args.chosen_command
    if not command.saves_on_stop_signals:
        stop_signals.restore_defaults()
    if overrides and not command.takes_config_overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    logs.configure(logging.INFO if args.verbose else logging.WARNING)
    if not args.verbose:  # Hugging Face's bars, transformers' "Loading weights" included; read when it is imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        if getattr(args, "print_config", False):
            print(config_toml(load_job_config(args.config or command.default_config, overrides)), end="")
            status = 0
        else:
            status = command.run(args)
    except UsageError as error:
        args.command_parser.error(str(error))
    except ConfigError as error:
        print(f"lacy-stream: config error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except TooManySkipsError as error:
        _fail(EXIT_TOO_MANY_SKIPS, str(error), verbose=args.verbose)
    except PipeNotAllowedError as error:
        _fail(EXIT_ERROR, f"{error}{_pipe_opt_in(args)}", verbose=args.verbose)
    except (ShardOpenError, ShardInputError) as error:  # nothing to read: no usable document
        _fail(EXIT_TOO_MANY_SKIPS, str(error), verbose=args.verbose)
    except (ValueError, OSError) as error:
        _fail(EXIT_ERROR, str(error), verbose=args.verbose)
    sys.exit(status)


def _pipe_opt_in(args: argparse.Namespace) -> str:
    """How this command allows ``pipe:`` sources, if it can."""
    if hasattr(args, "allow_pipe"):
        return "; allow them with --allow-pipe"
    if hasattr(args, "config"):  # commands that take a job config
        return "; allow them with --data.allow_pipe=true"
    return ""


def _fail(status: int, message: str, *, verbose: bool) -> None:
    """Exit with ``status``; the message is the last line, after the traceback when ``verbose``."""
    if verbose:
        traceback.print_exc()
    hint = "" if verbose else " (rerun with -v for the traceback)"
    print(f"lacy-stream: error: {message}{hint}", file=sys.stderr)
    sys.exit(status)
