"""The LaCy pretraining loop: FSDP2 data parallelism, gradient accumulation, checkpoints, metrics.

Launch with one process (``python -m lacy_stream train --config ...``) or with torchrun
(``torchrun --nproc-per-node=8 -m lacy_stream train --config ...``); ``--section.key=value`` overrides
any config value. A process group that already exists (tests) is used as it is.

One optimizer step consumes ``train.global_batch_tokens`` input tokens: every rank reads
``micro_batches`` micro-batches of ``data.batch_size`` windows of ``data.seq_len`` tokens.

Loss normalisation: ``lacy_loss`` returns a micro-batch's loss divided by the valid tokens of that
micro-batch over all ranks. The trainer rescales it by (valid tokens of the micro-batch) / (valid tokens
of the whole step over all ranks), so the summed gradients are those of the mean over every valid token
of the step. Dividing each micro-batch loss by the number of micro-batches would weight tokens of
micro-batches with fewer valid tokens (more document ends) slightly more, and a step would then depend
on how its global batch is split into micro-batches and ranks; with this scaling it does not (up to the
call selection, which is made per micro-batch over all ranks, and float rounding). To know the step's
valid tokens before the first backward, all micro-batches of a step are read before the first forward.

Resume: checkpoints hold the model, the optimizer, and per rank the scheduler, counters, RNG streams
and dataloader position, so a resumed run continues exactly where the saved one was (same world size).

A step reads nothing back from the GPU: the loss, the gradient norm and the counts stay on the device and
are read on logging steps only, and the ranks agree on a SIGTERM over a host-side (gloo) group. So the host
queues the next step's work while the GPU runs this one.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.tensor import DTensor

from ..checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from ..config.job_config import ConfigError, JobConfig
from ..annotate.labeling import audit_figures, student_path
from ..data.loader import TokenLoader, stream_options
from .. import stop_signals
from ..distributed import host_group, init_distributed, rank, world_size
from ..models.hf_export import export_hf
from ..inference.reference_loss import reference_scorer_factory
from ..labels import TokenClass, TokenLabels
from ..loss.lacy_loss import LossOutput
from ..loss.masks import METHODS, check_loss_config
from .metrics import MetricsLogger, StepTimer, check_metrics_config, mfu, peak_flops
from .optimizer import build_optimizer, lr_factor
from ..models.gpt2 import Transformer, check_model_config, flops_per_token, model_args
from .parallelize import TrainingModule, parallelize
from .run_directory import RunLock, check_resume, record_config
from .probes import ProbeRecorder
from .samples import SAMPLE_WINDOWS, top_calls, window_markdown
from ..shards.specs import expand_shard_spec
from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

DATA_WAIT_ADVICE_SHARE = 0.05
"""A data wait above this share of the step time gets a line of advice (once per run)."""

MIN_AUDITED_PIECES = 10_000
"""Audited pieces below which the student's agreement is too uncertain to warn about."""

# Sums over the micro-batches of a logging interval, in this order (see ``_micro_batch_counts``).
COUNTS = ("valid", "facts", "calls", "call_loss_sum", "learned", "learned_loss_sum",
          "call_shortfall", "ref_scored", "ref_loss_sum", "excess_loss_sum", "call_excess_loss_sum")


