"""A distilled fact labeler: a small network over SentencePiece pieces in place of spaCy.

The network predicts only what the rules decide locally (see :func:`.annotation.local_labels`), per piece:

- its *span tag*: outside any mention, or the first / a later piece of a mention (a PERSON one or another);
- its *base class*: grammar or other, the class it has when no mention makes it a fact;
- whether it is a fact when its mention is the first one.

The document-level rules then run exactly as for spaCy (:func:`.annotation.first_mentions`) over the
mentions the tags delimit, keyed by their text. :mod:`.distill` makes the training targets from spaCy and
trains the network.

A student file carries its identity: the tokenizer it was trained for (file hash), the rules version and the
teacher (spaCy model). Loading it for another tokenizer or rules version is refused.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ..labels import TokenClass
from ..tokenizer import Tokenizer
from .alignment import PieceLabels, char_to_byte_offsets, encode_with_offsets
from .annotation import (
    RULES_VERSION,
    Mention,
    first_mentions,
    mention_key,
    person_name_parts,
)
from .label_cache import file_digest

OUTSIDE, BEGIN, INSIDE, BEGIN_PERSON, INSIDE_PERSON = range(5)
"""Span tags: a mention starts at a BEGIN tag and goes on over the INSIDE tags that follow."""
SPAN_TAGS = 5
BASE_CLASSES = (TokenClass.OTHER, TokenClass.GRAMMAR)
SHAPES = 14
WORD_CASES, WORD_POSITIONS = 6, 6
WORD_FEATURES = WORD_CASES * WORD_POSITIONS * 2
"""Codes of :func:`word_features`: the word's case, the piece's place in it, whether the word starts a sentence."""
BATCH_PIECES = 8192
"""Pieces the network labels in one call (documents are not split; a longer one runs alone)."""
STUDENT_FORMAT = "lacy-student-4"
"""Version 4 adds the known words; 3 (read too: no known words) the word features; students of earlier versions
were distilled from rules lacy-rules-1."""
READABLE_FORMATS = ("lacy-student-3", STUDENT_FORMAT)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""What a student can label in (``annotation.student_dtype``; ``auto`` picks one with :func:`labeling_dtype`)."""


@dataclass
class StudentConfig:
    """The network's size: piece, piece-shape and word-feature embeddings (plus, for the known words, an
    embedding of the word's identity), then dilated convolutions (the receptive field doubles with each layer).
    ``word_dim`` 0 leaves the word features out."""

    num_pieces: int
    width: int = 128
    """On 7.2M pieces, 95.29% held-out agreement against 95.19% at 96 and 95.31% at 160; labeling in bf16 it runs
    1.35x as fast as width 96 in fp32 (in fp32, 0.74x: on a CPU without native bfloat16, 96 is the faster choice)."""
    layers: int = 4
    kernel: int = 3
    shape_dim: int = 16
    word_dim: int = 16
    known_words: int = 0
    """Words the network knows by identity (its training's most frequent; the others share one embedding),
    added to their pieces' embeddings; 0 leaves word identities out."""
    dropout: float = 0.1
    """Share of the embeddings' and each convolution's channels zeroed at random in training (labeling never drops
    any). On 1M training pieces 0.1 takes a width-128 student from 93.32% to 93.82% held-out agreement (without it,
    more capacity or more passes learn the training documents by heart); on 7.2M and a swapped copy it changes
    nothing (95.54% against 95.53%)."""

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout is a share of channels, at least 0 and below 1, not {self.dropout}")
        if self.width <= self.shape_dim + self.word_dim:
            raise ValueError(f"a student of width {self.width} has no channels left for its pieces after "
                             f"{self.shape_dim} of shape and {self.word_dim} of word features: give a larger width")


