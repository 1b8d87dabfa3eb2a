"""Call policies: at which generation steps the small model hands the next token to its cascade partner.

At every step the generator shows the policy the step's next-token logits (full vocabulary, ``<CALL>``
included, repetition penalty applied) and the ids so far; the policy answers whether this step is a call.

* :class:`ArgmaxCall`: plain LaCy, a call whenever ``<CALL>`` has the top logit.
* :class:`NeverCall`: never a call (the fact-leakage evaluation and the no-cascade baselines).
* :class:`CalibratedCall`: a call when the ``<CALL>`` logit passes a running-quantile threshold that keeps
  the realised call rate at a target (Appendix A.5: models are compared at an equal call budget).
* :class:`ILacyCall`: inference-time-only LaCy (Appendix E.5.3): spaCy judges on the fly whether the
  model's proposed token is a fact, and only fact positions are delegated, by thresholding the model's
  uncertainty with the same running-quantile controller.
* :class:`RandomCall`: a call with a fixed probability at each step (the i-LaCy random baseline).

A policy counts its steps and calls over its whole life: reuse one object over many prompts for one
budget across all of them, or make a new one per prompt.
"""

from __future__ import annotations

import bisect
import math
import os
import random
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from ..labels import TokenClass
from ..tokenizer import Tokenizer

if TYPE_CHECKING:  # spaCy loads only when an i-LaCy policy is made
    from ..annotate.annotation import FactAnnotator

ILACY_TOP_K = 20
"""i-LaCy's entropy is taken over the renormalised top-20 next-token distribution (Appendix E.5.3)."""

Uncertainty = Literal["logprob", "entropy"]

CALIBRATION_WINDOW = 256
CALIBRATION_HORIZON = 32.0
"""See :class:`CallRateController`: over 256 steps whose scores drift steadily (a worst case for a lagging
quantile), a 15% target gave 5-17% calls with horizon 32, 1-19% with 64 and 10-16% with 16; on stationary
scores 86%, 89% and 82% of the calls went to the top 15% of scores."""


class CallPolicy(ABC):
    """Decides, step by step, whether the step is a call; counts steps and calls."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.steps = 0
        self.calls = 0

    def decide(self, logits: torch.Tensor, context_ids: Sequence[int]) -> bool:
        """Whether this step is a call, given its logits [vocab_size] and the ids before it (prompt included)."""
        call = self._is_call(logits, context_ids)
        self.steps += 1
        self.calls += call
        return call

    @abstractmethod
    def _is_call(self, logits: torch.Tensor, context_ids: Sequence[int]) -> bool: ...

    @property
    def wants_prompt(self) -> bool:
        """Whether :meth:`prime` would use the prompt's ``<CALL>`` logits (generation computes them only then)."""
        return False

    def prime(self, prompt_call_logits: Sequence[float]) -> None:
        """The ``<CALL>`` logit at each position of the prompt, before the generation's first step."""

    @property
    def call_rate(self) -> float:
        return self.calls / self.steps if self.steps else 0.0

    def state_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot of the policy's settings and counters, for reports."""
        return {"policy": self.name, "steps": self.steps, "calls": self.calls, "call_rate": self.call_rate}


class ArgmaxCall(CallPolicy):
    """Plain LaCy: the step is a call when ``<CALL>`` is the model's top token."""

    name = "argmax"

    def __init__(self, call_id: int) -> None:
        super().__init__()
        self.call_id = call_id

    def _is_call(self, logits: torch.Tensor, context_ids: Sequence[int]) -> bool:
        return int(logits.argmax()) == self.call_id


class NeverCall(CallPolicy):
    """No step is a call: the model generates alone, as if its ``<CALL>`` logit were -inf."""

    name = "never"

    def _is_call(self, logits: torch.Tensor, context_ids: Sequence[int]) -> bool:
        return False


class RandomCall(CallPolicy):
    """Each step is a call with probability ``rate``, independent of the model (seeded, reproducible)."""

    name = "random"

    def __init__(self, rate: float, *, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"random call rate must be in [0, 1], got {rate}")
        self.rate = rate
        self.seed = seed
        self._rng = random.Random(seed)

    def _is_call(self, logits: torch.Tensor, context_ids: Sequence[int]) -> bool:
        return self._rng.random() < self.rate

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"rate": self.rate, "seed": self.seed}


