"""Options shared by the commands that read shards."""

from __future__ import annotations

import argparse

from ..config.job_config import DataConfig
from ..shards.documents import SKIP_WARNING_RATIO
from ..shards.streams import StreamOptions
from .exit_status import EXIT_TOO_MANY_SKIPS


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


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1")
    return value


def stream_options_from_arguments(args: argparse.Namespace) -> StreamOptions:
    """How to open shard URLs, as :func:`add_url_options`' options say."""
    return StreamOptions(
        timeout_s=args.http_timeout, deadline_s=args.http_deadline, retries=args.http_retries,
        allow_pipe=args.allow_pipe,
    )
