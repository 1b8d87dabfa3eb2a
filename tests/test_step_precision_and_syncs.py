"""The training step on one process: FSDP2's bf16 policy as on N processes, fused AdamW, and no value read back
from the device outside logging steps."""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import lacy_stream.trainer.parallelize as parallelize_module
from helpers import make_corpus
from lacy_stream.config.job_config import load_job_config
from lacy_stream.distributed import init_distributed
from lacy_stream.trainer.metrics import StepTimer
from lacy_stream.trainer.train import _Trainer, train

aten = torch.ops.aten

HOST_READ_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                 aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_consecutive.default,
                 aten.repeat_interleave.Tensor}
"""Operators that hand a value of a tensor to the host (``item``, ``bool``, boolean indexing's ``nonzero``)."""

HOST_READ_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.item}
"""Tensor methods that read the data directly; on the CPU they dispatch no operator, so they are seen here."""


class _HostReadOperators(TorchDispatchMode):
    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1] if index is not None)
        if func in HOST_READ_OPS or boolean_index:
            self.reads.append(str(func))
        return func(*args, **kwargs)


class _HostReadMethods(TorchFunctionMode):
    def __init__(self, reads: list[str]) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READ_METHODS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@contextmanager
def host_reads():
    """Records every read of a tensor's value by the host inside the block (on a GPU each one waits for the
    work queued before it)."""
    reads: list[str] = []
    with _HostReadMethods(reads), _HostReadOperators(reads):
        yield reads


def test_the_detector_sees_what_it_should():
    values = torch.arange(6.0)
    for read in (lambda: values.sum().item(), lambda: values[values > 2], lambda: bool(values.any()),
                 lambda: values.tolist(), lambda: int(values[0])):
        with host_reads() as reads:
            read()
        assert reads, read
    with host_reads() as reads:
        torch.where(values > 2, values, 0).sum()
        values.sort(descending=True, stable=True)
    assert not reads


def job(tmp_path: Path, tokenizer_path: str, *extra: str):
    make_corpus(tmp_path / "corpus", shards=2, docs_per_shard=6)
    return load_job_config(None, [
        f"--data.shards={tmp_path / 'corpus'}", f"--tokenizer.path={tokenizer_path}", f"--train.run_dir={tmp_path / 'run'}",
        "--model.preset=tiny", "--model.max_seq_len=32", "--data.seq_len=32", "--data.batch_size=2",
        "--data.num_workers=0", "--train.global_batch_tokens=128", "--train.steps=3", "--checkpoint.export_hf=false",
        *extra,
    ])


@contextmanager
def one_process_group(dtype: str):
    owns = init_distributed(even_alone=dtype == "bf16")
    try:
        yield
    finally:
        if owns:
            dist.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("dtype", "method"), [("fp32", "lacy"), ("bf16", "lacy"), ("bf16", "rho1")])
@pytest.mark.slow
def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, tokenizer_path, dtype, method):
    """Masks, budgets, counts, the loss, gradient clipping and the optimizer step run without a single host read;
    the batches are read beforehand (the loader's work is the host's own)."""
    extra = ["--loss.method=rho1", f"--loss.reference={tmp_path / 'reference'}"] if method == "rho1" else []
    if method == "rho1":
        train(job(tmp_path / "reference-run", tokenizer_path, "--loss.method=baseline", "--annotation.enabled=false",
                  f"--train.run_dir={tmp_path / 'reference'}", "--train.steps=1", "--train.global_batch_tokens=0"))
    config = job(tmp_path, tokenizer_path, f"--train.dtype={dtype}", "--loss.implementation=chunked", *extra)
    with one_process_group(dtype):
        trainer = _Trainer(config)
        batches = list(itertools.islice(iter(trainer.loader), 4 * trainer.micro_batches))
        timer, totals = StepTimer(), trainer._zero_totals()
        trainer._train_step(iter(batches), timer, totals)  # warm-up: the optimizer creates its state
        with host_reads() as reads:
            for _ in range(2):
                loss, grad_norm = trainer._train_step(iter(batches), timer, totals)
        assert reads == []
        assert torch.isfinite(loss) and grad_norm > 0


@pytest.mark.timeout(300)
def test_one_process_in_bf16_hands_the_loss_bf16_and_keeps_fp32_masters(tmp_path, tokenizer_path, monkeypatch):
    seen = []
    loss_function = parallelize_module.lacy_loss

    def recording_loss(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype, weight.shape[0], kwargs["vocab_size"]))
        return loss_function(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(parallelize_module, "lacy_loss", recording_loss)
    config = job(tmp_path, tokenizer_path, "--train.dtype=bf16", "--train.steps=2")
    with one_process_group("bf16"):
        trainer = _Trainer(config)
        trainer.run(None)
        parameters = list(trainer.module.parameters())
        assert all(parameter.dtype == torch.float32 for parameter in parameters)
        assert all(state["exp_avg"].dtype == torch.float32 for state in trainer.optimizer.state.values())
        assert trainer.optimizer.defaults["fused"] is True
    vocab = trainer.tokenizer.vocab_size
    assert seen and all(entry == (torch.bfloat16, torch.bfloat16, 128 * -(-vocab // 128), vocab) for entry in seen)


def test_fp32_on_one_process_needs_no_group_and_bf16_refuses_to_run_without_one(tmp_path, tokenizer_path):
    assert init_distributed(even_alone=False) is False and not dist.is_initialized()
    with pytest.raises(ValueError, match="needs a process group"):
        _Trainer(job(tmp_path, tokenizer_path, "--train.dtype=bf16"))
