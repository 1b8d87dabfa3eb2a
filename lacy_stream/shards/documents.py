"""Documents as they leave the shard reader, the skip accounting, and the splitting of huge documents.

A document that is too long for spaCy (``nlp.max_length``, 1,000,000 characters by default) is cut into
consecutive parts at paragraph, then line, then sentence, then word boundaries. The parts concatenate back
to the original text exactly; they keep the document's identity and are packed as one document.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from ..config.job_config import DataConfig

log = logging.getLogger(__name__)

# Boundaries tried in order when a document must be split; each pattern matches the separator that ends a
# part (the separator stays with the part before it, so nothing is lost).
_SPLIT_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n\s*"),  # paragraph
    re.compile(r"\n"),  # line
    re.compile(r"(?<=[.!?])[\"')\]]*\s+"),  # sentence
    re.compile(r"\s+"),  # word
)

# The one vocabulary of skip reasons (docs/operations.md, "Bad input"). A shard skip costs a shard, or its rest after a
# break; a document skip costs one document (a sample of a shard, a record of a make-shards input).
SHARD_SKIP_REASONS = ("unreachable_shard", "host_unreachable", "corrupt_tar", "truncated_stream", "read_error")
DOCUMENT_SKIP_REASONS = (
    "missing_text", "invalid_utf8", "empty_document", "invalid_metadata",
    "invalid_json", "not_an_object", "non_string_text", "non_string_annotated_text",
)
REPAIR_REASONS = ("lone_surrogate",)
"""Repairs: the document is kept, the repair counted."""
_NEVER_OPENED = ("unreachable_shard", "host_unreachable")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # decoders join valid pairs, so any left is unpaired

MAX_SKIP_RATIO = DataConfig.max_skip_ratio
"""Default of ``max_skip_ratio``: a read fails only when it skipped everything."""
SKIP_WARNING_RATIO = 0.05
"""A read that skipped more than this share of its shards or documents ends with a warning."""


class TooManySkipsError(ValueError):
    """A read that yielded no document, or skipped a larger share of its shards or documents than allowed."""


@dataclass(frozen=True)
class Document:
    """One document (or one part of a huge document) read from a shard.

    ``shard`` is the shard's index in the expanded shard list and ``index`` the sample's position inside
    that shard (skipped samples keep their index, so indices are stable across reads). ``labels`` holds
    the sample's stored labels when the shard was annotated offline.
    """

    text: str
    key: str
    url: str
    shard: int
    index: int
    meta: dict = field(default_factory=dict)
    part: int = 0
    num_parts: int = 1
    labels: bytes | None = None

    @property
    def is_last_part(self) -> bool:
        return self.part == self.num_parts - 1


def loggable(text: str) -> str:
    """``text`` with the lone surrogates of undecodable bytes (a tar member named in another encoding) written as
    escapes: a UTF-8 log file refuses to write them."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ReadStats:
    """Counts what a reader saw: documents, bytes, split documents and skips by reason.

    Every skip is logged once with the URL, the tar member and the reason. ``skipped`` is the
    reason -> count map that ``inspect --json`` prints and the trainer's metrics report; ``repaired``
    counts the documents kept after a repair.
    """

    def __init__(self) -> None:
        self.docs = 0
        self.text_bytes = 0
        self.shards = 0
        self.split_docs = 0
        self.skipped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()

    def skip(self, reason: str, url: str, member: str | None = None, detail: str = "") -> None:
        if reason not in SHARD_SKIP_REASONS + DOCUMENT_SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}: add it to the vocabulary in documents.py and docs/operations.md")
        self.skipped[reason] += 1
        where = f"{url}:{member}" if member else url
        log.warning("skipped %s (%s)%s", loggable(where), reason, f": {loggable(detail)}" if detail else "")

    def repair(self, reason: str, where: str) -> None:
        if reason not in REPAIR_REASONS:
            raise ValueError(f"unknown repair {reason!r}: add it to the vocabulary in documents.py and docs/operations.md")
        self.repaired[reason] += 1
        log.info("repaired %s (%s)", loggable(where), reason)

    def skipped_shares(self) -> dict[str, float]:
        """The shares of shards and of documents that were skipped (0 when there were none)."""
        shard_skips = sum(self.skipped[reason] for reason in SHARD_SKIP_REASONS)
        shards_tried = self.shards + sum(self.skipped[reason] for reason in _NEVER_OPENED)
        document_skips = sum(self.skipped[reason] for reason in DOCUMENT_SKIP_REASONS)
        documents_seen = self.docs + document_skips
        return {
            "shards": shard_skips / shards_tried if shards_tried else 0.0,
            "documents": document_skips / documents_seen if documents_seen else 0.0,
        }

    def check_skips(self, max_skip_ratio: float, source: str) -> None:
        """Raise ``TooManySkipsError`` when no document was read or a skipped share passes ``max_skip_ratio``;
        warn when one passes ``SKIP_WARNING_RATIO``."""
        summary = f"{source}: {self.docs} documents read, skipped {dict(sorted(self.skipped.items()))}"
        if self.docs == 0:
            raise TooManySkipsError(f"{summary}: no usable document")
        kind, share = max(self.skipped_shares().items(), key=lambda item: item[1])
        if share > max_skip_ratio:
            raise TooManySkipsError(
                f"{summary}: {share:.1%} of the {kind} were skipped, more than the allowed {max_skip_ratio:.1%} "
                "(max_skip_ratio)"
            )
        if share > SKIP_WARNING_RATIO:
            log.warning("%s: %.1f%% of the %s were skipped", summary, 100 * share, kind)

    def as_dict(self) -> dict:
        return {
            "docs": self.docs,
            "text_bytes": self.text_bytes,
            "shards": self.shards,
            "split_docs": self.split_docs,
            "skipped": dict(sorted(self.skipped.items())),
            "repaired": dict(sorted(self.repaired.items())),
        }

    @classmethod
    def from_dict(cls, state: dict) -> "ReadStats":
        stats = cls()
        stats.add_dict(state)
        return stats

    def add_dict(self, state: dict) -> None:
        """Add the counts of another reader (e.g. another dataloader worker)."""
        self.docs += state["docs"]
        self.text_bytes += state["text_bytes"]
        self.shards += state["shards"]
        self.split_docs += state["split_docs"]
        self.skipped.update(state["skipped"])
        self.repaired.update(state.get("repaired", {}))  # absent from states saved before repairs were counted


