"""Outputs that appear whole or not at all: at every instant a directory output holds its previous complete content,
its new complete content, or a state that the next command writing it recovers to the new one; each file of a file
output is the old file or the new one, never a part.

A command writes output ``NAME`` into a staging directory ``.NAME.partial-*`` beside it (in the same parent, hence on
the same file system, so that publishing is a rename) and publishes only when the output is complete:

* file outputs (``move_files``) are renamed into place one by one, the one readers open last (a tokenizer's model
  after its vocabulary);
* a directory output (``replace_directory``) takes the place of the old directory. Where the system can swap two
  paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``, on local file systems) that is all; elsewhere
  (NFS, other systems) the complete directory is renamed ``.NAME.ready``, the old directory moved to a
  ``.NAME.partial-*`` name, and ``.NAME.ready`` renamed ``NAME``. Entries of the old directory that are not the
  build's own (a tokenizer kept in a shard directory) are first carried into the new one by hard link (copied where
  the file system has no hard links); the new directory gets the old one's permission bits. The old directory,
  now under a ``.NAME.partial-*`` name, is deleted last.

A command that fails removes its staging directory and leaves the output as it was. A killed one can leave
``.NAME.partial-*`` directories (a build not finished, or an old output not yet deleted) and, killed between the
renames of the second way, a complete ``.NAME.ready`` with ``NAME`` missing. The next command for the same output
first puts a ``.NAME.ready`` in place and removes the ``.NAME.partial-*`` directories, logging what it does
(``recover_interrupted_swap``), before it builds anything.

Readers read ``NAME`` and nothing beside it. Where the swap is one step they always find a complete output; elsewhere
``NAME`` is missing for the moment between two renames, or, when the publisher was killed in that moment, until the
next command: a missing ``NAME`` beside a ``.NAME.ready`` is a publication in progress, not a missing output. A
directory output is a new directory once published: files opened in the old one stay readable, but a process whose
working directory was the old one is left in a deleted directory.

One command at a time per output: a second one started while the first runs removes the first one's staging directory.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

log = logging.getLogger(__name__)

# From <linux/fs.h> and <fcntl.h>.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextmanager
def staging_directory(parent: str | Path, name: str) -> Iterator[Path]:
    """A new, empty directory ``parent/.{name}.partial-*`` to write ``name``'s output into; removed when the
    block ends, whether its content was published or not. What killed commands left for ``parent/name`` is
    recovered first."""
    parent = Path(parent)
    target = parent / name
    created_parent = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(target)
    if target.exists() and target.lstat().st_dev != parent.stat().st_dev:
        raise ValueError(
            f"{target} is a mount point, which publishing by rename cannot replace; write into a directory inside it"
        )
    staging = _partial_path(target)
    staging.mkdir()  # with the default permissions, not mkdtemp's 0o700: a directory output keeps them
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if created_parent:
            with suppress(OSError):  # removes the directory only if nothing was published into it
                parent.rmdir()


def recover_interrupted_swap(target: Path) -> None:
    """Puts in place the complete output that a command killed while publishing ``target`` left in ``.NAME.ready``,
    then removes the ``.NAME.partial-*`` directories that killed commands left; logs what it does."""
    if _ready_path(target).exists():
        log.warning("%s: the command writing it was killed while publishing; putting its complete output in place",
                    target)
        _put_ready_in_place(target)
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.partial-*"):
        log.warning("removing %s, left by an interrupted command", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def move_files(staging: Path, target: Path, names: Iterable[str]) -> None:
    """Moves the files ``names`` from ``staging`` into the directory ``target``, in order, each by a rename."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.replace(staging / name, target / name)


def replace_directory(staging: Path, target: Path, carry: Callable[[str], bool] | None = None) -> None:
    """Puts the finished directory ``staging`` in the place of ``target``, whose old content is deleted, except the
    entries whose names ``carry`` accepts: those are carried into the new directory first."""
    if not target.exists():
        os.rename(staging, target)
        return
    if carry is not None:
        _carry_entries(target, staging, carry)
    shutil.copymode(target, staging)
    if _exchange(staging, target):
        previous = staging
    else:
        os.rename(staging, _ready_path(target))
        previous = _put_ready_in_place(target)
    shutil.rmtree(previous, ignore_errors=True)


def _put_ready_in_place(target: Path) -> Path | None:
    """Renames ``.NAME.ready`` to ``target``, after moving an existing ``target`` to a ``.NAME.partial-*`` name,
    which it returns."""
    previous = None
    if target.exists():
        previous = _partial_path(target)
        os.rename(target, previous)
    os.rename(_ready_path(target), target)
    return previous


def _carry_entries(source: Path, destination: Path, carry: Callable[[str], bool]) -> None:
    for name in sorted(os.listdir(source)):
        if not carry(name):
            continue
        path = source / name
        if path.is_symlink():
            os.symlink(os.readlink(path), destination / name)
        elif path.is_dir():
            shutil.copytree(path, destination / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(path, destination / name)


def _link_or_copy(source: str | Path, destination: str | Path) -> None:
    try:
        os.link(source, destination)
    except OSError:  # a file system without hard links
        shutil.copy2(source, destination)


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two paths in one step; False, having changed nothing, where the system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # a C library without renameat2, or none to load
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), os.fspath(first), None, os.fspath(second))


def _ready_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.ready")


def _partial_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial-{secrets.token_hex(6)}")
