"""Label cache: token ids and labels of documents already annotated, on disk, for the epochs that follow.

The paper trains about 16 epochs over the same text; spaCy is the expensive part, so the first epoch writes
what it computed and later epochs read it back. Labels are a function of the document (its text and judge
markup), the spaCy model, the rules version and the tokenizer:

- the *namespace* directory is named by a hash of the labeler identity (spaCy model + rules + tokenizer
  file hash), so changing any of them starts from an empty namespace;
- inside, entries are keyed by a 128-bit hash of the document content, so an edited document misses.

Entries are grouped per shard URL into immutable *segments* (a directory of ``.npy`` files, memory-mapped on
read). A segment is written under a temporary name and renamed into place, so concurrent writers (every
worker of every rank may write) never see half a segment, and a killed writer only loses its pending
entries. Shards can be read by several workers (strided) and by other workers in later epochs: lookups
consult every segment of the shard, whoever wrote it.

Every entry carries a CRC-32 of its key and its bytes (``checksums.npy``), checked at each lookup: a lookup
reads its own entry only, so the check is one more pass over the bytes it copies out, and the memory-mapped
columns are never read as a whole. An entry that fails its checksum, or whose segment cannot be read (a
truncated or unreadable file, offsets that disagree with the columns), is a *corrupt* miss: counted in
``CacheStats.corrupt``, logged once per segment with the segment's path, dropped from the lookups so that the
caller's next :meth:`ShardLabelCache.put` writes it again; never an exception. A segment whose keys cannot be
read at all is skipped whole (``CacheStats.unreadable_segments``). Segments are never repaired in place; a
corrupt one is shadowed by the entries written again.

The cache format is part of the namespace: caches written before the checksums (format 1) are not read,
their documents are misses and are labeled again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..labels import LABEL_COLUMNS

log = logging.getLogger(__name__)

KEY_BYTES = 16
CACHE_FORMAT = 2
"""Segments with a per-entry checksum; part of the namespace, so older caches are not read."""
LABEL_CACHE_COLUMNS = {"tokens": np.dtype(np.int32), **{name: LABEL_COLUMNS[name] for name in ("token_class", "judge")}}
"""What the fact-label cache stores per token (ids fit in int32 on disk)."""
REFERENCE_CACHE_COLUMNS = {"ref_loss": LABEL_COLUMNS["ref_loss"]}
"""What the reference-loss cache stores per token."""
Entry = dict[str, np.ndarray]
"""One document's per-token arrays, by column name."""
IDENTITY_FILE = "identity.txt"
"""In each namespace directory: the labeler identity that names it."""
_FLUSH_TOKENS = 1 << 22
_SEGMENT_ERRORS = (OSError, ValueError, EOFError)
"""What ``np.load`` raises for a missing, truncated or garbled ``.npy`` file."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("LACY_CACHE_DIR") or Path.home() / ".cache" / "lacy-stream") / "labels"


def cache_namespaces(root: str | Path) -> list[Path]:
    """The namespaces of the cache at ``root`` (of fact labels and of reference losses alike), nothing else in it."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir()
                  if re.fullmatch(r"[0-9a-f]{16}", path.name) and (path / IDENTITY_FILE).is_file())


def directory_bytes(directory: Path) -> int:
    """The size of the files under ``directory``."""
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def clear_cache(root: str | Path) -> tuple[int, int]:
    """Deletes every namespace of the cache at ``root``; returns how many were deleted and the bytes they held."""
    namespaces = cache_namespaces(root)
    freed = sum(directory_bytes(namespace) for namespace in namespaces)
    for namespace in namespaces:
        shutil.rmtree(namespace)
    return len(namespaces), freed