class StudentNetwork(nn.Module):
    """Pieces, their shapes and word features -> span tag, base class and "fact if first" logits per piece."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.config = config
        self.pieces = nn.Embedding(config.num_pieces, config.width - config.shape_dim - config.word_dim)
        self.shapes = nn.Embedding(SHAPES, config.shape_dim)
        self.words = nn.Embedding(WORD_FEATURES, config.word_dim) if config.word_dim else None
        self.word_identities = None
        if config.known_words:
            piece_dim = config.width - config.shape_dim - config.word_dim
            self.word_identities = nn.Embedding(config.known_words + 1, piece_dim)
            self.register_buffer("known_word_hashes", torch.zeros(config.known_words, dtype=torch.int64))
        self.convolutions = nn.ModuleList(
            DilatedConvolution(config.width, config.kernel, dilation=2**layer) for layer in range(config.layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(config.width) for _ in range(config.layers))
        self.dropout = BitDropout(config.dropout)
        self.head = nn.Linear(config.width, SPAN_TAGS + 2 + 2)

    def identities_of(self, hashes: np.ndarray) -> np.ndarray:
        """Word identities of pieces from their :func:`word_hashes`: 1 + the word's place among the known
        words, 0 for any other word."""
        return places_among(self.known_word_hashes.numpy(), hashes)

    @property
    def reach(self) -> int:
        """How far the widest convolution looks to each side."""
        return max(convolution.reach for convolution in self.convolutions)

    def forward(self, *inputs: torch.Tensor | None, **named: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Logits ``[batch, length, 5]`` (span tag), ``[.., 2]`` (base), ``[.., 2]`` (fact) of the pieces
        (inputs as for :meth:`encode`)."""
        return self.outputs(self.encode(*inputs, **named))

    def outputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three logits of :meth:`forward` from the hidden state of :meth:`encode`."""
        logits = self.head(hidden)
        return logits[..., :SPAN_TAGS], logits[..., SPAN_TAGS : SPAN_TAGS + 2], logits[..., SPAN_TAGS + 2 :]

    def encode(
        self,
        pieces: torch.Tensor,
        shapes: torch.Tensor,
        words: torch.Tensor | None,
        keep: torch.Tensor | None = None,
        identities: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[batch, length]`` piece ids, shape codes (:attr:`PieceTable.shapes`) and word-feature codes
        (:func:`word_features`; None for a network without them, ``word_dim`` 0) and, for a network with
        ``known_words``, the pieces' word identities (:meth:`identities_of`) -> the hidden state
        ``[batch, length, width]`` the heads read.

        ``keep`` (``[batch, length, 1]``, 0 or 1) zeroes positions before every convolution: a run of at least
        :attr:`reach` zeroed positions between two documents makes each see the other as "same" padding."""
        embedded = self.pieces(pieces)
        if self.word_identities is not None:
            embedded = embedded + self.word_identities(identities)
        inputs = [embedded, self.shapes(shapes)]
        if self.words is not None:
            inputs.append(self.words(words))
        hidden = self.dropout(torch.cat(inputs, dim=-1))
        for convolution, norm in zip(self.convolutions, self.norms):
            if keep is not None:
                hidden = hidden * keep
            hidden = norm(hidden + self.dropout(torch.relu(convolution(hidden))))
        return hidden


