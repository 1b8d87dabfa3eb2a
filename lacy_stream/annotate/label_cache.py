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
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..labels import LABEL_COLUMNS

log = logging.getLogger(__name__)

KEY_BYTES = 16
LABEL_CACHE_COLUMNS = {"tokens": np.dtype(np.int32), **{name: LABEL_COLUMNS[name] for name in ("token_class", "judge")}}
"""What the fact-label cache stores per token (ids fit in int32 on disk)."""
REFERENCE_CACHE_COLUMNS = {"ref_loss": LABEL_COLUMNS["ref_loss"]}
"""What the reference-loss cache stores per token."""
_FLUSH_TOKENS = 1 << 22


def default_cache_dir() -> Path:
    return Path(os.environ.get("LACY_CACHE_DIR") or Path.home() / ".cache" / "lacy-stream") / "labels"


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
    written: int = 0


class _Segment:
    def __init__(self, path: Path, columns: dict[str, type]) -> None:
        self.keys = np.load(path / "keys.npy")
        self.offsets = np.load(path / "offsets.npy")
        self.columns = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in columns}
        if len(self.offsets) != len(self.keys) + 1 or any(len(c) != self.offsets[-1] for c in self.columns.values()):
            raise ValueError("keys, offsets and columns disagree in length")

    def entry(self, row: int) -> dict[str, np.ndarray]:
        start, end = self.offsets[row], self.offsets[row + 1]
        return {name: np.array(column[start:end]) for name, column in self.columns.items()}


class ShardLabelCache:
    """The cached entries of one shard: lookups over its segments, and the entries pending a write."""

    def __init__(self, directory: Path, shard_id: str, stats: CacheStats, columns: dict[str, type]) -> None:
        self.directory = directory
        self.shard_id = shard_id
        self.stats = stats
        self.columns = columns
        self._index: dict[bytes, tuple[_Segment, int]] = {}
        self._loaded: set[str] = set()
        self._pending: list[tuple[bytes, dict[str, np.ndarray]]] = []
        self._pending_tokens = 0
        self.refresh()

    def refresh(self) -> None:
        """Pick up segments written since (by this or another process)."""
        for path in sorted(self.directory.glob(f"{self.shard_id}-*")):
            if path.name in self._loaded or not path.is_dir():
                continue
            try:
                segment = _Segment(path, self.columns)
            except (OSError, ValueError) as error:
                log.warning("label cache: ignoring unreadable segment %s: %s", path, error)
                self._loaded.add(path.name)
                continue
            self._loaded.add(path.name)
            for row, key in enumerate(segment.keys):
                self._index[key.tobytes()] = (segment, row)

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        found = self._index.get(key)
        if found is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        segment, row = found
        return segment.entry(row)

    def put(self, key: bytes, labels: dict[str, np.ndarray]) -> None:
        if key in self._index:
            return
        entry = {name: np.asarray(labels[name], dtype=dtype) for name, dtype in self.columns.items()}
        self._pending.append((key, entry))
        self._pending_tokens += len(next(iter(entry.values())))
        if self._pending_tokens >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"{self.shard_id}-{uuid.uuid4().hex}"
        temporary = self.directory / f".tmp-{name}"
        temporary.mkdir()
        # raw bytes, not an "S" string array: numpy strips trailing zero bytes from those
        keys = np.frombuffer(b"".join(key for key, _ in self._pending), dtype=np.uint8).reshape(-1, KEY_BYTES)
        lengths = [len(next(iter(labels.values()))) for _, labels in self._pending]
        np.save(temporary / "keys.npy", keys)
        np.save(temporary / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        for column, dtype in self.columns.items():
            values = [labels[column] for _, labels in self._pending]
            np.save(temporary / f"{column}.npy", np.concatenate(values).astype(dtype) if values else np.empty(0, dtype))
        os.rename(temporary, self.directory / name)
        self.stats.written += len(self._pending)
        self._pending, self._pending_tokens = [], 0
        self.refresh()


class LabelCache:
    """Per-namespace cache; :meth:`shard` gives the view of one shard URL.

    ``columns`` are the per-token arrays of an entry: the fact labels by default, or the reference losses
    (:data:`REFERENCE_CACHE_COLUMNS`, under an identity that names the reference).
    """

    def __init__(self, root: str | Path, identity: str, columns: dict[str, type] = LABEL_CACHE_COLUMNS) -> None:
        self.columns = columns
        namespace = hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.directory = Path(root) / namespace
        self.directory.mkdir(parents=True, exist_ok=True)
        identity_file = self.directory / "identity.txt"
        if not identity_file.exists():
            identity_file.write_text(identity + "\n")
        self.stats = CacheStats()

    def shard(self, url: str) -> ShardLabelCache:
        shard_id = hashlib.sha256(url.encode()).hexdigest()[:16]
        return ShardLabelCache(self.directory, shard_id, self.stats, self.columns)
