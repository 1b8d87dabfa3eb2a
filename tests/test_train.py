"""The trainer end to end on a tiny model: metrics, checkpoints, export, resume, two ranks, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import REPO, logged, losses_by_step, make_corpus, overrides, spawn_gloo, train_on_rank
from lacy_stream.checkpoint import CheckpointManager
from lacy_stream.cli import main as cli_main
from lacy_stream.config.job_config import RUN_CONFIGS, ConfigError, load_job_config
from lacy_stream.inference.loading import load_lacy, resolve_model_path
from lacy_stream.models.gpt2 import Transformer, model_args
from lacy_stream.trainer.parallelize import TrainingModule
from lacy_stream.tokenizer import Tokenizer
import lacy_stream.trainer.train as train_module
from lacy_stream.trainer.optimizer import build_optimizer
from lacy_stream.trainer.train import micro_batches_per_step, train

# call_loss is logged only when something was called; mfu only on a GPU of the peak-FLOPs table.
REQUIRED_METRICS = ("loss", "noncall_loss", "call_ratio", "fact_ratio", "tokens_per_s", "grad_norm",
                    "lr", "data_wait_share", "data/docs")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    make_corpus(tmp_path / "corpus", shards=2, docs_per_shard=4)
    return tmp_path / "corpus"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cli_trains_logs_checkpoints_and_exports(tmp_path, corpus, tokenizer_path):
    run_dir = tmp_path / "run"
    args = overrides(corpus, tokenizer_path, run_dir, "--train.steps=30", "--checkpoint.every=10",
                     "--checkpoint.keep=2", f"--train.val_shards={corpus}", "--train.val_every=3",
                     "--train.val_batches=2")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *args])
    assert exit_info.value.code == 0

    records = logged(run_dir)
    assert [record["step"] for record in records] == list(range(1, 31))
    for key in REQUIRED_METRICS:
        assert key in records[0], key
    assert records[0]["call_ratio"] == 0  # no facts without annotation, so nothing to call
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.5, (first, last)  # the 8 tiny documents repeat every few steps
    validated = {record["step"]: record["val/loss"] for record in records if "val/loss" in record}
    assert list(validated) == list(range(3, 31, 3))
    assert validated[30] < validated[3] - 0.5, validated  # validation here reads the training documents
    assert "val/noncall_loss" in records[2] and records[2]["val/call_ratio"] == 0
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    samples = events.Tensors("val/sample_0/text_summary")
    assert [event.step for event in samples] == list(range(3, 31, 3))
    assert b"the model's calls" in samples[-1].tensor_proto.string_val[0] and "val/sample_1/text_summary" in events.Tags()["tensors"]
    assert CheckpointManager(run_dir).steps() == [20, 30]
    assert (run_dir / "hf" / "model.safetensors").is_file()
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 30

    # Inference reads the export, the final checkpoint and the run directory as the same model.
    tokens = torch.tensor([Tokenizer(tokenizer_path).encode("The museum was founded in 1887.")])
    loaded = [load_lacy(source) for source in (run_dir / "hf", CheckpointManager(run_dir).path(30), run_dir)]
    logits = [lacy.model.logits(lacy.model(tokens)) for lacy in loaded]
    torch.testing.assert_close(logits[1], logits[0])
    torch.testing.assert_close(logits[2], logits[0])
    assert loaded[1].tokenizer.call_id == loaded[0].call_id == Tokenizer(tokenizer_path).call_id
    assert loaded[2].source == run_dir / "hf"
    # A run resumed for more steps and stopped before its new export: its newest checkpoint is the model.
    newest = CheckpointManager(run_dir).path(30) / "COMPLETE"
    os.utime(newest, (newest.stat().st_atime, (run_dir / "hf" / "model.safetensors").stat().st_mtime + 10))
    assert resolve_model_path(run_dir) == CheckpointManager(run_dir).path(30)


@pytest.mark.timeout(120)
def test_resumed_run_continues_with_the_same_losses(tmp_path, corpus, tokenizer_path, monkeypatch, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--checkpoint.export_hf=false", "--checkpoint.every=3")
    windows: list[list[int]] = []  # the documents of every window the trainer consumed, in order
    prepare = train_module._Trainer._prepare

    def recording_prepare(self, batch):
        windows.extend(sorted(set(window.tolist())) for window in batch["doc_ids"])
        return prepare(self, batch)

    monkeypatch.setattr(train_module._Trainer, "_prepare", recording_prepare)
    train(load_job_config(None, overrides(corpus, tokenizer_path, straight, "--train.steps=6", *common)))
    straight_windows, windows[:] = list(windows), []
    train(load_job_config(None, overrides(corpus, tokenizer_path, resumed, "--train.steps=3", *common)))
    assert "resuming" not in capsys.readouterr().err
    torch.manual_seed(1234)  # the resumed run must restore its RNG streams, not rely on the process's
    train(load_job_config(None, overrides(corpus, tokenizer_path, resumed, "--train.steps=6", *common)))
    assert f"resuming {resumed} from the checkpoint of step 3: 3 steps to go" in capsys.readouterr().err.splitlines()
    train(load_job_config(None, overrides(corpus, tokenizer_path, resumed, "--train.steps=5", *common)))
    assert f"nothing to do: {resumed} is at step 6 of train.steps=5; raise --train.steps" in capsys.readouterr().err

    assert [record["step"] for record in logged(resumed)] == [1, 2, 3, 4, 5, 6]  # no step ran twice
    assert windows == straight_windows  # no document seen twice or skipped across the restart
    expected, actual = losses_by_step(straight), losses_by_step(resumed)
    for step in (4, 5, 6):
        assert actual[step] == pytest.approx(expected[step], abs=1e-6), step


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_two_ranks_match_one_process_accumulating_two_micro_batches(tmp_path, corpus, tokenizer_path):
    # The same windows either way: the loader's slots are rank x workers + worker, and one process with two
    # workers takes its batches from worker 0 and worker 1 in turn, so micro-batch i of a step there is
    # the batch of rank i here. The annotation-free corpus has no facts, so no call selection differs.
    common = ("--train.steps=4", "--train.global_batch_tokens=128", "--checkpoint.export_hf=false")
    one = tmp_path / "one"
    train(load_job_config(None, overrides(corpus, tokenizer_path, one, "--data.num_workers=2", *common)))
    two = tmp_path / "two"
    spawn_gloo(train_on_rank, 2, tmp_path, overrides(corpus, tokenizer_path, two, *common))

    expected, actual = losses_by_step(one), losses_by_step(two)
    assert sorted(actual) == [1, 2, 3, 4]
    for step in actual:
        assert actual[step] == pytest.approx(expected[step], abs=1e-5), step
    assert CheckpointManager(two).latest() == 4


@pytest.mark.timeout(120)
def test_sigterm_saves_a_loadable_checkpoint_and_stops(tmp_path, corpus, tokenizer_path):
    run_dir = tmp_path / "run"
    args = overrides(corpus, tokenizer_path, run_dir, "--train.steps=20", "--checkpoint.every=100")
    config = load_job_config(None, args)

    def terminate_at_step_2(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = train(config, on_step=terminate_at_step_2)
    assert summary["interrupted"] and summary["step"] == 2 and summary["hf_dir"] is None

    tokenizer = Tokenizer(tokenizer_path)
    module = TrainingModule(
        Transformer(model_args("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=32)),
        config.loss, call_id=tokenizer.call_id, seed=0,
    )
    extra = CheckpointManager(run_dir).load(None, model=module, optimizer=build_optimizer(module, config.optimizer))
    assert extra["step"] == 2 and extra["tokens_seen"] == 2 * 2 * 32


@pytest.mark.timeout(120)
def test_lacy_with_annotation_calls_facts(tmp_path, corpus, tokenizer_path):
    run_dir = tmp_path / "run"
    args = overrides(corpus, tokenizer_path, run_dir, "--train.steps=2", "--checkpoint.export_hf=false",
                     "--train.activation_checkpointing=true")
    args.remove("--annotation.enabled=false")
    train(load_job_config(None, args))
    record = logged(run_dir)[-1]
    assert record["fact_ratio"] > 0
    assert 0 < record["call_ratio"] < 0.2  # the budget is round(0.15 x valid tokens)
    assert record["call_loss"] > 0


def test_global_batch_must_split_into_whole_micro_batches():
    assert micro_batches_per_step(0, 2, 2, 32) == 1
    assert micro_batches_per_step(256, 2, 2, 32) == 2
    with pytest.raises(ConfigError, match="multiple"):
        micro_batches_per_step(100, 2, 2, 32)
    # The 1.3b config's 112 windows a step on 8 ranks: 16 does not divide, 14 does.
    with pytest.raises(ConfigError, match="e.g. --data.batch_size=14"):
        micro_batches_per_step(114688, 8, 16, 1024)


@pytest.mark.timeout(120)
def test_a_run_from_before_the_padded_vocabulary_loads_and_resumes_only_with_its_shape(tmp_path, corpus,
                                                                                      tokenizer_path, capsys):
    """A run of 401 embedding rows (no padding) with a config.json that predates ``model.vocab_multiple``."""
    run_dir = tmp_path / "run"
    train(load_job_config(None, overrides(corpus, tokenizer_path, run_dir, "--train.steps=2",
                                          "--checkpoint.export_hf=false", "--model.vocab_multiple=1")))
    config = json.loads((run_dir / "config.json").read_text())
    del config["model"]["vocab_multiple"]
    (run_dir / "config.json").write_text(json.dumps(config))

    loaded = load_lacy(run_dir)
    assert loaded.model.tok_embeddings.weight.shape[0] == Tokenizer(tokenizer_path).vocab_size

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *overrides(corpus, tokenizer_path, run_dir, "--train.steps=4")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "tok_embeddings.weight is [401, 128] there and [512, 128] here" in error
    assert "--model.vocab_multiple=1" in error
    resumed = train(load_job_config(None, overrides(corpus, tokenizer_path, run_dir, "--train.steps=4",
                                                    "--model.vocab_multiple=1")))
    assert resumed["step"] == 4


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_two_node_torchrun_on_localhost_trains(tmp_path, corpus, tokenizer_path):
    """scripts/multinode_train.sh on two "nodes" of one process each, meeting over TCP on localhost."""
    run_dir = tmp_path / "run"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    train_args = overrides(corpus, tokenizer_path, run_dir, "--train.steps=4", "--checkpoint.every=2",
                           f"--train.val_shards={corpus}", "--train.val_every=2", "--train.val_batches=1")
    environment = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # this torchrun
        "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
    }
    nodes = [
        subprocess.Popen(
            ["bash", str(REPO / "scripts" / "multinode_train.sh"), str(RUN_CONFIGS / "tiny_cpu.toml"), *train_args],
            env={**environment, "NODE_RANK": str(node)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in range(2)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]

    records = logged(run_dir)
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert [record["step"] for record in records if "val/loss" in record] == [2, 4]  # over both ranks' shares
    assert CheckpointManager(run_dir).steps() == [2, 4]
    assert json.loads((CheckpointManager(run_dir).path(4) / "COMPLETE").read_text())["world_size"] == 2
    assert (run_dir / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("labeler", "reference", "tasks", "remedies"),
    [
        ("spacy", False, "labeling with spaCy", ["workers", "student labeler", "label cache"]),
        ("student:s.pt", False, "labeling with a student", ["workers", "label cache"]),
        ("spacy", True, "labeling with spaCy and scoring with the reference model",
         ["workers", "student labeler", "reference losses stored with the shards", "label cache"]),
    ],
)
def test_the_data_wait_advice_names_what_the_workers_do_and_what_would_help(labeler, reference, tasks, remedies):
    config = load_job_config(RUN_CONFIGS / "tiny_cpu.toml", [f"--annotation.labeler={labeler}"])
    trainer = SimpleNamespace(config=config, reference=object() if reference else None)
    assert train_module._Trainer._worker_tasks(trainer) == tasks
    advice = train_module._Trainer._data_wait_remedies(trainer, 3)
    assert advice[0] == "about 3 workers would feed it (data.num_workers)"
    assert [next(remedy for remedy in remedies if remedy in line) for line in advice] == remedies
