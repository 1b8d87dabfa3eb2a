from __future__ import annotations

import numpy as np
import pytest

from lacy_stream.data.packing import (
    COLUMNS,
    WindowPacker,
    doc_uid,
    document_columns,
    split_doc_uid,
)
from lacy_stream.labels import JUDGE_UNKNOWN, TokenClass
from lacy_stream.shards.documents import Document, split_document, split_text
from lacy_stream.tokenizer import Tokenizer


def test_split_text_loses_nothing_and_prefers_paragraphs():
    paragraphs = ["First paragraph. It has two sentences.", "Second one is here.", "Third, and last."]
    text = "\n\n".join(paragraphs)
    parts = split_text(text, 60)
    assert "".join(parts) == text
    assert all(len(part) <= 60 for part in parts)
    assert parts[0] == paragraphs[0] + "\n\n"


def test_split_text_falls_back_to_sentences_words_and_hard_cuts():
    sentences = "One sentence here. Another sentence there! A third one? " * 20
    parts = split_text(sentences, 100)
    assert "".join(parts) == sentences
    assert all(part.rstrip().endswith((".", "!", "?")) for part in parts[:-1])
    assert "".join(split_text("word " * 100, 33)) == "word " * 100
    unbroken = "x" * 250
    assert split_text(unbroken, 100) == ["x" * 100, "x" * 100, "x" * 50]
    with pytest.raises(ValueError):
        split_text("abc", 0)


def test_doc_uid_round_trip_and_range():
    assert split_doc_uid(doc_uid(5, 1023, 77_777)) == (5, 1023, 77_777)
    with pytest.raises(ValueError, match="smaller shards"):
        doc_uid(0, 0, 1 << 24)


def make_doc(text: str, index: int = 0) -> Document:
    return Document(text=text, key=f"k{index}", url="mem", shard=1, index=index)


def columns_of(doc: Document, tokenizer: Tokenizer, epoch: int = 0, position_base: int = 0) -> dict:
    """Columns of a document labeled with stand-in labels: class = id % 3, judge = id % 2."""
    ids = np.array(tokenizer.encode(doc.text), dtype=np.int64)
    labels = {"tokens": ids, "token_class": (ids % 3).astype(np.int8), "judge": (ids % 2).astype(np.int8)}
    return document_columns(doc, labels, tokenizer.eos_id, epoch, position_base)


def test_windows_are_full_with_eos_between_documents(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    texts = ["The river city museum was founded in 1850.", "A painter studied law.", "Mozart met the king."]
    packer = WindowPacker(seq_len=7)
    windows = []
    for index, text in enumerate(texts):
        columns = columns_of(make_doc(text, index), tokenizer)
        windows += [window for window, _ in packer.add(columns)]
    stream = np.concatenate([w["tokens"] for w in windows])
    expected = sum((tokenizer.encode(t) + [tokenizer.eos_id] for t in texts), [])
    assert all(len(w["tokens"]) == 8 for w in windows)
    assert stream.tolist() == expected[: len(stream)]
    uids = np.concatenate([w["doc_ids"] for w in windows])
    positions = np.concatenate([w["positions"] for w in windows])
    eos = np.flatnonzero(stream == tokenizer.eos_id)
    for at in eos:
        assert positions[at] == len(tokenizer.encode(texts[split_doc_uid(uids[at])[2]]))


def test_parts_of_a_split_document_continue_positions(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    text = "Mozart met the king in 1780.\n\nThe queen founded a museum.\n\nA war ended the treaty."
    parts = list(split_document(make_doc(text), 35))
    assert len(parts) == 3 and "".join(p.text for p in parts) == text
    base = 0
    positions, tokens = [], []
    for part in parts:
        columns = columns_of(part, tokenizer, position_base=base)
        positions += columns["positions"].tolist()
        tokens += columns["tokens"].tolist()
        base += len(columns["tokens"])
    assert positions == list(range(len(tokens)))
    assert tokens.count(tokenizer.eos_id) == 1 and tokens[-1] == tokenizer.eos_id


def test_packer_resumes_inside_a_document(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    columns = columns_of(make_doc("The composer met the queen of the island in 1791. " * 4), tokenizer)
    whole = [w for w, _ in WindowPacker(seq_len=9).add(columns)]
    first_window, consumed = next(WindowPacker(seq_len=9).add(columns))
    rest = [w for w, _ in WindowPacker(seq_len=9).add(columns, start=consumed)]
    assert np.array_equal(first_window["tokens"], whole[0]["tokens"])
    assert [w["tokens"].tolist() for w in rest] == [w["tokens"].tolist() for w in whole[1:]]


def test_labels_travel_with_their_tokens_and_eos_is_ignored(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    texts = ["Mozart met the king in 1780.", "The queen founded a museum.", "A war ended."]
    packer = WindowPacker(seq_len=5)
    windows = [w for i, t in enumerate(texts) for w, _ in packer.add(columns_of(make_doc(t, i), tokenizer))]
    assert set(windows[0]) == set(COLUMNS)
    tokens = np.concatenate([w["tokens"] for w in windows])
    classes = np.concatenate([w["token_class"] for w in windows])
    judge = np.concatenate([w["judge"] for w in windows])
    eos = tokens == tokenizer.eos_id
    assert (classes[eos] == TokenClass.IGNORE).all() and (judge[eos] == JUDGE_UNKNOWN).all()
    assert (classes[~eos] == tokens[~eos] % 3).all() and (judge[~eos] == tokens[~eos] % 2).all()
