"""Options shared by the commands that read shards, and by those that read a job config."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import textwrap

from ..config.job_config import DataConfig, config_keys, load_job_config, toml_value
from ..shards.documents import SKIP_WARNING_RATIO
from ..shards.streams import StreamOptions
from .exit_status import EXIT_TOO_MANY_SKIPS

CALL_PIECES_HELP = ("pieces one call appends at most (default: all the pieces of the partner's token, as Appendix "
                    "A.5 does; with Llama 3.2 that was never more than three)")


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """``--shards`` and how its documents are read and counted."""
    parser.add_argument("--shards", required=True, help="shard URL spec (file, directory, brace range, http(s)://, ::)")
    add_url_options(parser)
    parser.add_argument("--max-doc-chars", type=int, default=DataConfig.max_doc_chars)
    add_max_skip_ratio(parser)


def add_url_options(parser: argparse.ArgumentParser) -> None:
    """The options of every command that reads shard URLs, with the trainer's defaults."""
    parser.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (runs a shell command)")
    parser.add_argument("--http-timeout", type=float, default=DataConfig.http_timeout_s, metavar="SECONDS",
                        help="connect and read timeout of http(s) shards (default: %(default)s)")
    parser.add_argument("--http-deadline", type=float, default=DataConfig.http_deadline_s, metavar="SECONDS",
                        help="how long one http request may wait for the server in all (default: %(default)s)")
    parser.add_argument("--http-retries", type=int, default=DataConfig.http_retries,
                        help="retries after a failed or dropped http request (default: %(default)s)")


def add_max_skip_ratio(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-skip-ratio", type=_share, default=DataConfig.max_skip_ratio, metavar="R",
        help=f"exit with status {EXIT_TOO_MANY_SKIPS} when more than this share of the shards or documents was "
             f"skipped (default: %(default)s, only when nothing was read); above {SKIP_WARNING_RATIO * 100:g}%% a warning",
    )


def positive_count(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    return _count(text, 1)


def count(text: str) -> int:
    """An argparse type: a whole number of at least 0."""
    return _count(text, 0)


def weight(text: str) -> float:
    """An argparse type: a finite number of at least 0."""
    return _number_within(text, 0, sys.float_info.max, "a number of at least 0")


def dropout_share(text: str) -> float:
    """An argparse type: a share of at least 0 and below 1."""
    return _number_within(text, 0, math.nextafter(1, 0), "a share of at least 0 and below 1")


def _count(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of at least {least}")
    return value


def _share(text: str) -> float:
    return _number_within(text, 0, 1, "a share between 0 and 1")


def _number_within(text: str, least: float, most: float, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not least <= value <= most:
        raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value


def stream_options_from_arguments(args: argparse.Namespace) -> StreamOptions:
    """How to open shard URLs, as :func:`add_url_options`' options say."""
    return StreamOptions(
        timeout_s=args.http_timeout, deadline_s=args.http_deadline, retries=args.http_retries,
        allow_pipe=args.allow_pipe,
    )


def add_job_config_options(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """``--print-config``, and every config key with its type, value and meaning after the command's own epilog;
    ``default_config`` is the config the command reads without ``--config`` (None: the defaults)."""
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (--config with the overrides applied) as TOML and exit")
    # The raw formatter keeps the key list's layout; the description is filled as argparse would.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if parser.description:
        parser.description = textwrap.fill(parser.description, _help_width())
    parser.epilog = "\n\n".join(text for text in (parser.epilog, config_keys_help(default_config)) if text)


def config_keys_help(default_config: str | None) -> str:
    """Every config key as an override with its value in ``default_config`` (or its default), type and meaning."""
    width = _help_width()
    values = f"its value in {default_config}" if default_config else "its default"
    lines = [f"config keys, each with {values} (a --section.key=value override replaces the --config file's):"]
    for key in config_keys(load_job_config(default_config) if default_config else None):
        lines.append(f"  --{key.name}={toml_value(key.value)}  ({key.type})")
        lines += textwrap.wrap(key.meaning, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _help_width() -> int:
    return max(60, min(100, shutil.get_terminal_size().columns - 2))
