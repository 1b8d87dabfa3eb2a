"""The chunked LaCy statistics and gradients (``implementation="chunked"``) against the float64 reference,
with the row kernels in Triton (under its interpreter on the CPU, see conftest.py) and in PyTorch."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from projection_reference import (
    DEVICE,
    assert_close,
    check_against_reference,
    check_empty_batch,
    make_inputs,
    reference,
)

from lacy_stream.loss import row_kernels
from lacy_stream.loss.chunked import logit_grads, logit_stats
from lacy_stream.loss.implementation import AUTO, choose_implementation

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