def train(config: JobConfig, *, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train as ``config`` says; returns a summary. ``on_step(step)`` runs after every optimizer step."""
    check_config(config)
    sixteen_bits = compute_dtype(config.train.dtype, training_device()) != torch.float32
    with stop_signals.handled():
        owns_group = init_distributed(even_alone=sixteen_bits)
        try:
            return _Trainer(config).run(on_step)
        finally:
            if owns_group:
                dist.destroy_process_group()


def check_config(config: JobConfig) -> None:
    """What ``load_job_config`` leaves to the components: each checks the section it owns (``ConfigError``)."""
    check_model_config(config.model)
    check_loss_config(config.loss)
    check_metrics_config(config.metrics)
    if config.train.probe_windows and not config.train.val_shards:
        raise ConfigError("train.probe_windows: the probe windows are held-out windows; set train.val_shards")


def micro_batches_per_step(global_batch_tokens: int, ranks: int, batch_size: int, seq_len: int) -> int:
    """Micro-batches each rank accumulates per optimizer step; ``global_batch_tokens`` 0 means one."""
    tokens_per_round = ranks * batch_size * seq_len
    if global_batch_tokens == 0:
        return 1
    if global_batch_tokens % tokens_per_round:
        windows = global_batch_tokens // seq_len
        fitting = [size for size in range(batch_size, 0, -1) if windows % (ranks * size) == 0]
        advice = f"; e.g. --data.batch_size={fitting[0]}" if global_batch_tokens % seq_len == 0 and fitting else ""
        raise ConfigError(
            f"train.global_batch_tokens ({global_batch_tokens}) must be a multiple of ranks x data.batch_size x "
            f"data.seq_len = {ranks} x {batch_size} x {seq_len} = {tokens_per_round}{advice}"
        )
    return global_batch_tokens // tokens_per_round


def training_device() -> torch.device:
    return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``train.dtype`` as a torch dtype: ``auto`` is bf16 on CUDA and fp32 elsewhere (bf16 runs on a CPU too,
    slowly: the tests use it to check the precision policy)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


class _Trainer:
    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.rank = rank()
        self.ranks = world_size()
        self.device = training_device()
        self.dtype = compute_dtype(config.train.dtype, self.device)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 tensor cores for whatever runs in fp32
        self.run_dir = Path(config.train.run_dir)
        self.micro_batches = micro_batches_per_step(
            config.train.global_batch_tokens, self.ranks, config.data.batch_size, config.data.seq_len
        )
        self.tokens_per_step = self.micro_batches * self.ranks * config.data.batch_size * config.data.seq_len

        # The same on every rank: FSDP shards identical weights.
        torch.manual_seed(config.train.seed)
        random.seed(config.train.seed)
        np.random.seed(config.train.seed)
        self.tokenizer = Tokenizer(config.tokenizer.path)
        overrides = {"vocab_size": self.tokenizer.vocab_size, "vocab_multiple": config.model.vocab_multiple}
        if config.model.max_seq_len:
            overrides["max_seq_len"] = config.model.max_seq_len
        self.model_args = model_args(config.model.preset, **overrides)
        if config.data.seq_len > self.model_args.max_seq_len:
            raise ConfigError(f"data.seq_len ({config.data.seq_len}) exceeds the model's max_seq_len "
                              f"({self.model_args.max_seq_len})")
        with torch.device(self.device):
            model = Transformer(self.model_args)
        self.module = parallelize(
            TrainingModule(model, config.loss, call_id=self.tokenizer.call_id, seed=config.train.seed),
            dtype=self.dtype,
            compile=config.train.compile,
            activation_checkpointing=config.train.activation_checkpointing,
        )
        self.optimizer = build_optimizer(self.module, config.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config.optimizer, config.train.steps)
        )
        self.reference = reference_scorer_factory(config.loss.reference, config.tokenizer.path)
        self.loader = TokenLoader.from_config(
            config.data, config.tokenizer.path, config.annotation, reference=self.reference,
            rank=self.rank, world_size=self.ranks,
        )
        if config.train.val_shards:  # held-out shards that name nothing fail now, not at the first validation
            expand_shard_spec(config.train.val_shards, stream_options(config.data))
        self.checkpoints = CheckpointManager(self.run_dir, keep=config.checkpoint.keep)
        self.host_group = host_group()
        self._agreement_warned = False
        self._data_wait_advised = False
        self.val_batches: list[dict[str, torch.Tensor]] | None = None
        self.probes = None
        if self.rank == 0 and config.train.probe_windows and config.train.val_shards:
            self.probes = ProbeRecorder(self.run_dir, config.train.probe_windows, config.loss.call_ratio)
        self.step = 0
        self.tokens_seen = 0
        self.flops_per_token = flops_per_token(self.model_args, config.data.seq_len)
        on_gpu = self.device.type == "cuda"
        peak_dtype = "tf32" if self.dtype == torch.float32 else str(self.dtype)
        self.peak_flops = peak_flops(torch.cuda.get_device_name(), peak_dtype) if on_gpu else None

    def run(self, on_step: Callable[[int], None] | None) -> dict[str, Any]:
        with RunLock(self.run_dir) if self.rank == 0 else nullcontext():
            return self._run(on_step)

    def _run(self, on_step: Callable[[int], None] | None) -> dict[str, Any]:
        config = self.config
        resuming_from = self.checkpoints.latest() if config.checkpoint.resume else None
        check_resume(self.run_dir, config, resuming_from)
        if resuming_from is not None:
            self._load_checkpoint()
        if self.probes is not None:
            self.probes.drop_after(self.step)
        if self.rank == 0:
            record_config(self.run_dir, config, resuming_from)
            if resuming_from is not None:
                print(_resume_line(self.run_dir, self.step, config.train.steps), file=sys.stderr, flush=True)
            method = METHODS[config.loss.method]
            if method.ignore_mask != "none":
                print(f"loss.method={method.name} leaves its ignored tokens ({method.ignore_mask}) out of the loss, "
                      "which counts them as 0 over all tokens: its loss runs below other methods' (lacy-stream compare "
                      "scores runs alike)", file=sys.stderr, flush=True)
        timer = StepTimer()
        totals = self._zero_totals()
        losses: list[torch.Tensor] = []
        saved_step = self.checkpoints.latest()
        progress_lines = self.rank == 0 and not sys.stderr.isatty()  # a terminal shows the progress bar instead
        first_step = self.step
        # A stop requested while the run was being set up: nothing new to save.
        interrupted = self._any_rank(stop_signals.requested() is not None)
        with (
            closing(iter(self.loader)) as batches,  # the workers end with the loop, even when it ends in an error
            MetricsLogger(self.run_dir, rank=self.rank, start_step=self.step, config=config.metrics,
                          run_config=dataclasses.asdict(config)) as metrics,
            self._progress() as bar,
        ):
            while self.step < config.train.steps and not interrupted:
                loss, grad_norm = self._train_step(batches, timer, totals)
                lr = self.scheduler.get_last_lr()[0]
                self.scheduler.step()
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                timer.step_done(self.tokens_per_step)
                losses.append(loss)
                last_step = self.step == config.train.steps
                record = {}
                if self.step % config.train.log_every == 0 or last_step:
                    record = self._metrics(losses, totals, timer, grad_norm, lr)
                    losses, totals = [], self._zero_totals()
                if config.train.val_shards and (self.step % config.train.val_every == 0 or last_step):
                    record["val"], samples = self._validate()
                    for number, sample in enumerate(samples):
                        metrics.log_text(self.step, f"val/sample_{number}", sample)
                if record:
                    metrics.log(self.step, record)
                if progress_lines and "loss" in record:
                    print(_progress_line(self.step, config.train.steps, record, self.tokens_per_step), file=sys.stderr,
                          flush=True)
                bar.update(1)
                if on_step is not None:
                    on_step(self.step)
                # Every rank must agree to stop, or the others would hang in the next collective.
                interrupted = self._any_rank(stop_signals.requested() is not None)
                if interrupted or self.step % config.checkpoint.every == 0 or self.step == config.train.steps:
                    self._save_checkpoint()
                    saved_step = self.step
                if interrupted:
                    log.warning("stop signal: saved a checkpoint at step %d and stopped", self.step)
        hf_dir = self._export() if config.checkpoint.export_hf and not interrupted else None
        return {
            "step": self.step,
            "first_step": first_step,
            "tokens_seen": self.tokens_seen,
            "interrupted": interrupted,
            "stop_signal": stop_signals.name(stop_signals.requested()) if interrupted else None,
            "checkpoint_step": saved_step,
            "hf_dir": str(hf_dir) if hf_dir else None,
            "run_dir": str(self.run_dir),
        }

    def _train_step(
        self, batches: Iterator[dict], timer: StepTimer, totals: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss of the step over all ranks, gradient norm before clipping), both
        0-dim tensors on the device: nothing is read back from it."""
        with timer.data_wait():
            micro_batches = [self._prepare(next(batches)) for _ in range(self.micro_batches)]
        local_valid = sum(batch["valid"].sum() for batch in micro_batches).double()
        step_valid = self._sum_over_ranks(local_valid).clamp(min=1)
        step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in micro_batches:
            output = self.module(**batch, step=self.step)
            share = output.loss * (output.masks.valid_tokens / step_valid).to(output.loss.dtype)
            share.backward()
            step_loss += share.detach()
            totals += _micro_batch_counts(batch, output, self.rank)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._sum_over_ranks(step_loss), grad_norm

    def _validate(self) -> tuple[dict[str, float | None], list[str]]:
        """Loss, call loss and non-call loss over the same ``val_batches`` held-out micro-batches each time, and
        on rank 0 the first ``SAMPLE_WINDOWS`` windows as markdown, facts and the model's calls marked.

        The batches are read once, on first use, from ``train.val_shards`` (each rank its share), and
        scored with the training loss (its masks chosen as for step 0, so random methods repeat them).
        """
        if self.val_batches is None:
            loader = TokenLoader.from_config(
                dataclasses.replace(self.config.data, shards=self.config.train.val_shards, num_workers=0),
                self.config.tokenizer.path, self.config.annotation, reference=self.reference,
                rank=self.rank, world_size=self.ranks,
            )
            self.val_batches = [self._prepare(batch) for batch in itertools.islice(loader, self.config.train.val_batches)]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        totals = self._zero_totals()
        samples = []
        with torch.no_grad():
            for number, batch in enumerate(self.val_batches):
                output = self.module(**batch, step=0)
                loss_sum += output.loss.double() * output.masks.valid_tokens
                totals += _micro_batch_counts(batch, output, self.rank)
                if number == 0 and self.rank == 0:
                    samples = self._samples(batch, output)
                    if self.probes is not None:
                        self._record_probes(batch, output)
        counts = dict(zip(COUNTS, self._sum_over_ranks(totals).tolist()))
        loss_sum = self._sum_over_ranks(loss_sum).item()  # each rank's loss is its share of the global one
        return {"loss": loss_sum / max(counts["valid"], 1), **_loss_breakdown(counts)}, samples

    def _record_probes(self, batch: dict[str, Any], output: LossOutput) -> None:
        shape = batch["targets"].shape
        self.probes.record(
            self.step, torch.cat([batch["inputs"][:, :1], batch["targets"]], dim=1), batch["labels"].token_class,
            batch["valid"], output.learned_loss.view(shape), output.call_loss.view(shape), output.masks.call.view(shape),
        )

    def _samples(self, batch: dict[str, Any], output: LossOutput) -> list[str]:
        """The first windows of a validation micro-batch as markdown (``samples.window_markdown``)."""
        shape = batch["targets"].shape
        call_logprob = -output.call_loss.view(shape).float().cpu()
        valid = batch["valid"].cpu()
        token_class = batch["labels"].token_class.cpu()
        tokens = torch.cat([batch["inputs"][:, :1], batch["targets"]], dim=1).cpu()
        calling = self.config.loss.method != "baseline"
        return [
            window_markdown(
                self.tokenizer, tokens[row], token_class[row],
                top_calls(call_logprob[row], valid[row], self.config.loss.call_ratio) if calling else None,
            )
            for row in range(min(SAMPLE_WINDOWS, shape[0]))
        ]

    def _prepare(self, batch: dict) -> dict[str, Any]:
        """Loader columns [B, T + 1] -> the ``TrainingModule`` inputs [B, T] on the device."""
        wanted = ["token_class", "judge"] + (["ref_loss"] if self.config.loss.reference else [])
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        labels = TokenLabels(**{name: batch[name][:, 1:].to(self.device, non_blocking=True) for name in wanted})
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "valid": labels.token_class != TokenClass.IGNORE,
            "labels": labels,
        }

    def _clip_gradients(self) -> torch.Tensor:
        max_norm = self.config.optimizer.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _metrics(
        self, losses: list[torch.Tensor], totals: torch.Tensor, timer: StepTimer, grad_norm: torch.Tensor, lr: float
    ) -> dict[str, Any]:
        counts = dict(zip(COUNTS, self._sum_over_ranks(totals).tolist()))
        throughput = timer.summary()
        tokens_per_s = throughput["tokens_per_s"]
        label_counts = self.loader.label_counts()
        audit = audit_figures(label_counts)
        if audit:
            self._warn_on_low_agreement(audit)
        if throughput["data_wait_share"] is not None and self.step > self.config.train.log_every:  # past start-up
            self._advise_on_data_wait(throughput["data_wait_share"])
        return {
            "loss": torch.stack(losses).mean().item(),
            **_loss_breakdown(counts),
            "fact_ratio": counts["facts"] / max(counts["valid"], 1),
            "call_shortfall": counts["call_shortfall"] / len(losses),
            "tokens_per_s": tokens_per_s,
            "tokens_seen": self.tokens_seen,
            "grad_norm": grad_norm.item(),
            "lr": lr,
            "mfu": mfu(tokens_per_s / self.ranks, self.flops_per_token, self.peak_flops) if tokens_per_s else None,
            "data_wait_share": throughput["data_wait_share"],
            "data": {**self.loader.read_stats(), "labels": label_counts},  # this rank's counters
            "annotation": audit or None,
        }

    def _advise_on_data_wait(self, wait_share: float) -> None:
        """Once per run, when the step waits for data: how many workers would feed it, or what else would."""
        if self._data_wait_advised or wait_share <= DATA_WAIT_ADVICE_SHARE:
            return
        self._data_wait_advised = True
        data = self.config.data
        # The workers deliver what the step consumes now; without waiting it would consume 1 / (1 - wait) times more.
        needed = math.ceil(max(data.num_workers, 1) / (1 - wait_share))
        log.warning("the step waits for data %.0f%% of its time: %d dataloader workers per rank %s keep up with "
                    "%.0f%% of it; %s", 100 * wait_share, data.num_workers, self._worker_tasks(),
                    100 * (1 - wait_share), "; or ".join(self._data_wait_remedies(needed)))

    def _worker_tasks(self) -> str:
        """What the dataloader workers spend their time on, for the data-wait advice."""
        annotation = self.config.annotation
        tasks = []
        if annotation.enabled:
            tasks.append(f"labeling with {'a student' if student_path(annotation.labeler) else 'spaCy'}")
        if self.reference is not None:
            tasks.append("scoring with the reference model")
        return " and ".join(tasks) or "reading"

    def _data_wait_remedies(self, workers_needed: int) -> list[str]:
        remedies = [f"about {workers_needed} workers would feed it (data.num_workers)"]
        annotation = self.config.annotation
        if annotation.enabled and not student_path(annotation.labeler):
            remedies.append("a student labeler (annotation.labeler=student:PATH, ~13x spaCy per core; lacy-stream "
                            "bench annotate --gpu-tokens-per-s gives the cores each labeler needs)")
        if self.reference is not None:
            remedies.append("the reference losses stored with the shards, computed once (lacy-stream annotate "
                            "--shards ... --reference ...)")
        if annotation.enabled or self.reference is not None:
            remedies.append("the label cache, from the second epoch on")
        return remedies

    def _warn_on_low_agreement(self, audit: dict[str, float]) -> None:
        """Once per run: the student labels this corpus unlike spaCy (judged on enough audited pieces)."""
        wanted = self.config.annotation.audit_min_agreement
        if self._agreement_warned or audit["audited_pieces"] < MIN_AUDITED_PIECES or audit["student_agreement"] >= wanted:
            return
        self._agreement_warned = True
        log.warning(
            "the student labeler agrees with spaCy on %.1f%% of %d audited pieces of this corpus (fact precision "
            "%.1f%%, recall %.1f%%), below annotation.audit_min_agreement = %.0f%%: distill a student on this "
            "corpus, or label with spaCy (annotation.labeler=spacy)", 100 * audit["student_agreement"],
            audit["audited_pieces"], 100 * audit["student_fact_precision"], 100 * audit["student_fact_recall"],
            100 * wanted,
        )

    def _zero_totals(self) -> torch.Tensor:
        return torch.zeros(len(COUNTS), dtype=torch.float64, device=self.device)

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.ranks > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank, agreed on the host: no wait for the GPU."""
        if self.ranks == 1:
            return flag
        value = torch.tensor([float(flag)])
        dist.all_reduce(value, group=self.host_group)
        return bool(value.item())

    def _save_checkpoint(self) -> None:
        extra = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "dataloader": self.loader.state_dict(),
        }
        self.checkpoints.save(self.step, model=self.module, optimizer=self.optimizer, extra=extra)

    def _load_checkpoint(self) -> None:
        extra = self.checkpoints.load(None, model=self.module, optimizer=self.optimizer)
        self.step = extra["step"]
        self.tokens_seen = extra["tokens_seen"]
        self.scheduler.load_state_dict(extra["scheduler"])
        restore_rng_state(extra["rng"])
        self.loader.load_state_dict(extra["dataloader"])

    def _export(self) -> Path | None:
        """Collective: gathers the full weights on every rank; rank 0 writes the Hugging Face model."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=options)
        if self.rank != 0:
            return None
        weights = {name.removeprefix("model."): tensor for name, tensor in state.items()}
        return export_hf(weights, self.config.tokenizer.path, self.run_dir / "hf", args=self.model_args)

    def _progress(self):
        """A tqdm bar on rank 0 when stderr is a terminal, else a stand-in that does nothing."""
        if self.rank != 0 or not sys.stderr.isatty():
            return nullcontext(_NoProgress())
        from tqdm import tqdm

        return tqdm(total=self.config.train.steps, initial=self.step, unit="step", dynamic_ncols=True)


