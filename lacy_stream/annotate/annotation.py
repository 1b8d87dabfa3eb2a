"""Annotation: spaCy parses a document, rules of the paper's Appendix A.2.1 sort its words into classes.

Every spaCy token (whitespace tokens included) gets one :class:`~lacy_stream.labels.TokenClass`:

1. **Named entities** (all spaCy types, dates and numbers included). Only the first mention in a document
   is a fact. A PERSON mention repeats when any part of its name was seen in an earlier PERSON mention
   ("Wolfgang" after "Wolfgang Amadeus Mozart"); other entities repeat only as the full entity.
2. **Noun chunks** beyond NER, split at whitespace tokens (a chunk never spans a newline). The first
   occurrence of a chunk is a fact when it is
   - likely a PERSON: it has a capitalised word (not just sentence-initial) and is a subject or
     appositive, or is followed by "born"/"died", or comes after (or starts with) a title such as "Dr";
   - likely an ORG: a keyword such as committee, council, university, or a leading "the" before a
     capitalised word;
   - a proper noun: its head is one ("Mount Everest"); a chunk whose head is a common noun and that
     qualifies by no other rule has its proper nouns alone as facts ("Paris" in "the Paris office");
   - a common noun in a role that carries information: predicative attribute ("She was a lawyer"),
     direct object ("She studied physics"), appositive ("Marie Curie, a physicist, ..."), unless a manner
     preposition hangs off it ("a lawyer by training").
3. **Numbers** outside entities: the first occurrence of each number word is a fact ("1987" is one word,
   however many pieces the tokenizer cuts it into).
4. **Grammar**: determiners, prepositions, conjunctions, auxiliaries, punctuation.
5. Everything else is **other**.

Choices where the paper is vague (changing any of them changes :data:`RULES_VERSION`):

- Mentions are processed in document order, entities before chunks at the same position, and share one
  record of what was seen: a chunk repeating an earlier entity is a repeat, and vice versa. A mention that
  does not qualify as a fact still counts as seen ("physics" as an object after "physics" in a prepositional
  phrase is not a first occurrence).
- Repetition ignores case, surrounding whitespace and a leading "the"/"a"/"an"; chunk keys also drop
  pronouns ("his portraits" repeats "portraits").
- Inside a fact span, punctuation, whitespace and leading determiners are not facts ("the" in "the Red
  Cross", the comma in "May 11, 1751"); other grammatical words inside a name stay facts ("of" in
  "University of Cambridge") because the whole name is what the model cannot guess.
- In a chunk, only the words not already covered by an entity or a number are decided by the chunk rules.
- A chunk whose head is a pronoun is never a fact. Whitespace tokens are grammar (like punctuation).
- Parts of a document split for length are annotated as separate documents.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, TextIO, TypeVar

import numba
import numpy as np
from spacy import symbols
from spacy.attrs import (
    DEP,
    HEAD,
    IDX,
    IS_SPACE,
    IS_TITLE,
    LENGTH,
    LIKE_NUM,
    LOWER,
    POS,
    SENT_START,
)
from spacy.tokens import Doc

from ..labels import TokenClass
from ..shards.documents import MAX_SKIP_RATIO, ReadStats, split_text
from ..shards.make_shards import FieldNames, record_from_object
from .spacy_pipeline import load_pipeline, pipeline_identity

log = logging.getLogger(__name__)

RULES_VERSION = "lacy-rules-2"
"""2: a proper noun makes a fact of itself, not of the whole chunk, when the chunk's head is a common noun."""
T = TypeVar("T")

GRAMMAR_POS = ("DET", "ADP", "CCONJ", "SCONJ", "AUX", "PUNCT", "SPACE")
PERSON_ROLES = {"nsubj", "nsubjpass", "appos"}
INFORMATIVE_ROLES = {"attr", "dobj", "appos", "oprd"}
PREDICATE_ROLES = {"attr", "dobj", "oprd"}
"""Roles whose verb also governs them: "was a lawyer by training" may hang "by" off "was"."""
PERSON_TITLES = {
    "dr", "doctor", "professor", "prof", "mr", "mrs", "ms", "miss", "sir", "dame", "lord", "lady", "saint",
    "st", "king", "queen", "prince", "princess", "president", "general", "captain", "reverend", "rev",
    "father", "sister", "brother", "bishop", "judge", "senator", "governor", "mayor",
}  # fmt: skip
LIFE_EVENT_CUES = {"born", "died", "dies"}
ORG_KEYWORDS = {
    "committee", "council", "university", "college", "institute", "academy", "school", "society",
    "association", "federation", "union", "league", "club", "party", "company", "corporation", "agency",
    "ministry", "department", "commission", "board", "foundation", "church", "museum", "hospital", "bank",
    "army", "navy", "court", "parliament", "assembly", "congress", "senate", "orchestra", "band", "team",
}  # fmt: skip
MANNER_PREPOSITIONS = {"by", "through", "via"}
_ARTICLES = ("the ", "a ", "an ")


