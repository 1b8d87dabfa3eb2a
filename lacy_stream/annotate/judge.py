"""LLM-judge labels of the paper's baseline: which characters of a document the LMLM annotator delegates.

The LMLM annotator (zhao2025lmlm) marks each value it delegates by inserting
``[dblookup('Entity', 'Relation') -> Value] `` into a copy of the article (``annotated_text``). Quotes
inside entity and relation are sometimes escaped (``\\'``), often not (``'Carson's Mounds Mall'``).
Two steps turn the markup into character spans of the document:

1. :func:`strip_markup` removes the markup and looks for each value after the point where its markup
   stood, before the next markup. The annotator normalises values, so the value does not always follow
   verbatim. On dwiki-dev (6,507 values) 68% do; 13% come a few words later ("-> Poland] central
   Poland"); 8% are lists the article words differently ("-> A, B, C] A, B and C": each item becomes a
   span); 11% are reworded ("-> April 25, 1879] 25 April 1879"): those are counted as not found, never
   guessed at. Values match ignoring case and whitespace, as whole words.
2. :func:`judge_spans` maps the spans into the document text, which differs from the stripped article:
   it starts with a title line and a blank line, spacing around punctuation differs ("Earl ( May" vs
   "Earl (May"), it has "&amp;" where the article has "&", and the annotator rewrote a few passages.
   The two texts are aligned on their visible characters (no whitespace, entities decoded), walked in
   lockstep from where the article starts inside the document; after a mismatch the walk resumes at the
   nearest point where the texts agree again. A span maps when its characters were aligned to one
   unbroken run of the document, so its text there equals the value up to whitespace (99.3% of the
   values found on dwiki-dev).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_MARKUP_START = "[dblookup("
_MARKUP = re.compile(r"\[dblookup\('.*?', '.*?'\) -> (?P<value>.*?)\] ?")
# _IS_WHITESPACE[c]: whether chr(c).isspace(). No code point above U+3000 (ideographic space) is, so the
# last entry, U+3001, stands for all of them.
_LAST_WHITESPACE_CHECKED = 0x3001
_IS_WHITESPACE = np.array([chr(c).isspace() for c in range(_LAST_WHITESPACE_CHECKED + 1)])
_HTML_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&#39;": "'"}
_HTML_ENTITY = re.compile("|".join(map(re.escape, _HTML_ENTITIES)))

# A value (or the next item of a list value) is looked for at most this many characters ahead: the
# farthest right ones on dwiki-dev are ~200 characters away, and beyond, "2015" would match by chance.
_MAX_VALUE_DISTANCE = 300
# Alignment: the characters that locate the article in the document; then, to resynchronise after a
# mismatch, (reach, anchor) pairs tried in turn: two texts must agree on `anchor` characters within
# `reach` characters skipped per side (longer anchors for longer reaches, where chance agreement is
# likelier); beyond the last reach, a far anchor found anywhere ahead.
_START_ANCHOR_CHARS = 32
_RESYNC_STEPS = ((32, 10), (512, 14), (4096, 20))
_FAR_ANCHOR_CHARS = 48


@dataclass
class JudgeStats:
    """Counts for one document: ``values == mapped + unmapped + not_found``."""

    values: int = 0
    """Markups parsed."""
    mapped: int = 0
    """Values whose spans all mapped into the document text."""
    unmapped: int = 0
    """Values found in the stripped article that could not be mapped into the document text."""
    not_found: int = 0
    """Values the article does not contain near their markup (reworded by the annotator)."""
    unparseable: int = 0
    """Markups that could not be parsed (or had an empty value); left in the stripped text."""


@dataclass
class _Stripped:
    text: str
    visible: _Visible
    value_spans: list[list[tuple[int, int]]]
    """Spans of each value found in ``text``: one span, or one per item of a list value."""
    not_found: int
    unparseable: int


def strip_markup(annotated_text: str) -> tuple[str, list[tuple[int, int]]]:
    """The article without markup, and the character spans of the delegated values in it (sorted)."""
    stripped = _strip(annotated_text)
    return stripped.text, [span for spans in stripped.value_spans for span in spans]


def judge_spans(text: str, annotated_text: str) -> tuple[list[tuple[int, int]], JudgeStats]:
    """Character spans of ``text`` that the judge delegates (sorted, disjoint), and counts."""
    stripped = _strip(annotated_text)
    stats = JudgeStats(
        values=len(stripped.value_spans) + stripped.not_found,
        not_found=stripped.not_found,
        unparseable=stripped.unparseable,
    )
    spans: list[tuple[int, int]] = []
    if not stripped.value_spans:
        return spans, stats
    to_text = _TextMap(stripped.visible, _Visible(text))
    for value_spans in stripped.value_spans:
        mapped = [to_text.span(begin, end) for begin, end in value_spans]
        if all(span is not None for span in mapped):
            spans.extend(mapped)
            stats.mapped += 1
        else:
            stats.unmapped += 1
    return spans, stats


def _strip(annotated_text: str) -> _Stripped:
    text, markups, unparseable = _remove_markup(annotated_text)
    visible = _Visible(text)
    value_spans, not_found = [], 0
    for index, (start, value) in enumerate(markups):
        stop = markups[index + 1][0] if index + 1 < len(markups) else len(text)
        spans = _find_value(visible, value, start, stop)
        if spans:
            value_spans.append(spans)
        else:
            not_found += 1
    return _Stripped(text, visible, value_spans, not_found, unparseable)


def _remove_markup(annotated_text: str) -> tuple[str, list[tuple[int, str]], int]:
    """The text without markup; each value with where its markup stood; how many markups were unparseable."""
    pieces: list[str] = []
    markups: list[tuple[int, str]] = []
    length = unparseable = copied_to = 0
    cursor = annotated_text.find(_MARKUP_START)
    while cursor >= 0:
        markup = _MARKUP.match(annotated_text, cursor)
        value = markup["value"].replace("\\'", "'").strip() if markup else ""
        if not value:
            unparseable += 1
            cursor = annotated_text.find(_MARKUP_START, cursor + 1)
            continue
        pieces.append(annotated_text[copied_to:cursor])
        length += cursor - copied_to
        markups.append((length, value))
        copied_to = markup.end()
        cursor = annotated_text.find(_MARKUP_START, copied_to)
    pieces.append(annotated_text[copied_to:])
    return "".join(pieces), markups, unparseable


def _find_value(text: _Visible, value: str, start: int, stop: int) -> list[tuple[int, int]]:
    """Spans of ``value`` in ``text`` between ``start`` and ``stop``: its first occurrence, else each item
    of a list value, found in order; ``[]`` when neither is there."""
    span = _find_words(text, value, start, stop)
    if span is not None:
        return [span]
    items = [item.strip() for item in value.split(",") if item.strip()]
    if len(items) < 2:
        return []
    spans: list[tuple[int, int]] = []
    for item in items:
        span = _find_words(text, item, spans[-1][1] if spans else start, stop)
        if span is None:
            return []
        spans.append(span)
    return spans


def _find_words(text: _Visible, words: str, start: int, stop: int) -> tuple[int, int] | None:
    """The first occurrence of ``words`` in ``text.text[start:stop]`` that begins at most
    ``_MAX_VALUE_DISTANCE`` after ``start``, ignoring case and whitespace, as whole words."""
    needle = _folded(words)
    first, last = np.searchsorted(text.begin, [start, stop])
    latest = np.searchsorted(text.begin, start + _MAX_VALUE_DISTANCE, side="right")
    at = text.folded.find(needle, first, last)
    while 0 <= at < latest:
        begin, end = int(text.begin[at]), int(text.end[at + len(needle) - 1])
        before = text.text[begin - 1] if begin > 0 else " "
        after = text.text[end] if end < len(text.text) else " "
        starts_inside_word = _is_word_char(needle[0]) and _is_word_char(before)
        ends_inside_word = _is_word_char(needle[-1]) and _is_word_char(after)
        if not (starts_inside_word or ends_inside_word):
            return begin, end
        at = text.folded.find(needle, at + 1, last)
    return None


def _folded(text: str) -> str:
    """``_Visible(text).folded`` without building the arrays: for the short values looked up in a document."""
    chars, position = [], 0
    for entity in _HTML_ENTITY.finditer(text):
        chars += [char for char in text[position : entity.start()] if not char.isspace()]
        chars.append(_HTML_ENTITIES[entity[0]])
        position = entity.end()
    chars += [char for char in text[position:] if not char.isspace()]
    return _fold_case("".join(chars))


def _fold_case(chars: str) -> str:
    """Lower case, character for character: "İ" is the one character that lowers to two ("i" and a dot)."""
    return chars.replace("\u0130", "I").lower()


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


class _TextMap:
    """Maps character spans of one text to another through their aligned visible characters."""

    def __init__(self, source: _Visible, target: _Visible) -> None:
        self._source = source
        self._target = target
        self._match = _align(source.chars, target.chars)

    def span(self, begin: int, end: int) -> tuple[int, int] | None:
        first, last = np.searchsorted(self._source.begin, [begin, end])
        if last <= first:
            return None
        run = self._match[first:last]
        if run[0] < 0 or not np.array_equal(run, run[0] + np.arange(len(run))):
            return None
        return int(self._target.begin[run[0]]), int(self._target.end[run[-1]])


class _Visible:
    """The visible characters of a text: no whitespace, HTML entities decoded (the document text has
    "&amp;" where the annotated text has "&"); ``chars[k]`` spans ``text[begin[k]:end[k]]``, and
    ``folded`` is ``chars`` in lower case, character for character."""

    def __init__(self, text: str) -> None:
        self.text = text
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).copy()
        visible = ~_IS_WHITESPACE[np.minimum(code_points, _LAST_WHITESPACE_CHECKED)]
        end = np.arange(1, len(text) + 1)
        for entity in _HTML_ENTITY.finditer(text):
            code_points[entity.start()] = ord(_HTML_ENTITIES[entity[0]])
            visible[entity.start() + 1 : entity.end()] = False
            end[entity.start()] = entity.end()
        self.begin = np.flatnonzero(visible)
        self.end = end[self.begin]
        self.chars = code_points[self.begin].tobytes().decode("utf-32-le")
        self.folded = _fold_case(self.chars)


def _align(source: str, target: str) -> np.ndarray:
    """``match[i]``: the index in ``target`` aligned with ``source[i]``, -1 when none.

    Walks both strings in lockstep from where ``source`` begins inside ``target``. After a mismatch it
    resumes where they agree again (see :func:`_resync`); with too little left for that, the remainders
    are aligned on their common suffix.
    """
    match = np.full(len(source), -1, dtype=np.int64)
    start = target.find(source[:_START_ANCHOR_CHARS])
    i, j = 0, max(start, 0)
    if start < 0:
        i, j = _resync(source, i, target, j) or (len(source), len(target))
    while i < len(source) and j < len(target):
        run = _common_prefix_length(source, i, target, j)
        match[i : i + run] = np.arange(j, j + run)
        i, j = i + run, j + run
        position = _resync(source, i, target, j)
        if position is None:
            break
        i, j = position
    tail = _common_suffix_length(source, i, target, j)
    match[len(source) - tail :] = np.arange(len(target) - tail, len(target))
    return match


def _resync(source: str, i: int, target: str, j: int) -> tuple[int, int] | None:
    """The nearest ``(i', j')`` from ``(i, j)`` (fewest characters skipped) where the texts agree on an
    anchor, moved back over skipped characters that agree too; None when there is none.

    Looks within growing reaches, so the usual small edits cost little; past the last reach, the first
    longer stretch of ``source`` found anywhere ahead in ``target`` (a section one side lacks).
    """
    for reach, anchor in _RESYNC_STEPS:
        anchors: dict[str, int] = {}
        for skip in range(min(reach, len(target) - j - anchor + 1)):
            anchors.setdefault(target[j + skip : j + skip + anchor], skip)
        best: tuple[int, int] | None = None
        for source_skip in range(min(reach, len(source) - i - anchor + 1)):
            if best is not None and source_skip >= sum(best):
                break
            target_skip = anchors.get(source[i + source_skip : i + source_skip + anchor])
            if target_skip is not None and (best is None or source_skip + target_skip < sum(best)):
                best = (source_skip, target_skip)
        if best is not None:
            return _extend_back(source, i, i + best[0], target, j, j + best[1])
    for source_skip in range(0, len(source) - i - _FAR_ANCHOR_CHARS + 1, _FAR_ANCHOR_CHARS):
        found = target.find(source[i + source_skip : i + source_skip + _FAR_ANCHOR_CHARS], j)
        if found >= 0:
            return _extend_back(source, i, i + source_skip, target, j, found)
    return None


def _extend_back(source: str, source_floor: int, i: int, target: str, target_floor: int, j: int) -> tuple[int, int]:
    """Moves ``(i, j)`` back while the characters before agree, not below the floors."""
    while i > source_floor and j > target_floor and source[i - 1] == target[j - 1]:
        i, j = i - 1, j - 1
    return i, j


def _common_suffix_length(a: str, i: int, b: str, j: int) -> int:
    """Length of the common suffix of ``a[i:]`` and ``b[j:]``."""
    length = 0
    while length < min(len(a) - i, len(b) - j) and a[-1 - length] == b[-1 - length]:
        length += 1
    return length


def _common_prefix_length(a: str, i: int, b: str, j: int) -> int:
    """Length of the common prefix of ``a[i:]`` and ``b[j:]``, compared in shrinking blocks."""
    limit = min(len(a) - i, len(b) - j)
    length = 0
    for block in (4096, 256, 16, 1):
        while length + block <= limit and a[i + length : i + length + block] == b[j + length : j + length + block]:
            length += block
    return length
