"""Probe windows: per-token loss trajectories recorded at every validation, exact through a resume, and what
``compare`` makes of them."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import make_corpus, overrides
from lacy_stream.config.job_config import ConfigError, load_job_config
from lacy_stream.eval.compare import TrajectorySummary
from lacy_stream.labels import TokenClass
from lacy_stream.trainer.probes import PROBES_DIRECTORY, Trajectories, read_trajectories, step_file
from lacy_stream.trainer.train import train


@pytest.fixture
def corpus(tmp_path):
    make_corpus(tmp_path / "corpus", shards=2, docs_per_shard=4)
    return tmp_path / "corpus"


def probe_overrides(corpus, tokenizer_path, run_dir, steps: int) -> list[str]:
    return overrides(corpus, tokenizer_path, run_dir, f"--train.steps={steps}", f"--train.val_shards={corpus}",
                     "--train.val_every=2", "--train.val_batches=1", "--train.probe_windows=2",
                     "--checkpoint.every=2", "--checkpoint.export_hf=false")


@pytest.mark.timeout(120)
def test_probes_are_recorded_at_every_validation_and_a_resume_records_the_same(tmp_path, corpus, tokenizer_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(load_job_config(None, probe_overrides(corpus, tokenizer_path, straight, 4)))
    train(load_job_config(None, probe_overrides(corpus, tokenizer_path, resumed, 2)))
    stale = resumed / PROBES_DIRECTORY / step_file(3)  # as if an interrupted run had recorded past its checkpoint
    stale.write_bytes(b"not a probe file")
    train(load_job_config(None, probe_overrides(corpus, tokenizer_path, resumed, 4)))

    recorded = read_trajectories(straight)
    assert recorded.steps == [2, 4] and read_trajectories(resumed).steps == [2, 4] and not stale.exists()
    assert recorded.tokens.shape == (2, 33) and recorded.learned_loss.shape == (2, 2, 32)
    for name in ("tokens", "token_class", "valid", "learned_loss", "call_logprob", "called", "call_target"):
        np.testing.assert_array_equal(getattr(recorded, name), getattr(read_trajectories(resumed), name), err_msg=name)
    valid = recorded.valid
    assert (recorded.learned_loss[:, valid] > 0).all() and (recorded.call_logprob <= 0).all()
    # the model's calls: the call_ratio share (15%) of each window's valid targets
    assert (recorded.called.sum(axis=2) == np.round(0.15 * valid.sum(axis=1))).all()


def test_probes_need_held_out_shards(tmp_path, corpus, tokenizer_path):
    config = load_job_config(None, overrides(corpus, tokenizer_path, tmp_path, "--train.probe_windows=2"))
    with pytest.raises(ConfigError, match="train.probe_windows.*train.val_shards"):
        train(config)


def test_a_trajectory_summary_averages_fact_and_other_targets():
    fact, other, ignored = TokenClass.FACT, TokenClass.OTHER, TokenClass.IGNORE
    token_class = np.array([[fact, other, fact, ignored]])
    trajectories = Trajectories(
        steps=[10, 20], tokens=np.zeros((1, 5), dtype=np.int64), token_class=token_class,
        valid=token_class != ignored,
        learned_loss=np.array([[[4.0, 2.0, 6.0, 9.0]], [[1.0, 1.5, 3.0, 9.0]]]),
        call_logprob=np.zeros((2, 1, 4)), called=np.array([[[True, False, False, False]], [[True, False, True, False]]]),
        call_target=np.zeros((2, 1, 4), dtype=bool),
    )
    summary = TrajectorySummary.of(trajectories)
    assert summary.steps == [10, 20]
    assert summary.fact_loss == [5.0, 2.0] and summary.other_loss == [2.0, 1.5]
    assert summary.facts_called == [0.5, 1.0]
