"""The elementwise half of the chunked LaCy loss: one pass over a chunk of logits for the statistics, one in
place for the gradient.

For a chunk of logits ``z`` [rows, columns] (columns: the padded vocabulary, ``<CALL>`` at ``call_id``, padding
from ``vocab_size`` on), per row:

- :func:`row_stats`: the log-sum-exp over the columns that are neither ``<CALL>`` nor padding, the target's
  logit and the ``<CALL>`` logit, reading each logit once;
- :func:`row_grads_`: ``z`` overwritten by ``scale * (softmax(z) - one_hot(label))`` with the given normalizer,
  ``<CALL>`` left out of the softmax of rows that do not keep it, padding columns 0: one read and one write.

On CUDA (and anywhere under ``TRITON_INTERPRET=1``, which the tests use) these are Triton kernels, one program
per row, that read 16-bit logits and compute in fp32; elsewhere the same arithmetic in PyTorch operations,
which make several passes. float64 logits always take PyTorch (their fp64 accuracy is the point of them).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a CPU-only install without triton: the PyTorch operations serve
    triton = None

BLOCK_COLUMNS = 4096
"""Columns a Triton program reads per iteration (the row is walked in such blocks)."""


def triton_kernels_run_on(logits: Tensor) -> bool:
    """Whether :func:`row_stats` and :func:`row_grads_` use their Triton kernels for ``logits``."""
    if triton is None or logits.dtype == torch.float64:
        return False
    return logits.is_cuda or _INTERPRETED


def row_stats(
    logits: Tensor, targets: Tensor, call_id: int, vocab_size: int, out: tuple[Tensor, Tensor, Tensor]
) -> None:
    """Writes ``(lse_nocall, target_logit, call_logit)`` of each row of ``logits`` into ``out`` (three [rows]
    fp32 tensors, fp64 for fp64 logits). A target outside ``[0, vocab_size)`` gets ``target_logit`` 0."""
    lse, target_logit, call_logit = out
    rows = logits.shape[0]
    if rows == 0:
        return
    if triton_kernels_run_on(logits):
        _row_stats_kernel[(rows,)](
            logits, logits.stride(0), targets, lse, target_logit, call_logit, vocab_size, call_id,
            BLOCK=_block(vocab_size), num_warps=8,
        )
        return
    in_vocabulary = (targets >= 0) & (targets < vocab_size)
    real = logits[:, :vocab_size].to(lse.dtype)
    call_logit.copy_(real[:, call_id])
    gathered = real.gather(1, torch.where(in_vocabulary, targets, 0)[:, None])[:, 0]
    target_logit.copy_(torch.where(in_vocabulary, gathered, 0.0))
    call_column = torch.full((1,), call_id, device=logits.device)
    lse.copy_(torch.logsumexp(real.index_fill(1, call_column, float("-inf")), dim=1))


def row_grads_(
    logits: Tensor, labels: Tensor, keeps_call: Tensor, norms: Tensor, scales: Tensor, call_id: int, vocab_size: int
) -> Tensor:
    """Overwrites ``logits`` [rows, columns] with ``scales * (exp(logits - norms) - one_hot(labels))`` per row and
    returns it. Columns from ``vocab_size`` on and, in rows where ``keeps_call`` (int8) is 0, the ``<CALL>`` column
    get probability 0; a label outside ``[0, vocab_size)`` subtracts nothing; rows with scale 0 become exact
    zeros whatever their normalizer."""
    rows, columns = logits.shape
    if rows == 0:
        return logits
    if triton_kernels_run_on(logits):
        _row_grads_kernel[(rows,)](
            logits, logits.stride(0), labels, keeps_call, norms, scales, columns, vocab_size, call_id,
            BLOCK=_block(columns), num_warps=8,
        )
        return logits
    grad = logits.to(norms.dtype).sub_(norms[:, None]).exp_()
    grad[:, vocab_size:] = 0.0
    grad[:, call_id].masked_fill_(keeps_call == 0, 0.0)
    rows_with_label = torch.arange(rows, device=grad.device)
    in_vocabulary = (labels >= 0) & (labels < vocab_size)
    grad[rows_with_label, torch.where(in_vocabulary, labels, 0)] -= in_vocabulary.to(grad.dtype)
    grad = torch.where(scales[:, None] != 0, grad * scales[:, None], 0.0)
    return logits.copy_(grad)


def _block(columns: int) -> int:
    return min(BLOCK_COLUMNS, triton.next_power_of_2(columns))


if triton is not None:

    @triton.jit
    def _row_stats_kernel(
        logits_ptr, row_stride, targets_ptr, lse_ptr, target_logit_ptr, call_logit_ptr, vocab_size, call_id,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_start = logits_ptr + row * row_stride
        # An online log-sum-exp: the running maximum and the sum of exp(logit - maximum). The first block
        # always holds a column that is neither <CALL> nor padding (the vocabulary has two tokens or more),
        # so the maximum is finite from then on and exp(-inf - maximum) = 0 for dropped columns.
        maximum = float("-inf")
        total = 0.0
        for start in range(0, vocab_size, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            kept = (columns < vocab_size) & (columns != call_id)
            z = tl.load(row_start + columns, mask=kept, other=float("-inf")).to(tl.float32)
            new_maximum = tl.maximum(maximum, tl.max(z, axis=0))
            total = total * tl.exp(maximum - new_maximum) + tl.sum(tl.exp(z - new_maximum), axis=0)
            maximum = new_maximum
        tl.store(lse_ptr + row, maximum + tl.log(total))

        target = tl.load(targets_ptr + row)
        in_vocabulary = (target >= 0) & (target < vocab_size)
        target_logit = tl.load(row_start + target, mask=in_vocabulary, other=0.0).to(tl.float32)
        tl.store(target_logit_ptr + row, target_logit)
        tl.store(call_logit_ptr + row, tl.load(row_start + call_id).to(tl.float32))

    @triton.jit
    def _row_grads_kernel(
        logits_ptr, row_stride, labels_ptr, keeps_call_ptr, norms_ptr, scales_ptr, columns_in_row, vocab_size,
        call_id, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_start = logits_ptr + row * row_stride
        scale = tl.load(scales_ptr + row).to(tl.float32)
        norm = tl.load(norms_ptr + row).to(tl.float32)
        label = tl.load(labels_ptr + row)
        keeps_call = tl.load(keeps_call_ptr + row)
        for start in range(0, columns_in_row, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            in_row = columns < columns_in_row
            z = tl.load(row_start + columns, mask=in_row, other=0.0).to(tl.float32)
            # ``keeps_call == 0`` rather than ``not``: the interpreter of triton 3.2 cannot invert booleans.
            dropped = (columns >= vocab_size) | ((columns == call_id) & (keeps_call == 0))
            probability = tl.where(dropped, 0.0, tl.exp(z - norm))
            grad = (probability - tl.where(columns == label, 1.0, 0.0)) * scale
            grad = tl.where(scale != 0, grad, 0.0)
            tl.store(row_start + columns, grad.to(logits_ptr.dtype.element_ty), mask=in_row)

_INTERPRETED: bool = triton is not None and isinstance(_row_stats_kernel, InterpretedFunction)
"""Whether ``triton.jit`` defined the kernels for its interpreter, which ``TRITON_INTERPRET=1`` asks for before
this module is imported. Asked of a kernel rather than of the variable, whose accepted spellings differ between
triton releases."""
