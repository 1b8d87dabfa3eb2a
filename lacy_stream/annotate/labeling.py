"""Labeling: documents -> token ids with a fact class and a judge label per token.

The stage between the shard reader and the packer. For each document, in order, the labels come from the
first source that has them:

1. labels stored in the shard by ``lacy-stream annotate --shards`` (offline mode), when they were made by
   the same labeler (same spaCy model, rules and tokenizer) and for the same document split;
2. the label cache, written by earlier epochs;
3. the annotator: spaCy over a batch of documents, the rules, then alignment to SentencePiece pieces; or a
   distilled student (:mod:`.student_labeler`) that labels the pieces directly.

Judge labels come from the document's ``annotated_text`` markup (see :mod:`.judge`), when it has one.

Stored and cached labels are checked before they are used. A ``labels.npz`` that cannot be read (a member
whose CRC-32 fails: the zip container's checksum, written with the labels and checked as numpy reads the
member; a truncated file), whose columns disagree with its part lengths or whose token ids are out of the
tokenizer's range is counted in ``counts["stored_labels_corrupt"]``; a cache entry that fails its checksum
(see :mod:`.label_cache`) or has such ids in ``counts["cache_corrupt"]`` (``reference_cache_corrupt`` for
reference losses). Either way the labels are computed again, with a warning once per shard or cache segment.

With a student annotator and an :class:`Audit`, a deterministic sample of the documents the student labels
is also labeled by spaCy, and the two compared piece by piece (``counts["audit_*"]``): the student's
agreement on the user's own text, as the run goes.

With a reference model (a :class:`TokenScorer`, :mod:`lacy_stream.inference.reference_loss`), every
document also gets its per-token reference loss,
from the first source that has it: the offline shard (same reference), the reference-loss cache, or the
reference's forward pass.
"""

from __future__ import annotations

import io
import logging
import sys
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, TypeVar

import numpy as np

from ..labels import JUDGE_CALL, JUDGE_KEEP, JUDGE_UNKNOWN, LABEL_COLUMNS, TokenClass
from ..shards.documents import Document
from ..tokenizer import Tokenizer
from .alignment import (
    PieceLabels,
    char_to_byte_offsets,
    encode_with_offsets,
    piece_classes,
    pieces_in_spans,
)
from .annotation import FactAnnotator, WordLabels
from .judge import judge_spans
from .label_cache import LabelCache, ShardLabelCache, document_key, file_digest

if TYPE_CHECKING:
    from .student_labeler import StudentAnnotator

log = logging.getLogger(__name__)

MAX_BATCH_CHARS = 1_000_000
"""A batch for spaCy closes at its document limit or at this many characters, whichever comes first."""

Item = TypeVar("Item")
Labels = dict[str, np.ndarray]
"""``tokens`` (int64) and the label columns of :data:`lacy_stream.labels.LABEL_COLUMNS` (``ref_loss`` only
with a reference), one entry per token, without the closing EOS."""
FACT_LABELS = {"tokens": np.dtype(np.int64), "token_class": LABEL_COLUMNS["token_class"], "judge": LABEL_COLUMNS["judge"]}
"""The arrays every labeler produces; ``ref_loss`` comes on top with a reference."""


class TokenScorer(Protocol):
    """Per-token scores of a document's token ids (a reference model's losses), under a stable identity."""

    identity: str

    def score(self, ids: np.ndarray) -> np.ndarray: ...


