"""The pruned spaCy pipeline annotates exactly like the shipped one; model resolution and identity."""

from __future__ import annotations

import json
from itertools import islice

import pytest
import spacy
from spacy.language import Language
from spacy.pipeline import AttributeRuler
from spacy.tokens import Doc

from helpers import SHARED_DIR
from lacy_stream.annotate.spacy_pipeline import (
    POS_RULES_FACTORY,
    PosRules,
    load_pipeline,
    pipeline_identity,
)

DWIKI = SHARED_DIR / "data" / "dwiki-dev.jsonl"
REAL_DOCUMENTS = 40

# Sentences that reach the ruler's exceptions beyond its tag map.
HANDWRITTEN = [
    "I told him that we would meet her, but they saw me and us.",
    "Something happened, and anyone could see that nothing was wrong.",
    "Everyone knows everybody; somebody saw nobody, and anybody can find anything or everything.",
    "She did not go; he didn't either, and it isn't clear why it's late.",
    "He is a painter who has been working on a portrait that was being restored.",
    "Do you know whether the book that I gave you has arrived?",
    "There is a bridge over the river, and there were two mills. There's nothing here; there are villages.",
    "But he was right, but not entirely, and he did it but once.",
    "The museum was founded in 1887.\n\nIt moved  to Paris  in 1901.\nThen it  closed.",
    "Which did she choose? That is the one, and this is mine. All were sold, and each was signed.",
    "I have a car and he had done it; does she do it? They have and we did.",
    "If it rains, we will stay because we're tired; I'm sure they've left and she'd gone.",
    "He wasn't sure whether he had been there once, then he went home as well.",
    "  Leading spaces, a tab\there and a trailing newline\n",
    "We ourselves, you yourself and they themselves saw it itself; hers and ours, not theirs or yours.",
    "",
    "\n\n",
]


@pytest.fixture(scope="module")
def full() -> Language:
    return load_pipeline(prune=False)


@pytest.fixture(scope="module")
def pruned() -> Language:
    return load_pipeline(prune=True)


@pytest.fixture(scope="module")
def real_texts() -> list[str]:
    with DWIKI.open() as lines:
        return [json.loads(line)["text"] for line in islice(lines, REAL_DOCUMENTS)]


def annotations(doc: Doc) -> dict[str, list]:
    return {
        "tokens": [(token.i, token.text, token.pos_, token.dep_, token.head.i) for token in doc],
        "entities": [(entity.start, entity.end, entity.label_) for entity in doc.ents],
        "noun_chunks": [(chunk.start, chunk.end) for chunk in doc.noun_chunks],
    }


def assert_same_annotations(expected: list[Doc], actual: list[Doc]) -> None:
    assert len(expected) == len(actual)
    for number, (want, got) in enumerate(zip(expected, actual)):
        assert annotations(got) == annotations(want), f"document {number}: {want.text[:80]!r}"


@pytest.mark.needs_shared
@pytest.mark.slow
def test_pruned_matches_full_on_real_documents(
    full: Language, pruned: Language, real_texts: list[str]
) -> None:
    # A batch size that splits the documents into several batches of several documents each.
    expected = list(full.pipe(real_texts, batch_size=16))
    assert_same_annotations(expected, list(pruned.pipe(real_texts, batch_size=16)))


def test_pruned_matches_full_on_exception_sentences(full: Language, pruned: Language) -> None:
    expected = [full(text) for text in HANDWRITTEN]
    assert_same_annotations(expected, [pruned(text) for text in HANDWRITTEN])
    assert_same_annotations(expected, list(pruned.pipe(HANDWRITTEN, batch_size=5)))


def test_exception_sentences_reach_the_exceptions(full: Language) -> None:
    """The handwritten sentences exercise the ruler beyond its TAG -> POS map."""
    tokens = [token for doc in full.pipe(HANDWRITTEN) for token in doc]
    seen = {(token.lower_, token.tag_, token.pos_) for token in tokens}
    for exception in [
        ("i", "PRP", "PRON"),
        ("something", "NN", "PRON"),
        ("not", "RB", "PART"),
        ("n't", "RB", "PART"),
        ("is", "VBZ", "AUX"),
        ("was", "VBD", "AUX"),
        ("has", "VBZ", "AUX"),
        ("been", "VBN", "AUX"),
        ("being", "VBG", "AUX"),
        ("that", "WDT", "PRON"),
        ("that", "IN", "SCONJ"),
    ]:
        assert exception in seen
    assert any(token.dep_ == "expl" and token.head.pos_ == "VERB" for token in tokens)  # "there is"
    assert any(token.tag_ in {"DT", "WDT"} and token.pos_ == "PRON" for token in tokens)
    assert any(token.is_space and token.dep_ == "dep" for token in tokens)


