"""The fact rules of Appendix A.2.1, one by one, on hand-parsed sentences; then on the real spaCy model."""

from __future__ import annotations

import codecs
import json

import pytest
import spacy
from spacy.tokens import Doc

from helpers import SHARED_DIR
from lacy_stream.annotate.annotation import (
    RULES_VERSION,
    FactAnnotator,
    annotate_jsonl,
    label_words,
)
from lacy_stream.cli import EXIT_TOO_MANY_SKIPS, main
from lacy_stream.labels import TokenClass
from lacy_stream.shards.documents import TooManySkipsError

FACT, OTHER, GRAMMAR = TokenClass.FACT, TokenClass.OTHER, TokenClass.GRAMMAR
VOCAB = spacy.blank("en").vocab


def parsed(rows: str, ents: list[tuple[int, int, str]] = ()) -> Doc:
    """A Doc from ``word POS dep head`` lines (head: token index; ROOT points at itself)."""
    words, pos, deps, heads = [], [], [], []
    for line in rows.strip().splitlines():
        word, tag, dep, head = line.split()
        words.append("\n" if word == "\\n" else word)
        pos.append(tag)
        deps.append(dep)
        heads.append(int(head))
    spaces = [not (w in ".,\n" or nxt in (".", ",", "\n") or w == "\n") for w, nxt in zip(words, words[1:] + [""])]
    iob = ["O"] * len(words)
    for start, end, label in ents:
        iob[start] = f"B-{label}"
        for i in range(start + 1, end):
            iob[i] = f"I-{label}"
    return Doc(VOCAB, words=words, spaces=spaces, pos=pos, deps=deps, heads=heads, ents=iob)


def classes(doc: Doc) -> dict[int, TokenClass]:
    return {i: TokenClass(int(c)) for i, c in enumerate(label_words(doc).classes)}


def test_only_the_first_mention_of_an_entity_is_a_fact():
    doc = parsed(
        """
        Paris PROPN nsubj 1
        grew VERB ROOT 1
        . PUNCT punct 1
        Paris PROPN nsubj 4
        shrank VERB ROOT 4
        . PUNCT punct 4
        """,
        ents=[(0, 1, "GPE"), (3, 4, "GPE")],
    )
    labels = classes(doc)
    assert labels[0] == FACT and labels[3] == OTHER
    assert labels[1] == OTHER and labels[2] == GRAMMAR


def test_any_seen_part_of_a_person_name_is_a_repeat_but_other_entities_repeat_only_whole():
    doc = parsed(
        """
        Wolfgang PROPN compound 2
        Amadeus PROPN compound 2
        Mozart PROPN nsubj 3
        composed VERB ROOT 3
        . PUNCT punct 3
        Wolfgang PROPN nsubj 6
        left VERB ROOT 6
        . PUNCT punct 6
        Acme PROPN compound 9
        Steel PROPN nsubj 10
        closed VERB ROOT 10
        . PUNCT punct 10
        Acme PROPN nsubj 13
        reopened VERB ROOT 13
        . PUNCT punct 13
        """,
        ents=[(0, 3, "PERSON"), (5, 6, "PERSON"), (8, 10, "ORG"), (12, 13, "ORG")],
    )
    labels = classes(doc)
    assert [labels[i] for i in range(3)] == [FACT, FACT, FACT]
    assert labels[5] == OTHER
    assert labels[8] == labels[9] == FACT
    assert labels[12] == FACT, "a part of an ORG is a different entity"


def test_fact_spans_drop_leading_determiners_and_punctuation():
    doc = parsed(
        """
        the DET det 2
        Red PROPN compound 2
        Cross PROPN nsubj 3
        opened VERB ROOT 3
        on ADP prep 3
        May PROPN pobj 4
        11 NUM nummod 5
        , PUNCT punct 5
        1751 NUM nummod 5
        """,
        ents=[(0, 3, "ORG"), (5, 9, "DATE")],
    )
    labels = classes(doc)
    assert labels[0] == GRAMMAR and labels[1] == labels[2] == FACT
    assert [labels[i] for i in (5, 6, 7, 8)] == [FACT, FACT, GRAMMAR, FACT]
    assert labels[4] == GRAMMAR


def test_noun_chunks_are_split_at_newlines():
    doc = parsed(
        """
        They PRON nsubj 1
        saw VERB ROOT 1
        the DET det 6
        Red PROPN compound 6
        \\n SPACE dep 6
        old ADJ amod 6
        House PROPN dobj 1
        """
    )
    from lacy_stream.annotate.annotation import _chunks, _Document

    pieces = [indices for indices, _ in _chunks(_Document(doc))]
    assert pieces == [[0], [2, 3], [5, 6]]
    labels = classes(doc)
    assert labels[3] == labels[5] == labels[6] == FACT and labels[4] == GRAMMAR


