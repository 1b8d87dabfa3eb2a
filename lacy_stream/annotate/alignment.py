"""Alignment of SentencePiece pieces with words: piece byte offsets, and word classes inherited by pieces.

Everything works in UTF-8 byte offsets, the unit SentencePiece reports; :func:`char_to_byte_offsets`
converts the character offsets spaCy gives.

What SentencePiece reports, and what :func:`encode_with_offsets` makes of it:

* The dummy prefix "▁" that SentencePiece puts before the text covers no byte of it. Merged into the
  first piece ("▁in" for "in 1987") it is invisible: the piece starts at byte 0. Standing alone (before
  a digit, a byte-fallback character, a space, a newline) it is a piece with ``begin == end == 0``, the
  only empty piece that remains.
* A character with no piece of its own is spelled by byte-fallback pieces, one per UTF-8 byte. All of
  them report the character's first byte as ``begin``; the leading ones are empty and only the last one
  reports the character's end. We give the k-th of them the k-th byte of the character.
* A space travels with the piece after it ("▁in" covers " in"; a lone "▁" covers one space); newlines and
  tabs are byte pieces of their own.

So, after the dummy prefix, pieces tile the text bytes: each starts where the one before it ended.

Labels (:func:`label_pieces`) are decided per byte, then reduced per piece, in time linear in pieces,
words and bytes. The loops run under numba; :func:`warm_up` compiles them before dataloader workers fork.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np

from ..labels import TokenClass
from ..tokenizer import Tokenizer

_OTHER = int(TokenClass.OTHER)
_FACT = int(TokenClass.FACT)
_GRAMMAR = int(TokenClass.GRAMMAR)
_UNOWNED = -128  # byte class of a byte that belongs to no word; outside the TokenClass range
_SPACE = 0x20


@dataclass
class PieceLabels:
    """A document labeled piece by piece (by a labeler that works on pieces): ids, ``[begin, end)`` byte
    offsets as :func:`encode_with_offsets` gives them, and the class of each piece."""

    ids: np.ndarray
    begin: np.ndarray
    end: np.ndarray
    classes: np.ndarray


def encode_with_offsets(tokenizer: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Piece ids (equal to ``tokenizer.encode(text)``) and each piece's ``[begin, end)`` byte offsets.

    Offsets index ``text.encode("utf-8")``, never decrease, and the byte-fallback pieces of one character
    each get one of its bytes (see the module docstring).
    """
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    offsets = _offsets_from_piece_lengths(tokenizer, ids, len(text.encode("utf-8")), "\u2581" in text)
    return (ids, *offsets) if offsets is not None else _encode_with_proto_offsets(tokenizer, text)


