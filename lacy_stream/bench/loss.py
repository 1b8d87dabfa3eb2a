"""``lacy-stream bench loss``: forward + backward time, peak memory and matmul throughput of the LaCy loss
variants side by side, and each one's multiple of the three-matmul floor."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LossCase:
    """One variant of ``bench loss``: what it computes and on which shapes."""

    kind: str
    """``lacy`` (the LaCy loss with ``implementation``), ``cross_entropy`` (``F.linear_cross_entropy``, plain CE:
    the fused CE LaCy is held to), or ``matmuls`` (the three products of a forward + backward alone: the floor)."""
    implementation: str | None = None
    padded: bool = True
    """Vocabulary rows padded to a multiple of ``VOCAB_MULTIPLE``, as the model has them (else the raw V)."""
    fp32_inputs: bool = False
    """Hidden states and weight in fp32 (on CUDA, with TF32 matmuls as the trainer sets them) instead of bf16."""
    chunked_cross_entropy: bool = False
    passes: int | None = 3
    """``N x V x D`` matmul passes per forward + backward, for TF/s (None: unknown)."""


VOCAB_MULTIPLE = 128
"""The model's vocabulary padding (``ModelArgs.vocab_multiple``)."""

FLOOR = "matmuls alone"

LOSS_CASES: dict[str, LossCase] = {
    "lacy chunked": LossCase("lacy", "chunked", passes=4),
    "lacy chunked, V unpadded": LossCase("lacy", "chunked", padded=False, passes=4),
    "lacy chunked, fp32 inputs": LossCase("lacy", "chunked", fp32_inputs=True, passes=4),
    "lacy eager (torch)": LossCase("lacy", "torch"),
    "F.linear_cross_entropy": LossCase("cross_entropy", padded=False),
    "F.linear_cross_entropy chunked": LossCase("cross_entropy", padded=False, chunked_cross_entropy=True, passes=None),
    FLOOR: LossCase("matmuls"),
    "matmuls alone, V unpadded": LossCase("matmuls", padded=False),
}
"""The loss variants. The chunked LaCy loss makes four matmul passes (the statistics, then per chunk the logits
again and the two gradient products), plain autograd three (it keeps the logits); how torch chunks
``F.linear_cross_entropy`` is its own business: no count, no TF/s.

"matmuls alone" is the floor: the three products of a forward + backward (logits, then the gradients of the
hidden states and of the weight, with the logits standing in for their gradient) and nothing else, at the
padded vocabulary; every row's ``x_floor`` is its time over the floor's at its size. The unpadded and fp32
variants keep the old shape and the old precision of one-GPU training side by side with today's."""


def bench_loss(
    *, hidden_sizes: tuple[int, ...] = (1024, 2048), tokens: int = 8 * 1024, vocab: int = 32001, repeats: int = 3
) -> list[dict]:
    """Forward + backward time and peak memory of the loss variants, side by side, on the present device.

    On CUDA the inputs are bf16 (fp32 where the case says) and peak memory is ``max_memory_allocated`` above
    the inputs and their gradients; on the CPU the inputs are fp32, each case runs in a fresh process and peak
    memory is the growth of its peak resident set.
    """
    import multiprocessing

    import torch

    cuda = torch.cuda.is_available()
    rows = []
    for hidden in hidden_sizes:
        for case in LOSS_CASES:
            skipped = loss_case_unavailable(case)
            if skipped:
                rows.append({"case": case, "hidden": hidden, "tokens": tokens, "skipped": skipped})
                continue
            arguments = (case, hidden, tokens, vocab, repeats)
            if cuda:
                result = measure_loss_case(*arguments)
            else:
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    result = pool.apply(measure_loss_case, arguments)
            rows.append({"case": case, "hidden": hidden, "tokens": tokens, **result})
    return with_floor_ratios(rows)


def with_floor_ratios(rows: list[dict]) -> list[dict]:
    """``rows`` with ``x_floor``: each measured case's time over the floor's (``FLOOR``) at its size."""
    floors = {(row["tokens"], row["hidden"]): row["ms"] for row in rows if row["case"] == FLOOR and row.get("ms")}
    for row in rows:
        floor = floors.get((row["tokens"], row["hidden"]))
        if floor and row.get("ms"):
            row["x_floor"] = round(row["ms"] / floor, 2)
    return rows


def loss_case_unavailable(case: str) -> str | None:
    """Why ``case`` cannot run here, or None."""
    import torch
    import torch.nn.functional as F

    if LOSS_CASES[case].kind == "cross_entropy" and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    return None


def measure_loss_case(
    case: str, hidden_size: int, tokens: int, vocab: int, repeats: int, *, device: str | None = None
) -> dict:
    """One case of :func:`bench_loss`: median ms of forward + backward, peak MiB above the inputs and their
    gradients (CUDA: allocator peak; CPU: resident-set growth, meaningful in a fresh process only) and, for
    cases with a known pass count, the achieved TFLOP/s of their matmul passes."""
    import resource
    import statistics

    import torch
    import torch.nn.functional as F

    from ..labels import TokenLabels
    from ..loss import lacy_loss

    spec = LOSS_CASES[case]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" and not spec.fp32_inputs else torch.float32
    rows = -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE if spec.padded else vocab
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, generator=generator, requires_grad=True)
    weight = (0.02 * torch.randn(rows, hidden_size, device=device, dtype=dtype, generator=generator)).requires_grad_(True)
    targets = torch.randint(0, vocab - 1, (tokens,), device=device, generator=generator)
    valid = torch.ones(tokens, dtype=torch.bool, device=device)
    token_class = torch.randint(0, 3, (tokens,), device=device, generator=generator).to(torch.int8)

    def step() -> None:
        if spec.kind == "matmuls":
            with torch.no_grad():
                logits = hidden @ weight.T
                _ = (logits @ weight, logits.T @ hidden)  # the two gradient products, results unused
            return
        if spec.kind == "lacy":
            out = lacy_loss(hidden, weight, targets, valid, call_id=vocab - 1, vocab_size=vocab, method="lacy",
                            labels=TokenLabels(token_class=token_class), implementation=spec.implementation)
            loss = out.loss
        else:
            from torch.nn.modules.linear_cross_entropy_options import (
                LinearCrossEntropyOptions,
            )

            options = LinearCrossEntropyOptions() if spec.chunked_cross_entropy else None
            loss = F.linear_cross_entropy(hidden, weight, targets, options=options)
        loss.backward()
        hidden.grad = weight.grad = None

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    precision = torch.get_float32_matmul_precision()
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 inputs, as the trainer runs them
    try:
        # The resident-set peak never goes down, so on the CPU it is read before the first step.
        cpu_baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()  # warm-up: kernel compilation, allocator
        synchronize()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            # the gradients of hidden and weight are part of any backward, not of the loss
            baseline = torch.cuda.memory_allocated() + hidden.nbytes + weight.nbytes
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            step()
            synchronize()
            times.append(time.perf_counter() - started)
    finally:
        torch.set_float32_matmul_precision(precision)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - cpu_baseline - hidden.nbytes - weight.nbytes
    seconds = statistics.median(times)
    return {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_rows": rows,
        "ms": round(1000 * seconds, 2),
        "peak_mib": round(max(peak, 0) / 2**20),
        "tflops": round(spec.passes * 2 * tokens * rows * hidden_size / seconds / 1e12, 1) if spec.passes else None,
    }