def test_likely_person_chunks_subjects_appositives_and_cues():
    doc = parsed(
        """
        Then ADV advmod 2
        Curie NOUN nsubj 2
        discovered VERB ROOT 2
        radium NOUN dobj 2
        . PUNCT punct 2
        curie NOUN nsubj 6
        glowed VERB ROOT 6
        . PUNCT punct 6
        Kowalski NOUN nsubjpass 10
        was AUX auxpass 10
        born VERB ROOT 10
        . PUNCT punct 10
        He PRON nsubj 13
        met VERB ROOT 13
        Professor NOUN compound 15
        Nowak NOUN pobj 13
        . PUNCT punct 13
        Water NOUN nsubj 18
        boils VERB ROOT 18
        """
    )
    labels = classes(doc)
    assert labels[1] == FACT, "capitalised subject"
    assert labels[5] == OTHER, "repeat of curie"
    assert labels[8] == FACT, "followed by born, even at the start of a sentence"
    assert labels[12] == OTHER, "pronouns are never facts"
    assert labels[14] == labels[15] == FACT, "after a title"
    assert labels[17] == OTHER, "a capital at the start of a sentence is no name"


def test_likely_org_chunks_keywords_and_leading_the():
    doc = parsed(
        """
        They PRON nsubj 1
        wrote VERB ROOT 1
        to ADP prep 1
        the DET det 4
        committee NOUN pobj 2
        , PUNCT punct 1
        to ADP prep 1
        the DET det 8
        Beatles NOUN pobj 6
        and CCONJ cc 1
        to ADP prep 1
        the DET det 12
        house NOUN pobj 10
        """
    )
    labels = classes(doc)
    assert labels[4] == FACT, "keyword"
    assert labels[8] == FACT, "the + capitalised"
    assert labels[12] == OTHER, "an ordinary noun in a prepositional phrase"
    assert labels[3] == labels[7] == labels[11] == GRAMMAR


def test_proper_nouns_are_facts():
    doc = parsed(
        """
        They PRON nsubj 1
        climbed VERB ROOT 1
        near ADP prep 1
        Everest PROPN pobj 2
        """
    )
    assert classes(doc)[3] == FACT


def test_common_nouns_in_informative_roles_unless_a_manner_preposition_governs():
    doc = parsed(
        """
        She PRON nsubj 1
        was AUX ROOT 1
        a DET det 3
        lawyer NOUN attr 1
        . PUNCT punct 1
        She PRON nsubj 6
        studied VERB ROOT 6
        physics NOUN dobj 6
        in ADP prep 6
        gardens NOUN pobj 8
        . PUNCT punct 6
        He PRON nsubj 12
        was AUX ROOT 12
        a DET det 14
        painter NOUN attr 12
        by ADP prep 14
        training NOUN pobj 15
        . PUNCT punct 12
        """
    )
    labels = classes(doc)
    assert labels[3] == FACT and labels[2] == GRAMMAR and labels[1] == GRAMMAR
    assert labels[7] == FACT
    assert labels[9] == OTHER
    assert labels[14] == OTHER, "a painter by training"


def test_appositive_common_noun_is_a_fact():
    doc = parsed(
        """
        Curie PROPN nsubj 4
        , PUNCT punct 0
        a DET det 3
        physicist NOUN appos 0
        worked VERB ROOT 4
        """,
        ents=[(0, 1, "PERSON")],
    )
    labels = classes(doc)
    assert labels[3] == FACT and labels[0] == FACT


def test_first_occurrences_of_numbers_are_facts():
    doc = parsed(
        """
        In ADP prep 2
        1987 NUM pobj 0
        sales NOUN ROOT 2
        tripled VERB conj 2
        and CCONJ cc 2
        in ADP prep 2
        1987 NUM pobj 5
        three NUM nummod 8
        ships NOUN conj 2
        sank VERB conj 2
        """
    )
    labels = classes(doc)
    assert labels[1] == FACT and labels[6] == OTHER and labels[7] == FACT
    assert labels[4] == GRAMMAR and labels[0] == GRAMMAR


def test_repeats_ignore_determiners_and_possessives():
    doc = parsed(
        """
        She PRON nsubj 1
        sold VERB ROOT 1
        portraits NOUN dobj 1
        and CCONJ cc 1
        kept VERB conj 1
        his PRON poss 6
        portraits NOUN dobj 4
        """
    )
    labels = classes(doc)
    assert labels[2] == FACT and labels[6] == OTHER and labels[5] == OTHER


