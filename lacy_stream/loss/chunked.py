"""The LaCy loss's statistics and gradients from logits recomputed chunk by chunk with plain matmuls.

The same two functions as :mod:`.fused_kernel`, with ``z = hidden @ weight.T`` made by cuBLAS (or the CPU's
BLAS) for ``chunk_tokens`` rows at a time, so only a ``[chunk_tokens, V]`` slice of the logits exists:

- :func:`logit_stats`, one ``N x V x D`` matmul pass: per token the log-sum-exp without the CALL column,
  the target logit and the CALL logit;
- :func:`logit_grads`, three passes: per chunk the logits once more, turned into their gradient in place,
  then ``grad_hidden = g @ weight`` and ``grad_weight += g.T @ hidden``.

Four passes per step where the fused kernels make five (they recompute the logits for each gradient) and
plain autograd three (it keeps all ``[N, V]`` logits). The idea is Liger kernel's chunked cross-entropy,
extended by the statistics pass that LaCy's call mask needs before any gradient.

Precision follows plain PyTorch: 16-bit inputs give 16-bit logits (fp32 accumulation inside the matmul)
that the softmax reads in fp32, and a 16-bit gradient tile for the two gradient matmuls. ``grad_weight``
sums the chunks in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOGITS_BYTES_PER_CHUNK = 256 * 2**20
"""Chunks hold at most this many bytes of fp32 logits (2,097 tokens at a vocabulary of 32,001)."""


def logit_stats(
    hidden: Tensor, weight: Tensor, targets: Tensor, call_id: int, *, chunk_tokens: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(lse_nocall, target_logit, call_logit)`` of ``z = hidden @ weight.T``, each [N], as
    :func:`.fused_kernel.logit_stats`: fp64 for fp64 inputs, fp32 otherwise; a target outside ``[0, V)`` gets
    ``target_logit`` 0."""
    n, v = hidden.shape[0], weight.shape[0]
    acc_dtype = _acc_dtype(hidden.dtype)
    lse_nocall = hidden.new_empty(n, dtype=acc_dtype)
    target_logit, call_logit = torch.empty_like(lse_nocall), torch.empty_like(lse_nocall)
    in_vocabulary = (targets >= 0) & (targets < v)
    safe_targets = torch.where(in_vocabulary, targets, 0)
    for rows in _chunks(n, v, chunk_tokens):
        logits = (hidden[rows] @ weight.T).to(acc_dtype)
        call_logit[rows] = logits[:, call_id]
        target_logit[rows] = torch.where(in_vocabulary[rows], logits.gather(1, safe_targets[rows, None])[:, 0], 0.0)
        logits[:, call_id] = float("-inf")
        lse_nocall[rows] = _logsumexp_in_place(logits)
    return lse_nocall, target_logit, call_logit


def logit_grads(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    call_id: int,
    lse_nocall: Tensor,
    call_logit: Tensor,
    is_call: Tensor,
    token_scale: Tensor,
    *,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(grad_hidden [N, D], grad_weight [V, D])`` of ``sum(token_scale * loss)``, as
    :func:`.fused_kernel.logit_grads`: CALL tokens get ``softmax(z) - one_hot(call_id)``, the others the
    softmax without the CALL column minus ``one_hot(target)``; tokens with ``token_scale`` 0 contribute exact
    zeros whatever their target and statistics. The gradients have the dtypes of ``hidden`` and ``weight``."""
    n, v = hidden.shape[0], weight.shape[0]
    acc_dtype = _acc_dtype(hidden.dtype)
    scales = token_scale.to(acc_dtype)
    counts = scales != 0
    # Per token: the softmax normalizer and the column whose one-hot is subtracted. Tokens that do not count
    # get an infinite normalizer (probabilities 0), so garbage statistics of ignored tokens never reach a sum.
    lse_nocall, call_logit = lse_nocall.to(acc_dtype), call_logit.to(acc_dtype)
    norms = torch.where(is_call, torch.logaddexp(lse_nocall, call_logit), lse_nocall)
    norms = torch.where(counts, norms, float("inf"))
    labels = torch.where(is_call, call_id, targets)
    labels = torch.where(counts & (labels >= 0) & (labels < v), labels, 0)

    grad_hidden = torch.empty_like(hidden)
    grad_weight = weight.new_zeros(weight.shape, dtype=acc_dtype)
    for rows in _chunks(n, v, chunk_tokens):
        chunk = hidden[rows]
        grad = (chunk @ weight.T).to(acc_dtype)
        grad.sub_(norms[rows, None]).exp_()
        grad[:, call_id].masked_fill_(~is_call[rows], 0.0)
        grad[torch.arange(grad.shape[0], device=grad.device), labels[rows]] -= counts[rows].to(acc_dtype)
        grad = grad.mul_(scales[rows, None]).to(hidden.dtype)
        torch.mm(grad, weight, out=grad_hidden[rows])
        if grad_weight.dtype == hidden.dtype:
            grad_weight.addmm_(grad.T, chunk)
        else:  # 16-bit: the chunk's product in the input dtype (tensor cores), summed over chunks in fp32
            grad_weight += grad.T @ chunk
    return grad_hidden, grad_weight.to(weight.dtype)


def _chunks(n: int, v: int, chunk_tokens: int | None) -> list[slice]:
    """Row ranges of at most ``chunk_tokens`` tokens (default: ``LOGITS_BYTES_PER_CHUNK`` of fp32 logits),
    of equal sizes so that no chunk is a tiny, inefficient matmul."""
    largest = chunk_tokens or max(1, LOGITS_BYTES_PER_CHUNK // (4 * v))
    count = math.ceil(n / largest)
    if count == 0:
        return []
    size = math.ceil(n / count)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _logsumexp_in_place(logits: Tensor) -> Tensor:
    """Row-wise log-sum-exp that overwrites ``logits`` instead of allocating a second ``[rows, V]`` buffer.
    Every row needs a finite entry (here: any column besides CALL)."""
    row_max = logits.amax(dim=1)
    return row_max + logits.sub_(row_max[:, None]).exp_().sum(dim=1).log()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