def file_digest(path: str | Path) -> str:
    """A short hash of a file's content: the identity of a tokenizer (or a student) that labels depend on."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def document_key(text: str, annotated_text: str | None) -> bytes:
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    digest.update(text.encode("utf-8", "surrogatepass"))
    if annotated_text is not None:
        digest.update(b"\0judge\0")
        digest.update(annotated_text.encode("utf-8", "surrogatepass"))
    return digest.digest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    """Lookups without a usable entry, the corrupt ones included."""
    written: int = 0
    corrupt: int = 0
    """Entries found but not usable: a failed checksum, a broken segment, or a problem the caller found."""
    unreadable_segments: int = 0
    """Segments skipped whole because their keys could not be read."""
    write_error: str = ""
    """Why writing a segment failed (a full disk, a read-only directory); from then on nothing more is written."""


def _entry_checksum(key: bytes, arrays: Iterable[np.ndarray]) -> int:
    """CRC-32 of an entry's key and its arrays' bytes (C-contiguous), in column order."""
    checksum = zlib.crc32(key)
    for array in arrays:
        checksum = zlib.crc32(array, checksum)
    return checksum


class _Segment:
    """One segment's files: keys, offsets and checksums in memory, the columns memory-mapped.

    Raises when the keys cannot be read (nothing of the segment can be found then). When they can but the
    rest is unreadable or inconsistent, ``problem`` says why and every entry is corrupt.
    """

    def __init__(self, path: Path, columns: dict[str, np.dtype]) -> None:
        self.path = path
        self.keys = np.load(path / "keys.npy")
        if self.keys.dtype != np.uint8 or self.keys.ndim != 2 or self.keys.shape[1] != KEY_BYTES:
            raise ValueError(f"keys.npy holds {self.keys.dtype} {self.keys.shape}, not {KEY_BYTES}-byte keys")
        self.problem: str | None
        try:
            self.offsets = np.load(path / "offsets.npy")
            self.checksums = np.load(path / "checksums.npy")
            self.columns = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in columns}
        except _SEGMENT_ERRORS as error:
            self.problem = f"unreadable: {error}"
        else:
            self.problem = self._layout_problem(columns)

    def _layout_problem(self, columns: dict[str, np.dtype]) -> str | None:
        entries = len(self.keys)
        if self.offsets.dtype != np.int64 or self.checksums.dtype != np.uint32:
            return f"offsets ({self.offsets.dtype}) or checksums ({self.checksums.dtype}) are not int64 and uint32"
        if self.offsets.shape != (entries + 1,) or self.checksums.shape != (entries,):
            return "keys, offsets and checksums disagree in length"
        if self.offsets[0] != 0 or (np.diff(self.offsets) < 0).any():
            return "offsets are not increasing from 0"
        for name, column in self.columns.items():
            if column.dtype != columns[name] or column.shape != (self.offsets[-1],):
                return f"{name}.npy holds {column.dtype} {column.shape}, not {columns[name]} ({self.offsets[-1]},)"
        return None

    def entry(self, row: int, key: bytes) -> Entry | None:
        """The row's arrays; None when the segment is broken or the row fails its checksum."""
        if self.problem is not None:
            return None
        start, end = self.offsets[row], self.offsets[row + 1]
        entry = {name: np.array(column[start:end]) for name, column in self.columns.items()}
        if _entry_checksum(key, entry.values()) != self.checksums[row]:
            return None
        return entry


