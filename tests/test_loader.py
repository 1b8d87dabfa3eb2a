"""Document accounting across ranks and workers, equal batch counts, and exact resume."""

from __future__ import annotations

import functools
import os
import http.server
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_corpus

from lacy_stream.config.job_config import AnnotationConfig
from lacy_stream.data.loader import ResumeMismatchError, TokenLoader, assign_shards
from lacy_stream.data.packing import split_doc_uid
from lacy_stream.shards.documents import TooManySkipsError
from lacy_stream.shards.specs import expand_shard_spec
from lacy_stream.tokenizer import Tokenizer

SEQ_LEN = 32
BATCH = 2
UNLABELED = AnnotationConfig(enabled=False, cache=False)
"""These tests are about which tokens arrive; labeled batches are tested in test_labeled_loader.py."""


def build_loader(directory: Path, tokenizer_path: str, *, rank: int, world: int, workers: int, **kwargs) -> TokenLoader:
    return TokenLoader(
        expand_shard_spec(str(directory)),
        tokenizer_path,
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        num_workers=workers,
        rank=rank,
        world_size=world,
        seed=3,
        **{"annotation": UNLABELED, **kwargs},
    )


def epochs_of(batch: dict) -> np.ndarray:
    return np.vectorize(lambda uid: split_doc_uid(uid)[0])(batch["doc_ids"].numpy())


def batches_until_epoch_one(loader: TokenLoader, workers: int, limit: int = 2000) -> list[dict]:
    """Batches until each worker of the loader has moved on to epoch 1 (workers take turns)."""
    batches = []
    for batch in loader:
        batches.append(batch)
        last = batches[-max(workers, 1) :]
        if len(last) == max(workers, 1) and all(epochs_of(b)[:, -1].min() >= 1 for b in last):
            return batches
        assert len(batches) < limit, "epoch 0 never ended"
    raise AssertionError("the loader stopped")


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow),  # workers are processes
                                     pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("shards", [7, 2], ids=["shards>=slots", "fewer-shards-than-slots"])
