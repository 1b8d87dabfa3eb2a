"""Fused output projection + LaCy cross-entropy in Triton, never materializing the ``[N, V]`` logits.

With ``z = hidden @ weight.T`` (``hidden`` [N, D], ``weight`` [V, D], ``<CALL>`` at column ``call_id``):

- :func:`logit_stats` makes one pass over vocabulary tiles and returns per token the log-sum-exp over the
  vocabulary without the CALL column, the target logit and the CALL logit (an online, running-max
  log-sum-exp, so logits of any magnitude are safe);
- :func:`logit_grads` recomputes the logit tiles: one kernel walks the vocabulary per token block for
  ``grad_hidden``, another walks the tokens per vocabulary tile for ``grad_weight``.

Only ``[BLOCK_N, BLOCK_V]`` tiles of logits exist at any time. The gradient accumulators are fp32 (fp64 for
fp64 inputs) buffers shaped like the gradients; each of their rows is written by one program only (no
atomics, so the results are deterministic). When the grid has fewer programs than the GPU has SMs, the
walk is split into ``splits`` independent ranges whose partial results are combined in PyTorch; that costs
one extra accumulator per split.

On a CPU the kernels run under the Triton interpreter, which has to be switched on (``TRITON_INTERPRET=1``)
before this module is imported: ``triton.jit`` picks interpreted or compiled code when a kernel is defined.

Supported: triton 3.2 and newer (CI runs the kernel tests under the interpreter with 3.2.0 and with the
newest release); float64 inputs need 3.5, the first release whose ``tl.dot`` takes float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

FLOAT64_SUPPORTED: bool = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 5)
"""Whether this triton's ``tl.dot`` takes float64 (3.5 and newer)."""


