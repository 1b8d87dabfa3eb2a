from __future__ import annotations

import html
import json
import random
import re

import pytest
from helpers import SHARED_DIR

from lacy_stream.annotate.judge import JudgeStats, judge_spans, strip_markup

DWIKI = SHARED_DIR / "data" / "dwiki-dev.jsonl"


def lookup(entity: str, relation: str, value: str) -> str:
    return f"[dblookup('{entity}', '{relation}') -> {value}] "


def _texts(text: str, spans: list[tuple[int, int]]) -> list[str]:
    return [text[begin:end] for begin, end in spans]


def test_strip_markup_removes_lookups_and_finds_the_values_after_them():
    annotated = (
        f"Ralph Earl was born on {lookup('Ralph Earl', 'Birth Date', 'May 11, 1751')}May 11, 1751 in "
        f"{lookup('Ralph Earl', 'Birth Place', 'Leicester, Massachusetts')}Leicester, Massachusetts."
    )
    text, spans = strip_markup(annotated)
    assert text == "Ralph Earl was born on May 11, 1751 in Leicester, Massachusetts."
    assert _texts(text, spans) == ["May 11, 1751", "Leicester, Massachusetts"]


def test_quotes_inside_the_markup_escaped_or_not():
    annotated = (
        "It was opened by "
        + lookup("St. Xavier\\'s School", "Founded By", "the Jesuits")
        + "the Jesuits and sold to "
        + lookup("Carson's Mounds Mall", "Buyer", "Conan O\\'Brien")
        + "Conan O'Brien in 2018."
    )
    text, spans = strip_markup(annotated)
    assert text == "It was opened by the Jesuits and sold to Conan O'Brien in 2018."
    assert _texts(text, spans) == ["the Jesuits", "Conan O'Brien"]


def test_values_found_later_reworded_lists_case_and_whole_words():
    annotated = (
        f"Sokolniki is a {lookup('Sokolniki', 'Type', 'village')}village in {lookup('Sokolniki', 'Country', 'Poland')}"
        f"central Poland. It grows {lookup('Sokolniki', 'Crops', 'wheat, rye, potatoes')}wheat, rye and potatoes. "
        f"He was a {lookup('Jan', 'Occupation', 'Farmer')}farmer. In {lookup('Sokolniki', 'Schools', '2')}2010 "
        f"it was counted {lookup('Sokolniki', 'Census Date', 'April 25, 1879')}25 April 1879."
    )
    text, spans = strip_markup(annotated)
    assert _texts(text, spans) == ["village", "Poland", "wheat", "rye", "potatoes", "farmer"]
    _, stats = judge_spans("Sokolniki\n\n" + text, annotated)
    # "2" is no whole word of "2010"; the census date was reworded
    assert stats == JudgeStats(values=6, mapped=4, unmapped=0, not_found=2, unparseable=0)


def test_unparseable_markup_is_counted_and_left_in_the_text():
    annotated = f"A [dblookup(broken] markup and {lookup('A', 'B', '')}an empty value, then {lookup('A', 'B', 'C')}C."
    text, spans = strip_markup(annotated)
    assert text.startswith("A [dblookup(broken] markup") and _texts(text, spans) == ["C"]
    _, stats = judge_spans(text, annotated)
    assert stats.unparseable == 2 and stats.values == stats.mapped == 1


def test_judge_spans_map_into_the_document_past_its_title_and_spacing():
    text = "Ralph Earl\n\nRalph Earl (May 11, 1751) was an American painter for Melvin Simon &amp; Associates."
    annotated = (
        f"{lookup('Ralph Earl', 'Name', 'Ralph Earl')}Ralph Earl ( {lookup('Ralph Earl', 'Birth Date', 'May 11, 1751')}"
        f"May 11, 1751 ) was an {lookup('Ralph Earl', 'Nationality', 'American')}American painter for "
        f"{lookup('Ralph Earl', 'Employer', 'Melvin Simon & Associates')}Melvin Simon & Associates ."
    )
    spans, stats = judge_spans(text, annotated)
    assert stats == JudgeStats(values=4, mapped=4)
    assert spans[0] == (12, 22)  # the article's "Ralph Earl", not the title
    assert _texts(text, spans) == ["Ralph Earl", "May 11, 1751", "American", "Melvin Simon &amp; Associates"]


def test_a_value_in_a_passage_the_document_lacks_is_unmapped():
    text = "Title\n\nHe was born in Paris. He studied law."
    annotated = f"He was born in Paris. He then moved to {lookup('He', 'Residence', 'Lyon')}Lyon. He studied law."
    spans, stats = judge_spans(text, annotated)
    assert spans == [] and stats == JudgeStats(values=1, unmapped=1)


def test_no_markup():
    assert strip_markup("plain text") == ("plain text", [])
    assert judge_spans("Title\n\nplain text", "plain text") == ([], JudgeStats())


def _normalized(text: str) -> str:
    return re.sub(r"\s+", "", html.unescape(text)).lower()


def _dwiki() -> list[dict]:
    with DWIKI.open() as lines:
        return [json.loads(line) for line in lines]


@pytest.mark.needs_shared
def test_dwiki_values_map_to_their_text():
    totals = JudgeStats()
    for doc in _dwiki():
        clean, clean_spans = strip_markup(doc["annotated_text"])
        markup_values = re.findall(r" -> (.*?)\] ?", doc["annotated_text"].replace("\\'", "'"))
        values = [_normalized(value) for value in markup_values]
        found = [_normalized(span) for span in _texts(clean, clean_spans)]
        assert all(any(span in value for value in values) for span in found)

        spans, stats = judge_spans(doc["text"], doc["annotated_text"])
        assert stats.values == stats.mapped + stats.unmapped + stats.not_found
        assert all(end <= begin for (_, end), (begin, _) in zip(spans, spans[1:]))
        # the mapped spans are found spans, in order, up to whitespace and "&amp;"
        candidates = iter(found)
        assert all(span in candidates for span in map(_normalized, _texts(doc["text"], spans)))
        for field in vars(totals):
            setattr(totals, field, getattr(totals, field) + getattr(stats, field))

    assert totals.values > 6000 and totals.unparseable == 0
    assert totals.mapped >= 0.99 * (totals.mapped + totals.unmapped)
    # the rest the annotator reworded (dates, lists with "and"); see the judge module docstring
    assert totals.mapped >= 0.87 * totals.values


@pytest.mark.needs_shared
def test_one_long_document():
    """A 100k+ character document (a hundred articles, each after its title line) maps as well."""
    docs = _dwiki()[:100]
    text = "\n".join(doc["text"] for doc in docs)
    annotated = "\n".join(doc["annotated_text"] for doc in docs)
    assert len(text) > 100_000
    _, stats = judge_spans(text, annotated)
    assert stats.mapped >= 0.99 * (stats.mapped + stats.unmapped)


def test_folding_a_value_equals_folding_it_as_a_document():
    from lacy_stream.annotate.judge import _HTML_ENTITIES, _folded, _Visible

    rng = random.Random(0)
    alphabet = [*"ab XY\t\n\u00a0\u0130é;&", *_HTML_ENTITIES]
    for _ in range(2000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert _folded(value) == _Visible(value).folded, repr(value)