@dataclass
class WordLabels:
    """Per spaCy token of one document: character span ``[begin, end)`` and class."""

    begin: np.ndarray
    end: np.ndarray
    classes: np.ndarray

    def spans(self, text: str) -> list[list]:
        """``[[begin, end, class name], ...]`` for the words of ``text`` (whitespace tokens left out)."""
        return [
            [int(b), int(e), TokenClass(int(c)).name.lower()]
            for b, e, c in zip(self.begin.tolist(), self.end.tolist(), self.classes.tolist())
            if text[b:e].strip()
        ]


class _Mentions:
    """What one document has mentioned so far."""

    def __init__(self) -> None:
        self.texts: set[str] = set()
        self.person_parts: set[str] = set()

    def first_person(self, key: str, parts: list[str]) -> bool:
        first = key not in self.texts and not any(part in self.person_parts for part in parts)
        self.texts.add(key)
        self.person_parts.update(parts)
        return first

    def first(self, key: str) -> bool:
        first = key not in self.texts and key not in self.person_parts
        self.texts.add(key)
        return first


def person_name_parts(words: Iterable[str]) -> list[str]:
    """The (lower-case) words of a PERSON mention that name the person: "Wolfgang" of "Dr Wolfgang Mozart"."""
    return [w for w in words if w.isalpha() and w.rstrip(".") not in PERSON_TITLES and len(w) > 1]


def mention_key(words: Iterable[str]) -> str:
    """What a mention of these (lower-case) words must equal to repeat another one."""
    key = " ".join(words)
    for article in _ARTICLES:
        if key.startswith(article):
            return key[len(article) :]
    return key


class _Document:
    """A parsed document as arrays (no spaCy Token objects: they cost more than the rules), plus helpers."""

    def __init__(self, doc: Doc) -> None:
        self.size = len(doc)
        columns = doc.to_array([POS, DEP, HEAD, IDX, LENGTH, LIKE_NUM, IS_SPACE, IS_TITLE, SENT_START, LOWER])
        self.pos = columns[:, 0].astype(np.int64)
        self.dep = columns[:, 1]  # string-store hashes: uint64
        self.head = np.arange(self.size) + columns[:, 2].astype(np.int64)  # HEAD is stored relative
        self.begin = columns[:, 3].astype(np.int64)
        self.length = columns[:, 4].astype(np.int64)
        self.like_num, self.is_space, self.is_title = columns[:, 5] > 0, columns[:, 6] > 0, columns[:, 7] > 0
        self.sent_start = columns[:, 8].astype(np.int64) == 1
        self._lower_ids = columns[:, 9]
        self._strings = doc.vocab.strings
        self.grammar = np.isin(self.pos, [int(getattr(symbols, name)) for name in GRAMMAR_POS])
        manner = np.isin(self._lower_ids, [self._strings[word] for word in MANNER_PREPOSITIONS])
        self.has_manner_preposition = set(self.head[manner & (self.dep == self._strings["prep"])].tolist())
        self.covered = np.zeros(self.size, dtype=bool)

    def lower(self, i: int) -> str:
        return self._strings[int(self._lower_ids[i])]

    def dep_is(self, i: int, labels: set[str]) -> bool:
        return self._strings[int(self.dep[i])] in labels

    def fact_words(self, indices: list[int]) -> list[int]:
        """The words of a fact span that are facts: not its punctuation, whitespace and leading determiners."""
        facts = []
        leading = True
        for i in indices:
            pos = self.pos[i]
            if pos == symbols.PUNCT or pos == symbols.SPACE or (leading and pos == symbols.DET):
                continue
            leading = False
            facts.append(i)
        return facts

    def words(self, indices: Iterable[int]) -> list[str]:
        return [self.lower(i) for i in indices if not self.is_space[i]]


def _entity(document: _Document, start: int, end: int, label: str) -> Mention:
    indices = list(range(start, end))
    document.covered[start:end] = True
    words = document.words(indices)
    parts = person_name_parts(words) if label == "PERSON" else None
    key_words = [i for i in indices if not document.is_space[i]]
    return Mention(mention_key(words), parts, key_words, document.fact_words(indices))