def _offsets_from_piece_lengths(
    tokenizer: Tokenizer, ids: np.ndarray, text_bytes: int, has_literal_marker: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """The fast path: pieces tile the text, so offsets are running sums of the pieces' byte lengths.

    None when that cannot be trusted (an unknown piece, a literal "▁" in the text, lengths that do not add
    up to the text plus the dummy prefix); the caller then asks SentencePiece for the offsets.
    """
    lengths = _piece_byte_lengths(tokenizer)[ids]
    if has_literal_marker or (lengths < 0).any() or int(lengths.sum()) != text_bytes + 1:
        return None
    end = np.cumsum(lengths) - 1  # the dummy prefix "▁" covers no byte of the text
    begin = np.maximum(end - lengths, 0)
    return begin, end


@functools.lru_cache(maxsize=8)
def _piece_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """``lengths[id]``: bytes of text piece ``id`` stands for ("▁" = one space); -1 for unknown/control."""
    lengths = np.empty(tokenizer.num_pieces, dtype=np.int64)
    for piece in range(tokenizer.num_pieces):
        if tokenizer.is_byte_piece(piece):
            lengths[piece] = 1
        elif tokenizer.is_special_piece(piece):
            lengths[piece] = -1
        else:
            lengths[piece] = len(tokenizer.id_to_piece(piece).replace("\u2581", " ").encode("utf-8"))
    return lengths


def _encode_with_proto_offsets(tokenizer: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pieces = tokenizer.encode_with_spans(text).pieces
    ids = np.fromiter((piece.id for piece in pieces), dtype=np.int64, count=len(pieces))
    begin = np.fromiter((piece.begin for piece in pieces), dtype=np.int64, count=len(pieces))
    end = np.fromiter((piece.end for piece in pieces), dtype=np.int64, count=len(pieces))
    _spread_byte_pieces(begin, end, _byte_piece_mask(tokenizer)[ids])
    return ids, begin, end


@functools.lru_cache(maxsize=8)
def _byte_piece_mask(tokenizer: Tokenizer) -> np.ndarray:
    """``mask[id]``: whether piece ``id`` is a byte-fallback piece (``<0xAB>``)."""
    return np.fromiter((tokenizer.is_byte_piece(piece) for piece in range(tokenizer.num_pieces)), dtype=bool)


def _spread_byte_pieces(begin: np.ndarray, end: np.ndarray, is_byte: np.ndarray) -> None:
    """In place: the n byte pieces of an n-byte character get one byte each instead of (empty, ..., all)."""
    last = np.flatnonzero(is_byte & (end - begin > 1))
    if last.size == 0:
        return
    width = end[last] - begin[last]
    byte_in_char = np.arange(width.sum()) - np.repeat(np.cumsum(width) - width, width)
    piece = np.repeat(last - width + 1, width) + byte_in_char
    char_begin = np.repeat(begin[last], width)
    if piece[0] < 0 or not (is_byte[piece].all() and (begin[piece] == char_begin).all()):
        raise RuntimeError("SentencePiece byte-fallback offsets are not laid out as expected")
    begin[piece] = char_begin + byte_in_char
    end[piece] = begin[piece] + 1


def char_to_byte_offsets(text: str) -> np.ndarray:
    """``offsets[i]``: the UTF-8 byte offset of character boundary ``i``; ``len(text) + 1`` entries (int64)."""
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    utf8_widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    offsets = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(utf8_widths, out=offsets[1:])
    return offsets


def label_pieces(
    piece_begin: np.ndarray,
    piece_end: np.ndarray,
    word_begin: np.ndarray,
    word_end: np.ndarray,
    word_class: np.ndarray,
    text_bytes: np.ndarray,
) -> np.ndarray:
    """The :class:`TokenClass` of each piece (int8), from the classes of the words it covers.

    Pieces and words are ``[begin, end)`` byte offsets into ``text_bytes`` (the UTF-8 text as uint8);
    words are sorted and do not overlap (whitespace words such as "\\n" included).

    * A word owns its bytes plus the run of ASCII spaces right before it that no word owns: SentencePiece
      carries a space on the next piece as "▁", so the "▁" before the digits of "1987" is the number's.
    * A piece covering owned bytes of several words is FACT if any is a FACT word's, else OTHER if any is
      an OTHER word's, else GRAMMAR.
    * A piece that covers no owned byte is OTHER.
    * An empty piece (the lone dummy prefix) takes the class of the piece before it, OTHER when first.
    """
    size = len(text_bytes)
    piece_begin, piece_end = _checked_spans(piece_begin, piece_end, size, "piece")
    word_begin, word_end = _checked_spans(word_begin, word_end, size, "word")
    if np.any(word_begin[1:] < word_end[:-1]):
        raise ValueError("words must be sorted and must not overlap")
    word_class = _compilable(word_class, np.int8)
    if len(word_class) != len(word_begin):
        raise ValueError(f"{len(word_class)} word classes for {len(word_begin)} words")
    text_bytes = _compilable(text_bytes, np.uint8)
    return _label_pieces(piece_begin, piece_end, word_begin, word_end, word_class, text_bytes)


@numba.njit(cache=True)
def _label_pieces(piece_begin, piece_end, word_begin, word_end, word_class, text_bytes):
    byte_class = np.full(text_bytes.size, _UNOWNED, dtype=np.int8)
    for word in range(word_begin.size):
        byte_class[word_begin[word] : word_end[word]] = word_class[word]
        before = word_begin[word] - 1
        while before >= 0 and text_bytes[before] == _SPACE and byte_class[before] == _UNOWNED:
            byte_class[before] = word_class[word]
            before -= 1

    labels = np.empty(piece_begin.size, dtype=np.int8)
    for piece in range(piece_begin.size):
        if piece_begin[piece] == piece_end[piece]:
            labels[piece] = labels[piece - 1] if piece > 0 else _OTHER
            continue
        has_fact = has_other = has_grammar = False
        for byte in range(piece_begin[piece], piece_end[piece]):
            cls = byte_class[byte]
            has_fact |= cls == _FACT
            has_other |= cls == _OTHER
            has_grammar |= cls == _GRAMMAR
        if has_fact:
            labels[piece] = _FACT
        elif has_grammar and not has_other:
            labels[piece] = _GRAMMAR
        else:
            labels[piece] = _OTHER
    return labels


def pieces_in_spans(
    piece_begin: np.ndarray, piece_end: np.ndarray, span_begin: np.ndarray, span_end: np.ndarray
) -> np.ndarray:
    """Whether each piece's byte range overlaps a span (bool).

    Pieces are sorted by ``begin``; spans are sorted and do not overlap. Ranges are half-open, so an empty
    piece overlaps nothing, and the "▁" piece of the space right before a span does not overlap it.
    """
    piece_begin, piece_end = _checked_spans(piece_begin, piece_end, None, "piece")
    span_begin, span_end = _checked_spans(span_begin, span_end, None, "span")
    if np.any(np.diff(piece_begin) < 0):
        raise ValueError("pieces must be sorted by begin")
    if np.any(span_begin[1:] < span_end[:-1]):
        raise ValueError("spans must be sorted and must not overlap")
    return _pieces_in_spans(piece_begin, piece_end, span_begin, span_end)


@numba.njit(cache=True)
def _pieces_in_spans(piece_begin, piece_end, span_begin, span_end):
    inside = np.zeros(piece_begin.size, dtype=np.bool_)
    span = 0
    for piece in range(piece_begin.size):
        while span < span_begin.size and span_end[span] <= piece_begin[piece]:
            span += 1
        if span == span_begin.size:
            break
        inside[piece] = span_begin[span] < piece_end[piece] and piece_begin[piece] < piece_end[piece]
    return inside


def _compilable(array: np.ndarray, dtype: type) -> np.ndarray:
    """``array`` as the one array type the loops are compiled for: numba compiles another version for each
    dtype, layout and read-only flag (``np.frombuffer`` arrays are read-only), costing seconds per worker."""
    return np.require(array, dtype=dtype, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def _checked_spans(begin: np.ndarray, end: np.ndarray, size: int | None, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``begin``, ``end`` as compilable int64 arrays, checked to lie in ``[0, size]``."""
    begin = _compilable(begin, np.int64)
    end = _compilable(end, np.int64)
    if begin.shape != end.shape or begin.ndim != 1:
        raise ValueError(f"{what} begins and ends must be 1-d arrays of one length")
    if np.any(begin < 0) or np.any(end < begin) or (size is not None and np.any(end > size)):
        raise ValueError(f"{what} offsets must satisfy 0 <= begin <= end" + ("" if size is None else f" <= {size}"))
    return begin, end


def warm_up() -> None:
    """Compile (or load from numba's cache) the jitted loops, so that forked workers inherit them."""
    offsets = np.array([0, 1], dtype=np.int64)
    label_pieces(offsets[:1], offsets[1:], offsets[:1], offsets[1:], np.zeros(1, np.int8), np.zeros(1, np.uint8))
    pieces_in_spans(offsets[:1], offsets[1:], offsets[:1], offsets[1:])


def piece_classes(
    text: str,
    to_bytes: np.ndarray,
    piece_begin: np.ndarray,
    piece_end: np.ndarray,
    word_char_begin: np.ndarray,
    word_char_end: np.ndarray,
    word_class: np.ndarray,
) -> np.ndarray:
    """Classes of the pieces (byte offsets, from :func:`encode_with_offsets`) of ``text``, from words given in
    character offsets, as spaCy gives them; ``to_bytes`` is :func:`char_to_byte_offsets` of ``text``."""
    text_bytes = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return label_pieces(
        piece_begin,
        piece_end,
        to_bytes[np.asarray(word_char_begin, dtype=np.int64)],
        to_bytes[np.asarray(word_char_end, dtype=np.int64)],
        word_class,
        text_bytes,
    )