def test_grammar_classes():
    doc = parsed(
        """
        The DET det 1
        cat NOUN nsubj 3
        might AUX aux 3
        sit VERB ROOT 3
        on ADP prep 3
        mats NOUN pobj 4
        because SCONJ mark 8
        it PRON nsubj 8
        purrs VERB advcl 3
        and CCONJ cc 8
        sleeps VERB conj 8
        ? PUNCT punct 3
        """
    )
    labels = classes(doc)
    assert [labels[i] for i in (0, 2, 4, 6, 9, 11)] == [GRAMMAR] * 6
    assert labels[3] == labels[8] == labels[10] == OTHER


@pytest.fixture(scope="module")
def annotator() -> FactAnnotator:
    return FactAnnotator()


def word_classes(annotator: FactAnnotator, text: str) -> list[tuple[str, str]]:
    return [(text[b:e], name) for b, e, name in annotator.annotate_text(text).spans(text)]


def test_real_model_end_to_end(annotator):
    text = "Marie Curie was born in Warsaw in 1867. Curie studied physics in Paris.\n\nShe won the Nobel Prize."
    words = word_classes(annotator, text)
    facts = [w for w, name in words if name == "fact"]
    assert facts[:5] == ["Marie", "Curie", "Warsaw", "1867", "physics"]
    curie = [name for w, name in words if w == "Curie"]
    assert curie == ["fact", "other"]
    assert dict(words)["was"] == "grammar" and dict(words)["."] == "grammar"
    assert "\n" not in "".join(w for w, _ in words)
    assert annotator.identity.endswith(RULES_VERSION)


def test_annotation_is_deterministic_and_batch_independent(annotator):
    texts = [f"Document {i}: Ada Lovelace met Charles Babbage in {1830 + i}." for i in range(5)]
    one_by_one = [annotator.annotate_text(t).classes.tolist() for t in texts]
    batched = [labels.classes.tolist() for labels in annotator.annotate(texts)]
    assert one_by_one == batched


def test_empty_and_whitespace_texts(annotator):
    assert annotator.annotate_text("").classes.tolist() == []
    assert annotator.annotate_text(" \n\n ").spans(" \n\n ") == []


def test_annotate_jsonl_writes_character_spans_and_counts_bad_lines(tmp_path):
    source = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": "a", "text": "Ada Lovelace was born in London."}).encode(),
        b"not json",
        json.dumps({"text": "no id"}).encode(),
        b"\xff\xfe",
        json.dumps({"id": 7, "text": "\u00c9mile Zola wrote 20 novels. \U0001f642"}).encode(),
    ]
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    counts = annotate_jsonl(source, out)
    assert counts == {"documents": 3, "skipped": {"invalid_json": 1, "invalid_utf8": 1}, "repaired": {}}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", 1, 7]  # as make-shards numbers it, by its position
    text = "\u00c9mile Zola wrote 20 novels. \U0001f642"
    spans = {text[b:e]: name for b, e, name in records[2]["spans"]}
    assert spans["\u00c9mile"] == "fact" and spans["20"] == "fact" and spans["wrote"] == "other"


def test_annotate_jsonl_repairs_and_skips_as_make_shards_does(tmp_path, caplog):
    source = tmp_path / "in.jsonl"
    lines = [
        codecs.BOM_UTF8 + json.dumps({"id": "bom", "text": "Ada Lovelace was born in London."}).encode(),
        b'{"id": "x\\ud800", "text": "Caf\\udc00 society met in Paris in 1820."}',
        b"[" * 100_000,
        b'{"id": 3, "text": "an integer too long", "n": ' + b"9" * 5000 + b"}",
        b"",
        b'["not an object"]',
        b'{"id": 6, "text": 6}',
        b'{"id": 7}',
        b'{"id": 8, "text": "\\udc00\\udc01\\udc02 x"}',  # mostly lone surrogates
        b'{"id": 9, "text": "  "}',
    ]
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    counts = annotate_jsonl(source, out)
    assert counts == {
        "documents": 3,
        "skipped": {"invalid_json": 2, "invalid_utf8": 1, "missing_text": 1, "non_string_text": 1, "not_an_object": 1},
        "repaired": {"lone_surrogate": 1},
    }
    assert f"{source}:3 (invalid_json): RecursionError" in caplog.text
    assert f"{source}:8 (missing_text)" in caplog.text
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["bom", "x\ufffd", 9]
    text = "Caf\ufffd society met in Paris in 1820."
    assert {text[b:e]: name for b, e, name in records[1]["spans"]}["Paris"] == "fact"
    assert records[2]["spans"] == []  # an empty text is kept: it has no facts
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_annotate_jsonl_annotates_a_text_longer_than_max_doc_chars_in_parts(tmp_path):
    text = "Ada Lovelace was born in London. " * 3 + "Marie Curie was born in Warsaw in 1867."
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": 1, "text": text}) + "\n")
    annotate_jsonl(source, tmp_path / "out.jsonl", max_doc_chars=40)
    spans = json.loads((tmp_path / "out.jsonl").read_text())["spans"]
    assert [text[b:e] for b, e, name in spans if name == "fact"][-4:] == ["Marie", "Curie", "Warsaw", "1867"]
    assert [name for b, e, name in spans if text[b:e] == "London"] == ["fact"] * 3  # each part on its own
    assert all(text[b:e] and text[b:e].strip() == text[b:e] for b, e, _ in spans)


