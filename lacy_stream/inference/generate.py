"""Greedy cascade generation (Appendix A.5): the small model writes, and at its calls a partner does.

Decoding is greedy with CTRL's repetition penalty 1.2, for up to 256 new tokens, and stops at EOS. At each
step a :class:`~lacy_stream.inference.call_policy.CallPolicy` decides whether the step is a call. On a call
the delegate (a cascade partner behind our tokenizer, :class:`~lacy_stream.inference.partners.Cascade`)
adds one to three of our pieces. Without a delegate, or when none of the partner's candidates fits our
vocabulary, the model's own best token other than ``<CALL>`` stands in: the call is still counted, so call
rates can be measured without a partner. ``<CALL>`` itself never enters the sequence.

The model reads the prompt after an EOS, as training packs every document after the previous one's EOS;
that EOS is not penalised and no partner or policy sees it. Keys and values of the tokens read so far are
cached while the sequence fits the model's context; past ``max_seq_len`` ids the context becomes a sliding
window of the last ``max_seq_len``, whose positions shift at every step, so each step recomputes it.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..models.gpt2 import KVCache, Transformer
from ..tokenizer import Tokenizer
from .call_policy import CallPolicy, without_call

MAX_NEW_TOKENS = 256
REPETITION_PENALTY = 1.2


class TokenSource(enum.StrEnum):
    MODEL = "model"
    PARTNER = "partner"
    MODEL_AT_CALL = "model-at-call"
    """The model's own token at a call that no partner answered."""


class Delegate(Protocol):
    def next_pieces(self, context_ids: Sequence[int]) -> list[int]:
        """Our pieces that continue ``context_ids`` at a call; empty when the partner has none that fit."""
        ...


@dataclass
class Generation:
    """One generation: ``ids`` are the new ids (no ``<CALL>``, no EOS), ``sources`` say who wrote each."""

    prompt_ids: list[int]
    ids: list[int]
    sources: list[TokenSource]
    steps: int
    calls: int
    stopped_at_eos: bool
    seconds: float

    @property
    def call_rate(self) -> float:
        """Calls per generation step (a call answered with several pieces is one step)."""
        return self.calls / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else 0.0

    def completion(self, tokenizer: Tokenizer) -> str:
        """The generated text, with the space that joins it to the prompt."""
        prompt = tokenizer.decode(self.prompt_ids)
        return tokenizer.decode([*self.prompt_ids, *self.ids])[len(prompt) :]

    def report(self, tokenizer: Tokenizer) -> dict[str, Any]:
        """A JSON-able record: texts, ids and sources, counts and speed."""
        return {
            "prompt": tokenizer.decode(self.prompt_ids),
            "completion": self.completion(tokenizer),
            "ids": self.ids,
            "sources": [str(source) for source in self.sources],
            "steps": self.steps,
            "calls": self.calls,
            "call_rate": self.call_rate,
            "partner_tokens": self.sources.count(TokenSource.PARTNER),
            "stopped_at_eos": self.stopped_at_eos,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
        }


@torch.inference_mode()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str,
    policy: CallPolicy,
    *,
    delegate: Delegate | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    repetition_penalty: float = REPETITION_PENALTY,
    stop: str | None = None,
    kv_cache: bool = True,
) -> Generation:
    """Continue ``prompt`` greedily; ``policy`` decides the calls and ``delegate`` answers them.

    With ``stop`` (e.g. "\n" for one-line answers) generation ends as soon as the new text contains it;
    the generation keeps the tokens up to and including the one that completed it. ``kv_cache=False``
    recomputes the whole context at every step (same tokens, slower; for benchmarks).
    """
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError("generation needs a non-empty prompt")
    context = list(prompt_ids)
    new_ids: list[int] = []
    sources: list[TokenSource] = []
    steps = calls = 0
    stopped_at_eos = False
    start = time.perf_counter()
    reader = _ContextReader(model, kv_cache)
    if policy.wants_prompt:
        policy.prime(prompt_call_logits(model, [tokenizer.eos_id, *prompt_ids], tokenizer.call_id))
    while len(new_ids) < max_new_tokens:
        logits = reader.next_token_logits([tokenizer.eos_id, *context])
        logits = penalize_repetition(logits, context, repetition_penalty)
        steps += 1
        source = TokenSource.MODEL
        if policy.decide(logits, context):
            calls += 1
            pieces = delegate.next_pieces(context)[: max_new_tokens - len(new_ids)] if delegate else []
            if pieces:
                context += pieces
                new_ids += pieces
                sources += [TokenSource.PARTNER] * len(pieces)
                if stop is not None and stop in tokenizer.decode(new_ids):
                    break
                continue
            source = TokenSource.MODEL_AT_CALL
        token = int(without_call(logits, tokenizer.call_id).argmax())
        if token == tokenizer.eos_id:
            stopped_at_eos = True
            break
        context.append(token)
        new_ids.append(token)
        sources.append(source)
        if stop is not None and stop in tokenizer.decode(new_ids):
            break
    return Generation(
        prompt_ids=prompt_ids,
        ids=new_ids,
        sources=sources,
        steps=steps,
        calls=calls,
        stopped_at_eos=stopped_at_eos,
        seconds=time.perf_counter() - start,
    )