class DocumentLabeler:
    """Labels documents; ``annotator=None`` labels every token ``other`` (runs that need no facts)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        annotator: FactAnnotator | StudentAnnotator | None,
        *,
        cache: LabelCache | None = None,
        batch_size: int = 64,
        first_batch_size: int = 1,
        reference: TokenScorer | None = None,
        reference_cache: LabelCache | None = None,
        audit: Audit | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.annotator = annotator
        self.batch_size = batch_size
        self.first_batch_size = min(first_batch_size, batch_size)
        self.identity = labeler_identity(annotator.identity if annotator else None, tokenizer.model_path)
        self.cache = cache
        self.reference = reference
        self.reference_cache = reference_cache
        self.audit = audit
        self.counts: Counter[str] = Counter()
        self._shard_caches: dict[str, ShardLabelCache] = {}
        self._reference_shard_caches: dict[str, ShardLabelCache] = {}
        self._warned_shards: set[tuple[str, str]] = set()

    def label(self, items: Iterable[tuple[Item, Document]]) -> Iterator[tuple[Item, Document, Labels]]:
        """Labels for each ``(item, document)``, in order; ``item`` rides along untouched."""
        waiting: list[tuple[Item, Document, ShardLabelCache | None, bytes | None, Labels | None]] = []
        to_annotate = chars_to_annotate = 0
        # Batches start small and double up to batch_size: the first window of a stream comes quickly,
        # later batches are large enough for spaCy to work efficiently.
        batch_limit = self.first_batch_size
        try:
            for item, doc in items:
                shard_cache, key = self._cache_entry(doc)
                labels = self._stored_labels(doc) or self._cached_labels(shard_cache, key)
                waiting.append((item, doc, shard_cache, key, labels))
                if labels is None:
                    to_annotate += 1
                    chars_to_annotate += len(doc.text)
                if (
                    to_annotate == 0
                    or to_annotate >= batch_limit
                    or chars_to_annotate >= MAX_BATCH_CHARS
                    or len(waiting) >= 4 * self.batch_size
                ):
                    yield from self._complete(waiting)
                    if to_annotate:
                        batch_limit = min(2 * batch_limit, self.batch_size)
                    waiting, to_annotate, chars_to_annotate = [], 0, 0
            yield from self._complete(waiting)
        finally:
            # A stream abandoned mid-way is closed here, possibly only at interpreter exit, when the modules
            # a flush needs may already be gone; the cache only saves time, so then it is left unwritten.
            if not sys.is_finalizing():
                for shard_cache in [*self._shard_caches.values(), *self._reference_shard_caches.values()]:
                    shard_cache.flush()
            self._shard_caches.clear()
            self._reference_shard_caches.clear()

    def label_document(self, doc: Document) -> Labels:
        return next(self.label([(None, doc)]))[2]

    def _cache_entry(self, doc: Document) -> tuple[ShardLabelCache | None, bytes | None]:
        """The label cache of the document's shard (opened on its first document, None without a cache) and
        the document's key in both caches (None when neither is on)."""
        if self.cache is None and self.reference_cache is None:
            return None, None
        key = document_key(doc.text, _judge_markup(doc))
        if self.cache is None:
            return None, key
        return _shard_cache(self.cache, self._shard_caches, doc.url), key

    def _stored_labels(self, doc: Document) -> Labels | None:
        if doc.labels is None:
            return None
        try:
            # Every member is read to its end, where zipfile checks its CRC-32 (BadZipFile on a mismatch).
            stored = np.load(io.BytesIO(doc.labels), allow_pickle=False)
            identity = str(stored["identity"])
            part_lengths = stored["part_lengths"]
            if identity != self.identity or len(part_lengths) != doc.num_parts:
                self._count_stale(doc, identity)
                return None
            names = dict(FACT_LABELS)
            reference = str(stored["reference"]) if "reference" in stored.files else None
            if self.reference is not None and reference == self.reference.identity:
                names["ref_loss"] = LABEL_COLUMNS["ref_loss"]
            columns = {name: stored[name] for name in names}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            self._count_corrupt_stored(doc, f"unreadable: {error}")
            return None
        lengths_agree = (part_lengths >= 0).all() and all(len(c) == part_lengths.sum() for c in columns.values())
        problem = self._token_problem(columns["tokens"]) if lengths_agree else "columns disagree with the part lengths"
        if problem:
            self._count_corrupt_stored(doc, problem)
            return None
        start = int(part_lengths[: doc.part].sum())
        end = start + int(part_lengths[doc.part])
        self.counts["stored"] += 1
        return {name: columns[name][start:end].astype(dtype) for name, dtype in names.items()}

    def _token_problem(self, tokens: np.ndarray) -> str | None:
        """Why ``tokens`` cannot be this tokenizer's ids of a document (None when they can)."""
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.tokenizer.num_pieces):
            return f"token ids out of range [0, {self.tokenizer.num_pieces})"
        return None

    def _count_corrupt_stored(self, doc: Document, problem: str) -> None:
        self._count_unused_stored(
            doc, "stored_labels_corrupt", "%s:%s: stored labels are corrupt (%s); annotating online (later ones of "
            "this shard are only counted)", doc.url, doc.key, problem,
        )

    def _count_stale(self, doc: Document, identity: str) -> None:
        self._count_unused_stored(
            doc, "stored_labels_stale", "%s: stored labels were made by another labeler (%s, this one is %s) or "
            "another document split; annotating online", doc.url, identity, self.identity,
        )

    def _count_unused_stored(self, doc: Document, count: str, message: str, *arguments: object) -> None:
        """Counts a document whose stored labels are not used under ``count``; warns once per shard and count."""
        self.counts[count] += 1
        if (doc.url, count) not in self._warned_shards:
            self._warned_shards.add((doc.url, count))
            log.warning(message, *arguments)

    def _cached_labels(self, shard_cache: ShardLabelCache | None, key: bytes | None) -> Labels | None:
        if shard_cache is None or key is None:
            return None
        cached = self._usable_entry(
            shard_cache, key, "cache_corrupt", lambda entry: self._token_problem(entry["tokens"])
        )
        if cached is None:
            return None
        self.counts["cached"] += 1
        return {name: cached[name].astype(dtype) for name, dtype in FACT_LABELS.items()}

    def _usable_entry(
        self, shard_cache: ShardLabelCache, key: bytes, corrupt_count: str, problem: Callable[[Labels], str | None]
    ) -> Labels | None:
        """``key``'s cache entry, None on a miss. A miss because every copy was corrupt (or had a
        ``problem``) is counted under ``corrupt_count``; the cache then takes the recomputed labels."""
        found = key in shard_cache
        cached = shard_cache.get(key, problem)
        if cached is None and found:
            self.counts[corrupt_count] += 1
        return cached

    def _complete(self, waiting: list) -> Iterator[tuple[Item, Document, Labels]]:
        missing = [doc for _, doc, _, _, labels in waiting if labels is None]
        words: Iterator[WordLabels | PieceLabels | None]
        if self.annotator is not None:
            words = self.annotator.annotate(doc.text for doc in missing)
        else:
            words = iter([None] * len(missing))
        annotated: list[tuple[Document, Labels]] = []
        completed: list[tuple[Item, Document, Labels]] = []
        for item, doc, shard_cache, key, labels in waiting:
            if labels is None:
                labels = self._annotate(doc, next(words))
                self.counts["annotated"] += 1
                annotated.append((doc, labels))
                if shard_cache is not None and key is not None:
                    shard_cache.put(key, labels)
            if self.reference is not None and "ref_loss" not in labels:
                labels["ref_loss"] = self._reference_loss(doc, key, labels["tokens"])
            completed.append((item, doc, labels))
        if self.audit is not None:  # before the batch goes on, so that the counts travel with it
            self._audit([(doc, labels) for doc, labels in annotated if self.audit.samples(doc)])
        yield from completed
        # A shard's entries are complete once a later shard has started: write them out.
        current = waiting[-1][1].url if waiting else None
        for caches in (self._shard_caches, self._reference_shard_caches):
            for url in [url for url in caches if url != current]:
                caches.pop(url).flush()

    def _audit(self, labeled: list[tuple[Document, Labels]]) -> None:
        """spaCy's labels of the sampled documents against the student's, counted piece by piece."""
        if not labeled:
            return
        teacher_words = self.audit.annotator.annotate(doc.text for doc, _ in labeled)
        for (doc, student), words in zip(labeled, teacher_words):
            teacher = self._annotate(doc, words)["token_class"]
            predicted = student["token_class"]
            if len(teacher) != len(predicted):  # the same tokenizer over the same text: never, but do not guess
                continue
            fact, predicted_fact = teacher == TokenClass.FACT, predicted == TokenClass.FACT
            self.counts["audit_documents"] += 1
            self.counts["audit_pieces"] += len(teacher)
            self.counts["audit_agree"] += int((teacher == predicted).sum())
            self.counts["audit_fact_true_positive"] += int((fact & predicted_fact).sum())
            self.counts["audit_fact_false_positive"] += int((~fact & predicted_fact).sum())
            self.counts["audit_fact_false_negative"] += int((fact & ~predicted_fact).sum())

    def _reference_loss(self, doc: Document, key: bytes | None, tokens: np.ndarray) -> np.ndarray:
        shard_cache = None
        if self.reference_cache is not None and key is not None:
            shard_cache = _shard_cache(self.reference_cache, self._reference_shard_caches, doc.url)
            cached = self._usable_entry(
                shard_cache, key, "reference_cache_corrupt",
                lambda entry: None if len(entry["ref_loss"]) == len(tokens) else "not one loss per token",
            )
            if cached is not None:
                self.counts["reference_cached"] += 1
                return cached["ref_loss"]
        losses = self.reference.score(tokens)
        self.counts["reference_scored"] += 1
        if shard_cache is not None:
            shard_cache.put(key, {"ref_loss": losses})
        return losses

    def _annotate(self, doc: Document, words: WordLabels | PieceLabels | None) -> Labels:
        text = doc.text
        if isinstance(words, PieceLabels):
            judge = self._judge(doc, words.begin, words.end, char_to_byte_offsets(text))
            return {"tokens": words.ids, "token_class": words.classes, "judge": judge}
        if words is None and _judge_markup(doc) is None:
            ids = np.array(self.tokenizer.encode(text), dtype=np.int64)
            return {
                "tokens": ids,
                "token_class": np.full(len(ids), TokenClass.OTHER, dtype=np.int8),
                "judge": np.full(len(ids), JUDGE_UNKNOWN, dtype=np.int8),
            }
        ids, piece_begin, piece_end = encode_with_offsets(self.tokenizer, text)
        to_bytes = char_to_byte_offsets(text)
        if words is None:
            classes = np.full(len(ids), TokenClass.OTHER, dtype=np.int8)
        else:
            classes = piece_classes(text, to_bytes, piece_begin, piece_end, words.begin, words.end, words.classes)
        return {"tokens": ids, "token_class": classes, "judge": self._judge(doc, piece_begin, piece_end, to_bytes)}

    def _judge(
        self, doc: Document, piece_begin: np.ndarray, piece_end: np.ndarray, to_bytes: np.ndarray
    ) -> np.ndarray:
        """Judge labels of the pieces; ``to_bytes`` maps the text's character offsets to byte offsets."""
        markup = _judge_markup(doc)
        judge = np.full(len(piece_begin), JUDGE_UNKNOWN, dtype=np.int8)
        if markup is None:
            return judge
        if doc.num_parts > 1:
            self.counts["judge_split_document"] += 1
            return judge
        spans, stats = judge_spans(doc.text, markup)
        self.counts["judge_values"] += stats.values
        self.counts["judge_unmapped"] += stats.unmapped
        self.counts["judge_not_in_text"] += stats.not_found
        self.counts["judge_unparseable"] += stats.unparseable
        span_begin = np.array([to_bytes[b] for b, _ in spans], dtype=np.int64)
        span_end = np.array([to_bytes[e] for _, e in spans], dtype=np.int64)
        called = pieces_in_spans(piece_begin, piece_end, span_begin, span_end)
        judge[:] = JUDGE_KEEP
        judge[called] = JUDGE_CALL
        return judge


