"""The exit statuses of ``lacy-stream`` (README, "Exit statuses"); :mod:`lacy_stream.cli` says when each is given."""

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TOO_MANY_SKIPS = 65
EXIT_INTERRUPTED = 75