def places_among(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """1 + each key's place among ``sorted_keys``, 0 for a key not among them."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=np.int64)
    places = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[places] == keys, places + 1, 0)


class BitDropout(nn.Module):
    """``nn.Dropout``'s elements zeroed with probability ``p`` and the rest scaled by ``1 / (1 - p)``, with the
    masks drawn on the CPU from raw random bits (16 per element, numpy's PCG64 seeded from torch's generator):
    for each of the student's five dropouts of a training batch (``[8, 512, 128]``) torch's ``bernoulli_`` took
    6.6 ms of a ~170 ms step on two threads, these bits 0.3 ms. On a GPU, or with ``p`` 0, it is ``F.dropout``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self._threshold = round(p * 2**16)
        self._bits: np.random.Generator | None = None  # seeded at the first mask: labeling never touches torch's RNG

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or hidden.device.type != "cpu":
            return nn.functional.dropout(hidden, self.p, self.training)
        if self._bits is None:
            self._bits = np.random.Generator(np.random.PCG64(int(torch.randint(2**62, ()))))
        count = hidden.numel()
        bits = self._bits.bit_generator.random_raw(-(-count // 4)).view(np.uint16)[:count]
        keep = torch.from_numpy(bits >= self._threshold).view(hidden.shape)
        return hidden * keep * (1 / (1 - self.p))


class DilatedConvolution(nn.Module):
    """A 1-d convolution with "same" padding over ``[batch, length, width]``, computed as one matrix product of
    the shifted inputs side by side: on one CPU thread about twice as fast as ``conv1d`` at these widths."""

    def __init__(self, width: int, kernel: int, dilation: int) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"the kernel must be odd to keep pieces centred, not {kernel}")
        self.kernel, self.dilation = kernel, dilation
        self.reach = dilation * (kernel - 1) // 2
        self.mix = nn.Linear(kernel * width, width)  # input features tap by tap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        if torch.is_grad_enabled() and hidden.requires_grad:
            # Under autograd each write below costs a copy of the whole product input in the backward pass
            # (CopySlices: a quarter of a training step); padded slices side by side backpropagate by views.
            padded = nn.functional.pad(hidden, (0, 0, self.reach, self.reach))
            shifted = [padded[:, tap * self.dilation : tap * self.dilation + length] for tap in range(self.kernel)]
            return self.mix(torch.cat(shifted, dim=-1))
        # The shifted inputs are written straight into the matrix product's input (a pad and a concatenation
        # would copy them twice); only the ends a shift leaves uncovered are zeroed.
        taps = hidden.new_empty(batch, length, self.kernel * width)
        for tap in range(self.kernel):
            shift = tap * self.dilation - self.reach
            columns = slice(tap * width, (tap + 1) * width)
            begin, end = max(0, -shift), min(length, length - shift)
            taps[:, :begin, columns] = 0
            taps[:, max(begin, end) :, columns] = 0
            if begin < end:
                taps[:, begin:end, columns] = hidden[:, begin + shift : end + shift]
        return self.mix(taps)


@dataclass(frozen=True)
class PieceTable:
    """What each piece id looks like, indexed by id: the network's shape input and what :func:`word_features`
    needs to find words and sentences in a sequence of ids."""

    shapes: np.ndarray
    """:data:`SHAPES` codes: word start, case, digits, punctuation, bytes; so that pieces rarely seen in
    training still say something."""
    letters: np.ndarray
    """The case of the piece's text without its "▁" (:data:`WORD_CASES` codes, 0 when nothing is left)."""
    spaced: np.ndarray
    """Begins with "▁": a word starts here (and so does one after punctuation: spaCy splits it off)."""
    punctuation: np.ndarray
    ends_sentence: np.ndarray
    """Ends in ".", "!" or "?" (closing quotes and brackets after them allowed)."""
    closes: np.ndarray
    """Only closing quotes or brackets: a sentence can end just before it."""


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_CLOSERS = re.compile(r"[\"')\]]+$")


def piece_table(tokenizer: Tokenizer) -> PieceTable:
    """The :class:`PieceTable` of ``tokenizer``'s pieces (special pieces look like nothing; byte pieces are shape 1)."""
    size = tokenizer.num_pieces
    shapes, letters = np.zeros(size, dtype=np.int64), np.zeros(size, dtype=np.int64)
    spaced, punctuation, ends_sentence, closes = (np.zeros(size, dtype=bool) for _ in range(4))
    for piece in range(size):
        if tokenizer.is_special_piece(piece):
            continue
        if tokenizer.is_byte_piece(piece):
            shapes[piece] = 1
            continue
        text = tokenizer.id_to_piece(piece)
        bare = text.lstrip("\u2581")
        letters[piece] = _letters_shape(bare)
        shapes[piece] = 2 + 2 * letters[piece] + text.startswith("\u2581")
        punctuation[piece] = letters[piece] == 2
        spaced[piece] = text.startswith("\u2581")
        ends_sentence[piece] = bool(_SENTENCE_END.search(bare))
        closes[piece] = bool(_CLOSERS.fullmatch(bare))
    return PieceTable(shapes, letters, spaced, punctuation, ends_sentence, closes)


Words = tuple[np.ndarray, np.ndarray, np.ndarray]
"""What :func:`find_words` finds: each word's first piece, each piece's word, its place in it."""


def word_features(ids: np.ndarray, table: PieceTable, words: Words | None = None) -> np.ndarray:
    """Per piece of one document, a code (< :data:`WORD_FEATURES`) of what its word looks like: the word's case
    (from its first piece with letters or digits), the piece's place in it (alone; first or last of two; first,
    inner or last of more) and whether the word starts a sentence (the document's first word, or one after a
    sentence end and a space). Words start at a "▁" piece, and punctuation stands alone, roughly as spaCy
    splits them. ``words`` is :func:`find_words` of ``ids`` when the caller has it already."""
    count = len(ids)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    spaced = table.spaced[ids]
    firsts, word_of, place = words or find_words(ids, table)
    length = np.diff(np.append(firsts, count))[word_of]
    position = np.where(
        length == 1, 0, np.where(length == 2, 1 + place, np.where(place == 0, 3, np.where(place == length - 1, 5, 4)))
    )
    letters = table.letters[ids]
    second = np.minimum(firsts + 1, count - 1)
    word_case = np.where(letters[firsts] == 0, letters[second], letters[firsts])
    ends, closes = table.ends_sentence[ids], table.closes[ids]
    previous, before_that = np.maximum(firsts - 1, 0), np.maximum(firsts - 2, 0)
    sentence_start = spaced[firsts] & (ends[previous] | (closes[previous] & ends[before_that]))
    sentence_start[0] = True  # the document's first word
    return ((word_case[word_of] * WORD_POSITIONS + position) * 2 + sentence_start[word_of]).astype(np.int64)


def find_words(ids: np.ndarray, table: PieceTable) -> Words:
    """The words of a document's pieces: each word's first piece, each piece's word and its place in it. Words
    start at a "▁" piece, and punctuation stands alone, roughly as spaCy splits them."""
    punctuation = table.punctuation[ids]
    starts = table.spaced[ids] | punctuation
    starts[1:] |= punctuation[:-1] & ~punctuation[1:]
    starts[0] = True
    firsts = np.flatnonzero(starts)
    word_of = np.cumsum(starts) - 1
    return firsts, word_of, np.arange(len(ids)) - firsts[word_of]


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: 64-bit values to well-spread 64-bit values (uint64 arithmetic wraps)."""
    values = values * np.uint64(0x9E3779B97F4A7C15)
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


_PLACE_FACTORS = _mix(np.arange(1, 33, dtype=np.uint64)) | np.uint64(1)


def word_hashes(ids: np.ndarray, table: PieceTable, words: Words | None = None) -> np.ndarray:
    """Per piece of one document, a 64-bit hash of the pieces of its word (:func:`find_words`, or ``words``
    when the caller has them): the same word gets the same hash wherever it stands."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    firsts, word_of, place = words or find_words(ids, table)
    terms = (ids.astype(np.uint64) + np.uint64(1)) * _PLACE_FACTORS[np.minimum(place, len(_PLACE_FACTORS) - 1)]
    return np.add.reduceat(terms, firsts)[word_of].view(np.int64)


def _letters_shape(text: str) -> int:
    if not text:
        return 0
    if text.isdigit():
        return 1
    if all(unicodedata.category(c).startswith("P") for c in text):
        return 2
    if text[0].isupper():
        return 3 if len(text) > 1 and text.isupper() else 4
    return 5


_WORD = re.compile(r"\w+|[^\w\s]+")
"""Words of a mention's text, punctuation apart, roughly as spaCy splits them."""


def mention_spans(span_tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last piece of each mention the span tags delimit (an INSIDE after OUTSIDE starts one too)."""
    begins = (span_tags == BEGIN) | (span_tags == BEGIN_PERSON)
    insides = (span_tags == INSIDE) | (span_tags == INSIDE_PERSON)
    in_span = begins | insides
    continued = np.zeros_like(in_span)
    continued[1:] = in_span[:-1]
    first = np.flatnonzero(begins | (insides & ~continued))
    continues_next = np.append(insides[1:], False)
    last = np.flatnonzero(in_span & ~continues_next)
    return first, last


def resolve_pieces(
    text: str,
    piece_begin: np.ndarray,
    piece_end: np.ndarray,
    span_tags: np.ndarray,
    base_class: np.ndarray,
    fact_if_first: np.ndarray,
) -> np.ndarray:
    """The class of each piece: the document-level rules over the mentions the span tags delimit.

    ``piece_begin`` / ``piece_end`` are UTF-8 byte offsets into ``text``."""
    classes = base_class.astype(np.int8)
    firsts, lasts = mention_spans(span_tags)
    if firsts.size == 0:
        return classes
    texts = _byte_slices(text, piece_begin[firsts], piece_end[lasts])
    fact_pieces = np.flatnonzero(fact_if_first)
    fact_bounds = np.searchsorted(fact_pieces, np.stack([firsts, lasts + 1])).T.tolist()
    fact_pieces = fact_pieces.tolist()
    first_tags = span_tags[firsts]
    is_person = ((first_tags == BEGIN_PERSON) | (first_tags == INSIDE_PERSON)).tolist()
    mentions = []
    for first, last, mention_text, person, (fact_from, fact_to) in zip(
        firsts.tolist(), lasts.tolist(), texts, is_person, fact_bounds
    ):
        words = _WORD.findall(mention_text.lower())
        parts = person_name_parts(words) if person else None
        mentions.append(Mention(mention_key(words), parts, list(range(first, last + 1)), fact_pieces[fact_from:fact_to]))
    for mention, first in zip(mentions, first_mentions(mentions)):
        if first:
            classes[mention.facts] = TokenClass.FACT
    return classes


def _byte_slices(text: str, begins: np.ndarray, ends: np.ndarray) -> list[str]:
    """``text.encode()[begin:end].decode(errors="replace")`` for each pair, slicing ``text`` itself where both
    ends fall on character boundaries (always, for ASCII text)."""
    if text.isascii():
        return [text[begin:end] for begin, end in zip(begins.tolist(), ends.tolist())]
    boundaries = char_to_byte_offsets(text)
    char_begins, char_ends = np.searchsorted(boundaries, begins), np.searchsorted(boundaries, ends)
    aligned = ((boundaries[char_begins] == begins) & (boundaries[char_ends] == ends)).tolist()
    data = text.encode("utf-8")
    return [
        text[char_begin:char_end] if on_boundaries else data[begin:end].decode("utf-8", "replace")
        for begin, end, char_begin, char_end, on_boundaries in zip(
            begins.tolist(), ends.tolist(), char_begins.tolist(), char_ends.tolist(), aligned
        )
    ]


def labeling_dtype(requested: str = "auto") -> str:
    """``requested`` (a :data:`DTYPES` key), or for ``auto`` bf16 where this CPU multiplies bfloat16 matrices
    natively (AVX512-BF16 or AMX: the network runs about twice as fast, its labels differ from fp32's on a few
    pieces in ten thousand) and fp32 elsewhere (where bfloat16 would be emulated, slower than float32)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"a student labels in {', '.join(['auto', *DTYPES])}, not {requested!r}")
        return requested
    # torch's own checks are private: a torch without them labels in fp32 rather than failing.
    checks = (getattr(torch.cpu, name, lambda: False) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bf16" if any(check() for check in checks) else "fp32"


class StudentError(ValueError):
    """A student file that cannot label for this tokenizer or these rules."""


def save_student(path: str | Path, network: StudentNetwork, *, tokenizer: str, teacher: str, report: dict) -> None:
    """Write the network with its identity: tokenizer hash, rules version, teacher, measured agreement."""
    torch.save(
        {
            "format": STUDENT_FORMAT,
            "config": dataclasses.asdict(network.config),
            "state": network.state_dict(),
            "tokenizer": tokenizer,
            "rules": RULES_VERSION,
            "teacher": teacher,
            "report": report,
        },
        path,
    )


def load_student(path: str | Path, tokenizer: Tokenizer) -> tuple[StudentNetwork, dict]:
    """The network and its file's record; refuses a student made for another tokenizer or rules version."""
    not_a_student = f"{path} is not a lacy-stream student labeler (made by lacy-stream distill-labeler)"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # Not torch's message: it advises to retry with weights_only=False, which would run the file's code.
        code = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(error), re.IGNORECASE)
        if code:
            raise StudentError(f"refusing to load {path}: it references {code.group(1)}, not only tensors and plain "
                               "values") from None
        raise StudentError(not_a_student) from None
    except (RuntimeError, EOFError, OSError):
        raise StudentError(not_a_student) from None
    if not isinstance(saved, dict) or "format" not in saved or "rules" not in saved:
        raise StudentError(not_a_student)
    if saved["rules"] != RULES_VERSION:
        raise StudentError(
            f"{path} was distilled from rules {saved['rules']}, this code runs {RULES_VERSION}: "
            "distill the student again (lacy-stream distill-labeler)"
        )
    if saved["format"] not in READABLE_FORMATS:
        raise StudentError(f"{path} is a {saved['format']} file, this code reads {' and '.join(READABLE_FORMATS)}: "
                           "distill the student again (lacy-stream distill-labeler)")
    digest = file_digest(tokenizer.model_path)
    if saved["tokenizer"] != digest:
        raise StudentError(
            f"{path} was trained for tokenizer {saved['tokenizer']}, not {tokenizer.model_path} ({digest}): "
            "distill a student for this tokenizer (lacy-stream distill-labeler --tokenizer ...)"
        )
    network = StudentNetwork(StudentConfig(**saved["config"]))
    network.load_state_dict(saved["state"])
    return network.eval(), saved


class StudentAnnotator:
    """Labels texts with a distilled student: the network, then the document-level rules.

    ``identity`` names the student file (its hash), its teacher and the rules, so that labels of different
    labelers never share a label-cache namespace or pass for each other's stored labels. The network runs in
    ``dtype`` (a :data:`DTYPES` key); one that is not fp32 is part of the identity, as its labels differ slightly.
    """

    def __init__(self, network: StudentNetwork, tokenizer: Tokenizer, identity: str, dtype: str = "fp32") -> None:
        dtype = labeling_dtype(dtype)
        self.dtype = DTYPES[dtype]
        self.network = network.to(self.dtype)
        self.tokenizer = tokenizer
        self.identity = identity if dtype == "fp32" else f"{identity}+{dtype}"
        self._table = piece_table(tokenizer)

    @classmethod
    def load(cls, path: str | Path, tokenizer: Tokenizer, dtype: str = "auto") -> StudentAnnotator:
        network, saved = load_student(path, tokenizer)
        return cls(network, tokenizer, f"student:{file_digest(path)}+teacher:{saved['teacher']}", dtype)

    def annotate(self, texts: Iterable[str]) -> Iterator[PieceLabels]:
        """Labels of each text, in order; the network runs over several documents at a time (up to
        ``BATCH_PIECES`` pieces), which saves most of its per-call cost on short documents."""
        batch: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        pieces = 0
        for text in texts:
            batch.append((text, *encode_with_offsets(self.tokenizer, text)))
            pieces += len(batch[-1][1])
            if pieces >= BATCH_PIECES:
                yield from self._label_batch(batch)
                batch, pieces = [], 0
        yield from self._label_batch(batch)

    def label_text(self, text: str) -> PieceLabels:
        return next(self._label_batch([(text, *encode_with_offsets(self.tokenizer, text))]))

    def _label_batch(self, batch: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> Iterator[PieceLabels]:
        predictions = self.predict([ids for _, ids, _, _ in batch])
        for (text, ids, begin, end), (span_tags, base_class, fact_if_first) in zip(batch, predictions):
            yield PieceLabels(ids, begin, end, resolve_pieces(text, begin, end, span_tags, base_class, fact_if_first))

    @torch.inference_mode()
    def predict(self, documents: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per document, per piece: span tag, base class (a TokenClass value) and "fact if first" (bool).

        The documents run as one sequence, each followed by ``reach`` zeroed positions, so that every
        document is labeled as if it ran alone."""
        if not documents:
            return []
        gap = self.network.reach
        starts = np.cumsum([0] + [len(ids) + gap for ids in documents])
        pieces = np.zeros(starts[-1], dtype=np.int64)
        with_words = self.network.words is not None
        words = np.zeros(starts[-1], dtype=np.int64)
        keep = np.zeros((1, starts[-1], 1), dtype=np.float32)
        with_identities = self.network.word_identities is not None
        hashes = np.zeros(starts[-1], dtype=np.int64)
        for start, ids in zip(starts, documents):
            pieces[start : start + len(ids)] = ids
            found = find_words(ids, self._table) if len(ids) and (with_words or with_identities) else None
            if with_words:
                words[start : start + len(ids)] = word_features(ids, self._table, found)
            if with_identities:
                hashes[start : start + len(ids)] = word_hashes(ids, self._table, found)
            keep[0, start : start + len(ids)] = 1
        identities = self.network.identities_of(hashes) if with_identities else None
        logits = self.network(
            torch.from_numpy(pieces).unsqueeze(0),
            torch.from_numpy(self._table.shapes[pieces]).unsqueeze(0),
            torch.from_numpy(words).unsqueeze(0) if with_words else None,
            torch.from_numpy(keep).to(self.dtype),
            torch.from_numpy(identities).unsqueeze(0) if with_identities else None,
        )
        tags, base, fact = (scores[0].argmax(-1).numpy() for scores in logits)
        tags, base, fact = tags.astype(np.int8), np.asarray(BASE_CLASSES, dtype=np.int8)[base], fact.astype(bool)
        return [
            (tags[start : start + len(ids)], base[start : start + len(ids)], fact[start : start + len(ids)])
            for start, ids in zip(starts, documents)
        ]
