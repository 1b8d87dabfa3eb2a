"""The LaCy loss (paper Sec. 4, Appendix A.4, Eq. A.3/A.4) from final hidden states and the output embedding.

Per valid target token:
- delegated (call mask):   ``-log p(<CALL>)`` under the full softmax;
- learned:                 ``-log p_without_CALL(target)``, the softmax with the ``<CALL>`` logit excluded;
- ignored (ignore mask):   nothing.
The sum is divided by the number of valid tokens of the micro-batch over all ranks of the selection group,
so the losses of the ranks add up to the loss of the whole micro-batch, whatever its split.

The implementations (:mod:`.implementation`: ``torch``, ``triton``, ``chunked``) share the mask selection
(:mod:`.masks`). All but ``torch`` make one pass for the per-token statistics without keeping the ``[N, V]``
logits, and recompute them in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .implementation import IMPLEMENTATIONS  # noqa: F401  (re-exported: the values loss.implementation takes)
from .implementation import choose_implementation, recomputing_kernels
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
    method: str = "lacy",
    token_class: Tensor | None = None,
    judge: Tensor | None = None,
    ref_loss: Tensor | None = None,
    call_ratio: float = 0.15,
    ignore_ratio: float = 0.15,
    seed: int = 0,
    step: int = 0,
    group: dist.ProcessGroup | None = None,
    implementation: str = "auto",
) -> LossOutput:
    """LaCy loss of ``hidden`` [N, D] against ``targets`` [N] with output embedding ``weight`` [V, D].

    ``valid`` [N] marks the targets that count (not EOS, not padding); ``token_class`` (:class:`TokenClass`),
    ``judge`` (LLM-judge call labels) and ``ref_loss`` (a reference model's per-token loss) are needed by
    the methods that use them. ``group`` selects the masks over the micro-batches of all its ranks
    (``None``: this rank alone).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not 0 <= call_id < weight.shape[0]:
        raise ValueError(f"call_id {call_id} outside the vocabulary of {weight.shape[0]}")
    implementation = choose_implementation(implementation, hidden)
    valid = valid & (targets >= 0) & (targets < weight.shape[0])
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))

    recomputing = implementation != "torch"
    if recomputing:
        kernels = recomputing_kernels(implementation)
        with torch.no_grad():
            lse_nocall, target_logit, call_logit = kernels.logit_stats(hidden, weight, safe_targets, call_id)
    else:
        logits = F.linear(hidden, weight).float()
        call_logit = logits[:, call_id]
        lse_nocall = torch.logsumexp(logits.index_fill(1, torch.tensor([call_id], device=logits.device), float("-inf")), dim=1)
        target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)

    learned_loss = lse_nocall - target_logit
    call_loss = torch.logaddexp(lse_nocall, call_logit) - call_logit
    masks = select_masks(
        method,
        MaskInputs(learned_loss.detach(), valid, token_class, judge, ref_loss),
        call_ratio=call_ratio,
        ignore_ratio=ignore_ratio,
        seed=seed,
        step=step,
        group=group,
    )
    learned = valid & ~masks.call & ~masks.ignore
    token_weight = (learned | masks.call).float() / max(masks.valid_tokens, 1)

    if recomputing:
        loss = _RecomputedLacyLoss.apply(
            kernels.logit_grads, hidden, weight, safe_targets, call_id, lse_nocall, call_logit, masks.call,
            token_weight, torch.where(masks.call, call_loss, learned_loss),
        )
    else:
        loss = (torch.where(masks.call, call_loss, learned_loss) * token_weight).sum()
    return LossOutput(loss=loss, learned_loss=learned_loss.detach(), call_loss=call_loss.detach(), masks=masks)


class _RecomputedLacyLoss(torch.autograd.Function):
    """Sum of ``token_weight * token_loss``; backward recomputes the logits in ``logit_grads``."""

    @staticmethod
    def forward(ctx, logit_grads, hidden, weight, targets, call_id, lse_nocall, call_logit, is_call, token_weight,
                token_loss):
        ctx.save_for_backward(hidden, weight, targets, lse_nocall, call_logit, is_call, token_weight)
        ctx.call_id = call_id
        ctx.logit_grads = logit_grads
        return (token_loss * token_weight).sum()

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, targets, lse_nocall, call_logit, is_call, token_weight = ctx.saved_tensors
        grad_hidden, grad_weight = ctx.logit_grads(
            hidden, weight, targets, ctx.call_id, lse_nocall, call_logit, is_call, token_weight * grad_output
        )
        return None, grad_hidden, grad_weight, None, None, None, None, None, None, None
