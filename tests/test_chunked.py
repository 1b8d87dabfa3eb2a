"""The chunked LaCy statistics and gradients (``implementation="chunked"``) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from projection_reference import DEVICE, assert_close, make_inputs, reference

from lacy_stream.loss.chunked import logit_grads, logit_stats
from lacy_stream.loss.implementation import AUTO, choose_implementation

# Tolerances of assert_close (relative to each tensor's largest entry). bf16 rounds the logits (as plain
# PyTorch does) and the gradient tile to 8 significant bits.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}


def check(n, v, d, call_id, dtype, *, chunk_tokens=7, logit_scale=1.0, seed=0, is_call=None, scale=None):
    hidden, weight, targets, mixed_calls, mixed_scale = make_inputs(n, v, d, dtype, seed=seed, logit_scale=logit_scale)
    is_call = mixed_calls if is_call is None else is_call
    scale = mixed_scale if scale is None else scale
    tol = TOLERANCE[dtype]
    lse_ref, target_ref, call_ref, grad_h_ref, grad_w_ref = reference(hidden, weight, targets, call_id, is_call, scale)

    lse, target_logit, call_logit = logit_stats(hidden, weight, targets, call_id, chunk_tokens=chunk_tokens)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Statistics are compared on the scale of the largest logit: bf16 logits are rounded, not their lse.
    logit_scale_floor = max(lse_ref.abs().max().item(), 1.0)
    for actual, expected in ((lse, lse_ref), (target_logit, target_ref), (call_logit, call_ref)):
        assert (actual.double() - expected).abs().max() <= tol * logit_scale_floor

    grad_h, grad_w = logit_grads(hidden, weight, targets, call_id, lse, call_logit, is_call, scale,
                                 chunk_tokens=chunk_tokens)
    assert grad_h.dtype == grad_w.dtype == dtype
    assert_close(grad_h, grad_h_ref, tol)
    assert_close(grad_w, grad_w_ref, tol)
    return grad_h, grad_w


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "v", "d", "call_id", "chunk_tokens"),
    [
        (37, 77, 40, 76, 7),  # odd sizes, a short last chunk, CALL last
        (37, 77, 40, 0, 37),  # one chunk, CALL first
        (37, 77, 40, 38, 1),  # one token per chunk, CALL in the middle
        (1, 50, 24, 49, None),  # a single token, the default chunking
        (64, 17, 16, 16, 16),  # exact multiples
    ],
)
def test_matches_reference(n, v, d, call_id, chunk_tokens, dtype):
    check(n, v, d, call_id, dtype, chunk_tokens=chunk_tokens)


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
    hidden, weight, targets, is_call, scale = make_inputs(0, 20, 16, torch.float32)
    lse, target_logit, call_logit = logit_stats(hidden, weight, targets, 19)
    assert lse.shape == target_logit.shape == call_logit.shape == (0,)
    grad_h, grad_w = logit_grads(hidden, weight, targets, 19, lse, call_logit, is_call, scale)
    assert grad_h.shape == (0, 16) and (grad_w == 0).all()


def test_auto_takes_the_table_and_plain_pytorch_elsewhere(monkeypatch):
    hidden = torch.zeros(2, 4)
    assert choose_implementation("auto", hidden) == "torch"
    monkeypatch.setitem(AUTO, ("cpu", torch.float32), "chunked")
    assert choose_implementation("auto", hidden) == "chunked"
    assert choose_implementation("torch", hidden) == "torch"
    with pytest.raises(ValueError, match="implementation"):
        choose_implementation("fused", hidden)
