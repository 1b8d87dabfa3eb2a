"""One trainer per run directory; a resume that keeps the run's meaning; the config's history; RNG streams that a
resumed run continues exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, make_corpus
from lacy_stream.checkpoint import CheckpointManager
from lacy_stream.cli import main as cli_main
from lacy_stream.config.job_config import ConfigError, load_job_config
from lacy_stream.trainer.run_directory import HISTORY_FILE, RunDirectoryBusyError, RunLock
from lacy_stream.trainer.train import train


def run_args(corpus: Path, tokenizer_path: str, run_dir: Path, *extra: str) -> list[str]:
    return [f"--data.shards={corpus}", f"--tokenizer.path={tokenizer_path}", f"--train.run_dir={run_dir}",
            "--model.preset=tiny", "--model.max_seq_len=32", "--data.seq_len=32", "--data.batch_size=2",
            "--data.num_workers=0", "--annotation.enabled=false", "--train.log_every=1",
            "--checkpoint.export_hf=false", *extra]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    make_corpus(tmp_path / "corpus", shards=2, docs_per_shard=4)
    return tmp_path / "corpus"


def test_a_second_holder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lacy_stream.trainer.run_directory import RunLock\n"
         f"with RunLock({str(tmp_path)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusyError, match=rf"in use by another trainer \(pid {holder.pid} on "):
            RunLock(tmp_path).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead holder's lock
        pass


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_a_second_trainer_on_a_live_run_is_refused_in_one_line(tmp_path, corpus, tokenizer_path):
    run_dir = tmp_path / "run"
    args = run_args(corpus, tokenizer_path, run_dir, "--train.steps=100000", "--checkpoint.every=100000")
    first = subprocess.Popen([sys.executable, "-m", "lacy_stream", "train", *args], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "metrics.jsonl").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "lacy_stream", "train", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=90)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"{run_dir} is in use by another trainer (pid {first.pid}" in second.stderr.strip().splitlines()[-1]


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_resuming_with_another_method_or_learning_rate_is_refused_unless_allowed(tmp_path, corpus, tokenizer_path,
                                                                                capsys):
    run_dir = tmp_path / "run"
    train(load_job_config(None, run_args(corpus, tokenizer_path, run_dir, "--train.steps=2")))
    changed = run_args(corpus, tokenizer_path, run_dir, "--train.steps=4", "--loss.method=spacy", "--optimizer.lr=1e-3")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *changed])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss.method: 'lacy' -> 'spacy'" in error and "optimizer.lr: 0.0002 -> 0.001" in error
    assert "--checkpoint.allow_config_change=true" in error
    assert json.loads((run_dir / "config.json").read_text())["loss"]["method"] == "lacy"  # untouched

    # Settings that do not change the run (its length, its logging) need no permission.
    train(load_job_config(None, run_args(corpus, tokenizer_path, run_dir, "--train.steps=3", "--train.log_every=3")))
    summary = train(load_job_config(None, [*changed, "--checkpoint.allow_config_change=true"]))
    assert summary["step"] == 4
    history = [json.loads(line) for line in (run_dir / HISTORY_FILE).read_text().splitlines()]
    assert [entry["resumed_from_step"] for entry in history] == [None, 2, 3]
    assert [entry["config"]["loss"]["method"] for entry in history] == ["lacy", "lacy", "spacy"]
    with pytest.raises(ConfigError):  # the stored config is now the changed one: going back is a change too
        train(load_job_config(None, run_args(corpus, tokenizer_path, run_dir, "--train.steps=5")))


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_a_resumed_run_ends_with_the_rng_state_of_a_straight_run(tmp_path, corpus, tokenizer_path):
    """Python, numpy and torch generators, saved in the last checkpoint: equal after 4 straight steps and after
    2 + 2 resumed ones (with two dataloader workers, whose seeds are drawn from torch's generator)."""
    states = {}
    for name, stops in (("straight", [4]), ("resumed", [2, 4])):
        run_dir = tmp_path / name
        for steps in stops:
            train(load_job_config(None, run_args(corpus, tokenizer_path, run_dir, f"--train.steps={steps}",
                                                 "--data.num_workers=2", "--checkpoint.every=2")))
        states[name] = json.loads((CheckpointManager(run_dir).path(4) / "rank0.json").read_text())["rng"]
    assert states["resumed"] == states["straight"]
