"""The float64 reference of the output projection + LaCy loss, for the tests of the chunked implementation
(its matmuls and its Triton row kernels)."""

from __future__ import annotations

import torch

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
