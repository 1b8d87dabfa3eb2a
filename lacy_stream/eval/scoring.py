"""What every evaluation asks of the model: next-token statistics, with and without ``<CALL>``.

A LaCy model has two next-token distributions. The full softmax (``<CALL>`` included) says how much the
model wants to call; the softmax with the ``<CALL>`` logit excluded is what the model says when it does not
call, and the one its learned tokens were trained on (Eq. A.3). The validation losses need both (Eq. A.5
uses the full one on call positions, Eq. A.6 the other one elsewhere); multiple-choice scoring, greedy
generation without a cascade and the acceptability analysis use the one without ``<CALL>``, so that the
answers of a calling model and of a baseline are compared on the same footing.

:func:`token_statistics` reduces the logits of a batch to a handful of numbers per position right away,
so callers never hold more than one batch of ``[B, T, V]`` logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..inference.loading import LacyModel
from ..loss import logit_stats_of
from ..models.gpt2 import Transformer
from ..tokenizer import Tokenizer


@dataclass
class TokenStatistics:
    """Per position of a ``[B, T]`` batch: the model's view of the next token ``targets[b, t]``."""

    full_logprob: Tensor
    """log p(target) under the full softmax, ``<CALL>`` included (Eq. A.5)."""
    no_call_logprob: Tensor
    """log p(target) with the ``<CALL>`` logit excluded from the softmax (Eq. A.3, A.6)."""
    call_logit: Tensor
    """The raw ``<CALL>`` logit."""
    call_log_odds: Tensor
    """log(p(<CALL>) / (1 - p(<CALL>))) under the full softmax: the ``<CALL>`` logit minus the log-sum-exp of
    the others (unlike the probability, it does not saturate near 1)."""
    call_is_top: Tensor
    """Whether ``<CALL>`` has the top logit (what greedy decoding would emit)."""
    top_token: Tensor
    """The most likely token besides ``<CALL>`` (the model's proposal when it does not call)."""


def token_statistics(model: Transformer, inputs: Tensor, targets: Tensor, *, call_id: int) -> TokenStatistics:
    """Statistics of ``targets`` [B, T] as the next tokens after each prefix of ``inputs`` [B, T]."""
    with torch.inference_mode():
        logits = model.logits(model(inputs))
        no_call_normalizer, target_logit, call_logit = logit_stats_of(logits, targets, call_id)
        full_normalizer = torch.logaddexp(no_call_normalizer, call_logit)
        logits[..., call_id] = float("-inf")
        top_other_logit, top_token = logits.max(dim=-1)
    return TokenStatistics(
        full_logprob=target_logit - full_normalizer,
        no_call_logprob=target_logit - no_call_normalizer,
        call_logit=call_logit,
        call_log_odds=call_logit - no_call_normalizer,
        # <CALL> is the last id and argmax picks the first maximum, so <CALL> is greedy's choice only when
        # its logit is strictly above every other.
        call_is_top=call_logit > top_other_logit,
        top_token=top_token,
    )


@dataclass(frozen=True)
class ContinuationScore:
    """How the model (``<CALL>`` excluded) rates a continuation after a context."""

    logprob: float
    """Sum of the log-probabilities of the continuation's tokens."""
    is_greedy: bool
    """Whether greedy decoding would produce exactly these tokens."""
    num_tokens: int


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` (after an EOS) and of ``continuation`` as it continues that context.

    The continuation is not encoded alone: SentencePiece would give its first word a dummy-prefix "▁" and
    BPE may merge across the boundary. Instead the whole text is encoded once and cut after the longest
    prefix it shares with the encoded context, so the scored ids are exactly those of the full text. The
    context starts with EOS because that is what precedes every document in training (packed windows put EOS
    between documents); an empty context is just the EOS.
    """
    if not continuation:
        raise ValueError("cannot score an empty continuation")
    context_ids = tokenizer.encode(context)
    whole_ids = tokenizer.encode(context + continuation)
    shared = 0
    while shared < min(len(context_ids), len(whole_ids)) and context_ids[shared] == whole_ids[shared]:
        shared += 1
    shared = min(shared, len(whole_ids) - 1)  # the continuation keeps at least one token
    return [tokenizer.eos_id, *whole_ids[:shared]], whole_ids[shared:]


def score_continuations(
    lacy: LacyModel, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int
) -> list[ContinuationScore]:
    """Scores of ``(context ids, continuation ids)`` pairs, in order, computed in batches.

    A pair that fits the model's context is one window; a longer one loses the oldest context tokens. A
    continuation longer than the context is scored in consecutive windows that each predict up to
    ``max_seq_len`` new tokens, and a window that predicts fewer reaches back into the text before it for
    context: every token is predicted exactly once, as in lm-evaluation-harness' rolling log-likelihood,
    at the price of little context for the first tokens of a full window. Windows are batched longest
    first, so that a batch pads little.
    """
    max_seq_len = lacy.model.args.max_seq_len
    windows: list[tuple[int, list[int], int]] = []  # (pair index, window ids, targets scored at its end)
    for index, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError("a scored pair needs a non-empty context (at least EOS) and continuation")
        full = context + continuation
        start = len(context)
        while start < len(full):
            end = min(start + max_seq_len, len(full))
            windows.append((index, full[max(0, end - max_seq_len - 1) : end], end - start))
            start = end
    windows.sort(key=lambda window: len(window[1]), reverse=True)
    logprobs = [0.0] * len(pairs)
    greedy = [True] * len(pairs)
    eos_id = lacy.tokenizer.eos_id
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size]
        padded = torch.full((len(batch), len(batch[0][1])), eos_id, dtype=torch.long)
        for row, (_, ids, _) in enumerate(batch):
            padded[row, : len(ids)] = torch.tensor(ids)
        padded = padded.to(lacy.device)
        stats = token_statistics(lacy.model, padded[:, :-1], padded[:, 1:], call_id=lacy.call_id)
        is_top = stats.top_token == padded[:, 1:]
        for row, (index, ids, scored) in enumerate(batch):
            end = len(ids) - 1
            logprobs[index] += float(stats.no_call_logprob[row, end - scored : end].double().sum())
            greedy[index] = greedy[index] and bool(is_top[row, end - scored : end].all())
    return [
        ContinuationScore(logprob=logprob, is_greedy=is_greedy, num_tokens=len(continuation))
        for logprob, is_greedy, (_, continuation) in zip(logprobs, greedy, pairs)
    ]
