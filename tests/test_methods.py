"""All nine methods of Table 5 through the CLI; reference models (Rho-1, spaCy + RefLoss) end to end."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from helpers import logged, losses_by_step, overrides, spawn_gloo, synthetic_text, train_on_rank
from lacy_stream.cli import main as cli_main
from lacy_stream.config.job_config import ConfigError, load_job_config
from lacy_stream.loss.masks import METHODS
from lacy_stream.tokenizer import train_tokenizer
from lacy_stream.trainer.train import check_config, train


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, judged_corpus, tokenizer_path) -> Path:
    """A briefly trained baseline: the reference model of rho1 and spacy_refloss."""
    run_dir = tmp_path_factory.mktemp("reference") / "baseline"
    train(load_job_config(None, overrides(judged_corpus, tokenizer_path, run_dir, "--train.steps=3",
                                          "--loss.method=baseline")))
    return run_dir


@pytest.mark.timeout(180)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_through_the_cli(method, tmp_path, judged_corpus, tokenizer_path, reference_run):
    run_dir = tmp_path / method
    args = overrides(judged_corpus, tokenizer_path, run_dir, "--train.steps=3", f"--loss.method={method}",
                     "--checkpoint.export_hf=false")
    args.remove("--annotation.enabled=false")
    if METHODS[method].needs_reference:
        args.append(f"--loss.reference={reference_run}")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *args])
    assert exit_info.value.code == 0

    records = logged(run_dir)
    assert [record["step"] for record in records] == [1, 2, 3]
    last = records[-1]
    assert last["fact_ratio"] > 0 and last["call_shortfall"] >= 0
    if method == "baseline":
        assert last["call_ratio"] == 0
    else:
        assert last["call_ratio"] > 0 and last["call_loss"] > 0
    if method in ("rho1", "spacy", "lacy", "spacy_refloss", "lacy_ignorefacts", "lacy_ignore"):
        assert last["call_ratio"] == pytest.approx(0.15, abs=0.03)
    if METHODS[method].needs_reference:
        assert last["ref_loss"] > 0 and last["call_excess_loss"] is not None
    else:
        assert "ref_loss" not in last


@pytest.mark.timeout(120)
def test_rho1_calls_the_tokens_the_reference_finds_easier(tmp_path, judged_corpus, tokenizer_path, reference_run):
    run_dir = tmp_path / "rho1"
    train(load_job_config(None, overrides(judged_corpus, tokenizer_path, run_dir, "--train.steps=2",
                                          "--loss.method=rho1", f"--loss.reference={reference_run}",
                                          "--checkpoint.export_hf=false")))
    last = logged(run_dir)[-1]
    # Rho-1 calls the lowest excess losses: the called tokens' excess is below the average excess.
    assert last["call_excess_loss"] < last["excess_loss"]


def test_reference_settings_are_checked_at_start_up(tmp_path, judged_corpus, tokenizer_path, reference_run, capsys):
    with pytest.raises(ConfigError, match="set loss.reference"):
        check_config(load_job_config(None, ["--loss.method=spacy_refloss"]))
    with pytest.raises(ConfigError, match="unused by loss.method 'lacy'"):
        check_config(load_job_config(None, ["--loss.method=lacy", f"--loss.reference={reference_run}"]))

    other_tokenizer = tmp_path / "other.model"
    train_tokenizer([synthetic_text(random.Random(9), 20) for _ in range(200)], other_tokenizer, vocab_size=400)
    args = overrides(judged_corpus, str(other_tokenizer), tmp_path / "run", "--train.steps=1", "--loss.method=rho1",
                     f"--loss.reference={reference_run}")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *args])
    assert exit_info.value.code == 1 and "differs from this run's" in capsys.readouterr().err
    args = overrides(judged_corpus, tokenizer_path, tmp_path / "run", "--train.steps=1", "--loss.method=rho1",
                     f"--loss.reference={tmp_path / 'nothing-here'}")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *args])
    assert exit_info.value.code == 1 and "not a readable lacy-stream model" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_resumed_reference_run_continues_with_the_same_losses(tmp_path, judged_corpus, tokenizer_path, reference_run):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--checkpoint.export_hf=false", "--checkpoint.every=2", "--loss.method=rho1",
              f"--loss.reference={reference_run}")
    train(load_job_config(None, overrides(judged_corpus, tokenizer_path, straight, "--train.steps=4", *common)))
    train(load_job_config(None, overrides(judged_corpus, tokenizer_path, resumed, "--train.steps=2", *common)))
    train(load_job_config(None, overrides(judged_corpus, tokenizer_path, resumed, "--train.steps=4", *common)))
    expected, actual = losses_by_step(straight), losses_by_step(resumed)
    assert sorted(actual) == [1, 2, 3, 4]
    for step in (3, 4):
        assert actual[step] == pytest.approx(expected[step], abs=1e-6), step
    assert logged(resumed)[-1]["ref_loss"] == pytest.approx(logged(straight)[-1]["ref_loss"], abs=1e-6)


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_reference_method_on_two_gloo_ranks(tmp_path, judged_corpus, tokenizer_path, reference_run):
    run_dir = tmp_path / "two"
    args = overrides(judged_corpus, tokenizer_path, run_dir, "--train.steps=3", "--loss.method=spacy_refloss",
                     f"--loss.reference={reference_run}", "--checkpoint.export_hf=false")
    args.remove("--annotation.enabled=false")
    summaries = spawn_gloo(train_on_rank, 2, tmp_path, args)
    assert summaries[0]["step"] == summaries[1]["step"] == 3
    records = logged(run_dir)
    assert [record["step"] for record in records] == [1, 2, 3]
    for record in records:
        # one budget over both ranks' micro-batches: round(0.15 x valid) calls, all on facts
        assert record["call_ratio"] == pytest.approx(0.15, abs=0.01)
        assert record["ref_loss"] > 0 and record["fact_ratio"] >= record["call_ratio"]
