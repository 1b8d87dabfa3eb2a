"""The LaCy loss's statistics and gradients from logits made chunk by chunk with cuBLAS, never all at once.

``z = hidden @ weight.T`` is made by cuBLAS (or the CPU's BLAS) for ``chunk_tokens`` rows at a time, in the
inputs' dtype (bf16 in training), so only a ``[chunk_tokens, V]`` slice of the logits exists:

- :func:`logit_stats`, one ``N x V x D`` matmul pass: per token the log-sum-exp without the ``<CALL>`` and
  padding columns, the target logit and the ``<CALL>`` logit (:func:`.row_kernels.row_stats`: one read of
  each logit);
- :func:`logit_grads`, three passes: per chunk the logits once more, turned into their gradient in place
  (:func:`.row_kernels.row_grads_`: one read and one write), then ``grad_hidden = g @ weight`` and
  ``grad_weight += g.T @ hidden``.

Four matmul passes where the loss of a known mask needs three: LaCy's masks rank the tokens of the whole
micro-batch by their loss, so every token's statistics exist before any gradient can be formed, and holding
the logits from one pass to the next would mean ``[N, V]`` of them. The extra pass is the price of not
holding them (docs/benchmarks.md measures it against the three-matmul floor).

``weight`` may have padding rows (the model's ``padded_vocab_size``): they take part in the matmuls, which
run faster on an aligned vocabulary, and get no probability and hence no gradient.

Precision follows plain PyTorch: 16-bit inputs give 16-bit logits (fp32 accumulation inside the matmul)
that are read in fp32, and a 16-bit gradient tile for the two gradient matmuls. ``grad_weight`` sums the
chunks in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .row_kernels import row_grads_, row_stats

LOGITS_BYTES_PER_CHUNK = 512 * 2**20
"""Chunks hold at most this many bytes of logits: 8,355 tokens of bf16 at a padded vocabulary of 32,128,
so a micro-batch of 8 x 1,024 tokens is one chunk and the gradient of the weight needs no sum over chunks."""


def logit_stats(
    hidden: Tensor, weight: Tensor, targets: Tensor, call_id: int, *, vocab_size: int | None = None,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(lse_nocall, target_logit, call_logit)`` of ``z = hidden @ weight.T``, each [N]: fp64 for fp64 inputs,
    fp32 otherwise. Columns from ``vocab_size`` (default: all rows of ``weight``) on are padding; a target
    outside ``[0, vocab_size)`` gets ``target_logit`` 0."""
    n = hidden.shape[0]
    vocab_size = vocab_size or weight.shape[0]
    lse_nocall = hidden.new_empty(n, dtype=_acc_dtype(hidden.dtype))
    target_logit, call_logit = torch.empty_like(lse_nocall), torch.empty_like(lse_nocall)
    for rows in _chunks(n, weight, chunk_tokens):
        logits = hidden[rows] @ weight.T
        row_stats(logits, targets[rows], call_id, vocab_size, out=(lse_nocall[rows], target_logit[rows], call_logit[rows]))
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
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(grad_hidden [N, D], grad_weight [V, D])`` of ``sum(token_scale * loss)`` where ``loss`` is
    ``logaddexp(lse_nocall, call_logit) - call_logit`` for ``<CALL>`` tokens (``is_call``) and
    ``lse_nocall - target_logit`` otherwise: ``<CALL>`` tokens get ``softmax(z) - one_hot(call_id)``, the others
    the softmax without the ``<CALL>`` column minus ``one_hot(target)``, padding columns nothing. Tokens with
    ``token_scale`` 0 contribute exact zeros whatever their target and statistics. The gradients have the
    dtypes of ``hidden`` and ``weight``."""
    n = hidden.shape[0]
    vocab_size = vocab_size or weight.shape[0]
    acc_dtype = _acc_dtype(hidden.dtype)
    scales = token_scale.to(acc_dtype)
    counts = scales != 0
    # Per token: the softmax normalizer and the column whose one-hot is subtracted. Tokens that do not count
    # get an infinite normalizer and no label, so garbage statistics of ignored tokens never reach a sum.
    lse_nocall, call_logit = lse_nocall.to(acc_dtype), call_logit.to(acc_dtype)
    norms = torch.where(is_call, torch.logaddexp(lse_nocall, call_logit), lse_nocall)
    norms = torch.where(counts, norms, float("inf")).contiguous()
    labels = torch.where(counts, torch.where(is_call, call_id, targets), -1).contiguous()
    keeps_call = is_call.to(torch.int8)
    scales = scales.contiguous()

    grad_hidden = torch.empty_like(hidden)
    grad_weight: Tensor | None = None
    for rows in _chunks(n, weight, chunk_tokens):
        chunk = hidden[rows]
        grad = row_grads_(chunk @ weight.T, labels[rows], keeps_call[rows], norms[rows], scales[rows], call_id,
                          vocab_size)
        torch.mm(grad, weight, out=grad_hidden[rows])
        product = _product(grad.T, chunk, acc_dtype)
        grad_weight = product if grad_weight is None else grad_weight.add_(product)
    if grad_weight is None:
        return grad_hidden, torch.zeros_like(weight)
    return grad_hidden, grad_weight.to(weight.dtype)

_MM_WITH_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")
"""Whether this torch has ``torch.mm(..., out_dtype=)`` (2.8 and newer; CUDA only)."""


def _product(left: Tensor, right: Tensor, dtype: torch.dtype) -> Tensor:
    """``left @ right`` in ``dtype``: for 16-bit inputs on CUDA straight out of cuBLAS's fp32 accumulator."""
    if left.dtype == dtype:
        return left @ right
    if left.is_cuda and _MM_WITH_OUT_DTYPE:
        return torch.mm(left, right, out_dtype=dtype)
    return (left @ right).to(dtype)


def _chunks(n: int, weight: Tensor, chunk_tokens: int | None) -> list[slice]:
    """Row ranges of at most ``chunk_tokens`` tokens (default: ``LOGITS_BYTES_PER_CHUNK`` of logits), of equal
    sizes so that no chunk is a tiny, inefficient matmul."""
    largest = chunk_tokens or max(1, LOGITS_BYTES_PER_CHUNK // (weight.shape[0] * weight.element_size()))
    count = math.ceil(n / largest)
    if count == 0:
        return []
    size = math.ceil(n / count)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
