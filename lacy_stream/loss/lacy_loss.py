"""The LaCy loss (paper Sec. 4, Appendix A.4, Eq. A.3/A.4) from final hidden states and the output embedding.

Per valid target token:
- delegated (call mask):   ``-log p(<CALL>)`` under the full softmax;
- learned:                 ``-log p_without_CALL(target)``, the softmax with the ``<CALL>`` logit excluded;
- ignored (ignore mask):   nothing.
The sum is divided by the number of valid tokens of the micro-batch over all ranks of the selection group,
so the losses of the ranks add up to the loss of the whole micro-batch, whatever its split.

The implementations (:mod:`.implementation`: ``torch``, ``chunked``) share the mask selection
(:mod:`.masks`). ``torch`` computes full logits (fp32, fp64 for fp64 inputs) and is the CPU path and the
test oracle; ``chunked`` makes one pass for the per-token statistics without keeping the ``[N, V]`` logits,
and recomputes them in backward.

The output embedding may have more rows than the vocabulary (``vocab_size``): padding rows that make its
matmuls aligned. They are no token: every softmax leaves them out, so they get no gradient.

Nothing here reads a value from the device: masks, budgets and counts stay tensors, so a training step can
queue its work without waiting for the GPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..labels import TokenLabels
from . import chunked
from .implementation import IMPLEMENTATIONS  # noqa: F401  (re-exported: the values loss.implementation takes)
from .implementation import choose_implementation
from .masks import MaskInputs, Masks, select_masks


@dataclass
class LossOutput:
    loss: Tensor
    """Scalar with gradient: this rank's share of the micro-batch loss (the shares add up over ranks)."""
    learned_loss: Tensor
    """[N], detached: ``-log p_without_CALL(target)`` for every token (whether learned, called or ignored)."""
    call_loss: Tensor
    """[N], detached: ``-log p(<CALL>)`` for every token."""
    masks: Masks


def lacy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    valid: Tensor,
    *,
    call_id: int,
    vocab_size: int | None = None,
    method: str = "lacy",
    labels: TokenLabels | None = None,
    call_ratio: float = 0.15,
    ignore_ratio: float = 0.15,
    seed: int = 0,
    step: int = 0,
    group: dist.ProcessGroup | None = None,
    implementation: str = "auto",
) -> LossOutput:
    """LaCy loss of ``hidden`` [N, D] against ``targets`` [N] with output embedding ``weight`` [V, D].

    Rows of ``weight`` from ``vocab_size`` on (default: none) are padding. ``valid`` [N] marks the targets
    that count (not EOS, not padding); ``labels`` holds the per-target
    labels (fact class, judge label, reference loss, each [N]) that the method needs (see
    :data:`.masks.METHODS`). ``group`` selects the masks over the micro-batches of all its ranks
    (``None``: this rank alone). Losses are computed in fp32 for fp16/bf16 inputs and in fp64 for fp64.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    vocab_size = _checked_vocab_size(vocab_size, weight)
    if not 0 <= call_id < vocab_size:
        raise ValueError(f"call_id {call_id} outside the vocabulary of {vocab_size}")
    implementation = choose_implementation(implementation, hidden)
    valid = valid & (targets >= 0) & (targets < vocab_size)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))

    recomputing = implementation != "torch"
    with torch.no_grad() if recomputing else nullcontext():
        lse_nocall, target_logit, call_logit = logit_stats(
            hidden, weight, safe_targets, call_id, vocab_size=vocab_size, implementation=implementation
        )

    learned_loss = lse_nocall - target_logit
    call_loss = torch.logaddexp(lse_nocall, call_logit) - call_logit
    masks = select_masks(
        method,
        MaskInputs(learned_loss.detach(), valid, labels or TokenLabels()),
        call_ratio=call_ratio,
        ignore_ratio=ignore_ratio,
        seed=seed,
        step=step,
        group=group,
    )
    learned = valid & ~masks.call & ~masks.ignore
    token_weight = (learned | masks.call).to(learned_loss.dtype) / masks.valid_tokens.clamp(min=1)

    if recomputing:
        loss = _RecomputedLacyLoss.apply(
            hidden, weight, safe_targets, call_id, vocab_size, lse_nocall, call_logit, masks.call, token_weight,
            torch.where(masks.call, call_loss, learned_loss),
        )
    else:
        loss = (torch.where(masks.call, call_loss, learned_loss) * token_weight).sum()
    return LossOutput(loss=loss, learned_loss=learned_loss.detach(), call_loss=call_loss.detach(), masks=masks)


def logit_stats(
    hidden: Tensor, weight: Tensor, targets: Tensor, call_id: int, *, vocab_size: int | None = None,
    implementation: str = "torch",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per token of ``hidden`` [N, D]: (logsumexp of the logits without ``<CALL>``, the target's logit, the
    ``<CALL>`` logit), in fp32 (fp64 for fp64 inputs). Every loss of a LaCy model follows from these three:
    the learned loss is ``lse - target``, the call loss ``logaddexp(lse, call) - call``. Rows of ``weight``
    from ``vocab_size`` on are padding.

    ``implementation``: ``torch`` holds the ``[N, V]`` logits (differentiable); ``chunked`` never holds them
    all (no gradient; see :mod:`.implementation`).
    """
    vocab_size = _checked_vocab_size(vocab_size, weight)
    if implementation == "chunked":
        return chunked.logit_stats(hidden, weight, targets, call_id, vocab_size=vocab_size)
    return logit_stats_of(F.linear(hidden, weight[:vocab_size]), targets, call_id)


def logit_stats_of(logits: Tensor, targets: Tensor, call_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`logit_stats` of full logits ``[..., V]`` that a caller holds anyway (evaluation)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    call_logit = logits[..., call_id].clone()  # not a view: callers may reuse the logits
    without_call = logits.index_fill(-1, torch.full((1,), call_id, device=logits.device), float("-inf"))
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(without_call, dim=-1), target_logit, call_logit


def _checked_vocab_size(vocab_size: int | None, weight: Tensor) -> int:
    if vocab_size is None:
        return weight.shape[0]
    if not 2 <= vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size {vocab_size} must lie in [2, {weight.shape[0]}] (the rows of the weight)")
    return vocab_size


class _RecomputedLacyLoss(torch.autograd.Function):
    """Sum of ``token_weight * token_loss``; backward recomputes the logits in :func:`.chunked.logit_grads`."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, call_id, vocab_size, lse_nocall, call_logit, is_call, token_weight,
                token_loss):
        ctx.save_for_backward(hidden, weight, targets, lse_nocall, call_logit, is_call, token_weight)
        ctx.call_id = call_id
        ctx.vocab_size = vocab_size
        return (token_loss * token_weight).sum()

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, targets, lse_nocall, call_logit, is_call, token_weight = ctx.saved_tensors
        grad_hidden, grad_weight = chunked.logit_grads(
            hidden, weight, targets, ctx.call_id, lse_nocall, call_logit, is_call, token_weight * grad_output,
            vocab_size=ctx.vocab_size,
        )
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None
