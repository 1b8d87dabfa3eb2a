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
from .alignment import PieceLabels, encode_with_offsets
from .annotation import (
    RULES_VERSION,
    Mention,
    first_mentions,
    mention_key,
    person_name_parts,
)
from .labeling import file_digest

OUTSIDE, BEGIN, INSIDE, BEGIN_PERSON, INSIDE_PERSON = range(5)
"""Span tags: a mention starts at a BEGIN tag and goes on over the INSIDE tags that follow."""
SPAN_TAGS = 5
BASE_CLASSES = (TokenClass.OTHER, TokenClass.GRAMMAR)
SHAPES = 14
STUDENT_FORMAT = "lacy-student-1"


@dataclass
class StudentConfig:
    """The network's size: piece and shape embeddings, then dilated convolutions (receptive field grows 2x a layer)."""

    num_pieces: int
    width: int = 96
    layers: int = 4
    kernel: int = 3
    shape_dim: int = 16


class StudentNetwork(nn.Module):
    """Pieces and their shapes -> span tag, base class and "fact if first" logits per piece."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.config = config
        self.pieces = nn.Embedding(config.num_pieces, config.width - config.shape_dim)
        self.shapes = nn.Embedding(SHAPES, config.shape_dim)
        self.convolutions = nn.ModuleList(
            nn.Conv1d(config.width, config.width, config.kernel, dilation=2**layer, padding="same")
            for layer in range(config.layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(config.width) for _ in range(config.layers))
        self.head = nn.Linear(config.width, SPAN_TAGS + 2 + 2)

    def forward(self, pieces: torch.Tensor, shapes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[batch, length]`` ids -> logits ``[batch, length, 5]`` (span tag), ``[.., 2]`` (base), ``[.., 2]`` (fact)."""
        hidden = torch.cat([self.pieces(pieces), self.shapes(shapes)], dim=-1)
        for convolution, norm in zip(self.convolutions, self.norms):
            update = torch.relu(convolution(hidden.transpose(1, 2))).transpose(1, 2)
            hidden = norm(hidden + update)
        logits = self.head(hidden)
        return logits[..., :SPAN_TAGS], logits[..., SPAN_TAGS : SPAN_TAGS + 2], logits[..., SPAN_TAGS + 2 :]


def piece_shapes(tokenizer: Tokenizer) -> np.ndarray:
    """``shapes[id]``: a code for what piece ``id`` looks like (word start, case, digits, punctuation, bytes),
    so that pieces rarely seen in training still say something."""
    shapes = np.zeros(tokenizer.num_pieces, dtype=np.int64)
    for piece in range(tokenizer.num_pieces):
        if tokenizer.is_special_piece(piece):
            continue
        if tokenizer.is_byte_piece(piece):
            shapes[piece] = 1
            continue
        text = tokenizer.id_to_piece(piece)
        word_start = text.startswith("\u2581")
        shapes[piece] = 2 + 2 * _letters_shape(text.lstrip("\u2581")) + word_start
    return shapes


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
    text_bytes: bytes,
    piece_begin: np.ndarray,
    piece_end: np.ndarray,
    span_tags: np.ndarray,
    base_class: np.ndarray,
    fact_if_first: np.ndarray,
) -> np.ndarray:
    """The class of each piece: the document-level rules over the mentions the span tags delimit."""
    classes = base_class.astype(np.int8)
    mentions = []
    for first, last in zip(*mention_spans(span_tags)):
        words = _WORD.findall(text_bytes[piece_begin[first] : piece_end[last]].decode("utf-8", "replace").lower())
        is_person = span_tags[first] in (BEGIN_PERSON, INSIDE_PERSON)
        facts = (np.flatnonzero(fact_if_first[first : last + 1]) + first).tolist()
        parts = person_name_parts(words) if is_person else None
        mentions.append(Mention(mention_key(words), parts, list(range(first, last + 1)), facts))
    for mention, first in zip(mentions, first_mentions(mentions)):
        if first:
            classes[mention.facts] = TokenClass.FACT
    return classes


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
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != STUDENT_FORMAT:
        raise StudentError(f"{path} is not a lacy-stream student labeler (made by lacy-stream distill-labeler)")
    if saved["rules"] != RULES_VERSION:
        raise StudentError(
            f"{path} was distilled from rules {saved['rules']}, this code runs {RULES_VERSION}: "
            "distill the student again (lacy-stream distill-labeler)"
        )
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
    labelers never share a label-cache namespace or pass for each other's stored labels.
    """

    def __init__(self, network: StudentNetwork, tokenizer: Tokenizer, identity: str) -> None:
        self.network = network
        self.tokenizer = tokenizer
        self.identity = identity
        self._shapes = torch.from_numpy(piece_shapes(tokenizer))

    @classmethod
    def load(cls, path: str | Path, tokenizer: Tokenizer) -> StudentAnnotator:
        network, saved = load_student(path, tokenizer)
        return cls(network, tokenizer, f"student:{file_digest(path)}+teacher:{saved['teacher']}")

    def annotate(self, texts: Iterable[str]) -> Iterator[PieceLabels]:
        for text in texts:
            yield self.label_text(text)

    def label_text(self, text: str) -> PieceLabels:
        ids, begin, end = encode_with_offsets(self.tokenizer, text)
        span_tags, base_class, fact_if_first = self.predict(ids)
        classes = resolve_pieces(text.encode("utf-8"), begin, end, span_tags, base_class, fact_if_first)
        return PieceLabels(ids, begin, end, classes)

    @torch.inference_mode()
    def predict(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per piece: span tag, base class (a TokenClass value) and "fact if first" (bool)."""
        if len(ids) == 0:
            empty = np.zeros(0, dtype=np.int8)
            return empty, empty, empty.astype(bool)
        pieces = torch.from_numpy(ids).unsqueeze(0)
        tags, base, fact = self.network(pieces, self._shapes[pieces])
        base_class = np.asarray(BASE_CLASSES, dtype=np.int8)[base[0].argmax(-1).numpy()]
        return tags[0].argmax(-1).numpy().astype(np.int8), base_class, fact[0].argmax(-1).numpy().astype(bool)
