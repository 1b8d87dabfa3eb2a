"""The LaCy loss against an fp64 reference, F.linear_cross_entropy, and across 2 gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import spawn_gloo
from lacy_stream.labels import TokenClass, TokenLabels
from lacy_stream.loss import METHODS, lacy_loss

N, D, V = 48, 24, 37


def make_batch(seed: int = 0, n: int = N, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=generator, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, D, generator=generator, dtype=torch.float64) * 0.5).to(dtype)
    targets = torch.randint(0, V - 1, (n,), generator=generator)
    valid = torch.rand(n, generator=generator) > 0.1
    targets[~valid] = -100
    token_class = torch.randint(0, 3, (n,), generator=generator).to(torch.int8)
    labels = TokenLabels(
        token_class=token_class,
        judge=torch.rand(n, generator=generator) < 0.2,
        ref_loss=torch.rand(n, generator=generator) * 5,
    )
    return hidden, weight, targets, valid, labels


def reference_loss(hidden, weight, targets, valid, call, ignore, call_id):
    """Eq. A.4 in fp64 with the masks given."""
    logits = hidden.double() @ weight.double().T
    without_call = logits.clone()
    without_call[:, call_id] = float("-inf")
    safe = torch.where(valid, targets, 0)
    learned = torch.logsumexp(without_call, 1) - logits.gather(1, safe[:, None]).squeeze(1)
    delegated = torch.logsumexp(logits, 1) - logits[:, call_id]
    learn = valid & ~call & ~ignore
    return ((learned * learn).sum() + (delegated * call).sum()) / valid.sum()


PADDING = 11
"""Padding rows of the weight in the padded cases (V + 11 = 48, the next multiple of 16)."""


@pytest.mark.parametrize("padded", [False, True], ids=["V", "V padded"])
@pytest.mark.parametrize("implementation", ["torch", "chunked"])
@pytest.mark.parametrize("method", METHODS)
def test_loss_and_gradients_match_fp64(method, implementation, padded):
    """Every method and implementation against Eq. A.4 in fp64; padding rows of the weight never change the
    loss and get no gradient."""
    hidden, weight, targets, valid, labels = make_batch()
    if padded:
        weight = torch.cat([weight, torch.randn(PADDING, D, generator=torch.Generator().manual_seed(7))])
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = lacy_loss(hidden, weight, targets, valid, call_id=V - 1, vocab_size=V, method=method,
                    implementation=implementation, labels=labels)
    out.loss.backward()

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight[:V].detach().double().requires_grad_(True)
    expected = reference_loss(h64, w64, targets, valid, out.masks.call, out.masks.ignore, V - 1)
    expected.backward()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad[:V].double(), w64.grad, rtol=1e-4, atol=1e-6)
    assert (weight.grad[V:] == 0).all()


def test_vocab_size_outside_the_weight_is_refused():
    hidden, weight, targets, valid, labels = make_batch()
    with pytest.raises(ValueError, match="vocab_size 38 must lie in"):
        lacy_loss(hidden, weight, targets, valid, call_id=V - 1, vocab_size=V + 1, method="baseline")
    with pytest.raises(ValueError, match="call_id 40 outside the vocabulary of 37"):
        lacy_loss(hidden, torch.cat([weight, weight[:5]]), targets, valid, call_id=40, vocab_size=V, method="baseline")


@pytest.mark.parametrize("method", ["lacy", "lacy_ignore", "rho1"])
def test_torch_path_keeps_fp64_to_fp64_precision(method):
    """fp64 inputs are computed in fp64 (not downcast): the torch path is an fp64-exact oracle."""
    hidden, weight, targets, valid, labels = make_batch(5, dtype=torch.float64)
    hidden.requires_grad_(True)
    out = lacy_loss(hidden, weight, targets, valid, call_id=V - 1, method=method, implementation="torch", labels=labels)
    out.loss.backward()
    assert out.loss.dtype == torch.float64 and out.learned_loss.dtype == torch.float64
    h64 = hidden.detach().clone().requires_grad_(True)
    expected = reference_loss(h64, weight, targets, valid, out.masks.call, out.masks.ignore, V - 1)
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hidden.grad, h64.grad, rtol=1e-12, atol=1e-14)


def test_learned_loss_equals_linear_cross_entropy_with_call_masked():
    hidden, weight, targets, valid, labels = make_batch(1)
    call_id = 5
    targets = torch.where(targets == call_id, 0, targets)
    out = lacy_loss(hidden, weight, targets, valid, call_id=call_id, method="baseline", implementation="torch")
    bias = torch.zeros(V)
    bias[call_id] = float("-inf")
    oracle = F.linear_cross_entropy(hidden, weight, torch.where(valid, targets, -100), linear_bias=bias, reduction="none", ignore_index=-100)
    torch.testing.assert_close(out.learned_loss[valid], oracle[valid])
    torch.testing.assert_close(out.loss, oracle[valid].mean())


def test_calls_are_trained_towards_call_and_ignored_tokens_get_no_gradient():
    hidden, weight, targets, valid, labels = make_batch(2)
    valid[:] = True
    labels.token_class[:] = TokenClass.FACT
    hidden.requires_grad_(True)
    out = lacy_loss(hidden, weight, targets, valid, call_id=V - 1, method="lacy_ignorefacts", implementation="torch", labels=labels)
    out.loss.backward()
    ignored = out.masks.ignore
    assert ignored.any() and out.masks.call.any()
    assert torch.all(hidden.grad[ignored] == 0)
    # A step against the gradient raises p(<CALL>) on called tokens.
    with torch.no_grad():
        stepped = hidden - 1.0 * hidden.grad
        before = F.log_softmax(hidden @ weight.T, 1)[:, V - 1]
        after = F.log_softmax(stepped @ weight.T, 1)[:, V - 1]
    assert (after[out.masks.call] > before[out.masks.call]).float().mean() > 0.9


def test_no_valid_token_gives_a_zero_loss():
    hidden, weight, targets, valid, labels = make_batch(3)
    valid[:] = False
    out = lacy_loss(hidden.requires_grad_(True), weight, targets, valid, call_id=V - 1, method="lacy", implementation="torch", labels=labels)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(hidden.grad == 0)


def _two_rank_worker(rank: int, world: int) -> tuple:
    hidden, weight, targets, valid, labels = make_batch(4, n=2 * N)
    part = slice(rank * N, (rank + 1) * N)
    weight.requires_grad_(True)
    local_hidden = hidden[part].clone().requires_grad_(True)
    out = lacy_loss(
        local_hidden, weight, targets[part], valid[part], call_id=V - 1, method="lacy_ignore",
        implementation="torch", group=dist.group.WORLD,
        labels=TokenLabels(**{name: getattr(labels, name)[part] for name in labels.available()}),
    )
    out.loss.backward()
    return out.loss.detach(), local_hidden.grad, weight.grad


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_two_ranks_add_up_to_one_process(tmp_path):
    results = spawn_gloo(_two_rank_worker, 2, tmp_path)
    hidden, weight, targets, valid, labels = make_batch(4, n=2 * N)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = lacy_loss(hidden, weight, targets, valid, call_id=V - 1, method="lacy_ignore", implementation="torch", labels=labels)
    out.loss.backward()
    torch.testing.assert_close(results[0][0] + results[1][0], out.loss.detach())
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), hidden.grad)
    torch.testing.assert_close(results[0][2] + results[1][2], weight.grad)
