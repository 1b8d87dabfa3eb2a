"""Validation losses of a calling model over its own call mask (paper Appendix A.4.3, Figure 5).

A calling model is validated on the tokens it would call on and on those it would produce itself, so its
call mask C_M has to be decoded from the model first. Per batch of windows, C_M holds exactly
``round(call_ratio · valid tokens)`` positions (15% in the paper):

* every position where ``<CALL>`` has the top logit, when there are at most that many; the ones with the
  highest ``<CALL>`` logits when there are more (capped);
* when there are fewer, the positions with the next highest ``<CALL>`` logits fill the budget.

With C_M fixed, three losses follow:

* call loss (Eq. A.5): the mean NLL of the true next token at C_M positions, under the *full* softmax; a
  model that learned to call on a token puts little mass on the token itself, so this loss is high;
* non-call loss (Eq. A.6): the mean NLL of the true next token at the other positions, with ``<CALL>``
  excluded from the softmax (what the model produces when it does not call);
* total loss: both sums over all valid tokens, i.e. every token scored the way its mask says.

A baseline (a model trained without calls, same tokenizer) is scored on the *same* C_M: its call loss then
says how hard the tokens the calling model delegates are a priori, and the difference to the calling
model's call loss how much less the calling model learned about them. Masks are selected per batch of
``batch_size`` windows, as the paper selects them per batch; a different batch size changes them slightly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..annotate.label_cache import file_digest
from ..inference.loading import LacyModel
from ..markdown import markdown_table
from .heldout import pack_windows
from .config import PAPER_CALL_RATIO
from .scoring import TokenStatistics, token_statistics


def call_mask(call_logit: Tensor, call_is_top: Tensor, valid: Tensor, *, call_ratio: float) -> Tensor:
    """C_M over one batch (any shape): ``round(call_ratio · valid)`` positions, ``<CALL>``-top ones first.

    Positions are ranked by (``<CALL>`` is the top logit, ``<CALL>`` logit), both descending, and the first
    ones are taken: all top positions come before all others, so the cap keeps the top positions with the
    highest logits and the fill adds the other positions with the highest logits. Ties go to the earlier
    position.
    """
    if not 0.0 <= call_ratio <= 1.0:
        raise ValueError(f"call_ratio must be in [0, 1], got {call_ratio}")
    flat_valid = valid.flatten()
    positions = flat_valid.nonzero().squeeze(1)
    budget = round(call_ratio * positions.numel())
    by_logit = torch.argsort(call_logit.flatten()[positions], descending=True, stable=True)
    is_top = call_is_top.flatten()[positions][by_logit].to(torch.int8)
    ranked = by_logit[torch.argsort(is_top, descending=True, stable=True)]
    mask = torch.zeros_like(flat_valid)
    mask[positions[ranked[:budget]]] = True
    return mask.view_as(valid)


@dataclass
class MaskedLosses:
    """Call, non-call and total loss of one model on one sequence of call masks."""

    call_loss: float
    non_call_loss: float
    total_loss: float


class _LossSums:
    """Running sums of NLLs and counts, in float64 so that long validation sets do not lose precision."""

    def __init__(self) -> None:
        self.call = self.non_call = 0.0
        self.calls = self.non_calls = 0

    def add(self, stats: TokenStatistics, mask: Tensor, valid: Tensor) -> None:
        non_call = valid & ~mask
        self.call -= float(stats.full_logprob[mask].double().sum())
        self.non_call -= float(stats.no_call_logprob[non_call].double().sum())
        self.calls += int(mask.sum())
        self.non_calls += int(non_call.sum())

    def losses(self) -> MaskedLosses:
        return MaskedLosses(
            call_loss=self.call / max(self.calls, 1),
            non_call_loss=self.non_call / max(self.non_calls, 1),
            total_loss=(self.call + self.non_call) / max(self.calls + self.non_calls, 1),
        )


@dataclass
class ValidationResult:
    documents: int
    tokens: int
    """Valid target tokens scored."""
    call_ratio: float
    """The share of tokens in C_M (the budget)."""
    calls: int
    """Positions in C_M over all batches."""
    top_call_rate: float
    """Share of tokens where ``<CALL>`` had the top logit, before capping or filling."""
    model: MaskedLosses
    baseline: MaskedLosses | None
    """The baseline on the model's masks; None without a baseline."""

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        rows = [("model", self.model)] + ([("baseline on the model's C_M", self.baseline)] if self.baseline else [])
        lines = [
            f"{self.tokens} tokens of {self.documents} documents; C_M = {self.calls} positions "
            f"({self.call_ratio:.0%} per batch); `<CALL>` was the top logit at {self.top_call_rate:.2%} of tokens.",
            "",
            markdown_table(
                ["scored by", "call loss (A.5)", "non-call loss (A.6)", "total loss"],
                [
                    [name, f"{losses.call_loss:.4f}", f"{losses.non_call_loss:.4f}", f"{losses.total_loss:.4f}"]
                    for name, losses in rows
                ],
            ),
        ]
        return "\n".join(lines)


