"""Cascade partners: the larger models that write the next token at the small model's calls (Appendix A.5).

A partner sees the text so far (prompt and generation, never ``<CALL>``) and returns its ranked next-token
candidates as text with log-probabilities:

* :class:`HFPartner`: a local Hugging Face causal LM (the paper's Llama 3.2 1B), greedy with repetition
  penalty 1.2 on its own ids;
* :class:`OpenAIPartner`: an OpenAI-compatible ``/v1/completions`` server (vLLM, llama.cpp) with one token
  and its top log-probabilities;
* :class:`LacyPartner`: another lacy-stream model, ``<CALL>`` excluded;
* :class:`RagPartner`: any of them prompted with background text in the paper's RAG template (Qwen chat).

The partner's tokenizer is not ours, so :class:`TokenBridge` re-encodes its best candidate with our
SentencePiece model, falling back to the next candidate when ours cannot represent it, and
:class:`Cascade` puts partner and bridge together as the generator's delegate.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import requests
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..tokenizer import Tokenizer
from .call_policy import without_call
from .generate import REPETITION_PENALTY, next_token_logits, penalize_repetition
from .loading import load_lacy


TOP_CANDIDATES = 10
OPENAI_TOP_LOGPROBS = 5  # the most OpenAI's own API returns; vLLM allows up to 20 by default


@dataclass(frozen=True)
class Candidate:
    """One next token of a partner: the text it adds after the context (leading space included)."""

    text: str
    logprob: float


class Partner(Protocol):
    def candidates(self, text: str) -> list[Candidate]:
        """The partner's next-token candidates after ``text``, most likely first."""
        ...


class PartnerError(OSError):
    """The partner did not answer: connection failure, timeout, HTTP error or a reply we cannot read."""


class PartnerSpecError(ValueError):
    """A partner spec of none of the known forms."""


def ranked_candidates(
    logits: torch.Tensor,
    ids: list[int],
    decode: Callable[[list[int]], str],
    *,
    top_k: int,
    repetition_penalty: float,
) -> list[Candidate]:
    """The ``top_k`` tokens after ``ids`` by penalised log-probability, each as the text it adds.

    A token's text is what decoding it after the context adds, so leading spaces survive whatever the
    tokenizer's convention. Part of a multi-byte character decodes to "\ufffd", which the bridge refuses; a
    token that completes a character the context left open rewrites text before it and counts as adding none.
    """
    logprobs = torch.log_softmax(penalize_repetition(logits.float(), ids, repetition_penalty), dim=-1)
    top = logprobs.topk(min(top_k, logprobs.numel()))
    before = decode(ids)
    candidates = []
    for logprob, token in zip(top.values.tolist(), top.indices.tolist()):
        after = decode([*ids, token])
        text = after[len(before) :] if after.startswith(before) else ""
        candidates.append(Candidate(text, logprob))
    return candidates


class HFPartner:
    """A Hugging Face causal LM in a local directory, greedy with repetition penalty on its own ids."""

    def __init__(
        self,
        directory: str | Path,
        *,
        top_k: int = TOP_CANDIDATES,
        repetition_penalty: float = REPETITION_PENALTY,
        device: str | torch.device = "cpu",
    ) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).to(device).eval()
        self.max_positions: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.top_k = top_k
        self.repetition_penalty = repetition_penalty

    @torch.inference_mode()
    def candidates(self, text: str) -> list[Candidate]:
        # With the BOS its tokenizer adds, if any; no warning that the ids may exceed the positions: they are cut here.
        ids = self.tokenizer(text, verbose=False)["input_ids"]
        if self.max_positions:
            ids = ids[-self.max_positions :]
        logits = self.model(torch.tensor([ids], device=self.model.device)).logits[0, -1]
        return ranked_candidates(
            logits, ids, self._decode, top_k=self.top_k, repetition_penalty=self.repetition_penalty
        )

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)  # EOS & co. add no text: never chosen


