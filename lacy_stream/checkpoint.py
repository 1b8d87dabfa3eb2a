"""Checkpoints of a (possibly FSDP2-sharded) training run, restartable after a crash or preemption.

Layout of ``run_dir/checkpoints/``::

    step-00001200/
        .metadata, __0_0.distcp, ...   DCP: tensors of the model and the optimizer, sharded per rank
        optimizer.json                 the optimizer's non-tensor state (param_groups), written by rank 0
        rank0.json, rank1.json, ...    each rank's ``extra`` (scheduler, counters, RNG, dataloader state)
        COMPLETE                       {"step", "world_size"}; written last
    .tmp-step-00001300/                a save in progress (or one that crashed); never loaded

Design:

* Model and optimizer go through ``get_state_dict``/``set_state_dict`` so that FSDP2 modules are saved
  as DTensor shards and plain modules as plain tensors, and through ``torch.distributed.checkpoint``
  so that every rank writes its own shard in parallel.
* Only tensors are given to DCP. DCP would store any other value with ``torch.save`` and read it back
  with ``torch.load(weights_only=False)``, i.e. by unpickling arbitrary objects. Everything that is not
  a tensor of the model or the optimizer is JSON instead, with tensors inside it encoded as base64 of
  their raw bytes (see ``_encode``). DCP's own ``.metadata`` index is the only pickle in a checkpoint,
  and ``SafeFileSystemReader`` reads it with an unpickler that only builds DCP's metadata classes, and
  refuses an index that declares any entry as bytes (``BytesStorageMetadata``: DCP would hand such an
  entry to ``torch.load(weights_only=False)``, whatever the state dict it is loaded into expects). Tensor
  files are read by DCP with ``torch.load(weights_only=True)``. Loading never runs arbitrary code.
* ``extra`` is stored per rank, because the dataloader position and the RNG streams differ per rank;
  ``load`` hands each rank back its own. Resuming therefore needs the same world size.
* A checkpoint is written into a temporary directory and renamed into place by rank 0 once every rank
  has finished, so ``latest`` never sees half a checkpoint. Pruning removes ``COMPLETE`` before deleting
  the rest, so a crash in the middle of a deletion leaves a directory ``latest`` ignores as well.
* ``run_dir`` must be on a file system all ranks share.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import distributed

CHECKPOINT_PATTERN = re.compile(r"step-(\d{8})")
COMPLETE_MARKER = "COMPLETE"
OPTIMIZER_FILE = "optimizer.json"
TEMPORARY_PREFIX = ".tmp-"


class CheckpointManager:
    def __init__(self, run_dir: Path, *, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(run_dir) / "checkpoints"
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        steps = []
        for entry in self.directory.iterdir():
            match = CHECKPOINT_PATTERN.fullmatch(entry.name)
            if match and (entry / COMPLETE_MARKER).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Path:
        """Collective when distributed: every rank calls it with its own ``extra``."""
        rank, world_size = distributed.rank(), distributed.world_size()
        final = self.path(step)
        temporary = self.directory / f"{TEMPORARY_PREFIX}{final.name}"
        if rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f"{TEMPORARY_PREFIX}*"):
                shutil.rmtree(stale)
            temporary.mkdir()
        distributed.barrier()

        model_state, optimizer_state = get_state_dict(model, optimizer)
        optimizer_tensors, optimizer_rest = _split_tensors(optimizer_state)
        try:
            with single_process_quietly():
                dcp.save({"model": model_state, "optimizer": optimizer_tensors}, checkpoint_id=temporary,
                         no_dist=not distributed.is_distributed())
            _write_json(temporary / f"rank{rank}.json", extra)
            if rank == 0:
                _write_json(temporary / OPTIMIZER_FILE, optimizer_rest)
            distributed.barrier()
            if rank == 0:
                _write_json(temporary / COMPLETE_MARKER, {"step": step, "world_size": world_size})
        except (Exception, dcp.CheckpointException) as error:  # out of space, I/O: one line, no partial directory
            message = self._write_failure(step, temporary, error)  # before the removal frees its space
            if rank == 0:
                shutil.rmtree(temporary, ignore_errors=True)
            raise CheckpointWriteError(message) from None

        if rank == 0:
            if final.exists():
                _delete(final)
            temporary.rename(final)
            for old in self.steps()[: -self.keep]:
                _delete(self.path(old))
        distributed.barrier()
        return final

    def _write_failure(self, step: int, temporary: Path, error: BaseException) -> str:
        """What went wrong writing ``temporary``, in one line. DCP's writer can report a full disk as a torch
        error without the OS error ("unexpected pos"), so the free space is named too."""
        os_error = next((cause for cause in _causes(error) if isinstance(cause, OSError)), None)
        free = shutil.disk_usage(self.directory).free
        if os_error is not None and os_error.strerror:
            reason = os_error.strerror
        elif free < NEARLY_FULL_BYTES:
            reason = "No space left on device"
        else:
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        previous = self.latest()
        kept = f"; the checkpoint of step {previous} is intact" if previous is not None else ""
        return f"could not write the checkpoint of step {step} to {temporary}: {reason} ({free:,} bytes free there){kept}"

    def load(self, step: int | None, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore ``model`` and ``optimizer`` in place; return this rank's ``extra``. ``step=None``: latest."""
        if step is None:
            step = self.latest()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        path = self.path(step)
        if not (path / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory}; complete steps: {self.steps()}"
            )
        saved_world_size = _read_json(path / COMPLETE_MARKER)["world_size"]
        if saved_world_size != distributed.world_size():
            raise ValueError(
                f"checkpoint {path} was saved by {saved_world_size} ranks, not {distributed.world_size()}: "
                "the per-rank dataloader and RNG states cannot be redistributed"
            )

        # get_state_dict gives the target structure (and shards) for DCP to load into, and creates the
        # optimizer state of a fresh optimizer so that its moments have somewhere to go.
        model_state, optimizer_state = get_state_dict(model, optimizer)
        optimizer_tensors, _ = _split_tensors(optimizer_state)
        reader = SafeFileSystemReader.checked(path)
        check_model_fits(reader, model_state, path)
        with reading_checkpoint(path), single_process_quietly():
            dcp.load({"model": model_state, "optimizer": optimizer_tensors}, storage_reader=reader,
                     no_dist=not distributed.is_distributed())
            optimizer_state = _merge(optimizer_tensors, _read_json(path / OPTIMIZER_FILE))
            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
            return _read_json(path / f"rank{distributed.rank()}.json")


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (its partial directory is removed, older checkpoints stay)."""


NEARLY_FULL_BYTES = 1 << 20
"""Less free space than this on a failed write: the disk is taken to be full."""


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and the per-rank failures DCP gathers into one exception."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
        # DCP's exception holds each rank's (exception, stack) pair.
        pending += [failure[0] if isinstance(failure, tuple) else failure
                    for failure in getattr(current, "failures", {}).values()]


class CheckpointReadError(ValueError):
    """A checkpoint whose files cannot be read back (damaged, truncated)."""


@contextlib.contextmanager
def reading_checkpoint(path: Path) -> Iterator[None]:
    """Whatever DCP or the JSON reader raise on a damaged checkpoint, as one :class:`CheckpointReadError` naming
    the checkpoint and the innermost error (DCP reports it as a multi-rank exception many frames deep)."""
    try:
        yield
    except (Exception, dcp.CheckpointException) as error:
        *_, innermost = _causes(error)
        detail = str(innermost).strip().splitlines()[0] if str(innermost).strip() else ""
        raise CheckpointReadError(f"cannot read the checkpoint {path}: {type(innermost).__name__}: {detail}") from None


class CheckpointMismatchError(ValueError):
    """A checkpoint whose model tensors have other names or shapes than the model it is loaded into."""


def check_model_fits(reader: SafeFileSystemReader, model_state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse, naming the first difference, a checkpoint whose ``model`` tensors differ in name or shape from
    ``model_state`` (DCP would report it as a long "Size mismatch" traceback from inside its planner)."""
    stored = reader.read_metadata().state_dict_metadata
    for name, tensor in model_state.items():
        entry = stored.get(f"model.{name}")
        if entry is None:
            raise CheckpointMismatchError(f"checkpoint {path} has no model tensor {name}: it is not of this model")
        if isinstance(entry, TensorStorageMetadata) and tuple(entry.size) != tuple(tensor.shape):
            hint = ""
            if name.endswith("tok_embeddings.weight"):
                hint = (" (another tokenizer, or a run from before the vocabulary was padded: "
                        "--model.vocab_multiple=1 keeps its unpadded shape)")
            raise CheckpointMismatchError(
                f"checkpoint {path} does not fit this model: {name} is {list(entry.size)} there and "
                f"{list(tensor.shape)} here{hint}"
            )