def test_every_document_exactly_once_per_epoch(tmp_path, tokenizer_path, world, workers, shards):
    texts = make_corpus(tmp_path, shards=shards, docs_per_shard=60 // shards)
    tokenizer = Tokenizer(tokenizer_path)
    keys = {(shard, index): f"{shard:03d}{index:05d}" for shard in range(shards) for index in range(60 // shards)}

    per_rank = []
    for rank in range(world):
        per_rank.append(batches_until_epoch_one(build_loader(tmp_path, tokenizer_path, rank=rank, world=world, workers=workers), workers))
    # Streams cycle, so every rank can yield as many batches as the longest rank needed.
    longest = max(len(batches) for batches in per_rank)
    for rank in range(world):
        loader = build_loader(tmp_path, tokenizer_path, rank=rank, world=world, workers=workers)
        assert sum(1 for _, _ in zip(range(longest), loader)) == longest

    seen: dict[tuple[int, int], dict[int, int]] = defaultdict(dict)
    for batches in per_rank:
        for batch in batches:
            for row in range(batch["tokens"].shape[0]):
                for token, position, uid in zip(batch["tokens"][row].tolist(), batch["positions"][row].tolist(), batch["doc_ids"][row].tolist()):
                    epoch, shard, index = split_doc_uid(uid)
                    if epoch == 0:
                        assert position not in seen[(shard, index)], "a token of epoch 0 was read twice"
                        seen[(shard, index)][position] = token
    assert set(seen) == set(keys)
    for doc, tokens in seen.items():
        expected = tokenizer.encode(texts[keys[doc]]) + [tokenizer.eos_id]
        assert [tokens[p] for p in range(len(tokens))] == expected


def test_shard_assignment_covers_each_sample_once():
    for shards, slots in [(1, 5), (3, 4), (4, 4), (9, 4), (2, 7)]:
        for epoch in range(3):
            claims = defaultdict(int)
            for slot in range(slots):
                for assignment in assign_shards(shards, slots, slot, epoch, seed=0):
                    for index in range(50):
                        if index % assignment.stride == assignment.offset:
                            claims[(assignment.shard, index)] += 1
            assert claims == {(shard, index): 1 for shard in range(shards) for index in range(50)}


def test_shuffle_is_seeded_per_epoch():
    orders = [[a.shard for a in assign_shards(50, 1, 0, epoch, seed=7)] for epoch in range(3)]
    assert orders[0] != orders[1] != orders[2]
    assert orders[0] == [a.shard for a in assign_shards(50, 1, 0, 0, seed=7)]
    assert orders[0] != [a.shard for a in assign_shards(50, 1, 0, 0, seed=8)]


def assert_batches_equal(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_next_batches(tmp_path, tokenizer_path, workers):
    """torchtitan-style: iterate, save, rebuild, load; the next batches are identical (2 ranks, across epochs)."""
    make_corpus(tmp_path, shards=3, docs_per_shard=[5, 9, 2])
    for rank in range(2):
        loader = build_loader(tmp_path, tokenizer_path, rank=rank, world=2, workers=workers)
        iterator = iter(loader)
        for _ in range(7):
            next(iterator)
        state = loader.state_dict()
        stats_at_save = loader.read_stats()
        expected = [next(iterator) for _ in range(40)]  # long enough to cross epoch boundaries
        assert epochs_of(expected[-1]).max() >= 1

        resumed = build_loader(tmp_path, tokenizer_path, rank=rank, world=2, workers=workers)
        resumed.load_state_dict(state)
        assert resumed.read_stats() == stats_at_save
        got = []
        for batch in resumed:
            got.append(batch)
            if len(got) == len(expected):
                break
        assert_batches_equal(expected, got)
        assert resumed.read_stats() == loader.read_stats()


def test_resume_with_another_layout_is_refused(tmp_path, tokenizer_path):
    make_corpus(tmp_path, shards=2, docs_per_shard=4)
    loader = build_loader(tmp_path, tokenizer_path, rank=0, world=2, workers=2)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ResumeMismatchError, match="world_size"):
        build_loader(tmp_path, tokenizer_path, rank=0, world=1, workers=2).load_state_dict(state)
    with pytest.raises(ResumeMismatchError, match="num_workers"):
        build_loader(tmp_path, tokenizer_path, rank=0, world=2, workers=1).load_state_dict(state)


@pytest.mark.timeout(60)
def test_a_worker_without_documents_fails_clearly_instead_of_hanging(tmp_path, tokenizer_path):
    make_corpus(tmp_path, shards=1, docs_per_shard=2)
    loader = build_loader(tmp_path, tokenizer_path, rank=0, world=1, workers=3)
    with pytest.raises(TooManySkipsError, match="read no document"):
        for _ in loader:
            pass


def test_a_worker_that_skips_more_than_max_skip_ratio_fails_at_the_end_of_its_epoch(tmp_path, tokenizer_path):
    make_corpus(tmp_path, shards=2, docs_per_shard=3)
    spec = f"{tmp_path}::{tmp_path / 'missing-000000.tar'}"
    loader = TokenLoader(expand_shard_spec(spec), tokenizer_path, seq_len=SEQ_LEN, batch_size=BATCH, num_workers=0,
                         annotation=UNLABELED, max_skip_ratio=0.25)
    with pytest.raises(TooManySkipsError, match=r"after epoch 0: .* 33.3% of the shards were skipped"):
        for _ in zip(range(500), loader):
            pass


@pytest.mark.slow
def test_skip_counters_reach_the_loader(tmp_path, tokenizer_path):
    make_corpus(tmp_path, shards=2, docs_per_shard=5)
    spec = f"{tmp_path}::{tmp_path / 'missing-000000.tar'}"
    loader = TokenLoader(
        expand_shard_spec(spec), tokenizer_path, seq_len=SEQ_LEN, batch_size=BATCH, num_workers=0, annotation=UNLABELED
    )
    for _, _ in zip(range(200), loader):
        pass
    stats = loader.read_stats()
    assert stats["skipped"]["unreachable_shard"] >= 1
    assert stats["docs"] >= 10


@pytest.fixture
def http_base(tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def test_http_shards_stream_like_local_ones(tmp_path, tokenizer_path, http_base):
    make_corpus(tmp_path, shards=3, docs_per_shard=6)
    local = build_loader(tmp_path, tokenizer_path, rank=1, world=2, workers=2)
    remote = TokenLoader(
        expand_shard_spec(f"{http_base}/manifest.json"), tokenizer_path, seq_len=SEQ_LEN, batch_size=BATCH,
        num_workers=2, rank=1, world_size=2, seed=3, annotation=UNLABELED,
    )
    assert remote.dataset.urls[0].startswith("http://127.0.0.1")
    assert_batches_equal([b for _, b in zip(range(25), local)], [b for _, b in zip(range(25), remote)])
    assert remote.read_stats()["skipped"] == {}


@pytest.mark.slow
def test_workers_are_not_forked_from_the_trainer_and_see_its_cache_location(tmp_path, tokenizer_path, monkeypatch):
    """A fork of the trainer would copy the locks its threads hold (the rare worker segfault); the fork server's
    workers are its children, and they label into the cache the trainer's environment names when the loader is
    made, not the one the server started with."""
    make_corpus(tmp_path / "shards", shards=1, docs_per_shard=3)
    next(iter(build_loader(tmp_path / "shards", tokenizer_path, rank=0, world=1, workers=1)))  # the server is up
    cache = tmp_path / "cache-of-this-loader"
    monkeypatch.setenv("LACY_CACHE_DIR", str(cache))
    loader = build_loader(tmp_path / "shards", tokenizer_path, rank=0, world=1, workers=1,
                          annotation=AnnotationConfig())
    batches = iter(loader)
    next(batches)
    (worker,) = loader.loader._iterator._workers
    status = Path(f"/proc/{worker.pid}/status").read_text()
    parent = int(status.split("PPid:", 1)[1].split()[0])
    assert parent != os.getpid()
    batches.close()
    assert list((cache / "labels").glob("*/identity.txt"))