class LacyPartner:
    """Another lacy-stream model (run, export or checkpoint directory); its ``<CALL>`` is never a candidate.

    Like the generator, it reads the text after an EOS, the start of a document in training.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        top_k: int = TOP_CANDIDATES,
        repetition_penalty: float = REPETITION_PENALTY,
        device: str | torch.device = "cpu",
    ) -> None:
        self.lacy = load_lacy(path, device=device)
        self.top_k = top_k
        self.repetition_penalty = repetition_penalty

    @torch.inference_mode()
    def candidates(self, text: str) -> list[Candidate]:
        model, tokenizer = self.lacy.model, self.lacy.tokenizer
        ids = tokenizer.encode(text)  # the model's window is cut in next_token_logits; the penalty sees all
        logits = without_call(next_token_logits(model, [tokenizer.eos_id, *ids]), tokenizer.call_id)
        return ranked_candidates(
            logits, ids, tokenizer.decode, top_k=self.top_k, repetition_penalty=self.repetition_penalty
        )


class OpenAIPartner:
    """A model behind an OpenAI-compatible completions endpoint: one greedy token and its top log-probs.

    ``base_url`` is the server (``http://host:8000``) or its API root (``http://host:8000/v1``).
    ``repetition_penalty`` is sent as vLLM's sampling parameter of that name (None leaves it out, for
    servers that reject unknown parameters). Every request gives up after ``timeout`` seconds without an
    answer and raises :class:`PartnerError`, as does any HTTP error.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        top_k: int = OPENAI_TOP_LOGPROBS,
        repetition_penalty: float | None = REPETITION_PENALTY,
        timeout: float = 60.0,
    ) -> None:
        root = base_url.rstrip("/")
        self.url = f"{root}/completions" if root.endswith("/v1") else f"{root}/v1/completions"
        self.model = model
        self.api_key = api_key
        self.top_k = top_k
        self.repetition_penalty = repetition_penalty
        self.timeout = timeout

    def candidates(self, text: str) -> list[Candidate]:
        request: dict[str, Any] = {
            "model": self.model,
            "prompt": text,
            "max_tokens": 1,
            "logprobs": self.top_k,
            "temperature": 0,
        }
        if self.repetition_penalty is not None:
            request["repetition_penalty"] = self.repetition_penalty
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = requests.post(self.url, json=request, headers=headers, timeout=self.timeout)
        except requests.Timeout as error:
            raise PartnerError(f"{self.url} did not answer within {self.timeout:g} s") from error
        except requests.RequestException as error:
            raise PartnerError(f"{self.url} could not be reached: {error}") from error
        if response.status_code != 200:
            raise PartnerError(f"{self.url} answered HTTP {response.status_code}: {response.text[:500]}")
        try:
            return _completion_candidates(response.json())
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise PartnerError(f"{self.url} sent a reply without top log-probabilities: {error!r}") from error


def _completion_candidates(reply: dict[str, Any]) -> list[Candidate]:
    """Candidates from a completions reply: the chosen token and its ``top_logprobs``, most likely first."""
    choice = reply["choices"][0]
    logprobs = choice["logprobs"]
    ranked = {str(token): float(logprob) for token, logprob in logprobs["top_logprobs"][0].items()}
    ranked.setdefault(choice["text"], float(logprobs["token_logprobs"][0]))
    return [Candidate(text, logprob) for text, logprob in sorted(ranked.items(), key=lambda item: -item[1])]


RAG_TEMPLATE = (
    "<|im_start|>system\n"
    "You are an assistant who writes biographies of famous people and events. "
    "Continue any given text naturally and fluently.<|im_end|>\n"
    "<|im_start|>user\n"
    "Write a short biography about {person_name}. Here is some background information: {wiki_content}<|im_end|>\n"
    "<|im_start|>assistant\n"
    "<think>\n\n</think>\n\n"
    "{original_text}"
)
"""Appendix A.5's RAG prompt for Qwen 3 32B (Qwen chat format, thinking switched off)."""

MAX_BACKGROUND_CHARS = 8000

_BIO_PROMPT = re.compile(r"Tell me a bio of (?P<name>[^.]+)\.")


@dataclass(frozen=True)
class RagPrompt:
    """Background text about a person, put before the text the partner continues."""

    person_name: str
    background: str

    def render(self, text: str) -> str:
        # The paper's template has no newline between the background's last sentence and <|im_end|>.
        wiki_content = self.background[:MAX_BACKGROUND_CHARS].strip()
        return RAG_TEMPLATE.format(person_name=self.person_name, wiki_content=wiki_content, original_text=text)


