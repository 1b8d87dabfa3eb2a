"""Distillation of a student fact labeler (:mod:`.student_labeler`) from spaCy and the rules.

1. **Targets.** spaCy parses each document and :func:`.annotation.local_labels` gives what the rules decide
   locally; aligned to SentencePiece pieces these are the student's targets (span tag, base class, "fact if
   first"), next to the teacher's final class of each piece (the referee) and what spaCy said of the piece's
   word on the way (fine-grained tag, dependency label, entity type: the rules read them, so the student
   learns them too, on a head of its own used only in training). Targets are written through to
   the label cache under their own identity (teacher + rules + tokenizer), so a second distillation over the
   same documents skips spaCy; the missing ones are parsed in worker processes, with progress on the log.
2. **Training.** The network learns the three targets on windows of pieces; one document in ten (by content
   hash) is held out. Optionally copies of the training documents with words swapped (:mod:`.augment`),
   labeled by spaCy in the same way, add examples.
3. **Agreement.** On the held-out documents the student labels as it will in the loader (network, then the
   document-level rules) and is compared with the teacher: 3-class agreement, fact precision and recall.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from itertools import islice
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from spacy.attrs import DEP, ENT_TYPE, TAG
from spacy.language import Language
from spacy.tokens import Doc

from ..labels import TokenClass
from ..shards.documents import split_text
from ..shards.sources import read_documents
from ..tokenizer import Tokenizer
from .alignment import char_to_byte_offsets, encode_with_offsets, piece_classes
from .annotation import FactAnnotator, Mention, WordLabels, first_mentions, local_labels
from .augment import augmented_texts
from .label_cache import LabelCache, document_key
from .label_cache import file_digest
from .student_labeler import (
    BASE_CLASSES,
    BEGIN,
    BEGIN_PERSON,
    INSIDE,
    INSIDE_PERSON,
    StudentAnnotator,
    StudentConfig,
    StudentNetwork,
    PieceTable,
    find_words,
    piece_table,
    places_among,
    resolve_pieces,
    save_student,
    word_features,
    word_hashes,
)

log = logging.getLogger(__name__)

TARGET_COLUMNS = {
    "tokens": np.dtype(np.int32),
    "token_class": np.dtype(np.int8),
    "span_tag": np.dtype(np.int8),
    "base_class": np.dtype(np.int8),
    "fact_if_first": np.dtype(np.int8),
    "tag": np.dtype(np.int8),
    "dep": np.dtype(np.int8),
    "entity": np.dtype(np.int8),
}
"""Per piece: the teacher's final class, the student's three targets and its auxiliary ones."""
AUXILIARY_LABELS = {"tag": ("tagger", TAG), "dep": ("parser", DEP), "entity": ("ner", ENT_TYPE)}
"""The auxiliary targets: per piece, 1 + the place of its word's label among the spaCy component's labels (0:
none, or a piece between words)."""
AUXILIARY_WEIGHT = 0.3
"""The auxiliary targets' weight in the training loss (on their mean), next to the three targets the labels use:
on 7.2M pieces a width-96 student agrees on 95.19% of held-out pieces at 0.3, 95.10% at 1 and without them."""
TARGETS_VERSION = 2
"""Part of the targets' cache namespace: 2 adds the auxiliary targets."""
HELD_OUT_EVERY = 10
MAX_DOC_CHARS = 1_000_000
"""spaCy's limit on a text: a longer document is distilled in parts, as the loader (``data.max_doc_chars``, the
same by default) labels it."""
EPOCHS = 12
"""Passes over the training documents. On 7.2M pieces a width-64 student agrees on 93.9% of held-out pieces after 6
epochs, 94.3% after 12; a width-96 one on 94.8% after 12 and 94.9% after 24. With copies
(:data:`AUGMENT`), :func:`default_epochs` keeps the steps of ``EPOCHS`` passes over the documents alone."""
AUGMENT = 1
"""Swapped copies of each training document (:mod:`.augment`). On 7.2M pieces, one copy and 6 epochs (the steps
of 12 without copies) take a width-128 student from 95.29% to 95.53% held-out agreement, fact precision / recall
from 90.6% / 90.0% to 91.2% / 90.3%, for spaCy on the copies (as long as on the documents) once."""
KNOWN_WORDS = 32768
"""At most this many words known by identity; on 7.2M pieces, 21,721 words are seen often enough
(:data:`KNOWN_WORD_MIN_COUNT`), and knowing them takes a width-96 student from 94.8% to 95.1%, a width-64 one
from 94.3% to 94.9%."""
WINDOW = 512
BATCH_PIECES = 4096
"""Pieces of a training batch, padding included: about the real pieces of 16 windows drawn at random, many of
which are a short document's whole text."""
LENGTH_SORT_WINDOWS = 1024
"""Windows shuffled together and then sorted by length into batches: few enough that each batch is a random draw."""
KNOWN_WORD_MIN_COUNT = 10
"""A word seen fewer times in training stays unknown: its embedding would learn its few examples by heart."""
IGNORED = -100


