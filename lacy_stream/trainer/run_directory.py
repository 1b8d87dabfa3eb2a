"""A run directory's bookkeeping: one trainer at a time, and a resumed run that still means what it meant.

- :class:`RunLock`: an exclusive ``flock`` on ``run_dir/.lock``, held by the trainer (rank 0) for its whole
  life. A second trainer on the same directory is refused with the holder's pid and host. The kernel drops the
  lock when its process dies, however it dies, so a lock left by a killed run is taken over by the next one.
  (On network file systems ``flock`` may only exclude processes of one machine; keep a run's rank 0 on one.)
- :func:`check_resume`: resuming with settings that change what the run is (the model, the tokenizer, the
  loss, the data, the optimizer) is refused, naming each difference, unless ``checkpoint.allow_config_change``;
- :func:`record_config`: once the run has started (its checkpoint loaded), ``config.json`` is its resolved
  config and ``config-history.jsonl`` gets one line per start.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from ..config.job_config import ConfigError, JobConfig

CONFIG_FILE = "config.json"
HISTORY_FILE = "config-history.jsonl"
LOCK_FILE = ".lock"

FIXED_ON_RESUME: dict[str, tuple[str, ...] | None] = {
    "model": None,
    "tokenizer": None,
    "loss": ("method", "call_ratio", "ignore_ratio", "reference"),
    "data": ("shards", "seq_len"),
    "annotation": ("enabled", "labeler", "spacy_model"),
    "optimizer": None,
    "train": ("global_batch_tokens", "dtype", "seed"),
}
"""Per config section, the keys (None: all) whose value a resumed run must keep."""


class RunDirectoryBusyError(OSError):
    """Another live trainer holds the run directory."""


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory for this process (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(self.path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "an unknown process"
            lock.close()
            raise RunDirectoryBusyError(
                f"{self.path.parent} is in use by another trainer ({holder}): wait for it to end, or give this run "
                "another train.run_dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        self._file = lock
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock; the file stays, empty locks are harmless
            self._file = None


def check_resume(run_dir: Path, config: JobConfig, resuming_from: int | None) -> None:
    """Refuse to resume with a ``FIXED_ON_RESUME`` setting changed, unless the config allows it."""
    stored = Path(run_dir) / CONFIG_FILE
    if resuming_from is None or not stored.is_file() or config.checkpoint.allow_config_change:
        return
    changes = config_changes(json.loads(stored.read_text()), dataclasses.asdict(config))
    if changes:
        raise ConfigError(
            f"{run_dir} holds a run of other settings (checkpoint of step {resuming_from}): {'; '.join(changes)}. "
            "Resuming would change what the run is: give this run another train.run_dir, or "
            "--checkpoint.allow_config_change=true to continue it with the new settings"
        )


def record_config(run_dir: Path, config: JobConfig, resuming_from: int | None) -> None:
    """``config`` as the run's ``config.json``, and one more line of ``config-history.jsonl``."""
    resolved = dataclasses.asdict(config)
    (Path(run_dir) / CONFIG_FILE).write_text(json.dumps(resolved, indent=2))
    entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from_step": resuming_from, "config": resolved}
    with open(Path(run_dir) / HISTORY_FILE, "a") as history:
        history.write(json.dumps(entry) + "\n")


def config_changes(before: dict, after: dict) -> list[str]:
    """``section.key: old -> new`` for every ``FIXED_ON_RESUME`` setting that differs; a key the stored config
    lacks (written by an older version) is not compared."""
    changes = []
    for section, keys in FIXED_ON_RESUME.items():
        old, new = before.get(section, {}), after.get(section, {})
        for key in keys or sorted(new):
            if key in old and old[key] != new.get(key):
                changes.append(f"{section}.{key}: {old[key]!r} -> {new.get(key)!r}")
    return changes