class _NoProgress:
    def update(self, steps: int) -> None:
        pass


def _resume_line(run_dir: Path, step: int, steps: int) -> str:
    """What a run that found a checkpoint does: resume from it, or nothing when it made its steps already."""
    if step >= steps:
        return f"nothing to do: {run_dir} is at step {step} of train.steps={steps}; raise --train.steps to train on"
    return f"resuming {run_dir} from the checkpoint of step {step}: {steps - step} steps to go"


def _progress_line(step: int, steps: int, record: dict[str, Any], tokens_per_step: int) -> str:
    """One log line: the step, its loss, the throughput, the time left at that throughput and, on a validation
    step, the held-out loss."""
    tokens_per_s = record["tokens_per_s"]
    eta = _duration((steps - step) * tokens_per_step / tokens_per_s) if tokens_per_s else "unknown"
    throughput = f"{tokens_per_s:,.0f}" if tokens_per_s else "-"
    validation = f"  val loss {record['val']['loss']:.4f}" if "val" in record else ""
    return f"step {step}/{steps}  loss {record['loss']:.4f}  {throughput} tokens/s  ETA {eta}{validation}"


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``2h07m``."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _micro_batch_counts(batch: dict[str, Any], output: LossOutput, rank: int) -> torch.Tensor:
    """This rank's ``COUNTS`` of one micro-batch (the call shortfall, the same on every rank, counted by rank 0)."""
    labels: TokenLabels = batch["labels"].flatten()
    valid = batch["valid"].flatten()
    call = output.masks.call
    learned = valid & ~call & ~output.masks.ignore
    facts = valid & (labels.token_class == TokenClass.FACT)
    zero = torch.zeros((), device=valid.device)

    def sum_over(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, values, 0).sum()  # not values[mask]: boolean indexing reads the count back

    excess = output.learned_loss - labels.ref_loss if labels.ref_loss is not None else None
    values = [
        valid.sum(), facts.sum(), call.sum(), sum_over(call, output.call_loss), learned.sum(),
        sum_over(learned, output.learned_loss), output.masks.call_shortfall if rank == 0 else zero,
        valid.sum() if excess is not None else zero,
        sum_over(valid, labels.ref_loss) if excess is not None else zero,
        sum_over(valid, excess) if excess is not None else zero,
        sum_over(call, excess) if excess is not None else zero,
    ]
    return torch.stack([value.to(dtype=torch.float64) for value in values])


def _loss_breakdown(counts: dict[str, float]) -> dict[str, float | None]:
    """Mean call loss, mean non-call loss and call ratio from summed ``COUNTS``."""
    breakdown = {
        "call_loss": counts["call_loss_sum"] / counts["calls"] if counts["calls"] else None,
        "noncall_loss": counts["learned_loss_sum"] / counts["learned"] if counts["learned"] else None,
        "call_ratio": counts["calls"] / max(counts["valid"], 1),
    }
    if counts["ref_scored"]:
        breakdown["ref_loss"] = counts["ref_loss_sum"] / counts["ref_scored"]
        breakdown["excess_loss"] = counts["excess_loss_sum"] / counts["ref_scored"]
        breakdown["call_excess_loss"] = counts["call_excess_loss_sum"] / counts["calls"] if counts["calls"] else None
    return breakdown
