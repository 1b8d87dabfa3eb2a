"""The learning-rate schedule: linear warmup to the peak, then constant (the paper) or cosine down to
``min_lr_ratio`` of the peak at the last step."""

from __future__ import annotations

import pytest

from lacy_stream.config.job_config import OptimizerConfig
from lacy_stream.trainer.optimizer import lr_factor

TOTAL_STEPS = 20
COSINE = OptimizerConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_warmup_rises_linearly_to_the_peak(schedule):
    config = OptimizerConfig(warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    assert [lr_factor(step, config, TOTAL_STEPS) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_falls_from_the_peak_to_min_lr_ratio_at_the_last_step_and_stays_there():
    after_warmup = [lr_factor(step, COSINE, TOTAL_STEPS) for step in range(4, TOTAL_STEPS + 1)]
    assert after_warmup[0] == 1.0
    assert all(later < earlier for earlier, later in zip(after_warmup, after_warmup[1:]))
    assert lr_factor(12, COSINE, TOTAL_STEPS) == pytest.approx(0.55)  # halfway: halfway between peak and floor
    assert after_warmup[-1] == pytest.approx(0.1)
    assert lr_factor(TOTAL_STEPS + 5, COSINE, TOTAL_STEPS) == pytest.approx(0.1)


def test_constant_keeps_the_peak_after_warmup():
    constant = OptimizerConfig(warmup_steps=4, schedule="constant")
    assert {lr_factor(step, constant, TOTAL_STEPS) for step in range(4, TOTAL_STEPS + 5)} == {1.0}
