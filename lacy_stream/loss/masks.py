"""Call and ignore masks for every method of the paper's Table 5, selected over a whole micro-batch.

Selections are *global*: with a process group, the tokens of the micro-batch on every data-parallel rank
compete for one budget (an all-gather of one key per token; cheap next to a training step), so a batch
split over several ranks gets exactly the masks it would get on one rank. Ties go to the lower global
token index (rank-major order). Random choices (``loss_based``, ``spacy``) draw from a counter-based hash
of (seed, step, global token index), so they too do not depend on how the batch is split.

Budgets: ``k = round(call_ratio * valid tokens)``. When a method has fewer eligible tokens than ``k`` (fewer
facts than the budget), all eligible tokens are called and the shortfall is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..labels import TokenClass

METHODS = (
    "baseline",
    "loss_based",
    "rho1",
    "llm_judge",
    "spacy",
    "lacy",
    "spacy_refloss",
    "lacy_ignorefacts",
    "lacy_ignore",
)
_NEEDS_CLASSES = {"spacy", "lacy", "spacy_refloss", "lacy_ignorefacts", "lacy_ignore"}
_NEEDS_REFERENCE = {"rho1", "spacy_refloss"}
_NEEDS_JUDGE = {"llm_judge"}


@dataclass
class MaskInputs:
    """Per-token inputs of one micro-batch on this rank, all ``[N]``.

    ``token_loss`` is the model's own loss of the target (CE without ``<CALL>``), ``ref_loss`` a reference
    model's loss of the same target; ``valid`` is False for EOS targets, padding and other ignore positions.
    """

    token_loss: Tensor
    valid: Tensor
    token_class: Tensor | None = None
    judge: Tensor | None = None
    ref_loss: Tensor | None = None


@dataclass
class Masks:
    call: Tensor
    ignore: Tensor
    valid_tokens: int
    """Valid tokens of the micro-batch over all ranks of the selection."""
    wanted_calls: int
    """The call budget k; ``call`` holds ``wanted_calls - call_shortfall`` calls over all ranks."""
    call_shortfall: int


def select_masks(
    method: str,
    inputs: MaskInputs,
    *,
    call_ratio: float = 0.15,
    ignore_ratio: float = 0.15,
    seed: int = 0,
    step: int = 0,
    group: dist.ProcessGroup | None = None,
) -> Masks:
    """Masks for ``method``; with ``group``, selected over the micro-batch of every rank in it."""
    _check_inputs(method, inputs, call_ratio, ignore_ratio)
    selection = _Selection(inputs.valid.shape[0], inputs.valid.device, group)
    valid = inputs.valid
    valid_tokens = selection.total(valid)
    budget = round(call_ratio * valid_tokens)
    nothing = torch.zeros_like(valid)
    fact = valid & (inputs.token_class == TokenClass.FACT) if method in _NEEDS_CLASSES else nothing
    ignore = nothing

    if method == "baseline":
        call = nothing
        budget = 0
    elif method == "loss_based":
        call = valid & (selection.uniform(seed, step) < call_ratio)
        budget = selection.total(call)
    elif method == "rho1":
        call = selection.top_k(inputs.ref_loss - inputs.token_loss, valid, budget)
    elif method == "llm_judge":
        call = valid & inputs.judge
        budget = selection.total(call)
    elif method == "spacy":
        call = selection.top_k(selection.uniform(seed, step), fact, budget)
    elif method == "spacy_refloss":
        call = selection.top_k(inputs.ref_loss, fact, budget)
    else:  # lacy and its ignore variants
        call = selection.top_k(inputs.token_loss, fact, budget)
        if method in ("lacy_ignorefacts", "lacy_ignore"):
            ignore = fact & ~call
        if method == "lacy_ignore":
            remaining = round(ignore_ratio * valid_tokens) - selection.total(ignore)
            other = valid & (inputs.token_class == TokenClass.OTHER)
            ignore = ignore | selection.top_k(inputs.token_loss, other, max(remaining, 0))
    shortfall = budget - selection.total(call)
    return Masks(call=call, ignore=ignore, valid_tokens=valid_tokens, wanted_calls=budget, call_shortfall=shortfall)


def _check_inputs(method: str, inputs: MaskInputs, call_ratio: float, ignore_ratio: float) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if not (0.0 <= call_ratio <= 1.0 and 0.0 <= ignore_ratio <= 1.0):
        raise ValueError(f"call_ratio and ignore_ratio must lie in [0, 1], got {call_ratio}, {ignore_ratio}")
    needed = {
        "token_class": method in _NEEDS_CLASSES,
        "ref_loss": method in _NEEDS_REFERENCE,
        "judge": method in _NEEDS_JUDGE,
    }
    for name, is_needed in needed.items():
        if is_needed and getattr(inputs, name) is None:
            raise ValueError(f"method {method!r} needs per-token {name}, and the batch has none")
    shape = inputs.valid.shape
    for name in ("token_loss", "token_class", "judge", "ref_loss"):
        value = getattr(inputs, name)
        if value is not None and value.shape != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")


class _Selection:
    """Counting, ranking and hashing over the tokens of this rank or of every rank in ``group``."""

    def __init__(self, local_tokens: int, device: torch.device, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.local_tokens = local_tokens
        self.device = device
        if group is None:
            self.world, self.rank = 1, 0
        else:
            self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
            sizes = self._gather(torch.tensor([local_tokens], device=device))
            if bool((sizes != local_tokens).any()):
                raise ValueError(f"global selection needs equal micro-batches on every rank, got sizes {sizes.tolist()}")

    def _gather(self, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts)

    def total(self, mask: Tensor) -> int:
        count = mask.sum(dtype=torch.int64).reshape(1)
        if self.group is not None:
            dist.all_reduce(count, group=self.group)
        return int(count.item())

    def top_k(self, keys: Tensor, eligible: Tensor, k: int) -> Tensor:
        """The (at most) ``k`` eligible tokens with the largest keys; ties to the lower global index."""
        if k <= 0:
            return torch.zeros_like(eligible)
        keys = torch.where(eligible, keys.float(), torch.tensor(float("-inf"), device=keys.device))
        if self.group is not None:
            keys, eligible = self._gather(keys), self._gather(eligible)
        order = torch.sort(keys, descending=True, stable=True).indices
        chosen = order[: min(k, int(eligible.sum()))]
        selected = torch.zeros_like(eligible)
        selected[chosen] = True
        start = self.rank * self.local_tokens
        return selected[start : start + self.local_tokens]

    def uniform(self, seed: int, step: int) -> Tensor:
        """Uniform [0, 1) numbers, one per token, a function of (seed, step, global token index)."""
        start = self.rank * self.local_tokens
        index = torch.arange(start, start + self.local_tokens, device=self.device, dtype=torch.int64)
        mixed = _as_int64((seed * 0x100000001B3 + step) % (1 << 64))
        stream = _splitmix64(torch.tensor([mixed], dtype=torch.int64, device=self.device))
        bits = _splitmix64(index ^ stream)
        return _logical_shift(bits, 11).double() / float(1 << 53)


def _logical_shift(value: Tensor, bits: int) -> Tensor:
    return (value >> bits) & ((1 << (64 - bits)) - 1)


def _as_int64(constant: int) -> int:
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _splitmix64(value: Tensor) -> Tensor:
    """The splitmix64 finalizer on int64 tensors (wrapping arithmetic, logical shifts)."""
    value = value + _as_int64(0x9E3779B97F4A7C15)
    value = (value ^ _logical_shift(value, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    value = (value ^ _logical_shift(value, 27)) * _as_int64(0x94D049BB133111EB)
    return value ^ _logical_shift(value, 31)
