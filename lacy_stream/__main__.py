"""The ``lacy-stream`` command (also ``python -m lacy_stream``): stop signals are recorded from the first instant,
before the command line and torch load (:mod:`lacy_stream.stop_signals`)."""

from lacy_stream import stop_signals


def main() -> None:
    stop_signals.install()
    from lacy_stream.cli import main as command_line

    command_line()


if __name__ == "__main__":
    main()