class Audit:
    """spaCy (``annotator``) labeling the share ``ratio`` of the documents a student labels, chosen by a hash of
    the text, so the same documents are audited whatever the worker, the epoch or a resume."""

    def __init__(self, annotator: FactAnnotator, ratio: float) -> None:
        self.annotator = annotator
        self.ratio = ratio

    def samples(self, doc: Document) -> bool:
        return zlib.crc32(doc.text.encode("utf-8", "surrogatepass")) < self.ratio * 2**32


def audit_figures(counts: dict[str, int]) -> dict[str, float]:
    """The student's agreement with spaCy, and its fact precision and recall, from the ``audit_*`` counts
    (empty before any document was audited)."""
    pieces = counts.get("audit_pieces", 0)
    if not pieces:
        return {}
    true_positive = counts.get("audit_fact_true_positive", 0)
    predicted = true_positive + counts.get("audit_fact_false_positive", 0)
    actual = true_positive + counts.get("audit_fact_false_negative", 0)
    return {
        "student_agreement": counts.get("audit_agree", 0) / pieces,
        "student_fact_precision": true_positive / predicted if predicted else 1.0,
        "student_fact_recall": true_positive / actual if actual else 1.0,
        "audited_pieces": pieces,
    }


def student_path(labeler: str) -> str | None:
    """The student file of ``annotation.labeler`` (``student:PATH``); None for ``spacy``."""
    if labeler == "spacy":
        return None
    if labeler.startswith("student:") and labeler[len("student:") :]:
        return labeler[len("student:") :]
    raise ValueError(f"annotation.labeler must be 'spacy' or 'student:PATH', got {labeler!r}")