class AuxiliaryCodes:
    """The auxiliary labels (:data:`AUXILIARY_LABELS`) of a parsed document's words, as small codes."""

    def __init__(self, nlp: Language) -> None:
        self._attributes, self._tables = [], []
        for component, attribute in AUXILIARY_LABELS.values():
            hashes = np.array([nlp.vocab.strings[label] for label in nlp.get_pipe(component).labels], dtype=np.uint64)
            order = np.argsort(hashes)
            self._attributes.append(attribute)
            self._tables.append((hashes[order], np.append(0, order + 1).astype(np.int8)))

    def __call__(self, doc: Doc) -> np.ndarray:
        """``[words, len(AUXILIARY_LABELS)]`` codes of ``doc``'s tokens."""
        columns = doc.to_array(self._attributes).reshape(len(doc), len(self._attributes)).astype(np.uint64)
        codes = np.zeros(columns.shape, dtype=np.int8)
        for column, (hashes, code_of_place) in enumerate(self._tables):
            codes[:, column] = code_of_place[places_among(hashes, columns[:, column])]
        return codes


def piece_targets(
    tokenizer: Tokenizer, text: str, words: WordLabels, mentions: list[Mention], auxiliary: np.ndarray
) -> dict[str, np.ndarray]:
    """The student's targets and the teacher's classes for the pieces of ``text``, from the rules' local labels
    and the words' :class:`AuxiliaryCodes`."""
    ids, begin, end = encode_with_offsets(tokenizer, text)
    to_bytes = char_to_byte_offsets(text)

    def classes_with_facts(facts: list[int]) -> np.ndarray:
        word_classes = words.classes.copy()
        word_classes[facts] = TokenClass.FACT
        return piece_classes(text, to_bytes, begin, end, words.begin, words.end, word_classes)

    first_facts = [i for m, first in zip(mentions, first_mentions(mentions)) if first for i in m.facts]
    span_tag = np.zeros(len(ids), dtype=np.int8)
    text_bytes = text.encode("utf-8")
    for mention in mentions:
        if not mention.words:
            continue
        span_begin = int(to_bytes[words.begin[min(mention.words)]])
        span_end = int(to_bytes[words.end[max(mention.words)]])
        # SentencePiece carries the space before a word on the word's first piece ("▁" before digits too).
        while span_begin > 0 and text_bytes[span_begin - 1] == 0x20:
            span_begin -= 1
        first = int(np.searchsorted(end, span_begin, side="right"))
        last = int(np.searchsorted(begin, span_end, side="left")) - 1
        if first <= last:
            person = mention.person_parts is not None
            span_tag[first] = BEGIN_PERSON if person else BEGIN
            span_tag[first + 1 : last + 1] = INSIDE_PERSON if person else INSIDE
    # A piece takes the labels of the word its last byte falls in (none when it falls between words).
    piece_auxiliary = np.zeros((len(ids), len(AUXILIARY_LABELS)), dtype=np.int8)
    if len(words.begin):
        word_begin, word_end = to_bytes[words.begin], to_bytes[words.end]
        last_byte = end - 1
        word_of = np.maximum(np.searchsorted(word_begin, last_byte, side="right") - 1, 0)
        in_word = (word_begin[word_of] <= last_byte) & (last_byte < word_end[word_of])
        piece_auxiliary[in_word] = auxiliary[word_of[in_word]]
    return {
        "tokens": ids,
        "token_class": classes_with_facts(first_facts),
        "span_tag": span_tag,
        "base_class": classes_with_facts([]),
        "fact_if_first": classes_with_facts([i for m in mentions for i in m.facts]) == TokenClass.FACT,
        **{name: piece_auxiliary[:, column] for column, name in enumerate(AUXILIARY_LABELS)},
    }


