"""Augmented training documents for the student: words swapped for words of the same tag, and only training
documents copied; the ``--tokens`` cut of the training pieces."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from helpers import synthetic_text

from lacy_stream.annotate import augment
from lacy_stream.annotate import distill as distill_module
from lacy_stream.annotate.augment import KEPT, SWAPPED_TAGS, TaggedDocument, swap_words, tag_documents
from lacy_stream.annotate.distill import distill, first_pieces, split_held_out


def tagged(*words: tuple[str, str | None]) -> TaggedDocument:
    """A document of ``(word, tag)``; tag None: kept."""
    return TaggedDocument([word for word, _ in words], [" "] * (len(words) - 1) + [""],
                          np.array([KEPT if tag is None else SWAPPED_TAGS.index(tag) for _, tag in words], dtype=np.int8))


DOCUMENTS = [
    tagged(("Paris", "NNP"), ("is", None), ("a", None), ("large", "JJ"), ("city", "NN"), (".", None),
           ("Paris", "NNP"), ("grew", "VBD"), (".", None)),
    tagged(("Berlin", "NNP"), ("has", None), ("3", "CD"), ("old", "JJ"), ("bridges", "NNS"), (".", None)),
    tagged(("Rome", "NNP"), ("built", "VBD"), ("many", "JJ"), ("roads", "NNS"), (".", None)),
    tagged(("It", None), ("is", None), (".", None)),
]


def words_of_tag(tag: str) -> set[str]:
    index = SWAPPED_TAGS.index(tag)
    return {word.lower() for document in DOCUMENTS for word, t in zip(document.words, document.tags) if t == index}


def test_copies_keep_the_kept_words_and_swap_words_for_words_of_their_tag_consistently():
    texts = swap_words(DOCUMENTS, copies=20, share=0.5, seed=1)
    assert texts == swap_words(DOCUMENTS, copies=20, share=0.5, seed=1)  # the same texts again: the cache hits
    assert texts != swap_words(DOCUMENTS, copies=20, share=0.5, seed=2)
    originals = [" ".join(document.words) for document in DOCUMENTS]
    assert originals[3] not in texts and not any(text.startswith("It ") for text in texts)  # nothing to swap: no copy
    swapped = 0
    for text in texts:
        words = text.split(" ")
        document = next(d for d in DOCUMENTS[:3] if len(d.words) == len(words) and d.words[-1] == words[-1])
        assert text not in originals
        for original, word, tag in zip(document.words, words, document.tags.tolist()):
            if tag == KEPT:
                assert word == original
            else:
                assert word.lower() in words_of_tag(SWAPPED_TAGS[tag])
                swapped += word != original
        if len(words) == 9:  # "Paris ... Paris": a swapped name is swapped in its repeat too
            assert words[0] == words[6]
    assert swapped > 0


def test_a_swapped_word_takes_the_case_of_the_word_it_replaces():
    documents = [tagged(("Large", "JJ"), ("dogs", "NNS"), ("bark", "VBP")), tagged(("small", "JJ"), ("CATS", "NNS"))]
    texts = swap_words(documents, copies=30, share=1.0, seed=0)
    first_words = {text.split(" ")[0] for text in texts if len(text.split(" ")) == 3}
    shouted = {text.split(" ")[1] for text in texts if len(text.split(" ")) == 2}
    assert "Small" in first_words and first_words <= {"Small", "Large"}
    assert "DOGS" in shouted and shouted <= {"DOGS", "CATS"}


def test_spacy_tags_keep_auxiliaries_and_odd_numbers_out_of_the_swaps():
    [document] = tag_documents(["The car was 3 metres long and Ada Lovelace drove it at 25km/h."],
                               spacy_model="en_core_web_sm", workers=1)
    tags = dict(zip(document.words, (KEPT if t == KEPT else SWAPPED_TAGS[t] for t in document.tags.tolist())))
    assert tags["was"] == KEPT and tags["The"] == KEPT and tags["."] == KEPT
    assert tags["car"] == "NN" and tags["Lovelace"] == "NNP" and tags["3"] == "CD"
    assert "".join(w + s for w, s in zip(document.words, document.spaces)) == (
        "The car was 3 metres long and Ada Lovelace drove it at 25km/h.")


def test_first_pieces_cuts_the_training_pieces_in_one_place():
    documents = [{"tokens": np.arange(n), "span_tag": np.zeros(n)} for n in (5, 4, 6)]
    assert first_pieces(documents, None) is documents
    cut = first_pieces(documents, 7)
    assert [len(d["tokens"]) for d in cut] == [5, 2] and [len(d["span_tag"]) for d in cut] == [5, 2]
    assert [len(d["tokens"]) for d in first_pieces(documents, 100)] == [5, 4, 6]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_distillation_copies_only_training_documents_and_keeps_the_held_out_measure(tmp_path, tokenizer_path,
                                                                                    monkeypatch):
    rng = random.Random(9)
    texts = [synthetic_text(rng, 4) for _ in range(30)]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(texts)))
    training, held_out = split_held_out(texts)
    assert held_out, "the corpus must hold documents out for this test"
    copied = []
    augmented_texts = augment.augmented_texts
    monkeypatch.setattr(distill_module, "augmented_texts",
                        lambda given, **options: copied.extend(given) or augmented_texts(given, **options))
    common = dict(max_docs=30, cache_dir=None, epochs=1, workers=1)
    plain = distill([str(source)], tokenizer_path, tmp_path / "plain.pt", max_pieces=None, augment=0, **common)
    copied.clear()
    report = distill([str(source)], tokenizer_path, tmp_path / "augmented.pt", max_pieces=300, augment=2, **common)
    # The training documents that hold the first 300 training pieces, and none held out.
    assert 0 < len(copied) < len(training) and copied == [texts[i] for i in training[: len(copied)]]
    assert report["training_pieces"] == 300 and plain["augmented_documents"] == 0
    assert 0 < report["augmented_documents"] <= 2 * len(copied) and report["augmented_pieces"] > 0
    assert report["held_out"]["pieces"] == plain["held_out"]["pieces"]


def test_the_default_epochs_keep_the_steps_of_training_without_copies():
    assert distill_module.default_epochs(0) == distill_module.EPOCHS
    assert distill_module.default_epochs(1) * 2 == distill_module.EPOCHS
    assert distill_module.default_epochs(100) == 1
