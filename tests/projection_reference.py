"""The float64 reference of the output projection + LaCy loss, shared by the kernel tests of every
implementation that recomputes logits (``triton``, ``chunked``)."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(n: int, v: int, d: int, dtype: torch.dtype, *, seed: int = 0, logit_scale: float = 1.0):
    """Hidden states, weight, targets, a mix of CALL tokens and a non-uniform token scale with zeros."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (logit_scale / d**0.5)
    targets = torch.randint(0, v, (n,), generator=gen)
    is_call = torch.rand(n, generator=gen) < 0.3
    scale = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    scale[torch.rand(n, generator=gen) < 0.2] = 0.0
    return (hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), targets.to(DEVICE), is_call.to(DEVICE),
            scale.to(DEVICE, dtype))


def reference(hidden, weight, targets, call_id, is_call, scale):
    """float64 ``(lse_nocall, target_logit, call_logit, grad_hidden, grad_weight)`` from full logits and autograd
    of ``sum(scale * loss)``; targets outside the vocabulary read column 0 (they only occur with scale 0)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = h @ w.T
    call_logit = logits[:, call_id]
    call_col = torch.tensor([call_id], device=logits.device)
    lse_nocall = torch.logsumexp(logits.index_fill(1, call_col, float("-inf")), dim=1)
    safe_targets = torch.where((targets >= 0) & (targets < weight.shape[0]), targets, 0)
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