def repair_lone_surrogates(values: list[object], where: str, stats: ReadStats) -> list[object]:
    """``values`` with each lone surrogate in its strings replaced by U+FFFD, one repair counted if any was.

    UTF-8 cannot hold a lone surrogate (from a JSON ``"\\ud800"`` escape, or a tar member name that is not
    UTF-8), so a string with one would fail whatever writes it out later. Other values are kept as they are.
    """
    if not any(isinstance(value, str) and LONE_SURROGATE.search(value) for value in values):
        return values
    stats.repair("lone_surrogate", where)
    return [LONE_SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value for value in values]


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into parts of at most ``max_chars`` characters whose concatenation is ``text``.

    Each cut is placed at the last paragraph boundary that fits, else the last line break, sentence end
    or whitespace; a text without any of those is cut hard at ``max_chars``.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    parts = []
    start = 0
    while len(text) - start > max_chars:
        window = text[start : start + max_chars]
        cut = _last_boundary(window)
        parts.append(text[start : start + cut])
        start += cut
    parts.append(text[start:])
    return parts


def _last_boundary(window: str) -> int:
    for pattern in _SPLIT_BOUNDARIES:
        ends = [m.end() for m in pattern.finditer(window) if 0 < m.end() <= len(window)]
        # A cut in the first tenth would make tiny parts from a text with one early boundary.
        ends = [end for end in ends if end > len(window) // 10]
        if ends:
            return ends[-1]
    return len(window)


def split_document(doc: Document, max_chars: int) -> Iterator[Document]:
    parts = split_text(doc.text, max_chars)
    for number, text in enumerate(parts):
        yield Document(
            text=text,
            key=doc.key,
            url=doc.url,
            shard=doc.shard,
            index=doc.index,
            meta=doc.meta,
            part=number,
            num_parts=len(parts),
            labels=doc.labels,
        )
