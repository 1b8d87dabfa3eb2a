"""Call and ignore masks for every method of the paper's Table 5, selected over a whole micro-batch.

``METHODS`` is the one table of methods: each entry names the per-token labels it needs and its selection
function; the config's accepted values, the input checks, the table of docs/loss-and-methods.md and ``train --help`` come from
it. Adding a method is one entry plus its function.

Selections are *global*: with a process group, the tokens of the micro-batch on every data-parallel rank
compete for one budget (an all-gather of one key per token; cheap next to a training step), so a batch
split over several ranks gets exactly the masks it would get on one rank. Ties go to the lower global
token index (rank-major order). Random choices (``loss_based``, ``spacy``) draw from a counter-based hash
of (seed, step, global token index), so they too do not depend on how the batch is split.

Budgets: ``k = round(call_ratio * valid tokens)``. When a method has fewer eligible tokens than ``k`` (fewer
facts than the budget), all eligible tokens are called and the shortfall is reported.

No value is read back from the device: counts and budgets are 0-dim tensors, and a top-k keeps the tokens
whose rank in the sorted keys is below the budget, so a selection never waits for the GPU (and a step
could be captured in a CUDA graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ..config.job_config import ConfigError, LossConfig
from ..labels import JUDGE_CALL, TokenClass, TokenLabels
from ..markdown import markdown_table
from .implementation import IMPLEMENTATIONS


@dataclass
class MaskInputs:
    """Per-token inputs of one micro-batch on this rank, all ``[N]``.

    ``token_loss`` is the model's own loss of the target (CE without ``<CALL>``); ``valid`` is False for EOS
    targets, padding and other ignore positions; ``labels`` holds what the data says about each target.
    """

    token_loss: Tensor
    valid: Tensor
    labels: TokenLabels = field(default_factory=TokenLabels)


@dataclass
class Masks:
    call: Tensor
    ignore: Tensor
    valid_tokens: Tensor
    """Valid tokens of the micro-batch over all ranks of the selection (0-dim int64)."""
    wanted_calls: Tensor
    """The call budget k (0-dim int64); ``call`` holds ``wanted_calls - call_shortfall`` calls over all ranks."""
    call_shortfall: Tensor


@dataclass
class _Choice:
    """What a method's selection function returns: its masks and the calls it wanted (0-dim int64)."""

    call: Tensor
    wanted_calls: Tensor
    ignore: Tensor | None = None


@dataclass
class _Request:
    """What a method's selection function gets."""

    inputs: MaskInputs
    selection: "_Selection"
    valid_tokens: Tensor
    call_ratio: float
    ignore_ratio: float
    seed: int
    step: int

    @property
    def valid(self) -> Tensor:
        return self.inputs.valid

    @property
    def budget(self) -> Tensor:
        return _rounded_share(self.call_ratio, self.valid_tokens)

    @property
    def facts(self) -> Tensor:
        return self.valid & (self.inputs.labels.token_class == TokenClass.FACT)

    def uniform(self) -> Tensor:
        return self.selection.uniform(self.seed, self.step)


def _baseline(request: _Request) -> _Choice:
    return _Choice(call=torch.zeros_like(request.valid), wanted_calls=torch.zeros_like(request.valid_tokens))


def _loss_based(request: _Request) -> _Choice:
    call = request.valid & (request.uniform() < request.call_ratio)
    return _Choice(call=call, wanted_calls=request.selection.total(call))


def _rho1(request: _Request) -> _Choice:
    excess = request.inputs.token_loss - request.inputs.labels.ref_loss
    # Rho-1 trains on the tokens whose loss is furthest above the reference's; the rest are called.
    call = request.selection.top_k(-excess, request.valid, request.budget)
    return _Choice(call=call, wanted_calls=request.budget)


def _llm_judge(request: _Request) -> _Choice:
    judge = request.inputs.labels.judge
    delegated = judge if judge.dtype == torch.bool else judge == JUDGE_CALL
    call = request.valid & delegated
    return _Choice(call=call, wanted_calls=request.selection.total(call))


def _spacy(request: _Request) -> _Choice:
    call = request.selection.top_k(request.uniform(), request.facts, request.budget)
    return _Choice(call=call, wanted_calls=request.budget)


def _spacy_refloss(request: _Request) -> _Choice:
    call = request.selection.top_k(request.inputs.labels.ref_loss, request.facts, request.budget)
    return _Choice(call=call, wanted_calls=request.budget)


def _lacy(request: _Request) -> _Choice:
    call = request.selection.top_k(request.inputs.token_loss, request.facts, request.budget)
    return _Choice(call=call, wanted_calls=request.budget)