def _chunk_facts(document: _Document, indices: list[int], content: list[int], root: int) -> list[int]:
    """The words of a first-occurrence chunk that are facts (``content`` are its words not decided by other
    rules): all of them when the chunk qualifies, else its proper nouns."""
    if _chunk_qualifies(document, indices, content, root):
        return content
    return [i for i in content if document.pos[i] == symbols.PROPN]


def _chunk_qualifies(document: _Document, indices: list[int], content: list[int], root: int) -> bool:
    """Whether a first-occurrence chunk is a fact as a whole; ``content`` are its words not decided by other rules."""
    pos = document.pos
    title_case = [i for i in content if document.is_title[i]]
    # A capital at the start of a sentence says little about the word: role and "the" need another one.
    capitalised = any(not document.sent_start[i] for i in title_case)
    if pos[root] == symbols.PROPN and root in content:
        return True
    if capitalised and (document.dep_is(root, PERSON_ROLES) or document.lower(indices[0]) == "the"):
        return True
    if title_case:
        before = indices[0] - 1
        if document.lower(indices[0]).rstrip(".") in PERSON_TITLES:
            return True
        if before >= 0 and document.lower(before).rstrip(".") in PERSON_TITLES:
            return True
        after = indices[-1] + 1
        while after < document.size and pos[after] in (symbols.AUX, symbols.PUNCT, symbols.ADV):
            after += 1
        if after < document.size and document.lower(after) in LIFE_EVENT_CUES:
            return True
    if any(document.lower(i) in ORG_KEYWORDS for i in content):
        return True
    if pos[root] == symbols.NOUN and document.dep_is(root, INFORMATIVE_ROLES):
        governors = {root}
        if document.dep_is(root, PREDICATE_ROLES):
            governors.add(int(document.head[root]))
        return not governors & document.has_manner_preposition
    return False


NOUN_PHRASE_ROLES = ("oprd", "nsubj", "dobj", "nsubjpass", "pcomp", "pobj", "dative", "appos", "attr", "ROOT")
"""spaCy's English noun chunks: a noun, proper noun or pronoun in one of these roles (or coordinated to
one) and its left subtree."""


def _chunks(document: _Document) -> Iterator[tuple[list[int], int]]:
    """Noun chunks split at whitespace tokens, each as (token indices, index of its head word)."""
    strings = document._strings
    bounds = _noun_chunk_bounds(
        document.pos,
        document.dep,
        document.head,
        np.array([strings[label] for label in NOUN_PHRASE_ROLES], dtype=np.uint64),
        np.uint64(strings["conj"]),
    )
    for start, end in bounds.tolist():
        root = end - 1
        piece: list[int] = []
        for i in range(start, end + 1):
            if i == end or document.is_space[i]:
                if piece:
                    yield piece, root if piece[0] <= root <= piece[-1] else piece[-1]
                piece = []
            else:
                piece.append(i)


@numba.njit(cache=True)
def _noun_chunk_bounds(pos, dep, head, roles, conj):
    """``[start, end)`` of each noun chunk: spaCy's English noun-chunk iterator over arrays.

    The same decisions as ``spacy.lang.en.syntax_iterators.noun_chunks``, without creating a Token object
    per word (which costs more than everything else the rules do).
    """
    size = pos.size
    left_edge = np.arange(size)
    for child in range(size):
        ancestor, steps = child, 0
        while head[ancestor] != ancestor and steps < size:
            ancestor = head[ancestor]
            steps += 1
            if child < left_edge[ancestor]:
                left_edge[ancestor] = child
    bounds = np.empty((size, 2), dtype=np.int64)
    count = 0
    previous_end = -1
    for word in range(size):
        if pos[word] != _NOUN and pos[word] != _PROPN and pos[word] != _PRON:
            continue
        if left_edge[word] <= previous_end:
            continue
        governor = word
        if dep[word] == conj:
            governor = head[word]
            while dep[governor] == conj and head[governor] < governor:
                governor = head[governor]
        is_noun_phrase = False
        for role in roles:
            if dep[governor] == role:
                is_noun_phrase = True
        if is_noun_phrase:
            previous_end = word
            bounds[count, 0] = left_edge[word]
            bounds[count, 1] = word + 1
            count += 1
    return bounds[:count]


