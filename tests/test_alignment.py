from __future__ import annotations

import random

import numpy as np
import pytest

from lacy_stream.annotate import alignment
from lacy_stream.annotate.alignment import (
    char_to_byte_offsets,
    encode_with_offsets,
    label_pieces,
    piece_classes,
    pieces_in_spans,
)
from lacy_stream.labels import TokenClass
from lacy_stream.tokenizer import Tokenizer

OTHER, FACT, GRAMMAR = int(TokenClass.OTHER), int(TokenClass.FACT), int(TokenClass.GRAMMAR)

TEXTS = [
    "",
    " ",
    "\n",
    "in 1987",
    "  starts with spaces",
    "x  y   z",
    "lines\n\nand\ttabs\r\n",
    "café über naïve",
    "中文 and 東京",
    "emoji 🙂🎻 end",
    "combining e\u0301 and a\u0308",
    "no\u00a0break\u3000spaces",
    "a literal ▁ piece marker ▁x",
    "Wolfgang Amadeus Mozart was born in 1756.",
]

_RANDOM_ALPHABET = list("ab 1.\n\t") + ["é", "中", "🙂", "\u0301", "▁", "  ", "the ", "Paris", "1987"]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def _surface(tokenizer: Tokenizer, piece_id: int) -> bytes:
    """What a piece stands for in the text: "▁" a space, ``<0xAB>`` one byte."""
    piece = tokenizer.id_to_piece(piece_id)
    if tokenizer._sp.is_byte(piece_id):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("▁", " ").encode()


def _check_offsets(tokenizer: Tokenizer, text: str) -> None:
    ids, begin, end = encode_with_offsets(tokenizer, text)
    assert ids.dtype == begin.dtype == end.dtype == np.int64
    assert ids.tolist() == tokenizer.encode(text)
    data = text.encode()
    # SentencePiece spells a literal "▁" in the text like a space.
    slices = [data[b:e].replace("▁".encode(), b" ") for b, e in zip(begin, end)]
    surfaces = [_surface(tokenizer, piece) for piece in ids]
    if surfaces:
        assert surfaces[0].startswith(b" ")  # the dummy prefix, which covers no byte of the text
        surfaces[0] = surfaces[0][1:]
    assert slices == surfaces
    assert b"".join(data[b:e] for b, e in zip(begin, end)) == data
    assert (begin[1:] == end[:-1]).all()
    assert np.flatnonzero(begin == end).tolist() in ([], [0])


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_cover_each_piece_surface_and_tile_the_text(tokenizer, text):
    _check_offsets(tokenizer, text)


def test_offsets_of_random_texts(tokenizer):
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(_RANDOM_ALPHABET) for _ in range(rng.randint(0, 25)))
        _check_offsets(tokenizer, text)


def test_byte_fallback_pieces_of_one_character_get_one_byte_each(tokenizer):
    text = "🙂"
    ids, begin, end = encode_with_offsets(tokenizer, text)
    byte_pieces = [k for k, piece in enumerate(ids) if tokenizer._sp.is_byte(int(piece))]
    assert len(byte_pieces) == 4
    assert [(begin[k], end[k]) for k in byte_pieces] == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("text", TEXTS)
def test_char_to_byte_offsets(text):
    offsets = char_to_byte_offsets(text)
    assert offsets.dtype == np.int64
    assert offsets.tolist() == [len(text[:i].encode()) for i in range(len(text) + 1)]


def align_words(tokenizer, text: str, word_begin, word_end, word_class) -> tuple[np.ndarray, np.ndarray]:
    """Piece ids of ``text`` and their classes, as the labeler computes them."""
    ids, begin, end = encode_with_offsets(tokenizer, text)
    return ids, piece_classes(text, char_to_byte_offsets(text), begin, end, word_begin, word_end, word_class)


