"""SIGTERM and SIGINT to the trainer's whole process group (a scheduler's preemption, a terminal's Ctrl-C): the
dataloader workers leave them to the trainer, which saves a checkpoint and exits 75, from any point of the run;
a second signal ends it at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, make_corpus
from lacy_stream import stop_signals
from lacy_stream.checkpoint import CheckpointManager
from lacy_stream.cli import EXIT_INTERRUPTED


def test_a_signal_is_recorded_and_a_second_one_acts(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    with stop_signals.handled():
        assert stop_signals.requested() is None
        os.kill(os.getpid(), signal.SIGINT)
        assert stop_signals.requested() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C: Python's default action
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == previous and stop_signals.requested() is None


def start_training(tmp_path: Path, tokenizer_path: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    """``lacy-stream train`` in a process group of its own, with two spaCy dataloader workers."""
    make_corpus(tmp_path / "corpus", shards=4, docs_per_shard=6)
    run_dir = tmp_path / "run"
    args = [f"--data.shards={tmp_path / 'corpus'}", f"--tokenizer.path={tokenizer_path}", f"--train.run_dir={run_dir}",
            "--model.preset=tiny", "--model.max_seq_len=32", "--data.seq_len=32", "--data.batch_size=2",
            "--data.num_workers=2", "--train.steps=100000", "--train.log_every=1", "--checkpoint.every=100000",
            "--checkpoint.export_hf=false", *extra]
    process = subprocess.Popen([sys.executable, "-m", "lacy_stream", "train", *args], cwd=REPO, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process, run_dir


def wait_for_steps(process: subprocess.Popen, run_dir: Path, steps: int) -> None:
    deadline = time.monotonic() + 150
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended or never logged"
        time.sleep(0.1)


def finish(process: subprocess.Popen) -> tuple[str, str]:
    try:
        return process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.slow
def test_a_signal_to_the_process_group_saves_and_exits_75(tmp_path, tokenizer_path, stop):
    process, run_dir = start_training(tmp_path, tokenizer_path)
    wait_for_steps(process, run_dir, 2)
    os.killpg(process.pid, stop)
    stdout, stderr = finish(process)
    assert process.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] and CheckpointManager(run_dir).latest() == summary["step"] >= 2
    assert f"stopped on {stop.name} after saving the checkpoint of step {summary['step']}" in stderr


@pytest.mark.timeout(200)
@pytest.mark.slow
def test_a_signal_while_the_program_loads_exits_75_without_a_traceback(tmp_path, tokenizer_path):
    process, run_dir = start_training(tmp_path, tokenizer_path)
    time.sleep(0.5)  # torch and the command line are still loading
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = finish(process)
    assert process.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "stopped on SIGTERM before training a step (nothing new to save)" in stderr
    assert CheckpointManager(run_dir).latest() is None


def test_a_second_sigterm_ends_the_process_at_once():
    program = (
        "import os, signal, time\n"
        "from lacy_stream import stop_signals\n"
        "with stop_signals.handled():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert stop_signals.requested() == signal.SIGTERM\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(10)\n"
    )
    finished = subprocess.run([sys.executable, "-c", program], cwd=REPO, timeout=60)
    assert finished.returncode == -signal.SIGTERM


def test_a_worker_ignores_sigint_and_outlives_a_sigterm_for_its_grace_period_only():
    program = (
        "import time\n"
        "from lacy_stream import stop_signals\n"
        "stop_signals.leave_to_the_main_process(grace_s=1)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", program], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready"
        worker.send_signal(signal.SIGINT)
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert worker.poll() is None  # still serving the trainer, which ends it when it is done
        worker.send_signal(signal.SIGTERM)  # a second one does not move the deadline
        assert worker.wait(timeout=10) == -signal.SIGALRM
    finally:
        worker.kill()
        worker.wait()
