"""The fused projection + LaCy cross-entropy kernels against a float64 plain-PyTorch reference.

Without CUDA the kernels run under the Triton interpreter, which must be switched on before the kernel
module is imported (``triton.jit`` decides at definition time).
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from projection_reference import (  # noqa: E402
    DEVICE,
    assert_close,
    check_against_reference,
    check_empty_batch,
    make_inputs,
    reference,
)

from lacy_stream.loss.fused_kernel import (  # noqa: E402
    FLOAT64_SUPPORTED,
    KernelConfig,
    logit_grads,
    logit_stats,
    triton_available,
)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1"),
]

SMALL_TILES = KernelConfig(block_n=16, block_v=16, block_d=16)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
# The lowest supported triton (CI tests it) has no float64 ``tl.dot``: its runs check float32 instead.
EXACT = torch.float64 if FLOAT64_SUPPORTED else torch.float32
NEEDS_FLOAT64 = pytest.mark.skipif(not FLOAT64_SUPPORTED, reason="float64 needs triton >= 3.5")
FLOAT64 = pytest.param(torch.float64, marks=NEEDS_FLOAT64)


def check(n, v, d, call_id, dtype, *, config=SMALL_TILES, **inputs):
    return check_against_reference(partial(logit_stats, config=config), partial(logit_grads, config=config),
                                   n, v, d, call_id, dtype, TOLERANCE[dtype], **inputs)


@pytest.mark.parametrize("dtype", [FLOAT64, torch.float32])
@pytest.mark.parametrize(
    ("n", "v", "d", "call_id"),
    [
        (37, 77, 40, 76),  # odd sizes, CALL alone at the end of the last partial vocabulary tile
        (37, 77, 40, 0),
        (37, 77, 40, 38),
        (1, 50, 24, 49),  # a single token
        (32, 64, 32, 63),  # exact multiples of the tiles
        (20, 17, 16, 16),  # the last vocabulary tile holds only the CALL column
    ],
)
def test_matches_reference(n, v, d, call_id, dtype):
    check(n, v, d, call_id, dtype)


@pytest.mark.parametrize(
    ("n", "v", "d", "call_id", "splits"),
    [
        (37, 77, 40, 76, 2),
        (37, 77, 40, 30, 3),
        (20, 17, 16, 16, 2),  # the second split holds only the CALL column: its partial log-sum-exp is -inf
    ],
)
def test_split_reductions_match_reference(n, v, d, call_id, splits):
    check(n, v, d, call_id, EXACT, config=KernelConfig(block_n=16, block_v=16, block_d=16, splits=splits))


def test_default_config_matches_reference():
    check(70, 150, 72, 149, EXACT, config=None)


@pytest.mark.parametrize(("dtype", "logit_scale"), [pytest.param(torch.float64, 1e4, marks=NEEDS_FLOAT64),
                                                     (torch.float32, 1e3)])
def test_large_logits(dtype, logit_scale):
    """Logits of magnitude ~1e3-1e4 give finite statistics and gradients (the running max absorbs them)."""
    check(37, 77, 40, 76, dtype, logit_scale=logit_scale, seed=1)


def test_large_logits_float32_statistics():
    hidden, weight, targets, is_call, scale = make_inputs(37, 77, 40, torch.float32, seed=2, logit_scale=1e4)
    lse_ref, target_ref, call_ref, *_ = reference(hidden, weight, targets, 76, is_call, scale)
    lse, target_logit, call_logit = logit_stats(hidden, weight, targets, 76, config=SMALL_TILES)
    assert lse_ref.abs().max() > 1e3
    for actual, expected in ((lse, lse_ref), (target_logit, target_ref), (call_logit, call_ref)):
        assert_close(actual, expected, 1e-5)


@pytest.mark.parametrize("dtype", [FLOAT64, torch.float32])
def test_all_calls(dtype):
    check(37, 77, 40, 5, dtype, is_call=torch.ones(37, dtype=torch.bool, device=DEVICE))


@pytest.mark.parametrize("dtype", [FLOAT64, torch.float32])
def test_no_calls(dtype):
    grad_h, grad_w = check(37, 77, 40, 76, dtype, is_call=torch.zeros(37, dtype=torch.bool, device=DEVICE))
    # Non-call tokens never push gradient into the CALL embedding.
    assert (grad_w[76] == 0).all()


def test_all_scales_zero_give_exact_zero_gradients():
    hidden, weight, targets, is_call, _ = make_inputs(37, 77, 40, EXACT)
    lse, _, call_logit = logit_stats(hidden, weight, targets, 76, config=SMALL_TILES)
    scale = torch.zeros(37, dtype=EXACT, device=DEVICE)
    grad_h, grad_w = logit_grads(hidden, weight, targets, 76, lse, call_logit, is_call, scale, config=SMALL_TILES)
    assert (grad_h == 0).all() and (grad_w == 0).all()


@pytest.mark.parametrize("dtype", [FLOAT64, torch.float32])
def test_ignored_tokens_with_out_of_range_targets(dtype):
    """Targets of -100 or >= V are never read: target_logit 0, and with scale 0 they add nothing,
    even when their statistics are garbage."""
    n, v, d, call_id = 37, 77, 40, 76
    hidden, weight, targets, is_call, scale = make_inputs(n, v, d, dtype, seed=3)
    ignored = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    ignored[::4] = True
    targets = torch.where(ignored, -100, targets)
    targets[1] = v + 5
    ignored[1] = True
    scale = torch.where(ignored, 0.0, scale)
    is_call = is_call & ~ignored

    lse, target_logit, call_logit = logit_stats(hidden, weight, targets, call_id, config=SMALL_TILES)
    assert (target_logit[ignored] == 0).all()
    lse_ref, target_ref, call_ref, grad_h_ref, grad_w_ref = reference(hidden, weight, targets, call_id, is_call, scale)
    tol = TOLERANCE[dtype]
    assert_close(lse, lse_ref, tol)
    assert_close(target_logit[~ignored], target_ref[~ignored], tol)
    assert_close(call_logit, call_ref, tol)

    garbage_lse = torch.where(ignored, float("nan"), lse)
    grad_h, grad_w = logit_grads(hidden, weight, targets, call_id, garbage_lse, call_logit, is_call, scale,
                                 config=SMALL_TILES)
    assert (grad_h[ignored] == 0).all()
    assert_close(grad_h, grad_h_ref, tol)
    assert_close(grad_w, grad_w_ref, tol)


def test_non_contiguous_inputs():
    hidden, weight, targets, is_call, scale = make_inputs(20, 40, 24, EXACT)
    hidden_t = hidden.T.contiguous().T
    weight_t = weight.T.contiguous().T
    assert not hidden_t.is_contiguous() and not weight_t.is_contiguous()
    lse, target_logit, call_logit = logit_stats(hidden_t, weight_t, targets, 3, config=SMALL_TILES)
    lse_ref, target_ref, call_ref, grad_h_ref, grad_w_ref = reference(hidden, weight, targets, 3, is_call, scale)
    tol = TOLERANCE[EXACT]
    assert_close(lse, lse_ref, tol)
    grad_h, grad_w = logit_grads(hidden_t, weight_t, targets, 3, lse, call_logit, is_call, scale, config=SMALL_TILES)
    assert_close(grad_h, grad_h_ref, tol)
    assert_close(grad_w, grad_w_ref, tol)


@pytest.mark.skipif(FLOAT64_SUPPORTED, reason="this triton takes float64")
def test_float64_on_an_older_triton_is_refused():
    hidden, weight, targets, *_ = make_inputs(8, 20, 16, torch.float64)
    with pytest.raises(ValueError, match="triton >= 3.5"):
        logit_stats(hidden, weight, targets, 3)


def test_empty_batch():
    check_empty_batch(logit_stats, logit_grads)


def test_invalid_inputs_raise_value_error():
    hidden, weight, targets, is_call, scale = make_inputs(8, 20, 16, torch.float32)
    with pytest.raises(ValueError, match="call_id"):
        logit_stats(hidden, weight, targets, 20)
    with pytest.raises(ValueError, match="call_id"):
        logit_stats(hidden, weight, targets, -1)
    with pytest.raises(ValueError, match="hidden"):
        logit_stats(hidden, weight[:, :8], targets, 3)
    with pytest.raises(ValueError, match="dtype"):
        logit_stats(hidden, weight.double(), targets, 3)
    with pytest.raises(ValueError, match="targets"):
        logit_stats(hidden, weight, targets[:4], 3)
    with pytest.raises(ValueError, match="targets"):
        logit_stats(hidden, weight, targets.float(), 3)
    with pytest.raises(ValueError, match="<CALL>"):
        logit_stats(hidden, weight[:1], targets, 0)
    lse, _, call_logit = logit_stats(hidden, weight, targets, 3)
    with pytest.raises(ValueError, match="is_call"):
        logit_grads(hidden, weight, targets, 3, lse, call_logit, is_call.int(), scale)
    with pytest.raises(ValueError, match="token_scale"):
        logit_grads(hidden, weight, targets, 3, lse, call_logit, is_call, scale[:5])
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(block_n=8, block_v=16, block_d=16)