_NOUN, _PROPN, _PRON = int(symbols.NOUN), int(symbols.PROPN), int(symbols.PRON)


@dataclass
class Mention:
    """A named entity, noun chunk or number of a document, as the document-level rules see it.

    ``key`` is what a later mention must equal to repeat it; a PERSON has ``person_parts`` (the parts of its
    name). ``words`` are the indices of the words the key was made of, ``facts`` the words that become facts
    when this is the first mention (empty for a chunk that does not qualify: it still counts as seen).
    """

    key: str
    person_parts: list[str] | None
    words: list[int]
    facts: list[int]


def first_mentions(mentions: Iterable[Mention]) -> list[bool]:
    """Whether each mention, in document order, is the first of its kind: the document-level rules."""
    seen = _Mentions()
    return [
        seen.first(mention.key) if mention.person_parts is None else seen.first_person(mention.key, mention.person_parts)
        for mention in mentions
    ]


def local_labels(doc: Doc) -> tuple[WordLabels, list[Mention]]:
    """Everything the rules decide from a word and its sentence: each word's class when no mention makes it a
    fact (grammar or other), and the document's mentions in order. :func:`first_mentions` does the rest."""
    document = _Document(doc)
    mentions: list[Mention] = []
    events: list[tuple[int, int, tuple]] = [(ent.start, 0, ("entity", ent.end, ent.label_)) for ent in doc.ents]
    events += [(indices[0], 1, ("chunk", indices, root)) for indices, root in _chunks(document)]
    events += [(i, 2, ("number",)) for i in np.flatnonzero(document.like_num).tolist()]
    events.sort(key=lambda event: (event[0], event[1]))
    skipped_in_chunks = (symbols.DET, symbols.PRON, symbols.PUNCT)
    for start, _, event in events:
        kind = event[0]
        if kind == "entity":
            mentions.append(_entity(document, start, event[1], event[2]))
        elif kind == "number":
            if not document.covered[start]:
                mentions.append(Mention(document.lower(start), None, [start], [start]))
        else:
            indices, root = event[1], event[2]
            if document.pos[root] == symbols.PRON:
                continue
            content = [
                i
                for i in indices
                if not document.covered[i] and not document.like_num[i] and document.pos[i] not in skipped_in_chunks
            ]
            if not content:
                continue
            facts = _chunk_facts(document, indices, content, root)
            mentions.append(Mention(mention_key(document.words(content)), None, content, facts))
    classes = np.full(document.size, TokenClass.OTHER, dtype=np.int8)
    classes[document.grammar] = TokenClass.GRAMMAR
    return WordLabels(document.begin, document.begin + document.length, classes), mentions


def label_words(doc: Doc) -> WordLabels:
    """The class of every token of a parsed document (see the module docstring for the rules)."""
    words, mentions = local_labels(doc)
    for mention, first in zip(mentions, first_mentions(mentions)):
        if first:
            words.classes[mention.facts] = TokenClass.FACT
    return words


ZONE_BATCHES = 16


class FactAnnotator:
    """spaCy (pruned to what the rules need) plus the rules, over a stream of texts.

    ``identity`` names everything the labels depend on besides the text: the spaCy model and the rules.
    """

    def __init__(self, model: str = "en_core_web_sm", *, batch_size: int = 64, prune: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"annotation batch size must be at least 1, got {batch_size}")
        self.nlp = load_pipeline(model, prune=prune)
        self.batch_size = batch_size
        self.identity = f"{pipeline_identity(self.nlp)}+{RULES_VERSION}"
        self._zone = ExitStack()
        self._batches_in_zone = 0

    def annotate(self, texts: Iterable[str], rules: Callable[[Doc], T] = label_words) -> Iterator[T]:
        """Labels for each text, in order, parsed in batches of ``batch_size``; ``rules`` makes them from the
        parse (:func:`local_labels`: what a distilled student learns).

        spaCy's strings and lexemes are freed every ``ZONE_BATCHES`` batches (a memory zone that stays open
        across calls), so memory stays flat over an endless stream while the words of recent batches are
        still looked up fast. Nothing spaCy owns leaves this method.
        """
        texts = iter(texts)
        while batch := list(islice(texts, self.batch_size)):
            if self._batches_in_zone == ZONE_BATCHES:
                self.release_memory()
            if self._batches_in_zone == 0:
                self._zone.enter_context(self.nlp.memory_zone())
            self._batches_in_zone += 1
            yield from [rules(doc) for doc in self.nlp.pipe(batch, batch_size=self.batch_size)]

    def release_memory(self) -> None:
        """Free the strings and lexemes spaCy added since the current memory zone opened."""
        self._zone.close()
        self._batches_in_zone = 0

    def annotate_text(self, text: str) -> WordLabels:
        return next(self.annotate([text]))