class ShardLabelCache:
    """The cached entries of one shard: lookups over its segments, and the entries pending a write."""

    def __init__(
        self,
        directory: Path,
        shard_id: str,
        stats: CacheStats,
        columns: dict[str, np.dtype],
        reported_segments: set[Path],
    ) -> None:
        self.directory = directory
        self.shard_id = shard_id
        self.stats = stats
        self.columns = columns
        self._reported_segments = reported_segments
        # Every copy of a key (concurrent writers, or an entry written again after it was found corrupt);
        # lookups try the last one loaded first.
        self._index: dict[bytes, list[tuple[_Segment, int]]] = {}
        self._loaded: set[str] = set()
        self._pending: list[tuple[bytes, Entry]] = []
        self._pending_tokens = 0
        self.refresh()

    def refresh(self) -> None:
        """Pick up segments written since (by this or another process)."""
        for path in sorted(self.directory.glob(f"{self.shard_id}-*")):
            if path.name in self._loaded or not path.is_dir():
                continue
            self._loaded.add(path.name)
            try:
                segment = _Segment(path, self.columns)
            except _SEGMENT_ERRORS as error:
                self.stats.unreadable_segments += 1
                log.warning("label cache: ignoring segment %s, its keys are unreadable: %s", path, error)
                continue
            for row, key in enumerate(segment.keys):
                self._index.setdefault(key.tobytes(), []).append((segment, row))

    def __contains__(self, key: bytes) -> bool:
        """Whether ``key`` has an entry not yet found corrupt (a lookup may still find it so)."""
        return key in self._index

    def get(self, key: bytes, problem: Callable[[Entry], str | None] | None = None) -> Entry | None:
        """The entry of ``key``; None when there is none or no copy is usable. A copy that fails its checksum,
        lies in a broken segment or in which ``problem`` finds one (it says why; e.g. ids the caller's
        tokenizer cannot have made) is corrupt: dropped, so that :meth:`put` writes the entry again."""
        copies = self._index.get(key, [])
        while copies:
            segment, row = copies[-1]
            entry = segment.entry(row, key)
            if entry is None:
                reason = segment.problem or "an entry fails its checksum"
            else:
                reason = problem(entry) if problem is not None else None
            if reason is None:
                self.stats.hits += 1
                return entry
            copies.pop()
            self._report_corrupt(segment, reason)
        self._index.pop(key, None)
        self.stats.misses += 1
        return None

    def _report_corrupt(self, segment: _Segment, reason: str) -> None:
        self.stats.corrupt += 1
        if segment.path not in self._reported_segments:
            self._reported_segments.add(segment.path)
            log.warning("label cache: corrupt entries in %s (%s); they are recomputed", segment.path, reason)

    def put(self, key: bytes, labels: Entry) -> None:
        if key in self._index or self.stats.write_error:
            return
        entry = {name: np.ascontiguousarray(labels[name], dtype=dtype) for name, dtype in self.columns.items()}
        self._pending.append((key, entry))
        self._pending_tokens += len(next(iter(entry.values())))
        if self._pending_tokens >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"{self.shard_id}-{uuid.uuid4().hex}"
        temporary = self.directory / f".tmp-{name}"
        try:
            self._write_segment(temporary)
            os.rename(temporary, self.directory / name)
        except OSError as error:  # the cache is an optimization: labels stay right, later epochs label again
            shutil.rmtree(temporary, ignore_errors=True)
            self.stats.write_error = f"{error.strerror or error} ({temporary.parent})"
            log.warning("label cache: could not write a segment to %s: %s; this worker caches nothing more",
                        self.directory, error.strerror or error)
        else:
            self.stats.written += len(self._pending)
        self._pending, self._pending_tokens = [], 0
        self.refresh()

    def _write_segment(self, directory: Path) -> None:
        directory.mkdir()
        # raw bytes, not an "S" string array: numpy strips trailing zero bytes from those
        keys = np.frombuffer(b"".join(key for key, _ in self._pending), dtype=np.uint8).reshape(-1, KEY_BYTES)
        lengths = [len(next(iter(labels.values()))) for _, labels in self._pending]
        checksums = [_entry_checksum(key, labels.values()) for key, labels in self._pending]
        np.save(directory / "keys.npy", keys)
        np.save(directory / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        np.save(directory / "checksums.npy", np.array(checksums, dtype=np.uint32))
        for column, dtype in self.columns.items():
            values = [labels[column] for _, labels in self._pending]
            np.save(directory / f"{column}.npy", np.concatenate(values).astype(dtype) if values else np.empty(0, dtype))


class LabelCache:
    """Per-namespace cache; :meth:`shard` gives the view of one shard URL.

    ``columns`` are the per-token arrays of an entry: the fact labels by default, or the reference losses
    (:data:`REFERENCE_CACHE_COLUMNS`, under an identity that names the reference).
    """

    def __init__(self, root: str | Path, identity: str, columns: dict[str, np.dtype] = LABEL_CACHE_COLUMNS) -> None:
        self.columns = columns
        namespace = hashlib.sha256(f"{identity}|cache-format:{CACHE_FORMAT}".encode()).hexdigest()[:16]
        self.directory = Path(root) / namespace
        self.directory.mkdir(parents=True, exist_ok=True)
        identity_file = self.directory / IDENTITY_FILE
        if not identity_file.exists():
            identity_file.write_text(f"{identity}\ncache format {CACHE_FORMAT}\n")
        self.stats = CacheStats()
        self._reported_segments: set[Path] = set()

    def shard(self, url: str) -> ShardLabelCache:
        shard_id = hashlib.sha256(url.encode()).hexdigest()[:16]
        return ShardLabelCache(self.directory, shard_id, self.stats, self.columns, self._reported_segments)