class CallRateController:
    """A threshold on a per-step score that keeps the call rate at ``target``, whatever the scores do.

    The paper thresholds the ``<CALL>`` logit at a running quantile and notes that, because the logits drift
    during a generation, a 15% target ends up as about 22% calls. Here the quantile level is steered by the
    calls made so far, so the realised rate tracks the target itself:

    * Scores of the last ``window`` eligible steps are kept sorted. A step is a call when its score is in
      the top ``level`` fraction of that window with the step's own score included (fewer than
      ``level · n`` of the ``n`` scores exceed it; tied scores count as half above, half below), i.e. when
      it passes the running ``(1 - level)``-quantile. Counting the step's own score decides the very first
      step too, without a warm-up.
    * ``debt`` is how many calls the policy is behind its budget: each step adds ``target`` and each call
      subtracts 1. The level asks for the calls the budget expects over the next ``horizon`` steps plus the
      debt, spread over the eligible steps expected among them::

          level = clip((target + debt / horizon) / eligible_fraction, 0, 1)

      where ``eligible_fraction`` is the share of eligible steps among the last ``window`` steps (always 1
      unless some steps cannot be calls, as non-fact positions in i-LaCy).

    With stationary scores the quantile alone gives the target and the debt stays within a few calls. When
    the scores drift (the lagging window lets too many or too few steps pass) the debt grows until the level
    compensates, so the error in the number of calls stays around ``horizon`` times the quantile's error
    instead of growing with the length of the generation: the realised rate converges to the target.
    A smaller ``horizon`` tracks tighter but makes the level (and so the threshold) noisier. The debt is
    clipped to ±``horizon``, where the level already saturates at 0 or 1, so a stretch in which the
    target cannot be met (too few eligible steps) is not paid back later by a burst of calls.
    """

    def __init__(
        self, target: float, *, window: int = CALIBRATION_WINDOW, horizon: float = CALIBRATION_HORIZON
    ) -> None:
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"target call rate must be in [0, 1], got {target}")
        if window < 1 or horizon <= 0:
            raise ValueError(f"window must be at least 1 and horizon positive, got {window} and {horizon}")
        self.target = target
        self.window = window
        self.horizon = horizon
        self.debt = 0.0
        self.level = target
        self._scores: deque[float] = deque()
        self._sorted_scores: list[float] = []
        self._eligible: deque[bool] = deque(maxlen=window)

    def decide(self, score: float) -> bool:
        """Whether an eligible step with this score is a call."""
        self._eligible.append(True)
        self._remember(score)
        self.level = self._level()
        below = bisect.bisect_left(self._sorted_scores, score)
        not_above = bisect.bisect_right(self._sorted_scores, score)
        # Rank from the top; equal scores share their middle rank, so a run of ties is not all called.
        rank = len(self._sorted_scores) - not_above + (not_above - below - 1) / 2
        return self._settle(rank < self.level * len(self._sorted_scores))

    def skip(self) -> None:
        """A step that cannot be a call; it still counts towards the budget."""
        self._eligible.append(False)
        self._settle(False)

    @property
    def is_empty(self) -> bool:
        """Whether no score has been seen yet."""
        return not self._scores

    def observe(self, scores: Sequence[float]) -> None:
        """Scores of steps that are not decided (a prompt's) into the window, when it is still empty: the first
        decisions of a generation then compare with a quantile instead of with only the scores before them."""
        if self.is_empty:
            for score in scores[-self.window :]:
                self._remember(score)

    def _remember(self, score: float) -> None:
        if len(self._scores) == self.window:
            oldest = self._scores.popleft()
            del self._sorted_scores[bisect.bisect_left(self._sorted_scores, oldest)]
        self._scores.append(score)
        bisect.insort(self._sorted_scores, score)

    def _level(self) -> float:
        eligible_fraction = sum(self._eligible) / len(self._eligible)
        return min(1.0, max(0.0, (self.target + self.debt / self.horizon) / eligible_fraction))

    def _settle(self, call: bool) -> bool:
        self.debt = min(self.horizon, max(-self.horizon, self.debt + self.target - call))
        return call

    def state_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "window": self.window,
            "horizon": self.horizon,
            "debt": self.debt,
            "level": self.level,
        }


class CalibratedCall(CallPolicy):
    """A call when the ``<CALL>`` logit passes a running quantile steered to the ``target`` call rate.

    Pass one object to many generations for one budget over all of them; see :class:`CallRateController`.
    The first generation's prompt fills the quantile's window before its first step (a short generation would
    otherwise call at its first steps, whose window holds only themselves).
    """

    name = "calibrated"

    def __init__(
        self,
        call_id: int,
        target: float = 0.15,
        *,
        window: int = CALIBRATION_WINDOW,
        horizon: float = CALIBRATION_HORIZON,
    ) -> None:
        super().__init__()
        self.call_id = call_id
        self.controller = CallRateController(target, window=window, horizon=horizon)

    @property
    def wants_prompt(self) -> bool:
        return self.controller.is_empty

    def prime(self, prompt_call_logits: Sequence[float]) -> None:
        self.controller.observe(prompt_call_logits)

    def _is_call(self, logits: torch.Tensor, context_ids: Sequence[int]) -> bool:
        return self.controller.decide(float(logits[self.call_id]))

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | self.controller.state_dict()