def test_component_names(full: Language, pruned: Language) -> None:
    assert full.pipe_names == ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "ner"]
    assert pruned.pipe_names == ["tok2vec", "tagger", "parser", POS_RULES_FACTORY, "ner"]
    assert "lemmatizer" not in pruned.component_names
    assert "attribute_ruler" not in pruned.component_names


def test_identity_is_shared_by_pruned_and_full(full: Language, pruned: Language) -> None:
    identity = pipeline_identity(pruned)
    assert identity == pipeline_identity(full)
    assert identity.startswith(f"en_{full.meta['name']}-{full.meta['version']}-")
    assert pipeline_identity(spacy.blank("en")) != identity


def test_unknown_model_names_what_to_install() -> None:
    with pytest.raises(OSError, match="no_such_model.*spacy download no_such_model"):
        load_pipeline("no_such_model")


def test_model_directory_loads(full: Language, pruned: Language) -> None:
    assert load_pipeline(str(full.path)).pipe_names == pruned.pipe_names


SYNTHETIC_PATTERNS = [
    {"patterns": [[{"TAG": "NN"}], [{"TAG": "NNS"}]], "attrs": {"POS": "NOUN"}, "index": 0},
    {"patterns": [[{"ORTH": "Paris"}]], "attrs": {"POS": "X", "LEMMA": "paris"}, "index": 0},
    {"patterns": [[{"LOWER": {"REGEX": "^mu"}}]], "attrs": {"POS": "INTJ"}, "index": 0},  # Matcher only
    {"patterns": [[{"TEXT": "museum", "DEP": {"NOT_IN": ["ROOT"]}}]], "attrs": {"DEP": "museum"}, "index": 0},
    {"patterns": [[{"LOWER": "the"}, {"TAG": {"IN": ["NN", "NNP"]}}]], "attrs": {"POS": "SYM"}, "index": -1},
    {"patterns": [[{"LOWER": "end"}, {"LOWER": "start"}]], "attrs": {"POS": "NUM"}, "index": 1},
    {"patterns": [[{"POS": "NOUN"}, {"IS_PUNCT": True, "OP": "+"}]], "attrs": {"DEP": "x"}, "index": -1},
    {"patterns": [[{"IS_SPACE": True}]], "attrs": {"POS": "SPACE", "DEP": "space"}, "index": 0},
    {"patterns": [[{"TAG": "NN"}]], "attrs": {"LEMMA": "only a lemma"}, "index": 0},
]
SYNTHETIC_TEXTS = [
    "The museum in Paris was closed... The end",
    "start of the next museum text.\n\nIts music!",
    "Mules and the mule, museums; the end",
    "start",
]


def test_pos_rules_follow_the_attribute_ruler_on_any_patterns(pruned: Language) -> None:
    """Table, sequence and Matcher-only patterns, interleaved and overriding each other, across documents."""
    ruler = AttributeRuler(pruned.vocab)
    ruler.add_patterns(SYNTHETIC_PATTERNS)
    rules = PosRules(pruned.vocab)
    rules.set_patterns(SYNTHETIC_PATTERNS)
    parsed = list(pruned.pipe(SYNTHETIC_TEXTS))

    expected = [ruler(doc.copy()) for doc in parsed]
    batched = list(rules.pipe([doc.copy() for doc in parsed], batch_size=4))
    one_by_one = [rules(doc.copy()) for doc in parsed]
    for actual in (batched, one_by_one):
        for want, got in zip(expected, actual):
            assert [(t.pos_, t.dep_) for t in got] == [(t.pos_, t.dep_) for t in want]
    written = {(t.text, value) for doc in expected for t in doc for value in (t.pos_, t.dep_)}
    # Each kind of rule wrote something: table, Matcher-only, sequence after Matcher, DEP, OP quantifier.
    assert {("Paris", "X"), ("museum", "INTJ"), ("museum", "SYM"), ("museum", "museum"), (";", "x")} <= written
    assert ("\n\n", "space") in written
    assert ("start", "NUM") not in written  # "end" and "start" are in different documents
