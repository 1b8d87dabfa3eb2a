"""Errors an operator meets, each one line on stderr (no traceback without ``-v``) with the README's exit status:
another tokenizer on resume, a damaged checkpoint, an unparsable tokenizer, an impossible vocabulary size, a
missing input, a directory without manifest; and a full disk during a checkpoint, which leaves the previous
checkpoint intact and no partial directory."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import checkpoint_extra_state, make_corpus, synthetic_text, toy_batches, toy_train_step, toy_training
from lacy_stream.checkpoint import CheckpointManager, CheckpointWriteError
from lacy_stream.cli import EXIT_TOO_MANY_SKIPS, main as cli_main
from lacy_stream.config.job_config import load_job_config
from lacy_stream.tokenizer import train_tokenizer
from lacy_stream.trainer.train import train


def run_args(corpus: Path, tokenizer_path: str | Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"--data.shards={corpus}", f"--tokenizer.path={tokenizer_path}", f"--train.run_dir={run_dir}",
            "--model.preset=tiny", "--model.max_seq_len=32", "--data.seq_len=32", "--data.batch_size=2",
            "--data.num_workers=0", "--annotation.enabled=false", "--checkpoint.export_hf=false", *extra]


def status_and_last_line(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(list(args))
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return exit_info.value.code, err.splitlines()[-1]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    make_corpus(tmp_path / "corpus", shards=1, docs_per_shard=4)
    return tmp_path / "corpus"


@pytest.fixture
def trained_run(tmp_path: Path, corpus: Path, tokenizer_path: str) -> Path:
    run_dir = tmp_path / "run"
    train(load_job_config(None, run_args(corpus, tokenizer_path, run_dir, "--train.steps=2")))
    return run_dir


@pytest.mark.timeout(120)
def test_resuming_with_another_tokenizer(tmp_path, corpus, trained_run, capsys):
    import random

    other = tmp_path / "other.model"
    train_tokenizer([synthetic_text(random.Random(5), 20) for _ in range(200)], other, vocab_size=360)
    status, line = status_and_last_line(capsys, "train", *run_args(corpus, other, trained_run, "--train.steps=4",
                                                                   "--checkpoint.allow_config_change=true"))
    assert status == 1 and "tok_embeddings.weight is [512, 128] there and [384, 128] here" in line


@pytest.mark.timeout(120)
def test_a_damaged_checkpoint(corpus, tokenizer_path, trained_run, capsys):
    shard = next(CheckpointManager(trained_run).path(2).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[64:1024] = bytes(960)
    shard.write_bytes(bytes(data))
    status, line = status_and_last_line(capsys, "train", *run_args(corpus, tokenizer_path, trained_run, "--train.steps=4"))
    assert status == 1 and f"cannot read the checkpoint {CheckpointManager(trained_run).path(2)}" in line
    status, line = status_and_last_line(capsys, "generate", "--ckpt", str(trained_run), "--prompt", "The")
    assert status == 1 and "cannot read the checkpoint" in line


def test_an_unparsable_tokenizer(tmp_path, corpus, capsys):
    garbage = tmp_path / "tokenizer.model"
    garbage.write_text("not a model")
    status, line = status_and_last_line(capsys, "train", *run_args(corpus, garbage, tmp_path / "run"))
    assert status == 1 and f"{garbage} is not a SentencePiece model" in line
    status, line = status_and_last_line(capsys, "inspect", "--shards", str(corpus), "--tokenizer", str(garbage))
    assert status == 1 and f"{garbage} is not a SentencePiece model" in line


def test_a_vocabulary_too_small_for_the_text(tmp_path, corpus, capsys):
    status, line = status_and_last_line(capsys, "train-tokenizer", "--shards", str(corpus), "--vocab-size", "60",
                                        "--out", str(tmp_path / "t.model"))
    assert status == 1 and "SentencePiece could not train a 60-piece tokenizer" in line
    assert not (tmp_path / "t.model").exists()


def test_nothing_to_read_exits_65(tmp_path, capsys):
    status, line = status_and_last_line(capsys, "make-shards", str(tmp_path / "missing.jsonl"), "--out",
                                        str(tmp_path / "out"))
    assert status == EXIT_TOO_MANY_SKIPS and "missing.jsonl: no such file" in line
    (tmp_path / "empty").mkdir()
    status, line = status_and_last_line(capsys, "inspect", "--shards", str(tmp_path / "empty"))
    assert status == EXIT_TOO_MANY_SKIPS and "without manifest.json" in line


def _tmpfs(path: Path, size: str):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return mounted.returncode == 0


@pytest.mark.timeout(120)
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_leaves_no_partial_directory(tmp_path, monkeypatch):
    """On a real 600 KiB tmpfs where the machine allows mounting one (else the write fails as a full disk would)."""
    small = tmp_path / "small-disk"
    mounted = _tmpfs(small, "600k")
    try:
        model, optimizer, scheduler = toy_training(seed=0)
        toy_train_step(model, optimizer, scheduler, toy_batches()[0])
        manager = CheckpointManager(small / "run")
        first = manager.save(1, model=model, optimizer=optimizer, extra=checkpoint_extra_state(1, scheduler))
        before = {file.name: file.read_bytes() for file in first.iterdir()}
        big = torch.nn.Linear(400, 400)
        big_optimizer = torch.optim.AdamW(big.parameters())
        big(torch.ones(1, 400)).sum().backward()
        big_optimizer.step()
        if not mounted:
            def no_space(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(torch, "save", no_space)
        with pytest.raises(CheckpointWriteError, match=r"could not write the checkpoint of step 2 to .*\.tmp-step-00000002: "
                                                       r"No space left on device \(.* bytes free there\); the checkpoint "
                                                       r"of step 1 is intact"):
            manager.save(2, model=big, optimizer=big_optimizer, extra={})
        assert [path.name for path in manager.directory.iterdir()] == ["step-00000001"]
        assert {file.name: file.read_bytes() for file in first.iterdir()} == before
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=False)


def test_a_full_disk_during_an_export_is_one_os_error_and_leaves_nothing(tmp_path, tokenizer_path, monkeypatch):
    from safetensors import SafetensorError

    import lacy_stream.models.hf_export as export_module
    from lacy_stream.models.gpt2 import Transformer, model_args
    from lacy_stream.tokenizer import Tokenizer

    small = tmp_path / "small-disk"
    mounted = _tmpfs(small, "300k")
    try:
        if not mounted:
            def no_space(*args, **kwargs):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            monkeypatch.setattr(export_module, "save_file", no_space)
        model = Transformer(model_args("tiny", vocab_size=Tokenizer(tokenizer_path).vocab_size))
        with pytest.raises(OSError, match=r"could not write the export to .*hf: .*No space left on device"):
            export_module.export_hf(model, tokenizer_path, small / "hf")
        assert not list(small.iterdir())
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=False)