def triton_available() -> bool:
    """Whether the kernels can run here: on a CUDA device, or anywhere under the Triton interpreter."""
    return _INTERPRETED or torch.cuda.is_available()


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options shared by the three kernels.

    ``block_*`` must be powers of two and at least 16 (``tl.dot``). ``splits`` fixes how many independent
    ranges each kernel's reduction walk (vocabulary for the statistics and ``grad_hidden``, tokens for
    ``grad_weight``) is cut into; ``None`` picks enough to occupy every SM of the GPU.
    """

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2
    splits: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_d"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")
        if self.splits is not None and self.splits < 1:
            raise ValueError(f"splits must be >= 1, got {self.splits}")


def default_config(dtype: torch.dtype) -> KernelConfig:
    """Block sizes for ``dtype`` inputs.

    On a GPU: the largest tiles for which none of the three kernels spills registers when compiled for
    sm_90 (the backward kernels hold a logit tile, its gradient and an accumulator tile at once). In the
    interpreter each ``tl`` op is one numpy call, so fewer and bigger tiles run faster.
    """
    if _INTERPRETED:
        return KernelConfig(block_n=64, block_v=64, block_d=64)
    if dtype in (torch.float16, torch.bfloat16):
        return KernelConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=3)
    if dtype == torch.float32 and _dot_precision(dtype) == "tf32":
        return KernelConfig(block_n=64, block_v=64, block_d=32, num_warps=8, num_stages=3)
    if dtype == torch.float32:
        return KernelConfig(block_n=64, block_v=64, block_d=16, num_warps=8, num_stages=2)
    return KernelConfig(block_n=32, block_v=64, block_d=16, num_warps=4, num_stages=2)


@triton.jit
def _logit_tile(
    h_ptr, w_ptr, rows, cols, row_mask, col_mask, D,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``hidden[rows] @ weight[cols].T`` as a [BLOCK_N, BLOCK_V] tile; masked rows and columns give 0."""
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    # Every ``tl.dot`` names ``out_dtype``: its float32 default clashes with a float64 accumulator.
    for d_start in range(0, D, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        h = tl.load(h_ptr + rows[:, None] * D + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * D + dims[None, :], mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
        z = tl.dot(h, tl.trans(w), acc=z, input_precision=DOT_PRECISION, out_dtype=ACC)
    return z


@triton.jit
def _grad_tile(z, cols, col_mask, labels, keeps_call, norms, scales, call_id):
    """``scale * (softmax - one_hot(label))`` for one tile; the CALL column is left out of the softmax of
    tokens that don't keep it, and rows with scale 0 give exact zeros whatever their statistics."""
    # ``col_mask == 0`` rather than ``~col_mask``: the interpreter of triton 3.2 and 3.3 cannot invert booleans.
    dropped = (col_mask == 0)[None, :] | ((cols == call_id)[None, :] & (keeps_call == 0)[:, None])
    probs = tl.exp(tl.where(dropped, float("-inf"), z) - norms[:, None])
    grad = probs - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    return tl.where((scales != 0)[:, None], grad * scales[:, None], 0.0)


@triton.jit
def _scaled_grad_tile(
    h_ptr, w_ptr, labels, keeps_call, norms, scales, rows, cols, row_mask, col_mask, D, call_id,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The recomputed logit tile of ``rows`` x ``cols`` turned into its loss-gradient tile."""
    z = _logit_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, D, ACC, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION)
    return _grad_tile(z, cols, col_mask, labels, keeps_call, norms, scales, call_id)


@triton.jit
def _logit_stats_kernel(
    h_ptr, w_ptr, targets_ptr, lse_ptr, target_logit_ptr, call_logit_ptr,
    N, V, D, call_id, tiles_per_split,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (token block, split): the split's partial statistics into row ``split`` of the [splits, N]
    outputs, with the log-sum-exp of a split that holds no non-CALL column being -inf."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = rows.to(tl.int64)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)

    running_max = tl.full((BLOCK_N,), float("-inf"), ACC)
    running_sum = tl.zeros((BLOCK_N,), dtype=ACC)
    target_logit = tl.zeros((BLOCK_N,), dtype=ACC)
    call_logit = tl.zeros((BLOCK_N,), dtype=ACC)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logit_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, D, ACC, BLOCK_N, BLOCK_V, BLOCK_D,
                        DOT_PRECISION)
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
        call_logit += tl.sum(tl.where(cols[None, :] == call_id, z, 0.0), axis=1)

        z = tl.where((col_mask & (cols != call_id))[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        # Until a non-CALL column is seen the max stays -inf; shift by 0 then so -inf - -inf never occurs.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        running_max = new_max

    # The sum is >= 1 (the max term is exp(0)) unless the split saw no column; then the max is -inf and
    # clamping keeps log(0) out.
    lse = running_max + tl.log(tl.maximum(running_sum, 1.0))
    out = split * N + rows
    tl.store(lse_ptr + out, lse, mask=row_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)
    tl.store(call_logit_ptr + out, call_logit, mask=row_mask)


@triton.jit
def _grad_hidden_kernel(
    h_ptr, w_ptr, labels_ptr, keeps_call_ptr, norms_ptr, scales_ptr, grad_ptr,
    N, V, D, call_id, tiles_per_split,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (token block, split): adds ``g @ weight`` over the split's vocabulary tiles into
    ``grad[split, rows]``, a zero-initialised [splits, N, D] buffer."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows = rows.to(tl.int64)
    scales = tl.load(scales_ptr + rows, mask=row_mask, other=0.0)
    if tl.max(tl.abs(scales), axis=0) != 0:
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        keeps_call = tl.load(keeps_call_ptr + rows, mask=row_mask, other=0)
        norms = tl.load(norms_ptr + rows, mask=row_mask, other=0.0)
        grad_rows = grad_ptr + (split * N + rows) * D
        v_begin = split * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
        for v_start in range(v_begin, v_end, BLOCK_V):
            cols = v_start + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            g = _scaled_grad_tile(
                h_ptr, w_ptr, labels, keeps_call, norms, scales, rows, cols, row_mask, col_mask, D,
                call_id, ACC, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
            ).to(w_ptr.dtype.element_ty)
            for d_start in range(0, D, BLOCK_D):
                dims = d_start + tl.arange(0, BLOCK_D)
                dim_mask = dims < D
                w = tl.load(w_ptr + cols[:, None] * D + dims[None, :], mask=col_mask[:, None] & dim_mask[None, :],
                            other=0.0)
                acc_ptrs = grad_rows[:, None] + dims[None, :]
                acc_mask = row_mask[:, None] & dim_mask[None, :]
                acc = tl.load(acc_ptrs, mask=acc_mask, other=0.0)
                acc = tl.dot(g, w, acc=acc, input_precision=DOT_PRECISION, out_dtype=ACC)
                tl.store(acc_ptrs, acc, mask=acc_mask)
            # The next tile re-reads these accumulator rows, possibly from other threads of the program.
            tl.debug_barrier()


@triton.jit
def _grad_weight_kernel(
    h_ptr, w_ptr, labels_ptr, keeps_call_ptr, norms_ptr, scales_ptr, grad_ptr,
    N, V, D, call_id, blocks_per_split,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (vocabulary tile, split): adds ``g.T @ hidden`` over the split's token blocks into
    ``grad[split, cols]``, a zero-initialised [splits, V, D] buffer; token blocks with all scales 0 are skipped."""
    split = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    cols = cols.to(tl.int64)
    grad_cols = grad_ptr + (split * V + cols) * D
    n_begin = split * blocks_per_split * BLOCK_N
    n_end = tl.minimum(n_begin + blocks_per_split * BLOCK_N, N)
    for n_start in range(n_begin, n_end, BLOCK_N):
        rows = n_start + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        rows = rows.to(tl.int64)
        scales = tl.load(scales_ptr + rows, mask=row_mask, other=0.0)
        if tl.max(tl.abs(scales), axis=0) != 0:
            labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
            keeps_call = tl.load(keeps_call_ptr + rows, mask=row_mask, other=0)
            norms = tl.load(norms_ptr + rows, mask=row_mask, other=0.0)
            g = _scaled_grad_tile(
                h_ptr, w_ptr, labels, keeps_call, norms, scales, rows, cols, row_mask, col_mask, D,
                call_id, ACC, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
            )
            g_t = tl.trans(g.to(h_ptr.dtype.element_ty))
            for d_start in range(0, D, BLOCK_D):
                dims = d_start + tl.arange(0, BLOCK_D)
                dim_mask = dims < D
                h = tl.load(h_ptr + rows[:, None] * D + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :],
                            other=0.0)
                acc_ptrs = grad_cols[:, None] + dims[None, :]
                acc_mask = col_mask[:, None] & dim_mask[None, :]
                acc = tl.load(acc_ptrs, mask=acc_mask, other=0.0)
                acc = tl.dot(g_t, h, acc=acc, input_precision=DOT_PRECISION, out_dtype=ACC)
                tl.store(acc_ptrs, acc, mask=acc_mask)
            # The next token block re-reads these accumulator rows, possibly from other threads of the program.
            tl.debug_barrier()


_INTERPRETED: bool = isinstance(_logit_stats_kernel, InterpretedFunction)
"""Whether ``triton.jit`` defined the kernels above for the interpreter. Asked of a kernel rather than of
``TRITON_INTERPRET``, whose accepted spellings differ between triton releases (3.3 takes only "1")."""


def logit_stats(
    hidden: Tensor, weight: Tensor, targets: Tensor, call_id: int, *, config: KernelConfig | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(lse_nocall, target_logit, call_logit)`` of ``z = hidden @ weight.T``, each [N], in one pass over
    vocabulary tiles.

    ``lse_nocall`` is the log-sum-exp of each row of ``z`` without column ``call_id``. Results are float64
    for float64 inputs and float32 otherwise (fp32 accumulation for 16-bit inputs). A target outside
    ``[0, V)`` (e.g. the ignore index -100) is never read and gets ``target_logit`` 0.
    """
    n, v, d = _check_projection(hidden, weight, targets, call_id)
    acc_dtype = _acc_dtype(hidden.dtype)
    config = config or default_config(hidden.dtype)
    if n == 0:
        empty = hidden.new_empty(0, dtype=acc_dtype)
        return empty, empty.clone(), empty.clone()
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()

    token_blocks, tiles = triton.cdiv(n, config.block_n), triton.cdiv(v, config.block_v)
    splits, tiles_per_split = _split(tiles, token_blocks, config, hidden.device)
    lse = hidden.new_empty(splits, n, dtype=acc_dtype)
    target_logit, call_logit = torch.empty_like(lse), torch.empty_like(lse)
    _logit_stats_kernel[(token_blocks, splits)](
        hidden, weight, targets, lse, target_logit, call_logit,
        n, v, d, call_id, tiles_per_split,
        **_launch_args(hidden.dtype, acc_dtype, config),
    )
    if splits == 1:
        return lse[0], target_logit[0], call_logit[0]
    return torch.logsumexp(lse, dim=0), target_logit.sum(dim=0), call_logit.sum(dim=0)


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
    config: KernelConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """``(grad_hidden [N, D], grad_weight [V, D])`` of ``sum(token_scale * loss)``, recomputing logit tiles.

    ``loss`` is ``lse_all - call_logit`` for CALL tokens (``is_call``) and ``lse_nocall - target_logit``
    otherwise, so per token ``i`` and column ``j``:
    - CALL tokens: ``g[i, j] = exp(z[i, j] - lse_all[i]) - [j == call_id]``;
    - other tokens: ``g[i, j] = exp(z[i, j] - lse_nocall[i]) - [j == targets[i]]``, and ``g[i, call_id] = 0``;
    scaled by ``token_scale[i]``; ``grad_hidden = g @ weight`` and ``grad_weight = g.T @ hidden``.
    ``lse_nocall`` and ``call_logit`` come from :func:`logit_stats`. Tokens with ``token_scale`` 0 contribute
    exact zeros and may have any target (blocks of them are skipped). The gradients have the dtypes of
    ``hidden`` and ``weight``; they are accumulated in fp32 (fp64 for fp64 inputs), and for 16-bit inputs
    the gradient tile is rounded to the input dtype before its matmuls, as a 16-bit autograd matmul would.
    """
    n, v, d = _check_projection(hidden, weight, targets, call_id)
    acc_dtype = _acc_dtype(hidden.dtype)
    for name, tensor in (("lse_nocall", lse_nocall), ("call_logit", call_logit), ("token_scale", token_scale)):
        _check_token_vector(name, tensor, n, hidden.device)
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {tensor.dtype}")
    _check_token_vector("is_call", is_call, n, hidden.device)
    if is_call.dtype != torch.bool:
        raise ValueError(f"is_call must be bool, got {is_call.dtype}")
    config = config or default_config(hidden.dtype)
    if n == 0:
        return torch.zeros_like(hidden), torch.zeros_like(weight)
    hidden, weight = hidden.contiguous(), weight.contiguous()

    # Per token: the softmax normalizer, the column whose one-hot is subtracted, whether CALL stays in.
    lse_nocall, call_logit = lse_nocall.to(acc_dtype), call_logit.to(acc_dtype)
    norms = torch.where(is_call, torch.logaddexp(lse_nocall, call_logit), lse_nocall).contiguous()
    labels = torch.where(is_call, torch.full_like(targets, call_id), targets).contiguous()
    keeps_call = is_call.to(torch.int8).contiguous()
    scales = token_scale.to(acc_dtype).contiguous()
    token_blocks, tiles = triton.cdiv(n, config.block_n), triton.cdiv(v, config.block_v)
    launch = _launch_args(hidden.dtype, acc_dtype, config)

    splits, tiles_per_split = _split(tiles, token_blocks, config, hidden.device)
    grad_hidden = hidden.new_zeros(splits, n, d, dtype=acc_dtype)
    _grad_hidden_kernel[(token_blocks, splits)](
        hidden, weight, labels, keeps_call, norms, scales, grad_hidden, n, v, d, call_id, tiles_per_split, **launch
    )
    splits, blocks_per_split = _split(token_blocks, tiles, config, hidden.device)
    grad_weight = weight.new_zeros(splits, v, d, dtype=acc_dtype)
    _grad_weight_kernel[(tiles, splits)](
        hidden, weight, labels, keeps_call, norms, scales, grad_weight, n, v, d, call_id, blocks_per_split, **launch
    )
    return _sum_splits(grad_hidden).to(hidden.dtype), _sum_splits(grad_weight).to(weight.dtype)


def _check_projection(hidden: Tensor, weight: Tensor, targets: Tensor, call_id: int) -> tuple[int, int, int]:
    """Validates the shared inputs and returns ``(N, V, D)``."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    n, d = hidden.shape
    v = weight.shape[0]
    if d == 0:
        raise ValueError("hidden size D must be positive")
    if v < 2:
        raise ValueError(f"the vocabulary needs a token besides <CALL>, got V={v}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {hidden.dtype}; expected one of {_FLOAT_DTYPES}")
    if weight.device != hidden.device:
        raise ValueError(f"hidden is on {hidden.device} but weight on {weight.device}")
    if hidden.dtype == torch.float64 and not FLOAT64_SUPPORTED:
        raise ValueError(f"float64 inputs need triton >= 3.5, this is triton {triton.__version__}")
    if hidden.device.type == "cpu":
        if not _INTERPRETED:
            raise ValueError("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                             "this module")
        if hidden.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the Triton interpreter supports float32 and float64 here, got {hidden.dtype}")
    elif hidden.device.type != "cuda":
        raise ValueError(f"unsupported device {hidden.device}; the kernels run on CUDA or the CPU interpreter")
    _check_token_vector("targets", targets, n, hidden.device)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if not 0 <= call_id < v:
        raise ValueError(f"call_id {call_id} outside the vocabulary of {v}")
    return n, v, d


def _check_token_vector(name: str, tensor: Tensor, n: int, device: torch.device) -> None:
    if tensor.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, hidden on {device}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot`` input precision; PyTorch's fp32 matmul setting decides between exact fp32 (the default)
    and TF32 tensor cores. 16-bit inputs take Triton's default."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return None


def _launch_args(dtype: torch.dtype, acc_dtype: torch.dtype, config: KernelConfig) -> dict:
    """Constexpr and launch keyword arguments common to the three kernels."""
    return {
        "ACC": tl.float64 if acc_dtype == torch.float64 else tl.float32,
        "BLOCK_N": config.block_n,
        "BLOCK_V": config.block_v,
        "BLOCK_D": config.block_d,
        "DOT_PRECISION": _dot_precision(dtype),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }


def _sum_splits(partials: Tensor) -> Tensor:
    return partials[0] if partials.shape[0] == 1 else partials.sum(dim=0)


def _split(chunks: int, programs: int, config: KernelConfig, device: torch.device) -> tuple[int, int]:
    """``(splits, chunks_per_split)`` for a reduction over ``chunks`` tiles run by ``programs`` programs per split:
    ``config.splits`` if set, else enough splits to give every SM a program (1 in the interpreter)."""
    if config.splits is not None:
        wanted = config.splits
    elif device.type == "cuda" and not _INTERPRETED:
        wanted = math.ceil(torch.cuda.get_device_properties(device).multi_processor_count / programs)
    else:
        wanted = 1
    per_split = math.ceil(chunks / max(1, min(wanted, chunks)))
    return math.ceil(chunks / per_split), per_split
