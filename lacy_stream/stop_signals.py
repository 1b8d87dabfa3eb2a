"""SIGTERM and SIGINT as a request to stop training, from the first instant of the command.

A scheduler that preempts a job, or a terminal's Ctrl-C, signals the whole process group: the trainer and its
dataloader workers. The trainer should finish its step, save a checkpoint and exit 75; the workers should
leave that to it (a worker killed under the trainer would end the run with a traceback and no checkpoint).

- :func:`install` records the signals instead of acting on them. ``lacy-stream`` calls it before it imports
  torch, so a signal that arrives while the program loads is not lost either.
- :func:`handled` does the same for a block (the trainer's), restoring the handlers before it afterwards.
- :func:`requested` says which signal came, if any; the trainer polls it before its first step and after
  each one (every rank agrees before acting).
- A second signal of the same kind acts at once, as it would without this module: an operator who will not
  wait for the checkpoint presses Ctrl-C twice.
- :func:`restore_defaults` hands the signals back to their default action, acting on one that came in the
  meantime: commands other than training stop at once, as any program does.
- :func:`leave_to_the_main_process` is for dataloader workers: they ignore SIGINT, and a SIGTERM ends them only
  after a grace period, long enough for the trainer to finish its step and save (it then ends them itself).
  A worker must still end on a SIGTERM meant for it alone: multiprocessing sends one to the workers left at
  the exit of a process that never shut its loader down (after an error), and waits for them.

No torch import here: this module must load in milliseconds.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: list[int] = []


def install() -> None:
    for number in STOP_SIGNALS:
        signal.signal(number, _record)


@contextmanager
def handled() -> Iterator[None]:
    """Inside the block the stop signals are recorded (as by :func:`install`); afterwards the handlers before it
    come back, and a request served inside it is forgotten. Enter it in the main thread."""
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    install()
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, _default(number) if handler is None else handler)
        _received.clear()


def requested() -> int | None:
    """The first stop signal received (``signal.SIGTERM`` or ``signal.SIGINT``), or None."""
    return _received[0] if _received else None


def restore_defaults() -> None:
    if signal.getsignal(signal.SIGTERM) is not _record:
        return
    for number in STOP_SIGNALS:
        signal.signal(number, _default(number))
    if _received:
        os.kill(os.getpid(), _received.pop(0))


WORKER_GRACE_S = 120
"""How long a dataloader worker lives on after a SIGTERM."""


def leave_to_the_main_process(grace_s: int = WORKER_GRACE_S) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the alarm ends the worker (no handler inherited from the trainer)

    def end_later(number: int, frame: FrameType | None) -> None:
        signal.alarm(signal.alarm(0) or grace_s)  # the first SIGTERM's deadline holds

    signal.signal(signal.SIGTERM, end_later)


def name(number: int | None) -> str:
    """``SIGTERM``, ``SIGINT``; for None (another rank received it) ``a stop signal``."""
    return signal.Signals(number).name if number is not None else "a stop signal"


def _record(number: int, frame: FrameType | None) -> None:
    if number in _received:
        signal.signal(number, _default(number))
        os.kill(os.getpid(), number)
        return
    _received.append(number)


def _default(number: int):
    return signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL
