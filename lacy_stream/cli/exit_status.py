"""The exit statuses of ``lacy-stream`` (README, "Exit statuses"); :mod:`lacy_stream.cli` says when each is given."""

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TOO_MANY_SKIPS = 65
EXIT_INTERRUPTED = 75


class UsageError(Exception):
    """A command line that argparse accepts but that asks for nothing the command can do (exit ``EXIT_USAGE``)."""
