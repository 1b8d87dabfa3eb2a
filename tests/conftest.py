from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Before anything imports lacy_stream.loss: triton.jit defines a kernel for its interpreter or for the GPU
    # when the kernel is defined, so this has the loss's Triton kernels tested on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # The suite runs in several worker processes (pytest-xdist): each gets its share of the cores, it and the
    # processes its tests start (torch's threads spin-wait for each other when the cores are oversubscribed).
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS has no affinity
    _threads = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from helpers import SHARED_DIR, make_judged_corpus, synthetic_text  # noqa: E402
from lacy_stream.tokenizer import train_tokenizer  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The one rule for the paper's data: tests marked ``needs_shared`` are skipped when ``SHARED_DIR`` is missing."""
    if SHARED_DIR.is_dir():
        return
    missing = pytest.mark.skip(reason=f"{SHARED_DIR} not found (set LACY_SHARED_DIR)")
    for item in items:
        if item.get_closest_marker("needs_shared"):
            item.add_marker(missing)


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


@pytest.fixture(scope="module")
def judged_corpus(tmp_path_factory) -> Path:
    """Shards whose documents carry LLM-judge markup (see ``helpers.judged_document``)."""
    return make_judged_corpus(tmp_path_factory.mktemp("judged"))
