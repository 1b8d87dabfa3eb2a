"""What scripts and operators rely on: exit statuses, fail-fast reads of dead hosts, outputs that appear whole
or not at all, resume bookkeeping, progress in logs, and errors a person can read."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from helpers import REPO, logged, make_corpus, overrides, run_cli, tiny_lacy

from lacy_stream.annotate.label_cache import LabelCache, default_cache_dir
from lacy_stream.checkpoint import CheckpointManager, SafeFileSystemReader
from lacy_stream.cli import EXIT_INTERRUPTED, EXIT_TOO_MANY_SKIPS, EXIT_USAGE, main
from lacy_stream.config.job_config import config_keys, load_job_config, toml_value
from lacy_stream.models.gpt2 import Transformer, model_args
from lacy_stream.trainer.parallelize import TrainingModule
from lacy_stream.shards.documents import (
    DOCUMENT_SKIP_REASONS,
    REPAIR_REASONS,
    SHARD_SKIP_REASONS,
)
from lacy_stream.shards.make_shards import make_shards
from lacy_stream.tokenizer import Tokenizer
from lacy_stream.trainer.optimizer import build_optimizer


def cli(*args: str) -> int:
    """The exit status of ``lacy-stream ARGS`` run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def file_server(tmp_path) -> Iterator[str]:
    """The base URL of a loopback server of ``tmp_path``'s files."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def dead_host() -> str:
    """The base URL of a loopback server that is gone: its port refuses connections."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietFiles)
    server.server_close()
    return f"http://127.0.0.1:{server.server_address[1]}"


# --- 1. exit status when nothing usable was read, --max-skip-ratio ----------------------------------------------


def test_inspect_exits_65_when_no_document_was_read(tmp_path, capsys):
    shard = tmp_path / "shard.tar"
    shard.write_bytes(os.urandom(4096))
    assert cli("inspect", "--shards", str(shard), "--json") == EXIT_TOO_MANY_SKIPS
    output = capsys.readouterr()
    assert json.loads(output.out)["docs"] == 0  # the report is still printed
    assert last_line(output.err).startswith(f"lacy-stream: error: {shard}: 0 documents read")
    assert "no usable document" in output.err


@pytest.mark.parametrize("spec", ["missing", "missing-dir/", "missing-{0..1}.tar", "file://{tmp}/missing.tar"])
def test_a_missing_path_is_named_as_missing(tmp_path, capsys, spec):
    spec = spec.replace("{tmp}", str(tmp_path))
    for command in (["inspect", "--shards", spec], ["train-tokenizer", "--shards", spec, "--vocab-size", "100",
                                                     "--out", str(tmp_path / "t.model")]):
        with contextlib.chdir(tmp_path):
            assert cli(*command) == EXIT_TOO_MANY_SKIPS
        output = capsys.readouterr()
        assert output.out == ""  # no report of zeros
        assert "does not exist" in last_line(output.err) or "exists (the first" in last_line(output.err)


def test_max_skip_ratio_of_inspect_and_make_shards(tmp_path, capsys, caplog):
    make_corpus(tmp_path / "corpus", shards=2, docs_per_shard=3)
    spec = f"{tmp_path}/corpus/part-{{000000..000002}}.tar"  # the third shard does not exist
    assert cli("inspect", "--shards", spec, "--json") == 0  # by default only a read of nothing fails
    assert "33.3% of the shards were skipped" in caplog.text  # above a few percent: a warning
    assert cli("inspect", "--shards", spec, "--max-skip-ratio", "0.25") == EXIT_TOO_MANY_SKIPS
    assert "33.3% of the shards were skipped, more than the allowed 25.0%" in capsys.readouterr().err

    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": "one"}, {"text": "two"}, {"text": ""}])
    assert cli("make-shards", str(source), "--out", str(tmp_path / "out"), "--max-skip-ratio", "0.2") == EXIT_TOO_MANY_SKIPS
    assert not (tmp_path / "out").exists()
    assert cli("make-shards", str(source), "--out", str(tmp_path / "out")) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"] == {"empty_document": 1}


