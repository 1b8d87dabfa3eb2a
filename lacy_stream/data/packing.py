"""Packing: labeled documents -> fixed windows of ``seq_len + 1`` tokens with EOS between documents.

Every token carries side columns next to its id: its labels from the labeling stage (fact class
``token_class``, LLM-judge label ``judge``, reference loss ``ref_loss``: :data:`lacy_stream.labels.LABEL_COLUMNS`),
the document it belongs to (``doc_ids``) and its position in that document (``positions``; the closing EOS
has position = the document's token count). The EOS is no target: its labels are the ``LABEL_FILL`` values
(class ``IGNORE``, judge ``JUDGE_UNKNOWN``, reference loss NaN), as are the labels a labeler did not produce.
A window's inputs are ``tokens[:-1]`` and its targets ``tokens[1:]``, so the labels of the targets are
``token_class[1:]``, ``judge[1:]`` and ``ref_loss[1:]``.

Windows fill back to back; a document that does not fit continues in the next window. The packer never
holds more than one partial window, and it is always empty right after a window is yielded, so the
position of the stream (which document, how many of its tokens were consumed) is all a resume needs.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..labels import LABEL_COLUMNS, LABEL_FILL
from ..shards.documents import Document

COLUMNS: dict[str, np.dtype] = {
    "tokens": np.dtype(np.int64),
    **LABEL_COLUMNS,
    "positions": np.dtype(np.int32),
    "doc_ids": np.dtype(np.int64),
}

# A document id packs (epoch, shard, sample index) into one int64 so that every document of every epoch
# has its own id: 19 bits of epoch, 20 of shard, 24 of sample index.
_SHARD_BITS = 20
_INDEX_BITS = 24
_EPOCH_BITS = 19


def doc_uid(epoch: int, shard: int, index: int) -> int:
    if not (0 <= epoch < 1 << _EPOCH_BITS and 0 <= shard < 1 << _SHARD_BITS and 0 <= index < 1 << _INDEX_BITS):
        raise ValueError(
            f"document id out of range: epoch {epoch} (< 2^{_EPOCH_BITS}), shard {shard} (< 2^{_SHARD_BITS}), "
            f"sample {index} (< 2^{_INDEX_BITS}); use smaller shards"
        )
    return (epoch << (_SHARD_BITS + _INDEX_BITS)) | (shard << _INDEX_BITS) | index


def split_doc_uid(uid: int) -> tuple[int, int, int]:
    """Inverse of :func:`doc_uid`: ``(epoch, shard, sample index)``."""
    uid = int(uid)
    return uid >> (_SHARD_BITS + _INDEX_BITS), (uid >> _INDEX_BITS) & ((1 << _SHARD_BITS) - 1), uid & ((1 << _INDEX_BITS) - 1)


def document_columns(
    doc: Document, labels: dict[str, np.ndarray], eos_id: int, epoch: int, position_base: int
) -> dict[str, np.ndarray]:
    """All columns of one labeled document part; the last part ends with EOS."""
    tokens = labels["tokens"]
    count = len(tokens) + doc.is_last_part  # the closing EOS
    columns = {"tokens": np.full(count, eos_id, dtype=COLUMNS["tokens"])}
    columns["tokens"][: len(tokens)] = tokens
    for name, dtype in LABEL_COLUMNS.items():
        columns[name] = np.full(count, LABEL_FILL[name], dtype=dtype)
        if name in labels:
            columns[name][: len(tokens)] = labels[name]
    columns["positions"] = np.arange(position_base, position_base + count, dtype=COLUMNS["positions"])
    columns["doc_ids"] = np.full(count, doc_uid(epoch, doc.shard, doc.index), dtype=COLUMNS["doc_ids"])
    return columns


class WindowPacker:
    """Fills windows of ``seq_len + 1`` tokens from per-token columns, one document part at a time."""

    def __init__(self, seq_len: int, columns: dict[str, np.dtype] = COLUMNS) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.size = seq_len + 1
        self._window = {name: np.empty(self.size, dtype=dtype) for name, dtype in columns.items()}
        self._fill = 0

    def add(self, columns: dict[str, np.ndarray], start: int = 0) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Pack ``columns[start:]``; yield each completed window with the count of tokens consumed so far."""
        length = len(columns["tokens"])
        consumed = start
        while consumed < length:
            take = min(self.size - self._fill, length - consumed)
            for name, array in self._window.items():
                array[self._fill : self._fill + take] = columns[name][consumed : consumed + take]
            self._fill += take
            consumed += take
            if self._fill == self.size:
                self._fill = 0
                yield {name: array.copy() for name, array in self._window.items()}, consumed