_worker: tuple[FactAnnotator, Tokenizer, AuxiliaryCodes] | None = None


def _start_worker(spacy_model: str, tokenizer_path: str) -> None:
    global _worker
    torch.set_num_threads(1)
    annotator = FactAnnotator(spacy_model)
    _worker = (annotator, Tokenizer(tokenizer_path), AuxiliaryCodes(annotator.nlp))


def _targets_of(texts: list[str]) -> list[dict[str, np.ndarray]]:
    annotator, tokenizer, auxiliary_codes = _worker
    parsed = annotator.annotate(texts, rules=lambda doc: (*local_labels(doc), auxiliary_codes(doc)))
    return [piece_targets(tokenizer, text, *labels) for text, labels in zip(texts, parsed)]


def teacher_identity(spacy_model: str) -> str:
    """The teacher's identity (spaCy model and rules), as the spaCy labeler names itself."""
    return FactAnnotator(spacy_model).identity


def gather_targets(
    texts: list[str],
    tokenizer_path: str,
    *,
    spacy_model: str,
    cache: LabelCache | None,
    source: str,
    workers: int,
) -> list[dict[str, np.ndarray]]:
    """Targets of every text: from the cache, else spaCy in ``workers`` processes (progress on the log)."""
    shard_cache = cache.shard(source) if cache is not None else None
    keys = [document_key(text, None) for text in texts]
    targets: list[dict | None] = [shard_cache.get(key) if shard_cache else None for key in keys]
    missing = [i for i, found in enumerate(targets) if found is None]
    log.info("%s: %d documents, %d from the cache, %d for spaCy", source, len(texts), len(texts) - len(missing), len(missing))
    if missing:
        chunks = [missing[i : i + 8] for i in range(0, len(missing), 8)]
        started, pieces, done = time.monotonic(), 0, 0
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, _start_worker, (spacy_model, tokenizer_path)) as pool:
            for chunk, results in zip(chunks, pool.imap(_targets_of, [[texts[i] for i in c] for c in chunks])):
                for i, result in zip(chunk, results):
                    targets[i] = result
                    pieces += len(result["tokens"])
                    if shard_cache is not None:
                        shard_cache.put(keys[i], result)
                done += len(chunk)
                elapsed = time.monotonic() - started
                log.info("spaCy: %d/%d documents, %d pieces, %.0f pieces/s", done, len(missing), pieces, pieces / elapsed)
        if shard_cache is not None:
            shard_cache.flush()
    return targets


def split_held_out(texts: list[str]) -> tuple[list[int], list[int]]:
    """Indices of training and held-out documents; held out: one in ``HELD_OUT_EVERY`` by content hash."""
    held_out = [i for i, text in enumerate(texts) if document_key(text, None)[0] % HELD_OUT_EVERY == 0]
    chosen = set(held_out)
    return [i for i in range(len(texts)) if i not in chosen], held_out


def frequent_words(documents: list[np.ndarray], table: PieceTable, count: int) -> np.ndarray:
    """The hashes (:func:`word_hashes`, sorted) of the ``count`` most frequent words of the documents' pieces,
    among those seen at least ``KNOWN_WORD_MIN_COUNT`` times."""
    if count == 0 or not documents:
        return np.zeros(0, dtype=np.int64)
    first_pieces = [np.zeros(0, dtype=np.int64)]  # the hash of each word's first piece stands for the word
    for ids in documents:
        if len(ids):
            found = find_words(ids, table)
            first_pieces.append(word_hashes(ids, table, found)[found[0]])
    hashes = np.concatenate(first_pieces)
    words, counts = np.unique(hashes, return_counts=True)
    frequent = np.flatnonzero(counts >= KNOWN_WORD_MIN_COUNT)
    chosen = frequent[np.argsort(-counts[frequent], kind="stable")[:count]]
    return np.sort(words[chosen])