class _ContextReader:
    """Next-token logits of a growing sequence, reading only its new tokens while they fit the context."""

    def __init__(self, model: Transformer, use_cache: bool) -> None:
        self.model = model
        self.use_cache = use_cache
        self.cache = KVCache(model.args.n_layers)

    def next_token_logits(self, ids: Sequence[int]) -> torch.Tensor:
        if not self.use_cache or len(ids) > self.model.args.max_seq_len:
            return next_token_logits(self.model, ids)
        new = torch.tensor([list(ids[self.cache.length :])], device=self.model.output_weight.device)
        return self.model.logits(self.model(new, cache=self.cache)[0, -1]).float()


def prompt_call_logits(model: Transformer, ids: Sequence[int], call_id: int) -> list[float]:
    """The ``<CALL>`` logit where each token of ``ids`` after the first was predicted (the last
    ``max_seq_len`` positions)."""
    hidden = model(_context_window(model, ids))[0, :-1]
    return (hidden.float() @ model.output_weight[call_id].float()).tolist()


def next_token_logits(model: Transformer, ids: Sequence[int]) -> torch.Tensor:
    """Full-vocabulary float logits [vocab_size] after ``ids``, seen through the model's context window."""
    return model.logits(model(_context_window(model, ids))[0, -1]).float()


def _context_window(model: Transformer, ids: Sequence[int]) -> torch.Tensor:
    """``[1, T]``: the last ``max_seq_len`` ids on the model's device."""
    return torch.tensor([list(ids[-model.args.max_seq_len :])], device=model.output_weight.device)


def penalize_repetition(logits: torch.Tensor, seen_ids: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al., 2019), as transformers applies it.

    The logit of every token already in ``seen_ids`` moves towards less likely: a positive one is divided
    by ``penalty``, a negative one multiplied by it (dividing a negative logit would raise it).
    """
    if penalty == 1.0 or not seen_ids:
        return logits
    seen = torch.tensor(sorted(set(seen_ids)), device=logits.device)
    scores = logits[..., seen]
    penalized = logits.clone()
    penalized[..., seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return penalized


PARTNER_COLOR = "\033[1;36m"
UNANSWERED_CALL_COLOR = "\033[35m"
RESET = "\033[0m"
_COLORS = {TokenSource.PARTNER: (PARTNER_COLOR, RESET), TokenSource.MODEL_AT_CALL: (UNANSWERED_CALL_COLOR, RESET)}
_BRACKETS = {TokenSource.PARTNER: ("[[", "]]"), TokenSource.MODEL_AT_CALL: ("{{", "}}")}


def render(generation: Generation, tokenizer: Tokenizer, *, color: bool) -> str:
    """Prompt and generation as text, the tokens written at calls highlighted.

    On a terminal (``color``) the partner's tokens are cyan and the model's own tokens at unanswered calls
    magenta; otherwise they are ``[[bracketed]]`` and ``{{braced}}``. A space before a highlighted run is
    left outside it.
    """
    markers = _COLORS if color else _BRACKETS
    context = list(generation.prompt_ids)
    text = tokenizer.decode(context)
    parts = [text]
    for source, run in itertools.groupby(zip(generation.ids, generation.sources), key=lambda pair: pair[1]):
        context += [token for token, _ in run]
        extended = tokenizer.decode(context)
        segment, text = extended[len(text) :], extended
        if source == TokenSource.MODEL:
            parts.append(segment)
            continue
        opening, closing = markers[source]
        stripped = segment.lstrip()
        parts += [segment[: len(segment) - len(stripped)], opening, stripped, closing]
    return "".join(parts)
