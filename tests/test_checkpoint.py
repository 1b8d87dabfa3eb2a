from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from helpers import checkpoint_extra_state, spawn_gloo, toy_batches, toy_model, toy_train_step, toy_training
from lacy_stream.checkpoint import CheckpointManager, SafeFileSystemReader, restore_rng_state

# DCP warns that it saves "in a single process" whenever no process group is initialized.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def next_random_numbers() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_round_trip_restores_model_optimizer_scheduler_rng_and_extra(tmp_path: Path) -> None:
    model, optimizer, scheduler = toy_training(seed=0)
    for batch in toy_batches()[:3]:
        toy_train_step(model, optimizer, scheduler, batch)
    manager = CheckpointManager(tmp_path)
    extra = checkpoint_extra_state(3, scheduler)
    manager.save(3, model=model, optimizer=optimizer, extra=extra)
    expected_numbers = next_random_numbers()

    restored_model, restored_optimizer, restored_scheduler = toy_training(seed=1)
    restored_extra = manager.load(None, model=restored_model, optimizer=restored_optimizer)
    restored_scheduler.load_state_dict(restored_extra["scheduler"])
    restore_rng_state(restored_extra["rng"])

    assert next_random_numbers() == expected_numbers
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored_model.state_dict()[name], tensor), name
    original, restored = optimizer.state_dict(), restored_optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for index, moments in original["state"].items():
        for key, tensor in moments.items():
            assert torch.equal(restored["state"][index][key], tensor), (index, key)
    assert restored_scheduler.state_dict() == scheduler.state_dict()
    for key in ("step", "tokens_seen", "scheduler", "dataloader"):
        assert restored_extra[key] == extra[key]
    assert torch.equal(restored_extra["rng"]["torch"], extra["rng"]["torch"])


def test_resumed_training_matches_uninterrupted_run(tmp_path: Path) -> None:
    data = toy_batches()
    model, optimizer, scheduler = toy_training(seed=0)
    uninterrupted = [toy_train_step(model, optimizer, scheduler, batch) for batch in data]

    model, optimizer, scheduler = toy_training(seed=0)
    before = [toy_train_step(model, optimizer, scheduler, batch) for batch in data[:3]]
    manager = CheckpointManager(tmp_path)
    manager.save(3, model=model, optimizer=optimizer, extra=checkpoint_extra_state(3, scheduler))
    torch.rand(100)  # the crashed run moves on; the resumed one must not notice

    model, optimizer, scheduler = toy_training(seed=7)
    extra = manager.load(None, model=model, optimizer=optimizer)
    scheduler.load_state_dict(extra["scheduler"])
    restore_rng_state(extra["rng"])
    after = [toy_train_step(model, optimizer, scheduler, batch) for batch in data[extra["step"] :]]

    assert before + after == uninterrupted


def test_keeps_newest_checkpoints_and_ignores_incomplete_ones(tmp_path: Path) -> None:
    model, optimizer, scheduler = toy_training(seed=0)
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.latest() is None
    for step in range(1, 5):
        toy_train_step(model, optimizer, scheduler, toy_batches()[0])
        manager.save(step, model=model, optimizer=optimizer, extra={"step": step})

    assert manager.steps() == [3, 4]
    assert sorted(path.name for path in manager.directory.iterdir()) == ["step-00000003", "step-00000004"]

    crashed_save = manager.directory / ".tmp-step-00000009"
    crashed_save.mkdir()
    (crashed_save / "rank0.json").write_text("{}")
    half_deleted = manager.path(8)
    half_deleted.mkdir()
    (half_deleted / "optimizer.json").write_text("{}")
    assert manager.latest() == 4
    assert manager.load(None, model=model, optimizer=optimizer) == {"step": 4}

    manager.save(5, model=model, optimizer=optimizer, extra={"step": 5})
    assert not crashed_save.exists()
    assert manager.steps() == [4, 5]


def test_loading_a_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    model, optimizer, _ = toy_training(seed=0)
    manager = CheckpointManager(tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        manager.load(None, model=model, optimizer=optimizer)
    manager.save(2, model=model, optimizer=optimizer, extra={})
    with pytest.raises(FileNotFoundError, match=r"step 5 .*complete steps: \[2\]"):
        manager.load(5, model=model, optimizer=optimizer)


def test_checkpoint_holds_no_pickled_objects(tmp_path: Path) -> None:
    model, optimizer, scheduler = toy_training(seed=0)
    toy_train_step(model, optimizer, scheduler, toy_batches()[0])
    path = CheckpointManager(tmp_path).save(1, model=model, optimizer=optimizer,
                                            extra=checkpoint_extra_state(1, scheduler))

    # DCP stores every non-tensor entry with torch.save; only tensor entries means nothing to unpickle.
    metadata = SafeFileSystemReader(path).read_metadata()
    assert metadata.state_dict_metadata
    assert all(isinstance(entry, TensorStorageMetadata) for entry in metadata.state_dict_metadata.values())
    for file in path.iterdir():
        if file.suffix == ".json" or file.name == "COMPLETE":
            json.loads(file.read_text())
        else:
            assert file.suffix == ".distcp" or file.name == ".metadata", file.name


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_refuses_metadata_that_would_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, _ = toy_training(seed=0)
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, model=model, optimizer=optimizer, extra={})
    metadata = SafeFileSystemReader(path).read_metadata()
    metadata.planner_data = _RunsCode()
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|os)\.system, which is not allowed"):
        manager.load(1, model=model, optimizer=optimizer)
    assert not (tmp_path / "pwned").exists()


def _two_rank_worker(rank: int, world: int, run_dir: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def sharded_training(seed: int):
        model = toy_model(seed)
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return model, optimizer, scheduler

    data = toy_batches()
    model, optimizer, scheduler = sharded_training(seed=0)
    for batch in data[:2]:
        toy_train_step(model, optimizer, scheduler, batch)
    manager = CheckpointManager(run_dir)
    dataloader_state = {"rank": rank, "position": 100 + rank, "buffer": [rank] * (rank + 1)}
    manager.save(2, model=model, optimizer=optimizer, extra={"dataloader": dataloader_state})
    model.eval()
    expected_output = model(data[2][0])

    restored_model, restored_optimizer, _ = sharded_training(seed=1)
    extra = manager.load(2, model=restored_model, optimizer=restored_optimizer)
    restored_model.eval()
    local_moments = [state["exp_avg"].to_local() for state in optimizer.state.values()]
    restored_moments = [state["exp_avg"].to_local() for state in restored_optimizer.state.values()]
    return {
        "dataloader": extra["dataloader"],
        "same_output": torch.equal(restored_model(data[2][0]), expected_output),
        "same_local_moments": all(map(torch.equal, local_moments, restored_moments)) and len(local_moments) == 4,
        "files": sorted(path.name for path in manager.path(2).iterdir()),
    }


@pytest.mark.slow
def test_two_ranks_each_get_their_own_dataloader_state_back(tmp_path: Path) -> None:
    results = spawn_gloo(_two_rank_worker, 2, tmp_path, tmp_path / "run")
    for rank in (0, 1):
        assert results[rank]["dataloader"] == {"rank": rank, "position": 100 + rank, "buffer": [rank] * (rank + 1)}
        assert results[rank]["same_output"]
        assert results[rank]["same_local_moments"]
    assert {"rank0.json", "rank1.json", "optimizer.json", "COMPLETE", ".metadata"} <= set(results[0]["files"])
