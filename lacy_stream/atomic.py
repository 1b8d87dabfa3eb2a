"""Outputs that appear whole or not at all: an interrupted command leaves the old state or the complete new one.

A command writes into a staging directory (hidden, on the same file system as its target, so that moving out
of it is a rename) and publishes at the end; when it fails, the staging directory is removed and the target
is untouched. A staging directory left by a killed command is removed by the next one for the same target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def staging_directory(parent: str | Path, name: str) -> Iterator[Path]:
    """A new, empty directory ``parent/.{name}.partial-*`` to write ``name``'s output into; removed when the
    block ends, whether its content was published or not."""
    parent = Path(parent)
    created_parent = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    for leftover in parent.glob(f".{name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_parent:
            with suppress(OSError):  # removes the directory only if nothing was published into it
                parent.rmdir()


def move_files(staging: Path, target: Path, names: Iterable[str]) -> None:
    """Moves the files ``names`` from ``staging`` into the directory ``target``, in order, each by a rename."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(staging / name, target / name)


def replace_directory(staging: Path, target: Path) -> None:
    """Puts the finished directory ``staging`` in the place of ``target``, whose old content is deleted."""
    if not target.exists():
        staging.rename(target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    target.rename(retired / target.name)
    staging.rename(target)
    shutil.rmtree(retired)