def _lacy_ignorefacts(request: _Request) -> _Choice:
    choice = _lacy(request)
    choice.ignore = request.facts & ~choice.call
    return choice


def _lacy_ignore(request: _Request) -> _Choice:
    choice = _lacy_ignorefacts(request)
    remaining = _rounded_share(request.ignore_ratio, request.valid_tokens) - request.selection.total(choice.ignore)
    other = request.valid & (request.inputs.labels.token_class == TokenClass.OTHER)
    choice.ignore = choice.ignore | request.selection.top_k(request.inputs.token_loss, other, remaining)
    return choice


@dataclass(frozen=True)
class Method:
    name: str
    call_mask: str
    """The call mask, in words (the table of docs/loss-and-methods.md and ``train --help``)."""
    ignore_mask: str
    needs: frozenset[str]
    """The :class:`TokenLabels` fields the selection reads."""
    select: Callable[[_Request], _Choice]

    @property
    def needs_reference(self) -> bool:
        return "ref_loss" in self.needs


def _method(name, call_mask, select, needs=(), ignore_mask="none") -> tuple[str, Method]:
    return name, Method(name, call_mask, ignore_mask, frozenset(needs), select)


_FACTS = ("token_class",)
METHODS: dict[str, Method] = dict([
    _method("baseline", "none", _baseline),
    _method("loss_based", "Bernoulli(15%)", _loss_based),
    _method("rho1", "bottom 15% of own loss − reference loss", _rho1, needs=("ref_loss",)),
    _method("llm_judge", "the LLM-judge labels of the data", _llm_judge, needs=("judge",)),
    _method("spacy", "uniform sample of fact tokens, 15% of tokens", _spacy, needs=_FACTS),
    _method("lacy", "fact tokens with the highest own loss, 15% of tokens", _lacy, needs=_FACTS),
    _method("spacy_refloss", "fact tokens with the highest reference loss, 15%", _spacy_refloss,
            needs=("token_class", "ref_loss")),
    _method("lacy_ignorefacts", "as `lacy`", _lacy_ignorefacts, needs=_FACTS, ignore_mask="the remaining facts"),
    _method("lacy_ignore", "as `lacy`", _lacy_ignore, needs=_FACTS,
            ignore_mask="the remaining facts + highest-loss non-fact, non-grammar tokens, up to 15%"),
])
"""The paper's Table 5, in its order."""


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def methods_table() -> str:
    """The methods as a markdown table (docs/loss-and-methods.md's and ``train --help``'s)."""
    return markdown_table(
        ["method", "call mask", "ignore mask", "needs"],
        [
            [f"`{method.name}`", method.call_mask, method.ignore_mask, ", ".join(sorted(method.needs)) or "—"]
            for method in METHODS.values()
        ],
    )


def check_loss_config(loss: LossConfig) -> None:
    """The ``[loss]`` section's method, implementation and reference, as this package knows them."""
    if loss.method not in METHODS:
        raise ConfigError(f"loss.method: {loss.method!r} is not one of {', '.join(METHODS)}")
    if loss.implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"loss.implementation: {loss.implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    needs_reference = METHODS[loss.method].needs_reference
    if needs_reference and not loss.reference:
        raise ConfigError(
            f"loss.method {loss.method!r} selects by a reference model's loss: set loss.reference to its run "
            "directory, checkpoint or Hugging Face export (e.g. a baseline run on the same tokenizer)"
        )
    if loss.reference and not needs_reference:
        users = ", ".join(name for name, method in METHODS.items() if method.needs_reference)
        raise ConfigError(
            f"loss.reference is set but unused by loss.method {loss.method!r} (only {users} use a reference); "
            "remove it"
        )


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
    chosen = get_method(method)
    _check_inputs(chosen, inputs, call_ratio, ignore_ratio)
    selection = _Selection(inputs.valid.shape[0], inputs.valid.device, group)
    request = _Request(inputs, selection, selection.total(inputs.valid), call_ratio, ignore_ratio, seed, step)
    choice = chosen.select(request)
    ignore = choice.ignore if choice.ignore is not None else torch.zeros_like(inputs.valid)
    shortfall = choice.wanted_calls - selection.total(choice.call)
    return Masks(
        call=choice.call, ignore=ignore, valid_tokens=request.valid_tokens, wanted_calls=choice.wanted_calls,
        call_shortfall=shortfall,
    )


def _rounded_share(ratio: float, count: Tensor) -> Tensor:
    """``round(ratio * count)`` as a 0-dim int64 tensor (half to even, as Python's ``round``)."""
    return torch.round(ratio * count.double()).long()


