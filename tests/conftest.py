from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path

import pytest
import torch
import webdataset

if not torch.cuda.is_available():
    # Before anything imports lacy_stream.loss: triton.jit defines a kernel for its interpreter or for the GPU
    # when the kernel is defined, so this has the loss's Triton kernels tested on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lacy_stream.tokenizer import train_tokenizer  # noqa: E402

SHARED_DIR = Path(os.environ.get("LACY_SHARED_DIR", Path(__file__).resolve().parents[1].parent / "shared"))
needs_shared = pytest.mark.skipif(not SHARED_DIR.is_dir(), reason=f"{SHARED_DIR} not found (set LACY_SHARED_DIR)")

WORDS = (
    "the river city museum was founded in by a painter who studied law at university and later moved to "
    "Paris where she met the composer Wolfgang Amadeus Mozart during winter of council committee born died "
    "Dr Professor number bridge station island mountain village king queen war treaty company"
).split()


def synthetic_text(rng: random.Random, sentences: int) -> str:
    lines = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words).capitalize() + f" in {rng.randint(1000, 2024)}.")
    return " ".join(lines)


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.write_bytes(tar_bytes(samples))


def write_manifest(directory: Path, names: list[str], documents: list[int]) -> None:
    shards = []
    for name, count in zip(names, documents):
        data = (directory / name).read_bytes()
        shards.append({"name": name, "documents": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": "lacy-stream-shards", "version": 1, "documents": sum(documents), "shards": shards}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def make_corpus(directory: Path, shards: int, docs_per_shard: int | list[int], seed: int = 0) -> dict[str, str]:
    """Shards of synthetic documents plus a manifest; returns key -> text of every document."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    counts = docs_per_shard if isinstance(docs_per_shard, list) else [docs_per_shard] * shards
    texts, names = {}, []
    for shard, count in enumerate(counts):
        samples = []
        for index in range(count):
            key = f"{shard:03d}{index:05d}"
            text = synthetic_text(rng, rng.randint(1, 12))
            texts[key] = text
            samples.append((key, {"txt": text.encode(), "json": json.dumps({"id": key, "title": None}).encode()}))
        name = f"part-{shard:06d}.tar"
        write_tar(directory / name, samples)
        names.append(name)
    write_manifest(directory, names, counts)
    return texts


@pytest.fixture(autouse=True)
def label_cache_in_tmp(tmp_path, monkeypatch):
    """Label caches of tests go to their temporary directory, never to the user's cache."""
    monkeypatch.setenv("LACY_CACHE_DIR", str(tmp_path / "lacy-cache"))


@pytest.fixture(autouse=True)
def hosts_up_again(monkeypatch):
    """A host one test found down is not down for the next one (the OS reuses loopback ports)."""
    from lacy_stream.shards import streams

    monkeypatch.setattr(streams, "_HOSTS", streams._HostCircuitBreaker())


@pytest.fixture
def one_torch_thread():
    """For tests that run tiny models a token at a time: more threads only wait for each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    rng = random.Random(1)
    texts = [synthetic_text(rng, 20) for _ in range(300)]
    path = tmp_path_factory.mktemp("tokenizer") / "tiny.model"
    train_tokenizer(texts, path, vocab_size=400)
    return str(path)


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer, mtime=0) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    return buffer.getvalue()


def _gloo_entry(rank: int, world: int, init_file: str, worker, args: tuple, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results[rank] = worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(worker, world: int, tmp_path: Path, *args) -> dict:
    """Run ``worker(rank, world, *args)`` in ``world`` processes joined in a gloo group; {rank: its result}."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gloo_entry, args=(world, str(tmp_path / "gloo-init"), worker, args, results), nprocs=world)
        return dict(results)
