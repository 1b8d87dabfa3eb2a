"""Nothing read from a file runs code: crafted checkpoints, exports and student files, through every route that
loads them (``load_lacy``, ``generate --ckpt``, resuming, ``--loss.reference``, students), are refused with one
line and run nothing."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from helpers import make_corpus
from lacy_stream.checkpoint import CheckpointManager, SafeFileSystemReader, UnsafeCheckpointError
from lacy_stream.cli import main as cli_main
from lacy_stream.config.job_config import load_job_config
from lacy_stream.inference.loading import load_lacy
from lacy_stream.trainer.train import train

PLANTED_ENTRY = "model.model.norm.weight"


class _RunsCode:
    """Unpickling it runs a shell command that leaves ``marker`` behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run_overrides(corpus: Path, tokenizer_path: str, run_dir: Path, *extra: str) -> list[str]:
    return [f"--data.shards={corpus}", f"--tokenizer.path={tokenizer_path}", f"--train.run_dir={run_dir}",
            "--model.preset=tiny", "--model.max_seq_len=32", "--data.seq_len=32", "--data.batch_size=2",
            "--data.num_workers=0", "--annotation.enabled=false", "--train.log_every=1", *extra]


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, tokenizer_path) -> tuple[Path, Path, Path]:
    """(corpus, a run whose checkpoint declares one model tensor as a pickled object, the marker its payload
    would create). No export: ``load_lacy`` and ``generate`` read the checkpoint."""
    root = tmp_path_factory.mktemp("planted")
    make_corpus(root / "corpus", shards=1, docs_per_shard=4)
    run_dir = root / "run"
    train(load_job_config(None, run_overrides(root / "corpus", tokenizer_path, run_dir, "--train.steps=1",
                                              "--checkpoint.export_hf=false", "--loss.method=baseline")))
    marker = root / "code-ran"
    plant_pickled_entry(CheckpointManager(run_dir).path(1), PLANTED_ENTRY, _RunsCode(marker))
    return root / "corpus", run_dir, marker


def plant_pickled_entry(checkpoint: Path, entry: str, payload: object) -> None:
    """Rewrites the checkpoint's DCP index (of allowed classes only) so that ``entry`` is stored as bytes in a file
    holding ``torch.save(payload)``: DCP's default planner unpickles such entries with ``weights_only=False``."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    (checkpoint / "__planted.distcp").write_bytes(buffer.getvalue())
    with open(checkpoint / ".metadata", "rb") as file:
        metadata = pickle.load(file)
    metadata.state_dict_metadata[entry] = BytesStorageMetadata()
    metadata.storage_data = {index: info for index, info in metadata.storage_data.items() if index.fqn != entry}
    metadata.storage_data[MetadataIndex(entry)] = _StorageInfo("__planted.distcp", 0, len(buffer.getvalue()))
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))


def refusal(capsys, *args: str) -> str:
    """The last stderr line of ``lacy-stream ARGS``, which must exit 1 without a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(list(args))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("lacy-stream: error:")
    return last


def test_the_reader_refuses_an_index_with_a_pickled_entry(planted_run):
    _, run_dir, marker = planted_run
    with pytest.raises(UnsafeCheckpointError, match="BytesStorageMetadata"):
        SafeFileSystemReader.checked(CheckpointManager(run_dir).path(1))
    assert not marker.exists()


def test_load_lacy_refuses_it(planted_run):
    _, run_dir, marker = planted_run
    with pytest.raises(UnsafeCheckpointError):
        load_lacy(run_dir)
    assert not marker.exists()


@pytest.mark.parametrize("route", ["generate", "resume", "reference"])
def test_every_command_route_refuses_it_in_one_line(planted_run, tokenizer_path, tmp_path, capsys, route):
    """``generate --ckpt``; resuming the run; naming it as the reference of another run, which is refused in the
    trainer's process before any dataloader worker would load it."""
    corpus, run_dir, marker = planted_run
    command = {
        "generate": ["generate", "--ckpt", str(run_dir), "--prompt", "The museum", "--max-new-tokens", "2"],
        "resume": ["train", *run_overrides(corpus, tokenizer_path, run_dir, "--train.steps=2",
                                           "--loss.method=baseline", "--checkpoint.export_hf=false")],
        "reference": ["train", *run_overrides(corpus, tokenizer_path, tmp_path / "rho1", "--train.steps=1",
                                              "--loss.method=rho1", f"--loss.reference={run_dir}",
                                              "--data.num_workers=1")],
    }[route]
    assert "pickled object" in refusal(capsys, *command)
    assert not marker.exists()


def test_an_export_whose_weights_are_a_pickle_is_refused(planted_run, tmp_path, capsys):
    _, _, marker = planted_run
    export = tmp_path / "hf"
    export.mkdir()
    torch.save({"transformer.wte.weight": _RunsCode(marker)}, export / "model.safetensors")
    (export / "config.json").write_text('{"model_type": "gpt2", "activation_function": "gelu_new"}')
    assert "not a safetensors file" in refusal(capsys, "generate", "--ckpt", str(export), "--prompt", "The museum")
    assert not marker.exists()


def test_a_pickled_student_file_is_refused_without_advice_to_unpickle_it(tmp_path, tokenizer_path, capsys):
    from lacy_stream.annotate.student_labeler import StudentAnnotator, StudentError
    from lacy_stream.tokenizer import Tokenizer

    marker = tmp_path / "code-ran"
    student = tmp_path / "student.pt"
    torch.save({"format": _RunsCode(marker)}, student)
    with pytest.raises(StudentError, match="refusing to load") as refusal:
        StudentAnnotator.load(student, Tokenizer(tokenizer_path))
    assert "weights_only=False" not in str(refusal.value)
    student.write_bytes(b"not a torch file at all")
    with pytest.raises(StudentError, match="not a lacy-stream student"):
        StudentAnnotator.load(student, Tokenizer(tokenizer_path))
    assert not marker.exists()