class ILacyCall(CallPolicy):
    """Inference-time-only LaCy (Appendix E.5.3), for models trained without ``<CALL>``.

    The model's proposed token (its top token other than ``<CALL>``) is appended to the text so far and
    spaCy annotates that text with the training rules (:mod:`lacy_stream.annotate.annotation`). Only when the
    word the proposed token starts or continues is a fact may the step be a call; the model's uncertainty
    then decides, thresholded by a :class:`CallRateController` steered to ``target`` over all steps:

    * ``"logprob"``: the negative log-probability of the proposed token;
    * ``"entropy"``: the entropy of the top-20 next-token distribution, renormalised.

    A token that adds only whitespace, or only the start of a multi-byte character, is no fact and skips
    spaCy; the byte that completes the character is judged with its word.
    """

    name = "ilacy"

    def __init__(
        self,
        tokenizer: Tokenizer,
        uncertainty: Uncertainty = "logprob",
        target: float = 0.15,
        *,
        annotator: FactAnnotator | None = None,
        window: int = CALIBRATION_WINDOW,
        horizon: float = CALIBRATION_HORIZON,
    ) -> None:
        super().__init__()
        if uncertainty not in ("logprob", "entropy"):
            raise ValueError(f"i-LaCy uncertainty must be 'logprob' or 'entropy', got {uncertainty!r}")
        if annotator is None:
            from ..annotate.annotation import FactAnnotator

            annotator = FactAnnotator()
        self.tokenizer = tokenizer
        self.uncertainty = uncertainty
        self.annotator = annotator
        self.controller = CallRateController(target, window=window, horizon=horizon)
        self.fact_steps = 0

    def _is_call(self, logits: torch.Tensor, context_ids: Sequence[int]) -> bool:
        logits = without_call(logits, self.tokenizer.call_id)
        proposed = int(logits.argmax())
        if not self.proposes_fact(context_ids, proposed):
            self.controller.skip()
            return False
        self.fact_steps += 1
        score = negative_top_logprob(logits) if self.uncertainty == "logprob" else top_k_entropy(logits)
        return self.controller.decide(score)

    def proposes_fact(self, context_ids: Sequence[int], proposed: int) -> bool:
        """Whether token ``proposed`` after ``context_ids`` starts or continues a fact word."""
        before = self.tokenizer.decode(context_ids)
        after = self.tokenizer.decode([*context_ids, proposed])
        # A byte that completes a character replaces the "\ufffd" that its first bytes decoded to.
        added = after[len(os.path.commonprefix([before, after])) :]
        begin, end = len(after) - len(added.lstrip()), len(after)
        if begin == end or "\ufffd" in added:
            return False
        words = self.annotator.annotate_text(after)
        overlapping = (words.begin < end) & (words.end > begin)
        return bool((words.classes[overlapping] == TokenClass.FACT).any())

    def state_dict(self) -> dict[str, Any]:
        return (
            super().state_dict()
            | {"policy": f"ilacy-{self.uncertainty}", "fact_steps": self.fact_steps}
            | self.controller.state_dict()
        )


def without_call(logits: torch.Tensor, call_id: int) -> torch.Tensor:
    """The logits with ``<CALL>`` at -inf, i.e. the model's distribution over real tokens."""
    logits = logits.clone()
    logits[call_id] = -math.inf
    return logits


def negative_top_logprob(logits: torch.Tensor) -> float:
    """-log p of the most likely token."""
    return float(-torch.log_softmax(logits.float(), dim=-1).max())


def top_k_entropy(logits: torch.Tensor, k: int = ILACY_TOP_K) -> float:
    """Entropy (nats) of the ``k`` most likely tokens' distribution, renormalised over them."""
    top = logits.float().topk(min(k, logits.numel())).values
    top = top[top.isfinite()]  # a tiny vocabulary's top k may reach the masked <CALL>
    logprobs = torch.log_softmax(top, dim=-1)
    return float(-(logprobs.exp() * logprobs).sum())


POLICY_NAMES = ("argmax", "calibrated", "never", "ilacy-logprob", "ilacy-entropy", "random")
DEFAULT_POLICY = "calibrated"
"""Of ``generate`` and ``eval``: ``argmax`` calls at nearly every step of a briefly trained model, whose ``<CALL>``
logit only rises during training."""
DEFAULT_CALL_RATE = 0.15
"""The paper's 15% target realised about 22% calls (Appendix A.5); the calibrated policy realises its target, so
0.22 gives the paper's call budget."""


def policy_from_name(name: str, tokenizer: Tokenizer, call_rate: float, *, seed: int = 0) -> CallPolicy:
    """The policy the command line calls ``name``; ``call_rate`` is the target or random rate where one applies."""
    if name == "argmax":
        return ArgmaxCall(tokenizer.call_id)
    if name == "never":
        return NeverCall()
    if name == "calibrated":
        return CalibratedCall(tokenizer.call_id, call_rate)
    if name in ("ilacy-logprob", "ilacy-entropy"):
        return ILacyCall(tokenizer, name.removeprefix("ilacy-"), call_rate)
    if name == "random":
        return RandomCall(call_rate, seed=seed)
    raise ValueError(f"unknown call policy {name!r}; known: {', '.join(POLICY_NAMES)}")
