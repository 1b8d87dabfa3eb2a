"""Which implementation computes the LaCy loss: ``loss.implementation`` and what ``auto`` makes of it.

- ``torch``: plain PyTorch on full logits (fp32, fp64 for fp64 inputs); the CPU path and the test oracle;
- ``triton``: the fused kernels of :mod:`.fused_kernel` (five ``N x V x D`` matmul passes, no logits in memory);
- ``chunked``: :mod:`.chunked`, logits recomputed chunk by chunk with cuBLAS (four passes, one chunk of logits).

``triton`` and ``chunked`` offer the same two functions, ``logit_stats`` and ``logit_grads``.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

IMPLEMENTATIONS = ("auto", "triton", "chunked", "torch")

AUTO: dict[tuple[str, torch.dtype], str] = {
    ("cuda", torch.bfloat16): "chunked",
    ("cuda", torch.float16): "chunked",
    ("cuda", torch.float32): "chunked",
    ("cuda", torch.float64): "chunked",
}
"""What ``auto`` takes for hidden states of a (device type, dtype); ``torch`` for any other.

Measured on an H200 (bf16, torch 2.11, triton 3.6; docs/benchmarks.md): ``chunked`` took 1.23-1.31x the
time of plain PyTorch and the fused kernels 1.5-2.0x, with 3-13% and 1-8% of its peak memory; the GPU check's
``auto_table`` chose ``chunked``. Plain PyTorch is faster but holds ~4.7 copies of the fp32 logits (4.8 GiB
per 8k tokens at V = 32,001), which a 1.3B model at long batches cannot spare. Other GPUs: run
``scripts/gpu_check.py`` and copy its ``auto_table`` here. The CPU keeps plain PyTorch: its
models are tiny, and there the full logits cost nothing worth a second pass.
"""


def choose_implementation(implementation: str, hidden: Tensor) -> str:
    """``implementation`` with ``auto`` resolved for ``hidden``; ``triton`` where it cannot run is an error."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        choice = AUTO.get((hidden.device.type, hidden.dtype), "torch")
        return "chunked" if choice == "triton" and not triton_runs_here() else choice
    if implementation == "triton" and not triton_runs_here():
        raise RuntimeError("implementation='triton' needs triton and a CUDA device, or TRITON_INTERPRET=1")
    return implementation


def recomputing_kernels(implementation: str) -> ModuleType:
    """The module with ``logit_stats`` and ``logit_grads`` of ``triton`` or ``chunked``."""
    if implementation == "triton":
        from . import fused_kernel

        return fused_kernel
    if implementation == "chunked":
        from . import chunked

        return chunked
    raise ValueError(f"{implementation!r} does not recompute logits")


def triton_runs_here() -> bool:
    """Whether triton is installed and its kernels can run: on CUDA, or anywhere under the interpreter."""
    try:
        from .fused_kernel import triton_available
    except ImportError:
        return False
    return triton_available()