def build_annotator(
    labeler: str, tokenizer: Tokenizer, *, spacy_model: str, batch_size: int, max_doc_chars: int,
    student_dtype: str = "auto",
) -> FactAnnotator | StudentAnnotator:
    """The annotator ``labeler`` names: ``spacy`` (the spaCy model and the rules) or ``student:PATH`` (running in
    ``student_dtype``)."""
    path = student_path(labeler)
    if path:
        from .student_labeler import StudentAnnotator  # torch: only when needed

        return StudentAnnotator.load(path, tokenizer, student_dtype)
    annotator = FactAnnotator(spacy_model, batch_size=batch_size)
    # Documents are split to max_doc_chars before spaCy sees them; spaCy's own guard would stop a worker.
    annotator.nlp.max_length = max(annotator.nlp.max_length, max_doc_chars)
    return annotator


def _shard_cache(cache: LabelCache, opened: dict[str, ShardLabelCache], url: str) -> ShardLabelCache:
    """The view of ``cache`` for ``url``'s shard, opened on the shard's first document."""
    if url not in opened:
        opened[url] = cache.shard(url)
    return opened[url]


def _judge_markup(doc: Document) -> str | None:
    markup = doc.meta.get("annotated_text")
    return markup if isinstance(markup, str) and markup else None


def labeler_identity(annotator_identity: str | None, tokenizer_path: str | Path) -> str:
    return f"{annotator_identity or 'unannotated'}|tokenizer:{file_digest(tokenizer_path)}"


def stored_labels_bytes(identity: str, parts: list[Labels], reference_identity: str | None = None) -> bytes:
    """The ``labels.npz`` member of an offline-annotated sample (see :meth:`DocumentLabeler._stored_labels`);
    with ``reference_identity``, the parts' reference losses too. The zip container stores a CRC-32 of every
    member, which the reader checks."""
    columns = dict(FACT_LABELS)
    extra = {}
    if reference_identity is not None:
        columns["ref_loss"] = LABEL_COLUMNS["ref_loss"]
        extra["reference"] = np.array(reference_identity)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        identity=np.array(identity),
        part_lengths=np.array([len(part["tokens"]) for part in parts], dtype=np.int64),
        **extra,
        **{name: np.concatenate([part[name] for part in parts]).astype(dtype) for name, dtype in columns.items()},
    )
    return buffer.getvalue()
