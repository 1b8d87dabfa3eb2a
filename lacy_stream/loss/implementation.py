"""Which implementation computes the LaCy loss: ``loss.implementation`` and what ``auto`` makes of it.

- ``torch``: plain PyTorch on full logits (fp32, fp64 for fp64 inputs); the CPU path and the test oracle;
- ``chunked``: :mod:`.chunked`, logits made chunk by chunk by cuBLAS and read by Triton kernels (four matmul
  passes, one chunk of logits in memory).

A third, a Triton kernel that fused the matmuls with the loss (five matmul passes, fp32 accumulator tiles
through global memory), took 1.5-2.0x the time of plain PyTorch on an H200 where ``chunked`` took 1.23-1.31x,
and was removed (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

IMPLEMENTATIONS = ("auto", "chunked", "torch")

AUTO: dict[tuple[str, torch.dtype], str] = {
    ("cuda", torch.bfloat16): "chunked",
    ("cuda", torch.float16): "chunked",
    ("cuda", torch.float32): "chunked",
    ("cuda", torch.float64): "chunked",
}
"""What ``auto`` takes for hidden states of a (device type, dtype); ``torch`` for any other.

On CUDA ``chunked``: plain PyTorch holds ~4.7 copies of the fp32 logits (4.8 GiB per 8k tokens at
V = 32,001; docs/benchmarks.md), which a 1.3B model at long micro-batches cannot spare, and the GPU check's
``auto_table`` says whether it is also the faster. The CPU keeps plain PyTorch: its models are tiny, and
there the full logits cost nothing worth a second pass.
"""


def choose_implementation(implementation: str, hidden: Tensor) -> str:
    """``implementation`` with ``auto`` resolved for ``hidden``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        return AUTO.get((hidden.device.type, hidden.dtype), "torch")
    return implementation
