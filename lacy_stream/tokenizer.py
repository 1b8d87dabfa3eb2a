"""SentencePiece tokenizer with the ``<CALL>`` token appended after its vocabulary.

The paper uses Llama 2's 32,000-piece SentencePiece model; ``<CALL>`` gets the id right after the last
piece (so the model's vocabulary is 32,001). Text never encodes to ``<CALL>``: it is not a piece of the
SentencePiece model, so the literal string "<CALL>" in a document is just characters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm
from sentencepiece import sentencepiece_pb2

from .atomic import move_files, staging_directory

log = logging.getLogger(__name__)

CALL_TOKEN = "<CALL>"

# SentencePiece skips training sentences longer than this many bytes; documents are fed line by line and
# longer lines are cut.
_MAX_TRAINING_LINE_BYTES = 4096


class Tokenizer:
    def __init__(self, model_path: str | Path) -> None:
        self.model_path = str(model_path)
        if not Path(self.model_path).is_file():
            raise FileNotFoundError(
                f"tokenizer model {self.model_path} not found (train one with `lacy-stream train-tokenizer`)"
            )
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except RuntimeError as error:  # SentencePiece's own errors come as RuntimeError
            raise ValueError(f"{self.model_path} is not a SentencePiece model ({error})") from None
        if self._sp.eos_id() < 0:
            raise ValueError(f"tokenizer {self.model_path} has no EOS piece; documents could not be separated")

    @property
    def num_pieces(self) -> int:
        return self._sp.get_piece_size()

    @property
    def call_id(self) -> int:
        return self.num_pieces

    @property
    def vocab_size(self) -> int:
        """Model vocabulary: the SentencePiece pieces plus ``<CALL>``."""
        return self.num_pieces + 1

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids; each ``<CALL>`` id becomes the literal string "<CALL>"."""
        text, run = [], []
        for token in ids:
            if token == self.call_id:
                text.append(self._decode_run(run, first=not text))
                text.append(CALL_TOKEN)
                run = []
            else:
                run.append(int(token))
        text.append(self._decode_run(run, first=not text))
        return "".join(text)

    def _decode_run(self, run: list[int], *, first: bool) -> str:
        # SentencePiece drops the "▁" that starts a decoded sequence (the dummy prefix); after a <CALL> that
        # "▁" is a real space.
        decoded = self._sp.decode(run)
        if not first and run and self._sp.id_to_piece(run[0]).startswith("\u2581"):
            return " " + decoded
        return decoded

    def id_to_piece(self, token: int) -> str:
        return CALL_TOKEN if token == self.call_id else self._sp.id_to_piece(token)

    def is_byte_piece(self, token: int) -> bool:
        """Whether ``token`` is a byte-fallback piece (``<0xAB>``)."""
        return self._sp.is_byte(token)

    def is_special_piece(self, token: int) -> bool:
        """Whether ``token`` is a control (BOS, EOS) or the unknown piece, which stand for no text."""
        return self._sp.is_control(token) or self._sp.is_unknown(token)

    def encode_with_spans(self, text: str) -> sentencepiece_pb2.SentencePieceText:
        """The pieces of ``text`` with their ids and the character span each covers (SentencePiece's proto)."""
        # "serialized_proto" is the one offset-carrying output every 0.2 release shares: 0.2.3 dropped
        # "immutable_proto", and "proto" returns a parsed message only from 0.2.3 on.
        return sentencepiece_pb2.SentencePieceText.FromString(self._sp.encode(text, out_type="serialized_proto"))


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            data = line.encode("utf-8")
            while len(data) > _MAX_TRAINING_LINE_BYTES:
                head = data[:_MAX_TRAINING_LINE_BYTES].decode("utf-8", errors="ignore")
                yield head
                data = data[len(head.encode("utf-8")) :]
            if data:
                yield data.decode("utf-8")


def _lines_keeping_errors(texts: Iterable[str], errors: list[Exception]) -> Iterator[str]:
    try:
        yield from _training_lines(texts)
    except Exception as error:
        errors.append(error)
        raise


def train_tokenizer(
    texts: Iterable[str],
    out: str | Path,
    vocab_size: int,
    *,
    max_sentences: int = 2_000_000,
    num_threads: int = 2,
) -> Tokenizer:
    """Train a Llama-style SentencePiece BPE model: byte fallback, digits split, text kept verbatim.

    ``vocab_size`` counts SentencePiece pieces; the model vocabulary is one more (``<CALL>``). ``out`` and its
    ``.vocab`` appear only once training succeeded; an error raised by ``texts`` propagates as it is.
    """
    out = Path(out)
    if out.suffix != ".model":
        raise ValueError(f"--out must end in .model, got {out}")
    source_errors: list[Exception] = []
    with staging_directory(out.parent, out.name) as staging:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines_keeping_errors(texts, source_errors),
                model_prefix=str(staging / out.stem),
                model_type="bpe",
                vocab_size=vocab_size,
                byte_fallback=True,
                split_digits=True,
                character_coverage=0.9999,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as error:
            if source_errors:  # SentencePiece reports an error of the texts as its own RuntimeError
                raise source_errors[0] from None
            raise ValueError(f"SentencePiece could not train a {vocab_size}-piece tokenizer: {error}") from None
        move_files(staging, out.parent, [out.with_suffix(".vocab").name, out.name])  # the model last
    tokenizer = Tokenizer(out)
    log.info("trained tokenizer %s: %d pieces + %s = %d", out, tokenizer.num_pieces, CALL_TOKEN, tokenizer.vocab_size)
    return tokenizer