def _words(text: str, words: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Character offsets of ``words`` (found left to right in ``text``) and their classes."""
    begins, ends, position = [], [], 0
    for word, _ in words:
        position = text.index(word, position)
        begins.append(position)
        ends.append(position + len(word))
        position += len(word)
    return np.array(begins), np.array(ends), np.array([cls for _, cls in words], dtype=np.int8)


def _classes_by_surface(tokenizer, text: str, words: list[tuple[str, int]]) -> list[tuple[bytes, int]]:
    _, classes = align_words(tokenizer, text, *_words(text, words))
    _, begin, end = encode_with_offsets(tokenizer, text)
    data = text.encode()
    return [(data[b:e], int(c)) for b, e, c in zip(begin, end, classes)]


def test_the_space_before_a_number_and_its_digits_take_the_number_class(tokenizer):
    text = "born in 1987."
    labeled = _classes_by_surface(tokenizer, text, [("born", OTHER), ("in", GRAMMAR), ("1987", FACT), (".", GRAMMAR)])
    # split_digits keeps digits apart from everything, the space before them included
    assert labeled[-6:] == [(b" ", FACT), (b"1", FACT), (b"9", FACT), (b"8", FACT), (b"7", FACT), (b".", GRAMMAR)]
    head = labeled[:-6]
    assert b"".join(surface for surface, _ in head) == b"born in"
    assert {cls for surface, cls in head if surface in b"born"} == {OTHER}
    assert {cls for surface, cls in head if surface in b" in" and surface not in b"born"} == {GRAMMAR}


def test_whitespace_words_and_newlines(tokenizer):
    text = "x  y\n\nz"
    # spaCy: "x" (its trailing space at 1), the whitespace token " " at 2, "y", the token "\n\n", "z"
    words = np.array([0, 2, 3, 4, 6]), np.array([1, 3, 4, 6, 7]), np.array([GRAMMAR, OTHER, FACT, OTHER, FACT])
    _, classes = align_words(tokenizer, text, *words)
    _, begin, end = encode_with_offsets(tokenizer, text)
    labeled = [(text.encode()[b:e], int(c)) for b, e, c in zip(begin, end, classes)]
    assert labeled[0] == (b"", OTHER)  # the dummy prefix
    assert labeled[1:] == [
        (b"x", GRAMMAR), (b" ", OTHER), (b" ", OTHER), (b"y", FACT), (b"\n", OTHER), (b"\n", OTHER), (b"z", FACT)
    ]


def test_leading_spaces_belong_to_the_first_word(tokenizer):
    text = "  1987"
    labeled = _classes_by_surface(tokenizer, text, [("1987", FACT)])
    assert labeled[0] == (b"", OTHER)
    assert all(cls == FACT for _, cls in labeled[1:]) and b"".join(s for s, _ in labeled) == text.encode()


def test_multi_byte_characters_take_their_word_class(tokenizer):
    text = "café 中文 🙂 e\u0301"
    words = [("café", FACT), ("中文", GRAMMAR), ("🙂", OTHER), ("e\u0301", FACT)]
    _, classes = align_words(tokenizer, text, *_words(text, words))
    _, begin, end = encode_with_offsets(tokenizer, text)
    to_bytes = char_to_byte_offsets(text)
    for word, cls in words:
        start = text.index(word)
        # the word's pieces and the space before it, not the empty dummy prefix
        inside = (begin >= to_bytes[start] - 1) & (begin < to_bytes[start + len(word)]) & (end > begin)
        assert (classes[inside] == cls).all(), word


def test_a_piece_across_words_prefers_fact_then_other_then_grammar(tokenizer):
    text = "the river"
    _, begin, end = encode_with_offsets(tokenizer, text)
    wide = next(k for k in range(len(begin)) if end[k] - begin[k] >= 3)
    middle = int(begin[wide] + end[wide]) // 2
    data = np.frombuffer(text.encode(), dtype=np.uint8)

    def piece_class(first: int, second: int) -> int:
        words_begin, words_end = np.array([begin[wide], middle]), np.array([middle, end[wide]])
        return int(label_pieces(begin, end, words_begin, words_end, np.array([first, second]), data)[wide])

    assert piece_class(GRAMMAR, FACT) == FACT
    assert piece_class(OTHER, FACT) == FACT
    assert piece_class(GRAMMAR, OTHER) == OTHER
    assert piece_class(GRAMMAR, GRAMMAR) == GRAMMAR


def test_unowned_and_empty_pieces():
    data = np.frombuffer(b"ab, cd", dtype=np.uint8)
    piece_begin, piece_end = np.array([0, 2, 2, 3, 4]), np.array([2, 2, 3, 4, 6])
    # words "ab" (grammar) and "cd" (fact); "," belongs to no word
    classes = label_pieces(piece_begin, piece_end, np.array([0, 4]), np.array([2, 6]), np.array([GRAMMAR, FACT]), data)
    assert classes.dtype == np.int8
    assert classes.tolist() == [GRAMMAR, GRAMMAR, OTHER, FACT, FACT]
    first_empty = label_pieces(np.array([0, 0]), np.array([0, 2]), np.array([0]), np.array([2]), np.array([FACT]), data)
    assert first_empty.tolist() == [OTHER, FACT]


def test_empty_text(tokenizer):
    no_words = np.array([], dtype=np.int64)
    ids, classes = align_words(tokenizer, "", no_words, no_words, np.array([], dtype=np.int8))
    assert ids.shape == classes.shape == (0,)
    assert ids.dtype == np.int64 and classes.dtype == np.int8


def _reference_labels(data: bytes, pieces, words, classes) -> list[int]:
    """The rules of label_pieces, spelled out byte by byte."""

    def word_at(byte: int) -> int | None:
        return next((w for w, (b, e) in enumerate(words) if b <= byte < e), None)

    def owner(byte: int) -> int | None:
        if word_at(byte) is not None:
            return word_at(byte)
        if data[byte] != 0x20:
            return None
        after = byte + 1
        while after < len(data) and data[after] == 0x20 and word_at(after) is None:
            after += 1
        return word_at(after) if after < len(data) else None

    labels: list[int] = []
    for begin, end in pieces:
        if begin == end:
            labels.append(labels[-1] if labels else OTHER)
            continue
        owned = {int(classes[owner(b)]) for b in range(begin, end) if owner(b) is not None}
        labels.append(FACT if FACT in owned else OTHER if OTHER in owned or not owned else GRAMMAR)
    return labels


def test_label_pieces_matches_a_reference_on_random_inputs():
    rng = random.Random(7)
    for _ in range(300):
        size = rng.randint(0, 40)
        data = bytes(rng.choice(b"  ab\n") for _ in range(size))
        cuts = sorted(rng.sample(range(size + 1), rng.randint(0, min(size + 1, 12))))
        words = [(b, e) for b, e in zip(cuts[::2], cuts[1::2]) if rng.random() < 0.8]
        classes = np.array([rng.choice([OTHER, FACT, GRAMMAR]) for _ in words], dtype=np.int8)
        piece_cuts = [0, *sorted(rng.choices(range(size + 1), k=rng.randint(0, size))), size]
        pieces = list(zip(piece_cuts, piece_cuts[1:]))
        got = label_pieces(
            np.array([b for b, _ in pieces], dtype=np.int64),
            np.array([e for _, e in pieces], dtype=np.int64),
            np.array([b for b, _ in words], dtype=np.int64),
            np.array([e for _, e in words], dtype=np.int64),
            classes,
            np.frombuffer(data, dtype=np.uint8),
        )
        assert got.tolist() == _reference_labels(data, pieces, words, classes), (data, pieces, words, classes)


def test_label_pieces_rejects_bad_offsets():
    data = np.zeros(4, dtype=np.uint8)
    one = np.array([0]), np.array([4])
    with pytest.raises(ValueError, match="sorted"):
        label_pieces(*one, np.array([2, 0]), np.array([4, 2]), np.array([FACT, FACT]), data)
    with pytest.raises(ValueError, match="<= 4"):
        label_pieces(*one, np.array([0]), np.array([5]), np.array([FACT]), data)
    with pytest.raises(ValueError, match="word classes"):
        label_pieces(*one, np.array([0]), np.array([4]), np.array([FACT, FACT]), data)


def _in_spans(pieces: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    return pieces_in_spans(
        np.array([b for b, _ in pieces], dtype=np.int64),
        np.array([e for _, e in pieces], dtype=np.int64),
        np.array([b for b, _ in spans], dtype=np.int64),
        np.array([e for _, e in spans], dtype=np.int64),
    ).tolist()


def test_pieces_in_spans_edges():
    pieces = [(0, 0), (0, 3), (3, 4), (4, 8), (8, 9), (9, 12), (12, 12), (12, 20)]
    # span [4, 9): the piece [3, 4) (the space before it) and [9, 12) only touch it
    assert _in_spans(pieces, [(4, 9)]) == [False, False, False, True, True, False, False, False]
    assert _in_spans(pieces, []) == [False] * len(pieces)
    assert _in_spans([], [(0, 5)]) == []
    # one piece over two spans, an empty span, and a span past the last piece
    assert _in_spans([(0, 10), (10, 11)], [(1, 2), (5, 5), (6, 7), (30, 40)]) == [True, False]
    # an empty piece overlaps nothing, even inside a span
    assert _in_spans([(0, 2), (2, 2), (2, 4)], [(1, 3)]) == [True, False, True]


def test_pieces_in_spans_matches_brute_force():
    rng = random.Random(3)
    for _ in range(200):
        cuts = [0, *sorted(rng.choices(range(30), k=rng.randint(0, 20))), 30]
        pieces = list(zip(cuts, cuts[1:]))
        span_cuts = sorted(rng.sample(range(31), rng.randint(0, 10)))
        spans = list(zip(span_cuts[::2], span_cuts[1::2]))
        expected = [b < e and any(b < se and sb < e for sb, se in spans) for b, e in pieces]
        assert _in_spans(pieces, spans) == expected


def test_pieces_in_spans_rejects_unsorted_spans():
    with pytest.raises(ValueError, match="sorted"):
        _in_spans([(0, 4)], [(2, 3), (0, 1)])


def test_one_compiled_version_serves_every_input_layout():
    """Read-only (np.frombuffer) or other dtypes must not compile the loops again in each worker."""
    alignment.warm_up()
    data = np.frombuffer(b"ab cd", dtype=np.uint8)
    label_pieces(np.array([0], np.int32), np.array([5], np.int32), np.array([0]), np.array([2]), [FACT], data)
    pieces_in_spans(np.array([0], np.int32), np.array([5], np.int32), np.array([1]), np.array([2]))
    assert len(alignment._label_pieces.signatures) == 1
    assert len(alignment._pieces_in_spans.signatures) == 1


def test_fast_offsets_equal_sentencepiece_offsets(tokenizer_path):
    from lacy_stream.annotate.alignment import _encode_with_proto_offsets

    tokenizer = Tokenizer(tokenizer_path)
    rng = random.Random(7)
    alphabet = "ab c1 2\n\t.é中🙂\u0301 ▁"
    texts = ["", " ", "in 1987.", "  two  spaces", "\n\nnew", "Ünïcode 中文 🙂 e\u0301", "x\u2581y"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for text in texts:
        fast = encode_with_offsets(tokenizer, text)
        exact = _encode_with_proto_offsets(tokenizer, text)
        for a, b in zip(fast, exact):
            assert a.tolist() == b.tolist(), repr(text)