# What a DCP ``.metadata`` pickle may reference: DCP's metadata records and the torch values inside them.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint whose metadata would build other objects than DCP's own (and could run code); refused."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"):
            raise pickle.UnpicklingError(
                "checkpoint metadata declares an entry stored as a pickled object (BytesStorageMetadata), which "
                "DCP would unpickle with torch.load(weights_only=False); lacy-stream checkpoints hold tensors only"
            )
        raise pickle.UnpicklingError(f"checkpoint metadata references {module}.{name}, which is not allowed")


@contextlib.contextmanager
def single_process_quietly() -> Iterator[None]:
    """DCP warns at every save and load in one process that it assumes one process, which is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader, except that ``.metadata`` is unpickled with an allow-list of DCP's own classes."""

    @classmethod
    def checked(cls, path: str | Path) -> SafeFileSystemReader:
        """A reader of the checkpoint at ``path`` whose metadata was read: a refused checkpoint fails here with
        ``UnsafeCheckpointError``, not inside ``dcp.load``, which would report it as an assertion."""
        reader = cls(path)
        reader.read_metadata()
        return reader

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        with open(path, "rb") as file:
            try:
                metadata = _MetadataUnpickler(file).load()
            except pickle.UnpicklingError as error:
                raise UnsafeCheckpointError(f"refusing to load the checkpoint file {path}: {error}") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"refusing to load {path}: it holds a {type(metadata).__name__}, not DCP metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def capture_rng_state() -> dict[str, Any]:
    """The python, numpy, torch CPU and (if present) CUDA generator states, as JSON values and tensors."""
    version, internal, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": numpy_state["state"]["key"].tolist(),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": np.array(numpy["key"], dtype=np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _delete(checkpoint: Path) -> None:
    (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(checkpoint)


def _split_tensors(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the tensor leaves, everything else) of a nested dict, each keeping the nesting; empty dicts go to the rest."""
    tensors: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, dict) and value:
            value_tensors, value_rest = _split_tensors(value)
            if value_tensors:
                tensors[key] = value_tensors
            if value_rest:
                rest[key] = value_rest
        else:
            rest[key] = value
    return tensors, rest


def _merge(tensors: dict[str, Any], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``_split_tensors``."""
    merged = dict(tensors)
    for key, value in rest.items():
        merged[key] = _merge(merged[key], value) if isinstance(merged.get(key), dict) else value
    return merged


def _encode(value: Any) -> Any:
    """A JSON value for ``value``; tuples and tensors become tagged objects so that they come back as such."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy().tobytes()
        return {
            "__tensor__": base64.b64encode(raw).decode("ascii"),
            "dtype": str(value.dtype).removeprefix("torch."),
            "shape": list(value.shape),
        }
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item) for item in value]}
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"checkpoint state needs string keys, got {key!r}")
        return {key: _encode(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint: use JSON values and tensors")


def _decode_object(obj: dict[str, Any]) -> Any:
    if "__tuple__" in obj:
        return tuple(obj["__tuple__"])
    if "__tensor__" in obj:
        dtype = getattr(torch, obj["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"not a tensor dtype: {obj['dtype']!r}")
        raw = np.frombuffer(base64.b64decode(obj["__tensor__"]), dtype=np.uint8).copy()
        return torch.from_numpy(raw).view(dtype).reshape(obj["shape"])
    return obj


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as file:
        json.dump(_encode(value), file)
        file.flush()
        os.fsync(file.fileno())


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(), object_hook=_decode_object)
