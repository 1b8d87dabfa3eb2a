"""The chunked LaCy statistics and gradients (``implementation="chunked"``) against the float64 reference,
with the row kernels in Triton (under its interpreter on the CPU, see conftest.py) and in PyTorch."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lacy_stream.loss import row_kernels
from lacy_stream.loss.chunked import logit_grads, logit_stats
from lacy_stream.loss.implementation import AUTO, choose_implementation

# --- the float64 reference of the output projection + LaCy loss ---------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(n: int, v: int, d: int, dtype: torch.dtype, *, seed: int = 0, logit_scale: float = 1.0,
                padding: int = 0):
    """Hidden states, weight (``v`` rows plus ``padding`` padding rows of large values, which must never
    matter), targets, a mix of CALL tokens and a non-uniform token scale with zeros."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (logit_scale / d**0.5)
    weight = torch.cat([weight, 3 * torch.randn(padding, d, generator=gen, dtype=torch.float64)])
    targets = torch.randint(0, v, (n,), generator=gen)
    is_call = torch.rand(n, generator=gen) < 0.3
    scale = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    scale[torch.rand(n, generator=gen) < 0.2] = 0.0
    return (hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), targets.to(DEVICE), is_call.to(DEVICE),
            scale.to(DEVICE, dtype))


def reference(hidden, weight, targets, call_id, is_call, scale, vocab_size=None):
    """float64 ``(lse_nocall, target_logit, call_logit, grad_hidden, grad_weight)`` from full logits of the first
    ``vocab_size`` rows of ``weight`` (the others are padding: gradient 0) and autograd of ``sum(scale * loss)``;
    targets outside the vocabulary read column 0 (they only occur with scale 0)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = h @ w[:vocab_size].T
    call_logit = logits[:, call_id]
    call_col = torch.tensor([call_id], device=logits.device)
    lse_nocall = torch.logsumexp(logits.index_fill(1, call_col, float("-inf")), dim=1)
    safe_targets = torch.where((targets >= 0) & (targets < logits.shape[1]), targets, 0)
    target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)
    loss = torch.where(is_call, torch.logsumexp(logits, dim=1) - call_logit, lse_nocall - target_logit)
    (scale.double() * loss).sum().backward()
    return lse_nocall.detach(), target_logit.detach(), call_logit.detach(), h.grad, w.grad


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Elementwise ``|a - e| <= tol * (|e| + max|e|)``: relative, with the tensor's scale as a floor."""
    assert torch.isfinite(actual).all()
    error = (actual.double() - expected).abs()
    largest = expected.abs().max().item()
    bound = tol * (expected.abs() + largest + 1e-30)
    assert (error <= bound).all(), f"max error {error.max():.3e}, max |expected| {largest:.3e}"


def check_against_reference(logit_stats, logit_grads, n, v, d, call_id, dtype, tol, *, logit_scale=1.0, seed=0,
                            is_call=None, scale=None, padding=0):
    """One implementation's ``logit_stats`` and ``logit_grads`` (options bound) against the float64 reference
    on ``make_inputs`` (its CALL tokens and scales unless given; ``padding`` rows after the ``v`` of the
    vocabulary); returns the gradients."""
    hidden, weight, targets, mixed_calls, mixed_scale = make_inputs(n, v, d, dtype, seed=seed, logit_scale=logit_scale,
                                                                    padding=padding)
    is_call = mixed_calls if is_call is None else is_call
    scale = mixed_scale if scale is None else scale
    lse_ref, target_ref, call_ref, grad_h_ref, grad_w_ref = reference(hidden, weight, targets, call_id, is_call, scale,
                                                                      vocab_size=v)

    lse, target_logit, call_logit = logit_stats(hidden, weight, targets, call_id, vocab_size=v)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert lse.dtype == target_logit.dtype == call_logit.dtype == expected_dtype
    assert lse.shape == target_logit.shape == call_logit.shape == (n,)
    assert_close(lse, lse_ref, tol)
    assert_close(target_logit, target_ref, tol)
    assert_close(call_logit, call_ref, tol)

    grad_h, grad_w = logit_grads(hidden, weight, targets, call_id, lse, call_logit, is_call, scale, vocab_size=v)
    assert grad_h.shape == hidden.shape and grad_h.dtype == dtype
    assert grad_w.shape == weight.shape and grad_w.dtype == dtype
    assert_close(grad_h, grad_h_ref, tol)
    assert_close(grad_w, grad_w_ref, tol)
    return grad_h, grad_w


def check_empty_batch(logit_stats, logit_grads) -> None:
    hidden, weight, targets, is_call, scale = make_inputs(0, 20, 16, torch.float32)
    lse, target_logit, call_logit = logit_stats(hidden, weight, targets, 19)
    assert lse.shape == target_logit.shape == call_logit.shape == (0,)
    grad_h, grad_w = logit_grads(hidden, weight, targets, 19, lse, call_logit, is_call, scale)
    assert grad_h.shape == (0, 16) and (grad_w == 0).all()