def test_train_tokenizer_and_annotate_on_nothing_exit_65_and_write_nothing(tmp_path, capsys, tokenizer_path):
    missing = str(tmp_path / "missing-{0..2}.tar")
    out = tmp_path / "out"
    assert cli("train-tokenizer", "--shards", missing, "--vocab-size", "100", "--out", str(out / "t.model")) == 65
    assert "none of the 3 shards" in last_line(capsys.readouterr().err)
    assert cli("annotate", "--shards", missing, "--out", str(out), "--tokenizer", tokenizer_path) == 65
    assert not out.exists()


# --- 2. dead hosts ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_a_dead_host_costs_two_shards_of_retries_then_fails_its_others_at_once(tmp_path, file_server, dead_host):
    make_corpus(tmp_path, shards=2, docs_per_shard=3)
    spec = f"{file_server}/part-{{000000..000001}}.tar::{dead_host}/part-{{000002..000014}}.tar"
    started = time.monotonic()
    result = run_cli("inspect", "--shards", spec, "--json", "--http-retries", "1", "--http-timeout", "5",
                     "--max-skip-ratio", "0.5", check=False)
    seconds = time.monotonic() - started
    report = json.loads(result.stdout)
    assert report["docs"] == 6
    assert report["skipped"] == {"unreachable_shard": 2, "host_unreachable": 11}
    assert result.returncode == EXIT_TOO_MANY_SKIPS
    assert "86.7% of the shards were skipped" in last_line(result.stderr)
    assert seconds < 60  # two shards wait 1 s for their retry; before, each of the 13 did


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_training_on_a_dead_host_ends_with_its_reason_on_one_line(tmp_path, tokenizer_path, dead_host):
    result = run_cli("train", *overrides(f"{dead_host}/part-{{000000..000003}}.tar", tokenizer_path, tmp_path / "run",
                                         "--data.num_workers=1", "--data.http_retries=0"), check=False)
    assert result.returncode == EXIT_TOO_MANY_SKIPS
    assert "Traceback" not in result.stderr
    message = last_line(result.stderr)
    assert message.startswith("lacy-stream: error: rank 0 worker 0 read no document in epoch 0")
    assert "'host_unreachable': 2" in message and "'unreachable_shard': 2" in message


# --- 3. outputs appear whole or not at all ------------------------------------------------------------------