def annotate_jsonl(
    source: Path,
    destination: Path,
    model: str = "en_core_web_sm",
    *,
    batch_size: int = 64,
    max_doc_chars: int = 1_000_000,
    max_skip_ratio: float = MAX_SKIP_RATIO,
) -> dict:
    """``{"id", "text"}`` objects in, ``{"id", "spans"}`` objects out, in order; returns the counts.

    Lines are read as ``make-shards`` reads them: a line that cannot be a record is a counted skip, logged with
    its ``file:line`` and reason; lone surrogates become U+FFFD, a counted repair; a record without an ``id``
    gets its 0-based position in the output. Unlike make-shards, an empty text is kept (it has no spans). A
    text longer than ``max_doc_chars`` is annotated in parts, as the shard reader splits it.

    The output appears whole or not at all: it is written beside ``destination`` and renamed onto it only
    when the skips pass ``ReadStats.check_skips`` (``TooManySkipsError`` when no record was usable or more
    than ``max_skip_ratio`` of them were skipped).
    """
    stats = ReadStats()
    with open(source, "rb") as lines:  # a missing input fails before spaCy loads
        annotator = FactAnnotator(model, batch_size=batch_size)
        annotator.nlp.max_length = max(annotator.nlp.max_length, max_doc_chars)
        with _written_atomically(destination) as out:
            records = _input_records(source, lines, stats)
            while batch := list(islice(records, batch_size)):
                texts = [record["text"] for record in batch]
                for record, spans in zip(batch, _fact_spans(annotator, texts, max_doc_chars)):
                    identifier = stats.docs if record["id"] is None else record["id"]
                    out.write(json.dumps({"id": identifier, "spans": spans}, ensure_ascii=False) + "\n")
                    stats.docs += 1
            stats.check_skips(max_skip_ratio, str(source))
    return {
        "documents": stats.docs,
        "skipped": dict(sorted(stats.skipped.items())),
        "repaired": dict(sorted(stats.repaired.items())),
    }


def _input_records(source: Path, lines: BinaryIO, stats: ReadStats) -> Iterator[dict]:
    """The records of a jsonl input; blank lines are passed over, any other line is a record or a counted skip."""
    for number, line in enumerate(lines, start=1):
        if number == 1:
            line = line.removeprefix(codecs.BOM_UTF8)
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            stats.skip("invalid_utf8", where, detail=str(error))
            continue
        except (ValueError, RecursionError) as error:
            stats.skip("invalid_json", where, detail=f"{type(error).__name__}: {error}")
            continue
        record = _checked_record(obj, where, stats)
        if record is not None:
            yield record


def _checked_record(obj: object, where: str, stats: ReadStats) -> dict | None:
    """``make-shards``' checks and repairs of one object (``record_from_object``), an empty text kept."""
    text = obj.get("text") if isinstance(obj, dict) else None
    if isinstance(text, str) and not text.strip():
        # make-shards skips an empty text, annotation keeps it (no spans); with a stand-in text,
        # record_from_object still checks and repairs the rest of the record.
        record = record_from_object({**obj, "text": "-"}, where, FieldNames(), stats)
        return None if record is None else {**record, "text": text}
    return record_from_object(obj, where, FieldNames(), stats)


def _fact_spans(annotator: FactAnnotator, texts: list[str], max_chars: int) -> list[list[list]]:
    """``WordLabels.spans`` of each text, a text longer than ``max_chars`` annotated in parts (``split_text``)."""
    parts = []
    for number, text in enumerate(texts):
        start = 0
        for part in split_text(text, max_chars):
            parts.append((number, start, part))
            start += len(part)
    spans: list[list[list]] = [[] for _ in texts]
    for (number, start, part), labels in zip(parts, annotator.annotate(part for _, _, part in parts)):
        spans[number].extend([begin + start, end + start, name] for begin, end, name in labels.spans(part))
    return spans


@contextmanager
def _written_atomically(path: Path) -> Iterator[TextIO]:
    """A text file that replaces ``path`` (written beside it, synced, renamed) when the block succeeds; on any
    error it is removed and ``path`` is left as it was."""
    temporary = path.with_name(f".{path.name}.partial")
    try:
        with open(temporary, "w", encoding="utf-8") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