def person_from_prompt(prompt: str) -> str | None:
    """The name in a FactScore prompt ("Tell me a bio of <name>. <name> is"), None for other prompts."""
    match = _BIO_PROMPT.search(prompt)
    return match["name"].strip() if match else None


@dataclass(frozen=True)
class RagPartner:
    """A partner that continues the text inside the RAG prompt, with the person's background before it."""

    partner: Partner
    prompt: RagPrompt

    def candidates(self, text: str) -> list[Candidate]:
        return self.partner.candidates(self.prompt.render(text))


class TokenBridge:
    """Our pieces for a partner's text (Appendix A.5's tokenizer mapping).

    A candidate is encoded as a continuation: with our SentencePiece model but without its dummy prefix,
    so a leading space becomes "▁" exactly when the candidate has one (with Llama's vocabulary, " Paris" is
    "▁Paris" and "elace" after "Lov" is "el", "ace"). When no piece of ``encode(context + candidate)``
    spans the boundary between the two, these are exactly the pieces that encoding adds after
    ``encode(context)``: BPE never merges across a boundary that no piece spans, so each side is encoded as
    if alone. When a piece would span it (the context ends in a lone "▁" and the candidate is "Paris"), the
    ids already generated cannot change any more, and the continuation still reproduces the text exactly.

    Every piece is taken, as Appendix A.5 appends all of them: the partner's "1887" is "1", "8", "8", "7" for our
    digit-split tokenizer. ``max_pieces`` caps them (3: "1", "8", "8"). Characters outside our vocabulary are
    spelled in byte-fallback pieces (a partner's newline is "<0x0A>"); such a candidate is taken only whole,
    since a cut could end inside a character. A candidate we cannot represent (it needs more byte pieces than a call
    adds, ends inside a character, needs unknown pieces or adds no text) is skipped for the next one.
    """

    def __init__(self, tokenizer: Tokenizer, max_pieces: int | None = None) -> None:
        if max_pieces is not None and max_pieces < 1:
            raise ValueError(f"a call must be able to add at least one piece, got max_pieces={max_pieces}")
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(tokenizer.model_path).read_bytes())
        proto.normalizer_spec.add_dummy_prefix = False
        self._continuation = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.max_pieces = max_pieces

    def pieces(self, text: str) -> list[int] | None:
        """Our pieces for ``text`` continuing a text (at most ``max_pieces``); None when we cannot represent it."""
        if "\ufffd" in text:  # the partner's token ends inside a character
            return None
        sp = self._continuation
        ids = sp.encode(text)
        if not ids:
            return None
        if any(sp.is_unknown(piece) or sp.is_control(piece) for piece in ids):
            return None
        if self.max_pieces is None or len(ids) <= self.max_pieces:
            return ids
        if any(sp.is_byte(piece) for piece in ids):
            return None
        return ids[: self.max_pieces]

    def best(self, candidates: Iterable[Candidate]) -> list[int]:
        """The pieces of the most likely candidate we can represent; empty when there is none."""
        for candidate in candidates:
            if (ids := self.pieces(candidate.text)) is not None:
                return ids
        return []


class Cascade:
    """A partner behind our tokenizer: the generator's delegate at calls."""

    def __init__(self, partner: Partner, tokenizer: Tokenizer, max_pieces: int | None = None) -> None:
        self.partner = partner
        self.tokenizer = tokenizer
        self.bridge = TokenBridge(tokenizer, max_pieces)

    def next_pieces(self, context_ids: Sequence[int]) -> list[int]:
        return self.bridge.best(self.partner.candidates(self.tokenizer.decode(context_ids)))


def partner_from_spec(spec: str, *, device: str | torch.device = "cpu") -> Partner:
    """A partner from ``hf:DIR``, ``openai:URL#MODEL`` (key from ``OPENAI_API_KEY``) or ``lacy:PATH``."""
    kind, _, target = spec.partition(":")
    if kind == "hf" and target:
        return HFPartner(target, device=device)
    if kind == "lacy" and target:
        return LacyPartner(target, device=device)
    if kind == "openai":
        url, _, model = target.partition("#")
        if url and model:
            return OpenAIPartner(url, model, api_key=os.environ.get("OPENAI_API_KEY"))
    raise PartnerSpecError(f"cascade partner {spec!r} is none of hf:DIR, openai:URL#MODEL, lacy:PATH")