def test_annotate_jsonl_that_fails_leaves_the_old_output_and_no_partial_file(tmp_path, monkeypatch):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    out.write_text("the previous output\n")
    source.write_bytes(b'not json\n["no object"]\n\n{"text": 1}\n')
    with pytest.raises(TooManySkipsError, match="no usable document"):
        annotate_jsonl(source, out)
    source.write_text('{"id": 1, "text": "One."}\n{"id": 2, "text": ["two"]}\n')
    with pytest.raises(TooManySkipsError, match="more than the allowed 40.0%"):
        annotate_jsonl(source, out, max_skip_ratio=0.4)

    def broken_annotator(self, texts, rules=None):
        raise RuntimeError("spaCy failed")

    monkeypatch.setattr(FactAnnotator, "annotate", broken_annotator)
    with pytest.raises(RuntimeError):
        annotate_jsonl(source, out)
    assert out.read_text() == "the previous output\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_annotate_input_of_nothing_usable_exits_65_without_a_traceback(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"[" * 100_000 + b'\n{"id": 1, "text": "\\ud800"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["annotate", "--input", str(source), "--output", str(tmp_path / "out.jsonl")])
    assert exit_info.value.code == EXIT_TOO_MANY_SKIPS
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert error.splitlines()[-1].startswith(f"lacy-stream: error: {source}: 0 documents read")
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / ".out.jsonl.partial").exists()


@pytest.mark.slow
@pytest.mark.needs_shared
def test_pruned_pipeline_gives_the_labels_of_the_full_pipeline(annotator):
    source = SHARED_DIR / "data" / "dwiki-dev.jsonl"
    texts = [json.loads(line)["text"] for line in source.read_text().splitlines()[200:215]]
    full = FactAnnotator(prune=False)
    assert "lemmatizer" in full.nlp.pipe_names and "lemmatizer" not in annotator.nlp.pipe_names
    for pruned_labels, full_labels in zip(annotator.annotate(texts), full.annotate(texts)):
        assert pruned_labels.classes.tolist() == full_labels.classes.tolist()
        assert pruned_labels.begin.tolist() == full_labels.begin.tolist()


def test_memory_zones_keep_spacy_memory_flat():
    from lacy_stream.annotate.annotation import ZONE_BATCHES

    annotator = FactAnnotator(batch_size=1)
    strings = annotator.nlp.vocab.strings
    before = len(strings)
    texts = [f"Zorblax{i} met Quintar{i} in Vellmoor{i}." for i in range(3 * ZONE_BATCHES)]
    for _ in annotator.annotate(texts):
        assert len(strings) < before + 20 * ZONE_BATCHES, "strings of earlier zones were freed"
    annotator.release_memory()
    assert len(strings) == before


def test_a_proper_noun_in_a_common_noun_chunk_is_a_fact_alone():
    """Appendix A.2.1's proper-noun rule: a chunk whose head is a proper noun is a fact whole; in "a Zorbax
    office", whose head is a common noun in no informative role, only the proper noun is (lacy-rules-2)."""
    doc = parsed(
        """
        Workers NOUN nsubj 5
        of ADP prep 0
        a DET det 4
        Zorbax PROPN compound 4
        office NOUN pobj 1
        left VERB ROOT 5
        near ADP prep 5
        Mount PROPN compound 8
        Everest PROPN pobj 6
        """
    )
    labels = classes(doc)
    assert (labels[3], labels[4]) == (FACT, OTHER)
    assert labels[7] == labels[8] == FACT