# --- the chunked implementation against it ----------------------------------------------------------------------

# Tolerances of assert_close (relative to each tensor's largest entry). bf16 rounds the logits (as plain
# PyTorch does) and the gradient tile to 8 significant bits.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(params=["triton", "torch"], autouse=True)
def row_kernels_in(request, monkeypatch):
    """Each test twice: with the Triton row kernels (fp16/bf16/fp32) and with their PyTorch operations."""
    if request.param == "triton":
        if not row_kernels.triton_kernels_run_on(torch.zeros(1, device=DEVICE)):
            pytest.skip("the Triton row kernels need triton, and CUDA or TRITON_INTERPRET=1")
    else:
        monkeypatch.setattr(row_kernels, "triton_kernels_run_on", lambda logits: False)
    return request.param


def check(n, v, d, call_id, dtype, *, chunk_tokens=7, **inputs):
    return check_against_reference(partial(logit_stats, chunk_tokens=chunk_tokens),
                                   partial(logit_grads, chunk_tokens=chunk_tokens),
                                   n, v, d, call_id, dtype, TOLERANCE[dtype], **inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "v", "d", "call_id", "chunk_tokens", "padding"),
    [
        (37, 77, 40, 76, 7, 0),  # odd sizes, a short last chunk, CALL last
        (37, 77, 40, 76, 7, 51),  # the same, padded to 128 columns
        (37, 77, 40, 0, 37, 3),  # one chunk, CALL first
        (37, 77, 40, 38, 1, 0),  # one token per chunk, CALL in the middle
        (1, 50, 24, 49, None, 14),  # a single token, the default chunking
        (64, 17, 16, 16, 16, 0),  # exact multiples
    ],
)
def test_matches_reference(n, v, d, call_id, chunk_tokens, padding, dtype):
    _, grad_w = check(n, v, d, call_id, dtype, chunk_tokens=chunk_tokens, padding=padding)
    assert (grad_w[v:] == 0).all()  # padding rows: no probability, no gradient


def test_rows_longer_than_a_kernel_block(monkeypatch):
    """A row walked in several blocks, with <CALL> alone in the last block of the vocabulary."""
    monkeypatch.setattr(row_kernels, "BLOCK_COLUMNS", 16)
    check(9, 49, 16, 48, torch.float32, padding=15)


@pytest.mark.parametrize(("dtype", "logit_scale"), [(torch.float64, 1e4), (torch.float32, 1e3)])
def test_large_logits(dtype, logit_scale):
    """Logits of magnitude ~1e3-1e4 give finite statistics and gradients (the max is subtracted first)."""
    check(37, 77, 40, 76, dtype, logit_scale=logit_scale, seed=1)


@pytest.mark.parametrize("calls", ["all", "none"])
def test_all_and_no_calls(calls):
    is_call = torch.full((37,), calls == "all", dtype=torch.bool, device=DEVICE)
    _, grad_w = check(37, 77, 40, 76, torch.float64, is_call=is_call)
    if calls == "none":  # non-call tokens never push gradient into the CALL embedding
        assert (grad_w[76] == 0).all()


def test_ignored_tokens_with_out_of_range_targets_and_garbage_statistics():
    n, v, d, call_id = 37, 77, 40, 76
    hidden, weight, targets, is_call, scale = make_inputs(n, v, d, torch.float64, seed=3)
    ignored = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    ignored[::4] = True
    ignored[1] = True
    targets = torch.where(ignored, -100, targets)
    targets[1] = v + 5
    scale = torch.where(ignored, 0.0, scale)
    is_call = is_call & ~ignored

    lse, target_logit, call_logit = logit_stats(hidden, weight, targets, call_id, chunk_tokens=5)
    assert (target_logit[ignored] == 0).all()
    *_, grad_h_ref, grad_w_ref = reference(hidden, weight, targets, call_id, is_call, scale)
    garbage_lse = torch.where(ignored, float("nan"), lse)
    grad_h, grad_w = logit_grads(hidden, weight, targets, call_id, garbage_lse, call_logit, is_call, scale,
                                 chunk_tokens=5)
    assert (grad_h[ignored] == 0).all()
    assert_close(grad_h, grad_h_ref, 1e-10)
    assert_close(grad_w, grad_w_ref, 1e-10)


def test_empty_batch():
    check_empty_batch(logit_stats, logit_grads)


def test_auto_takes_the_table_and_plain_pytorch_elsewhere(monkeypatch):
    hidden = torch.zeros(2, 4)
    assert choose_implementation("auto", hidden) == "torch"
    monkeypatch.setitem(AUTO, ("cpu", torch.float32), "chunked")
    assert choose_implementation("auto", hidden) == "chunked"
    assert choose_implementation("torch", hidden) == "torch"
    with pytest.raises(ValueError, match="implementation"):
        choose_implementation("triton", hidden)
