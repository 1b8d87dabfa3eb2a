"""Benchmarks behind ``lacy-stream bench``: throughput figures, measured, never asserted in tests."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from .config.job_config import JobConfig
from .data.loader import TokenLoader
from .labels import TokenClass


def bench_stream(config: JobConfig, *, batches: int) -> dict:
    """Pull ``batches`` batches through the loader; tokens/s excludes the first batch (worker start-up)."""
    loader = TokenLoader.from_config(config.data, config.tokenizer.path, config.annotation)
    tokens = facts = targets = 0
    started = None
    progress = tqdm(total=batches, desc="streaming", unit="batch", disable=not sys.stderr.isatty())
    for count, batch in enumerate(loader, start=1):
        if started is None:
            started = time.perf_counter()
        else:
            tokens += batch["tokens"].numel()
        classes = batch["token_class"][:, 1:]
        facts += int((classes == TokenClass.FACT).sum())
        targets += int((classes != TokenClass.IGNORE).sum())
        progress.update()
        if count == batches:
            break
    progress.close()
    seconds = time.perf_counter() - started if started is not None else 0.0
    return {
        "batches": batches,
        "num_workers": config.data.num_workers,
        "tokens_per_s": round(tokens / seconds) if seconds > 0 else None,
        "fact_fraction": round(facts / targets, 4) if targets else None,
        "read": loader.read_stats(),
    }


LOSS_CASES: dict[str, int | None] = {
    "lacy fused (triton)": 5,
    "lacy chunked": 4,
    "lacy eager (torch)": 3,
    "F.linear_cross_entropy": 3,
    "F.linear_cross_entropy chunked": None,
    "matmuls alone": 3,
    "matmuls alone, V padded to 64": 3,
}
"""The loss variants and the ``N x V x D`` matmul passes each makes per forward + backward (the fused kernels
recompute the logits for each gradient; the chunked path once for both; autograd keeps them). How torch
chunks ``F.linear_cross_entropy`` is its own business: no count, no TFLOP/s.

"matmuls alone" is the floor: the three products of a forward + backward (logits, then the gradients of the
hidden states and of the weight, with the logits standing in for their gradient) and nothing else; "V padded
to 64" runs them with the vocabulary rounded up to a multiple of 64 rows, to see what an odd vocabulary
(32,001) costs the matmuls, which on the H200 ran every loss at 70-99 TFLOP/s (docs/benchmarks.md)."""

LACY_IMPLEMENTATIONS = {"lacy fused (triton)": "triton", "lacy chunked": "chunked", "lacy eager (torch)": "torch"}


def bench_loss(
    *, hidden_sizes: tuple[int, ...] = (1024, 2048), tokens: int = 8 * 1024, vocab: int = 32001, repeats: int = 3
) -> list[dict]:
    """Forward + backward time and peak memory of the loss variants, side by side, on the present device.

    On CUDA the inputs are bf16 and peak memory is ``max_memory_allocated`` above the inputs and their
    gradients; on the CPU the inputs are fp32, each case runs in a fresh process and peak memory is the
    growth of its peak resident set. The fused kernel runs only on CUDA (the CPU interpreter is not a
    benchmark). ``F.linear_cross_entropy`` does plain cross-entropy, the lower bound LaCy's loss is held to.
    """
    import multiprocessing

    import torch

    cuda = torch.cuda.is_available()
    rows = []
    for hidden in hidden_sizes:
        for case in LOSS_CASES:
            skipped = loss_case_unavailable(case, interpreter_allowed=False)
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
    return rows


def loss_case_unavailable(case: str, *, interpreter_allowed: bool) -> str | None:
    """Why ``case`` cannot run here, or None. The fused kernel needs CUDA unless ``interpreter_allowed``."""
    import torch
    import torch.nn.functional as F

    if case.startswith("F.linear_cross_entropy") and not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy"
    if LACY_IMPLEMENTATIONS.get(case) == "triton":
        from .loss.implementation import triton_runs_here

        if not (torch.cuda.is_available() or interpreter_allowed) or not triton_runs_here():
            return "needs a CUDA GPU and triton"
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

    from .labels import TokenLabels
    from .loss import lacy_loss

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, generator=generator, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, hidden_size, device=device, dtype=dtype, generator=generator)).requires_grad_(True)
    targets = torch.randint(0, vocab - 1, (tokens,), device=device, generator=generator)
    valid = torch.ones(tokens, dtype=torch.bool, device=device)
    token_class = torch.randint(0, 3, (tokens,), device=device, generator=generator).to(torch.int8)

    matmul_weight = weight.detach()
    if case == "matmuls alone, V padded to 64":
        matmul_weight = F.pad(matmul_weight, (0, 0, 0, -vocab % 64))

    def step() -> None:
        if case.startswith("matmuls alone"):
            with torch.no_grad():
                logits = hidden @ matmul_weight.T
                _ = (logits @ matmul_weight, logits.T @ hidden)  # the two gradient products, results unused
            return
        if case in LACY_IMPLEMENTATIONS:
            out = lacy_loss(hidden, weight, targets, valid, call_id=vocab - 1, method="lacy",
                            labels=TokenLabels(token_class=token_class), implementation=LACY_IMPLEMENTATIONS[case])
            loss = out.loss
        else:
            from torch.nn.modules.linear_cross_entropy_options import (
                LinearCrossEntropyOptions,
            )

            options = LinearCrossEntropyOptions() if case.endswith("chunked") else None
            loss = F.linear_cross_entropy(hidden, weight, targets, options=options)
        loss.backward()
        hidden.grad = weight.grad = None

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

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
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - cpu_baseline - hidden.nbytes - weight.nbytes
    seconds = statistics.median(times)
    passes = LOSS_CASES[case]
    return {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "ms": round(1000 * seconds, 1),
        "peak_mib": round(max(peak, 0) / 2**20),
        "tflops": round(passes * 2 * tokens * vocab * hidden_size / seconds / 1e12, 1) if passes else None,
    }