def evaluate_validation(
    lacy: LacyModel,
    texts: Sequence[str],
    *,
    baseline: LacyModel | None = None,
    batch_size: int = 8,
    call_ratio: float = PAPER_CALL_RATIO,
) -> ValidationResult:
    """Validation losses of ``lacy`` (and of ``baseline`` on ``lacy``'s call masks) on ``texts``.

    Texts are packed into windows of the model's context length; batches of ``batch_size`` windows are
    scored under ``torch.inference_mode``.
    """
    if not texts:
        raise ValueError("no held-out texts to validate on")
    if baseline is not None:
        _check_comparable(lacy, baseline)
    tokenizer = lacy.tokenizer
    windows = pack_windows(
        (tokenizer.encode(text) for text in texts), eos_id=tokenizer.eos_id, seq_len=lacy.model.args.max_seq_len
    )
    model_sums, baseline_sums = _LossSums(), _LossSums()
    calls = top_calls = 0
    for first in range(0, len(windows.tokens), batch_size):
        tokens = windows.tokens[first : first + batch_size].to(lacy.device)
        valid = windows.valid[first : first + batch_size].to(lacy.device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        stats = token_statistics(lacy.model, inputs, targets, call_id=lacy.call_id)
        mask = call_mask(stats.call_logit, stats.call_is_top, valid, call_ratio=call_ratio)
        model_sums.add(stats, mask, valid)
        calls += int(mask.sum())
        top_calls += int((stats.call_is_top & valid).sum())
        if baseline is not None:
            on_baseline = baseline.device
            baseline_stats = token_statistics(
                baseline.model, inputs.to(on_baseline), targets.to(on_baseline), call_id=baseline.call_id
            )
            baseline_sums.add(baseline_stats, mask.to(on_baseline), valid.to(on_baseline))
    tokens_scored = int(windows.valid.sum())
    return ValidationResult(
        documents=len(texts),
        tokens=tokens_scored,
        call_ratio=call_ratio,
        calls=calls,
        top_call_rate=top_calls / max(tokens_scored, 1),
        model=model_sums.losses(),
        baseline=baseline_sums.losses() if baseline is not None else None,
    )


def _check_comparable(lacy: LacyModel, baseline: LacyModel) -> None:
    """A baseline scores the model's windows and masks: it needs the same ids and at least the same context."""
    if file_digest(lacy.tokenizer.model_path) != file_digest(baseline.tokenizer.model_path):
        raise ValueError(
            f"the baseline {baseline.source} uses another tokenizer than {lacy.source}; "
            "call masks can only be compared on the same token ids"
        )
    if baseline.model.args.max_seq_len < lacy.model.args.max_seq_len:
        raise ValueError(
            f"the baseline's context ({baseline.model.args.max_seq_len}) is shorter than the model's "
            f"({lacy.model.args.max_seq_len}); it cannot score the model's windows"
        )