def _check_inputs(method: Method, inputs: MaskInputs, call_ratio: float, ignore_ratio: float) -> None:
    if not (0.0 <= call_ratio <= 1.0 and 0.0 <= ignore_ratio <= 1.0):
        raise ValueError(f"call_ratio and ignore_ratio must lie in [0, 1], got {call_ratio}, {ignore_ratio}")
    missing = method.needs - inputs.labels.available()
    if missing:
        raise ValueError(f"method {method.name!r} needs per-token {', '.join(sorted(missing))}, and the batch has none")
    shape = inputs.valid.shape
    values = {"token_loss": inputs.token_loss, **{name: getattr(inputs.labels, name) for name in method.needs}}
    for name, value in values.items():
        if value.shape != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    judge = inputs.labels.judge
    if "judge" in method.needs and judge.dtype != torch.bool and judge.is_floating_point():
        raise ValueError(f"judge must be a bool mask or the JUDGE_* label column, got {judge.dtype}")


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
            self._check_equal_sizes()

    def _check_equal_sizes(self) -> None:
        """Every rank must select over as many tokens as this one (checked once per group and size: the check
        reads a value back from the device)."""
        key = (id(self.group), self.local_tokens)
        if key in _CHECKED_SIZES:
            return
        sizes = self._gather(torch.full((1,), self.local_tokens, device=self.device))
        if bool((sizes != self.local_tokens).any()):
            raise ValueError(f"global selection needs equal micro-batches on every rank, got sizes {sizes.tolist()}")
        _CHECKED_SIZES.add(key)

    def _gather(self, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts)

    def total(self, mask: Tensor) -> Tensor:
        """How many tokens ``mask`` holds over all ranks, as a 0-dim int64 tensor."""
        count = mask.sum(dtype=torch.int64)
        if self.group is not None:
            dist.all_reduce(count, group=self.group)
        return count

    def top_k(self, keys: Tensor, eligible: Tensor, k: Tensor) -> Tensor:
        """The (at most) ``k`` eligible tokens with the largest keys; ties to the lower global index."""
        keys = torch.where(eligible, keys, torch.full_like(keys, float("-inf")))
        if self.group is not None:
            keys, eligible = self._gather(keys), self._gather(eligible)
        order = torch.sort(keys, descending=True, stable=True).indices
        rank_in_order = torch.empty_like(order)
        rank_in_order[order] = torch.arange(order.shape[0], device=order.device)
        selected = eligible & (rank_in_order < k)
        start = self.rank * self.local_tokens
        return selected[start : start + self.local_tokens]

    def uniform(self, seed: int, step: int) -> Tensor:
        """Uniform [0, 1) numbers, one per token, a function of (seed, step, global token index)."""
        start = self.rank * self.local_tokens
        index = torch.arange(start, start + self.local_tokens, device=self.device, dtype=torch.int64)
        stream = _as_int64(_splitmix64_of_int((seed * 0x100000001B3 + step) % (1 << 64)))
        bits = _splitmix64(index ^ stream)
        return _logical_shift(bits, 11).double() / float(1 << 53)


_CHECKED_SIZES: set[tuple[int, int]] = set()
"""(process group, tokens per rank) pairs whose equal sizes over the ranks have been checked."""

_MASK_64 = (1 << 64) - 1
_SPLITMIX_INCREMENT = 0x9E3779B97F4A7C15
_SPLITMIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _logical_shift(value: Tensor, bits: int) -> Tensor:
    return (value >> bits) & ((1 << (64 - bits)) - 1)


def _as_int64(constant: int) -> int:
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _splitmix64(value: Tensor) -> Tensor:
    """The splitmix64 finalizer on int64 tensors (wrapping arithmetic, logical shifts)."""
    first, second = (_as_int64(multiplier) for multiplier in _SPLITMIX_MULTIPLIERS)
    value = value + _as_int64(_SPLITMIX_INCREMENT)
    value = (value ^ _logical_shift(value, 30)) * first
    value = (value ^ _logical_shift(value, 27)) * second
    return value ^ _logical_shift(value, 31)


def _splitmix64_of_int(value: int) -> int:
    """:func:`_splitmix64` of one unsigned 64-bit Python int, computed on the host (no tensor to copy over)."""
    first, second = _SPLITMIX_MULTIPLIERS
    value = (value + _SPLITMIX_INCREMENT) & _MASK_64
    value = ((value ^ (value >> 30)) * first) & _MASK_64
    value = ((value ^ (value >> 27)) * second) & _MASK_64
    return value ^ (value >> 31)
