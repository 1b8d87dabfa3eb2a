from __future__ import annotations

import pytest

from lacy_stream.tokenizer import CALL_TOKEN, Tokenizer, train_tokenizer


def test_round_trip_is_lossless(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    for text in [
        "The museum was founded in 1850 by Dr Smith.",
        "  leading spaces,\ttabs and\n\nnewlines  ",
        "Unseen characters: Ægir, 東京, emoji 🎻 and ½.",
    ]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_call_is_appended_after_the_vocabulary_and_never_encoded(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    assert tokenizer.num_pieces == 400
    assert tokenizer.call_id == 400 and tokenizer.vocab_size == 401
    ids = tokenizer.encode(f"a literal {CALL_TOKEN} in the text")
    assert tokenizer.call_id not in ids and max(ids) < tokenizer.num_pieces
    assert tokenizer.decode([*tokenizer.encode("born in"), tokenizer.call_id]) == f"born in{CALL_TOKEN}"
    called = [*tokenizer.encode("born in"), tokenizer.call_id, *tokenizer.encode("museum")]
    assert tokenizer.decode(called) == f"born in{CALL_TOKEN} museum", "the space after a call is kept"
    assert tokenizer.decode([tokenizer.call_id, *tokenizer.encode("museum")]) == f"{CALL_TOKEN} museum"
    assert tokenizer.id_to_piece(tokenizer.call_id) == CALL_TOKEN


def test_digits_are_split_and_unknown_bytes_fall_back(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("in 1791")]
    assert [p for p in pieces if p.strip("▁").isdigit()] == ["1", "7", "9", "1"]
    assert any(tokenizer.id_to_piece(i).startswith("<0x") for i in tokenizer.encode("🎻"))


def test_an_existing_sentencepiece_model_gets_call_after_its_pieces(tmp_path):
    """Any SentencePiece model (e.g. Llama 2's 32,000 pieces) works; <CALL> = its piece count."""
    path = tmp_path / "other.model"
    train_tokenizer(["alpha beta gamma delta " * 50, "epsilon zeta eta theta " * 50], path, vocab_size=300)
    tokenizer = Tokenizer(path)
    assert tokenizer.call_id == 300 and tokenizer.vocab_size == 301


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-tokenizer"):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match=".model"):
        train_tokenizer(["x"], tmp_path / "tok.bin", vocab_size=10)
