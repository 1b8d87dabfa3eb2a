"""Held-out documents for the evaluations that score text, and their packing into windows.

Held-out text comes either as a record file (``.jsonl``, ``.jsonl.zst``, ``.parquet`` or ``hf:NAME`` with
a ``text`` field per record, like ``dwiki-dev.jsonl``) or as shards (any shard spec the trainer accepts), read
by :func:`lacy_stream.shards.sources.read_documents`, so held-out text is decoded, validated and skipped exactly
as training text is.

Packing follows training (:mod:`lacy_stream.data.packing`): documents back to back with EOS between them,
cut into windows of ``seq_len + 1`` tokens. The stream also starts with an EOS, so that the first token
of every document is predicted from a document boundary, as it is for every later document.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

import torch
from torch import Tensor

from ..shards.sources import read_documents


def read_heldout_texts(source: str, *, limit: int | None = None) -> list[str]:
    """The texts of the first ``limit`` (all when None) documents of ``source``."""
    return [document["text"] for document in islice(read_documents(source), limit)]


@dataclass
class PackedWindows:
    """Windows of token ids and which of their targets count."""

    tokens: Tensor
    """[N, seq_len + 1] int64: inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``."""
    valid: Tensor
    """[N, seq_len] bool: False where the target is a document-closing EOS or padding (no target in training either)."""


def pack_windows(documents: Iterable[list[int]], *, eos_id: int, seq_len: int) -> PackedWindows:
    """Token ids of documents packed into windows; the last window is padded with EOS."""
    stream = [eos_id]
    for ids in documents:
        stream.extend(ids)
        stream.append(eos_id)
    window = seq_len + 1
    count = -(-len(stream) // window)
    tokens = torch.full((count * window,), eos_id, dtype=torch.long)
    tokens[: len(stream)] = torch.tensor(stream, dtype=torch.long)
    tokens = tokens.view(count, window)
    return PackedWindows(tokens=tokens, valid=tokens[:, 1:] != eos_id)