def first_pieces(targets: list[dict[str, np.ndarray]], max_pieces: int | None) -> list[dict[str, np.ndarray]]:
    """The documents' targets up to ``max_pieces`` pieces in all (the last document cut), or all of them."""
    if max_pieces is None:
        return targets
    kept, total = [], 0
    for document in targets:
        if total >= max_pieces:
            break
        kept.append({name: column[: max_pieces - total] for name, column in document.items()})
        total += len(kept[-1]["tokens"])
    return kept


def _windows(targets: list[dict[str, np.ndarray]], table: PieceTable, network: StudentNetwork) -> list[dict[str, np.ndarray]]:
    """Windows of ``WINDOW`` pieces, each with the word features and word identities the network takes
    (words are found over the whole document)."""
    windows = []
    for document in targets:
        ids = document["tokens"]
        found = find_words(ids, table) if len(ids) else None
        if network.words is not None:
            document = {**document, "words": word_features(ids, table, found)}
        if network.word_identities is not None:
            document = {**document, "identities": network.identities_of(word_hashes(ids, table, found))}
        for start in range(0, len(document["tokens"]), WINDOW):
            windows.append({name: column[start : start + WINDOW] for name, column in document.items()})
    return windows


def _length_batches(lengths: np.ndarray, piece_budget: int, random: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches of window indices, in random order: windows of about the same length together, so
    that padding to the longest costs little, each batch at most ``piece_budget`` pieces with its padding (or
    one window)."""
    order = random.permutation(len(lengths))
    batches = []
    for chunk in np.array_split(order, max(1, len(order) // LENGTH_SORT_WINDOWS)):
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        start = 0
        while start < len(chunk):
            size = max(1, piece_budget // int(lengths[chunk[start]]))
            batches.append(chunk[start : start + size])
            start += size
    return [batches[i] for i in random.permutation(len(batches))]


def _batch(
    windows: list[dict[str, np.ndarray]], shapes: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor | None]:
    length = max(len(w["tokens"]) for w in windows)

    def padded(name: str, fill: int, convert=lambda column: column) -> torch.Tensor:
        out = np.full((len(windows), length), fill, dtype=np.int64)
        for row, window in enumerate(windows):
            out[row, : len(window[name])] = convert(window[name])
        return torch.from_numpy(out).to(device)

    pieces = padded("tokens", 0)
    return {
        "pieces": pieces,
        "shapes": shapes[pieces],
        "words": padded("words", 0) if "words" in windows[0] else None,
        "identities": padded("identities", 0) if "identities" in windows[0] else None,
        "span_tag": padded("span_tag", IGNORED),
        "base_class": padded("base_class", IGNORED, lambda column: column == BASE_CLASSES[1]),
        "fact_if_first": padded("fact_if_first", IGNORED),
        **{name: padded(name, IGNORED) for name in AUXILIARY_LABELS},
    }


def _loss(logits: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor], targets: Iterable[str]) -> torch.Tensor:
    """The sum of the cross-entropies of each of ``logits`` with the batch's target of the same place in ``targets``."""
    return sum(
        F.cross_entropy(scores.flatten(0, 1), batch[name].flatten(), ignore_index=IGNORED)
        for scores, name in zip(logits, targets, strict=True)
    )


def default_epochs(augment: int) -> int:
    """Passes over the training documents and their ``augment`` copies each that make the steps of
    :data:`EPOCHS` passes over the documents alone."""
    return max(1, round(EPOCHS / (1 + augment)))


def train_student(
    targets: list[dict[str, np.ndarray]],
    tokenizer: Tokenizer,
    *,
    epochs: int = EPOCHS,
    width: int = StudentConfig.width,
    layers: int = StudentConfig.layers,
    word_dim: int = StudentConfig.word_dim,
    known_words: int = KNOWN_WORDS,
    auxiliary_weight: float = AUXILIARY_WEIGHT,
    dropout: float = StudentConfig.dropout,
    batch_pieces: int = BATCH_PIECES,
    learning_rate: float = 3e-3,
    seed: int = 0,
    device: str | None = None,
) -> StudentNetwork:
    """The network trained on the targets' windows, on the GPU when there is one.

    The auxiliary targets are learned through a head of their own, left behind: labeling never computes them."""
    torch.manual_seed(seed)
    target_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    table = piece_table(tokenizer)
    vocabulary = frequent_words([document["tokens"] for document in targets], table, known_words)
    config = StudentConfig(num_pieces=tokenizer.num_pieces, width=width, layers=layers, word_dim=word_dim,
                           known_words=len(vocabulary), dropout=dropout)
    network = StudentNetwork(config)
    if len(vocabulary):
        network.known_word_hashes.copy_(torch.from_numpy(vocabulary))
        log.info("the student knows %d words by identity (each seen at least %d times)", len(vocabulary),
                 KNOWN_WORD_MIN_COUNT)
    windows = _windows(targets, table, network)
    network.to(target_device)
    auxiliary_sizes = [max(int(document[name].max(initial=0)) for document in targets) + 1 for name in AUXILIARY_LABELS]
    auxiliary_head = torch.nn.Linear(width, sum(auxiliary_sizes), device=target_device) if auxiliary_weight else None
    shapes = torch.from_numpy(table.shapes).to(target_device)
    if not windows:
        raise ValueError("no training pieces: give more documents")
    lengths = np.array([len(window["tokens"]) for window in windows])
    random = np.random.default_rng(seed)
    epoch_batches = [_length_batches(lengths, batch_pieces, random) for _ in range(epochs)]
    steps = sum(len(batches) for batches in epoch_batches)
    parameters = [*network.parameters(), *(auxiliary_head.parameters() if auxiliary_head else [])]
    # The fused update (one kernel over all parameters) takes an eighth less of a CPU step than the loop over them.
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01, fused=True)
    # OneCycleLR divides by the length of its warm-up phase, pct_start x total_steps - 1: at least one step,
    # so a few documents (the GPU check's keep-up section) train for the few steps they have.
    warmup_share = 0.1
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, pct_start=warmup_share,
                                                   total_steps=max(steps, math.ceil(2 / warmup_share)))
    network.train()
    for epoch, batches in enumerate(epoch_batches):
        losses = []
        for indices in batches:
            batch = _batch([windows[i] for i in indices], shapes, target_device)
            hidden = network.encode(batch["pieces"], batch["shapes"], batch["words"], identities=batch["identities"])
            loss = _loss(network.outputs(hidden), batch, ("span_tag", "base_class", "fact_if_first"))
            if auxiliary_weight:
                auxiliary = auxiliary_head(hidden).split(auxiliary_sizes, dim=-1)
                loss = loss + auxiliary_weight * _loss(auxiliary, batch, AUXILIARY_LABELS) / len(AUXILIARY_LABELS)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        log.info("epoch %d/%d: loss %.4f over %d windows", epoch + 1, epochs, float(np.mean(losses)), len(windows))
    return network.cpu().eval()