@pytest.mark.slow
def test_make_shards_on_a_truncated_input_keeps_the_previous_build(tmp_path):
    out = tmp_path / "out"
    previous = make_shards([str(write_jsonl(tmp_path / "docs.jsonl", [{"text": f"doc {i}"} for i in range(5)]))], out,
                           docs_per_shard=2)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    lines = "".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(2000)).encode()
    compressed = zstandard.ZstdCompressor().compress(lines)
    (tmp_path / "cut.jsonl.zst").write_bytes(compressed[: len(compressed) * 2 // 3])

    result = run_cli("make-shards", str(tmp_path / "cut.jsonl.zst"), "--out", str(out), "--docs-per-shard", "100", check=False)
    assert result.returncode == EXIT_TOO_MANY_SKIPS  # an unusable input: EX_DATAERR
    assert "truncated" in result.stderr and "cut.jsonl.zst" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # the old build, whole
    assert json.loads((out / "manifest.json").read_text()) == previous


# --- 4. resume bookkeeping, preemption, progress in logs --------------------------------------------------------

_TRAIN_THEN_DIE_AT_STEP_5 = """
import os, signal, sys
from lacy_stream.config.job_config import load_job_config
from lacy_stream.trainer.train import train
train(load_job_config(None, sys.argv[1:]), on_step=lambda step: step == 5 and os.kill(os.getpid(), signal.SIGKILL))
"""


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_a_run_killed_between_checkpoints_logs_every_step_once_after_resuming(tmp_path, tokenizer_path):
    make_corpus(tmp_path / "corpus", shards=2, docs_per_shard=4)
    run_dir = tmp_path / "run"
    args = overrides(tmp_path / "corpus", tokenizer_path, run_dir, "--checkpoint.every=3", "--checkpoint.export_hf=false")
    killed = subprocess.run([sys.executable, "-c", _TRAIN_THEN_DIE_AT_STEP_5, *args, "--train.steps=8"], cwd=REPO,
                            capture_output=True, text=True, timeout=150)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [record["step"] for record in logged(run_dir)] == [1, 2, 3, 4, 5]
    assert CheckpointManager(run_dir).latest() == 3

    assert cli("train", *args, "--train.steps=8") == 0
    assert [record["step"] for record in logged(run_dir)] == list(range(1, 9))


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_sigterm_saves_and_exits_75_with_progress_lines_in_the_log(tmp_path, tokenizer_path):
    make_corpus(tmp_path / "corpus", shards=2, docs_per_shard=4)
    run_dir = tmp_path / "run"
    args = overrides(tmp_path / "corpus", tokenizer_path, run_dir, "--train.steps=100000", "--checkpoint.export_hf=false")
    training = subprocess.Popen([sys.executable, "-m", "lacy_stream", "train", *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while not ((run_dir / "metrics.jsonl").exists() and len(logged(run_dir)) >= 2):
            assert training.poll() is None and time.monotonic() < deadline, "the run ended or never logged"
            time.sleep(0.2)
        training.send_signal(signal.SIGTERM)
        stdout, stderr = training.communicate(timeout=120)
    finally:
        training.kill()
    assert training.returncode == EXIT_INTERRUPTED
    summary = json.loads(stdout)
    assert summary["interrupted"] and CheckpointManager(run_dir).latest() == summary["step"]
    assert "run the same command to continue" in last_line(stderr)
    # stderr is no terminal: a plain line per logged step instead of a progress bar
    progress = re.findall(r"^step (\d+)/100000  loss \d+\.\d{4}  [\d,]+ tokens/s  ETA \w+$", stderr, flags=re.M)
    assert progress[:2] == ["1", "2"]


# --- 6. errors a person reads -----------------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_eval_prints_one_line_per_failed_section(tmp_path, tokenizer_path):
    tiny_lacy(tokenizer_path, tmp_path / "model", seed=0)
    result = run_cli("eval", "--ckpt", str(tmp_path / "model"), "--out", str(tmp_path / "report"),
                     "--shared", str(tmp_path / "no-shared-data"), "--sections", "validation,nlu,fact_leakage",
                     check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    failures = [line for line in result.stderr.splitlines() if "eval: section" in line]
    assert [line.split("eval: section ")[1].split(" failed:")[0] for line in failures] == [
        "validation", "nlu", "fact_leakage"
    ]
    assert all("no-shared-data" in line for line in failures)


def test_a_refused_checkpoint_is_a_clear_error_naming_the_file(tmp_path, tokenizer_path, capsys, monkeypatch):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    tokenizer = Tokenizer(tokenizer_path)
    config = load_job_config(None, [f"--tokenizer.path={tokenizer_path}", "--model.max_seq_len=32"])
    module = TrainingModule(Transformer(model_args("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=32)),
                            config.loss, call_id=tokenizer.call_id, seed=0)
    checkpoint = CheckpointManager(tmp_path / "run").save(1, model=module, optimizer=build_optimizer(module, config.optimizer),
                                                           extra={})
    (tmp_path / "run" / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    metadata = SafeFileSystemReader(checkpoint).read_metadata()
    metadata.planner_data = RunsCode()
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    monkeypatch.chdir(tmp_path)

    assert cli("generate", "--ckpt", str(tmp_path / "run"), "--prompt", "The museum") == 1
    error = capsys.readouterr().err
    assert f"refusing to load the checkpoint file {checkpoint / '.metadata'}" in error
    assert "system, which is not allowed" in error and "AssertionError" not in error
    assert not (tmp_path / "pwned").exists()


def test_a_shipped_run_config_is_found_by_name_from_any_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("train", "--config", "tiny_cpu", "--train.steps=0") == EXIT_USAGE
    assert "train.steps: must be positive" in capsys.readouterr().err  # the file was read; its value overridden


def test_the_operations_page_lists_every_skip_reason_once():
    page = (REPO / "docs" / "operations.md").read_text()
    section = page.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert sorted(listed) == sorted(SHARD_SKIP_REASONS + DOCUMENT_SKIP_REASONS + REPAIR_REASONS)
    assert not re.search(r"^\| `invalid_json` \|", (REPO / "shards" / "README.md").read_text(), flags=re.M)


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--ckpt", "m", "--out", "o", "--sections", "validation,vibes"], "unknown section(s) ['vibes']"),
        (["eval", "--ckpt", "m", "--out", "o", "--judge-url", "http://localhost:1/v1"], "--judge-url and --judge-model"),
        (["generate", "--ckpt", "m"], "give --prompt or --prompts-file"),
        (["annotate"], "give exactly one of"),
        (["make-shards", "--out", "o"], "give INPUT files or --demo"),
        (["bench", "annotate"], "give --input FILE.jsonl or --shards URL"),
        (["generate", "--ckpt", "x", "--prompt", "p", "--call-pieces", "0"], "at least one piece"),
        (["eval", "--ckpt", "x", "--out", "o", "--call-pieces", "0"], "at least one piece"),
        (["inspect", "--shards", "x", "--no-such-option"], "unrecognized arguments"),
        (["demo", "--data.sequence=3"], "unknown key"),
    ],
)
def test_a_command_line_not_understood_exits_2_with_one_line_and_no_traceback_hint(tmp_path, capsys, args, message):
    with contextlib.chdir(tmp_path):
        assert cli(*args) == EXIT_USAGE
    error = capsys.readouterr().err
    assert message in last_line(error) and "-v" not in last_line(error) and "Traceback" not in error


def test_a_missing_model_is_named_as_missing(tmp_path, capsys):
    assert cli("generate", "--ckpt", str(tmp_path / "nonexistent"), "--prompt", "x") == 1
    assert last_line(capsys.readouterr().err).startswith(f"lacy-stream: error: {tmp_path / 'nonexistent'} does not exist")


# --- 7. a command line that explains itself ----------------------------------------------------------------------


@pytest.mark.parametrize("command, values", [("train", "its default"), ("demo", "its value in tiny_cpu"),
                                             ("bench stream", "its default")])
def test_help_lists_every_config_key_with_its_type_value_and_meaning(capsys, command, values):
    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    help_text = capsys.readouterr().out
    assert f"config keys, each with {values}" in help_text and "--print-config" in help_text
    for key in config_keys(load_job_config("tiny_cpu") if command == "demo" else None):
        assert f"\n  --{key.name}={toml_value(key.value)}  ({key.type})\n      {key.meaning.split()[0]}" in help_text
    if command == "demo":
        assert "--section.key=value" in help_text and "held out" in help_text


def test_print_config_prints_the_resolved_config_as_toml(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("demo", "--print-config", "--data.seq_len=64", "--train.run_dir", "runs/x") == 0
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out)
    assert load_job_config(printed) == load_job_config("tiny_cpu", ["--data.seq_len=64", "--train.run_dir=runs/x"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["printed.toml"]  # nothing built, nothing trained
    assert cli("train", "--print-config", "--data.seq_len=abc") == EXIT_USAGE


@pytest.mark.slow  # imports spaCy
def test_info_names_the_versions_and_the_label_cache_and_cache_clear_empties_it(capsys):
    cache_dir = default_cache_dir()
    columns = {"tokens": np.arange(4, dtype=np.int32), "token_class": np.zeros(4, np.int8), "judge": np.zeros(4, np.int8)}
    shard = LabelCache(cache_dir, "labeler A").shard("a.tar")
    shard.put(b"k" * 16, columns)
    shard.flush()
    LabelCache(cache_dir, "labeler B")
    (cache_dir / "notes.txt").write_text("not the cache's")
    assert cli("info", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and info["spaCy model"].startswith("en_core_web_sm")
    assert set(info) >= {"CUDA", "triton", "GPU", "transformers"}
    assert info["label cache"].startswith(f"{cache_dir}: ") and info["label cache"].endswith(" in 2 namespaces")

    assert cli("cache", "clear") == 0
    assert capsys.readouterr().out.startswith("deleted 2 namespaces (")
    assert [path.name for path in cache_dir.iterdir()] == ["notes.txt"]
    assert cli("info") == 0
    assert f"label cache   {cache_dir}: empty" in capsys.readouterr().out


# --- 7. lone surrogates ----------------------------------------------------------------------------------------


def test_a_lone_surrogate_is_repaired_and_its_document_kept(tmp_path, capsys):
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "Caf\\ud800 society in 1820."}\n{"text": "\\udc00\\udc01\\udc02 x"}\n')
    assert cli("make-shards", str(source), "--out", str(tmp_path / "out")) == 0
    output = capsys.readouterr().out
    assert "1 documents" in output
    assert "skipped {'invalid_utf8': 1}" in output and "repaired {'lone_surrogate': 1}" in output
    assert cli("inspect", "--shards", str(tmp_path / "out"), "--json") == 0
    assert json.loads(capsys.readouterr().out)["docs"] == 1


# --- SLURM: the requeue decision -------------------------------------------------------------------------------


# torchrun while it trains: a worker stopped by SIGTERM makes it exit 1
TRAINING = "trap 'kill $sleeper; exit 1' TERM; sleep 60 & sleeper=$!; touch {started}; wait"


def slurm_job(tmp_path: Path, torchrun: str, **environment: str) -> subprocess.Popen:
    """scripts/slurm_train.sbatch as job 42 in its own process group, with stand-ins for srun, scontrol (which
    appends the job ids it requeues to tmp_path/requeued) and torchrun (the bash script ``torchrun``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "scontrol": f'if [ "$1" = requeue ]; then echo "$2" >> {tmp_path}/requeued; else echo node1; fi',
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done; exec "$@"',
        "torchrun": torchrun,
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
                   "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", **environment}
    return subprocess.Popen(["bash", str(REPO / "scripts" / "slurm_train.sbatch"), "tiny_cpu"], env=environment,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def signal_while_training(tmp_path: Path, job: subprocess.Popen, send) -> str:
    """Once the training has started, ``send(job)``; the job's stderr when it has ended."""
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # for the script to set its traps after starting the training
        send(job)
        return job.communicate(timeout=20)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)


def test_slurm_script_requeues_and_exits_75_when_signalled_before_the_time_limit(tmp_path):
    job = slurm_job(tmp_path, TRAINING.format(started=tmp_path / "started"))
    stderr = signal_while_training(tmp_path, job, lambda job: job.send_signal(signal.SIGUSR1))  # --signal=B:USR1@120
    assert job.returncode == EXIT_INTERRUPTED, stderr
    assert (tmp_path / "requeued").read_text() == "42\n"


@pytest.mark.parametrize("requeue", ["1", "0"])
def test_slurm_script_exits_75_when_preempted_and_requeues_unless_told_not_to(tmp_path, requeue):
    job = slurm_job(tmp_path, TRAINING.format(started=tmp_path / "started"), REQUEUE=requeue)
    # Preemption: SLURM sends SIGTERM to the training and to the script.
    stderr = signal_while_training(tmp_path, job, lambda job: os.killpg(job.pid, signal.SIGTERM))
    assert job.returncode == EXIT_INTERRUPTED, stderr
    assert "lacy-stream: stopped for the time limit or preemption" in stderr
    assert (tmp_path / "requeued").read_text() == "42\n" if requeue == "1" else not (tmp_path / "requeued").exists()


@pytest.mark.parametrize("status", [0, EXIT_TOO_MANY_SKIPS])
def test_slurm_script_exits_with_the_status_of_a_training_that_ends_on_its_own(tmp_path, status):
    job = slurm_job(tmp_path, f"exit {status}")
    _, stderr = job.communicate(timeout=20)
    assert job.returncode == status, stderr
    assert not (tmp_path / "requeued").exists()