def agreement(teacher: list[np.ndarray], student: list[np.ndarray]) -> dict:
    """3-class agreement and fact precision / recall of the student's piece classes against the teacher's (None
    without pieces: few documents may hold none out)."""
    if not teacher:
        return {"pieces": 0, "agreement": None, "fact_precision": None, "fact_recall": None}
    expected, predicted = np.concatenate(teacher), np.concatenate(student)
    true_facts = int(((expected == TokenClass.FACT) & (predicted == TokenClass.FACT)).sum())
    return {
        "pieces": int(expected.size),
        "agreement": round(float((expected == predicted).mean()), 4),
        "fact_precision": round(true_facts / max(int((predicted == TokenClass.FACT).sum()), 1), 4),
        "fact_recall": round(true_facts / max(int((expected == TokenClass.FACT).sum()), 1), 4),
    }


def rules_on_targets(text: str, targets: dict[str, np.ndarray], tokenizer: Tokenizer) -> np.ndarray:
    """The document-level rules over the targets themselves: what a perfect student would label."""
    _, begin, end = encode_with_offsets(tokenizer, text)
    return resolve_pieces(
        text, begin, end, targets["span_tag"], targets["base_class"], targets["fact_if_first"].astype(bool)
    )


def distill(
    sources: list[str],
    tokenizer_path: str,
    out: str | Path,
    *,
    max_docs: int,
    max_pieces: int | None,
    spacy_model: str = "en_core_web_sm",
    cache_dir: str | Path | None,
    workers: int = 1,
    epochs: int | None = None,
    width: int = StudentConfig.width,
    layers: int = StudentConfig.layers,
    word_dim: int = StudentConfig.word_dim,
    known_words: int = KNOWN_WORDS,
    auxiliary_weight: float = AUXILIARY_WEIGHT,
    dropout: float = StudentConfig.dropout,
    augment: int = AUGMENT,
) -> dict:
    """Targets, training and held-out agreement; writes the student to ``out`` and returns its report.

    ``max_pieces`` caps the training pieces taken from the sources; ``augment`` adds that many copies of those
    training documents with words swapped (:mod:`.augment`), labeled by spaCy like the others; ``epochs`` counts
    passes over both (by default :func:`default_epochs`)."""
    tokenizer = Tokenizer(tokenizer_path)
    teacher = teacher_identity(spacy_model)
    cache = None
    if cache_dir is not None:
        identity = f"distill-targets-{TARGETS_VERSION}|{teacher}|tokenizer:{file_digest(tokenizer_path)}"
        cache = LabelCache(cache_dir, identity, TARGET_COLUMNS)
    texts, targets, origins = [], [], []
    for source in sources:
        source_texts = []
        for document in islice(read_documents(source), max_docs):
            for part in split_text(document["text"], MAX_DOC_CHARS):
                source_texts.append(part)
                origins.append(document.get("source", source))
        texts += source_texts
        targets += gather_targets(
            source_texts, tokenizer_path, spacy_model=spacy_model, cache=cache, source=source, workers=workers
        )
    training, held_out = split_held_out(texts)
    natural = first_pieces([targets[i] for i in training], max_pieces)
    augmented = [part for text in augmented_texts([texts[i] for i in training[: len(natural)]], copies=augment,
                                                  spacy_model=spacy_model, workers=workers)
                 for part in split_text(text, MAX_DOC_CHARS)]  # swapped words may make a copy longer
    augmented_targets = gather_targets(augmented, tokenizer_path, spacy_model=spacy_model, cache=cache,
                                       source="augmented", workers=workers) if augmented else []
    started = time.monotonic()
    network = train_student(
        natural + augmented_targets, tokenizer, epochs=default_epochs(augment) if epochs is None else epochs,
        width=width, layers=layers, word_dim=word_dim, known_words=known_words, auxiliary_weight=auxiliary_weight,
        dropout=dropout,
    )
    student = StudentAnnotator(network, tokenizer, identity="distilling")
    teacher_classes = [targets[i]["token_class"] for i in held_out]
    student_classes = [student.label_text(texts[i]).classes for i in held_out]
    by_origin: dict[str, list[int]] = {}
    for position, document in enumerate(held_out):
        by_origin.setdefault(origins[document], []).append(position)
    report = {
        "documents": len(texts),
        "training_pieces": sum(len(document["tokens"]) for document in natural),
        "augmented_documents": len(augmented),
        "augmented_pieces": sum(len(document["tokens"]) for document in augmented_targets),
        "training_s": round(time.monotonic() - started, 1),
        "held_out": agreement(teacher_classes, student_classes),
        "held_out_by_source": {
            origin: agreement([teacher_classes[i] for i in positions], [student_classes[i] for i in positions])
            for origin, positions in sorted(by_origin.items())
        },
        "perfect_student": agreement(teacher_classes, [rules_on_targets(texts[i], targets[i], tokenizer) for i in held_out]),
    }
    save_student(out, network, tokenizer=file_digest(tokenizer_path), teacher=teacher, report=report)
    return report
