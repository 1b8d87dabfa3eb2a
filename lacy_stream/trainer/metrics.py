"""Training metrics: peak-FLOPs table and MFU, a rank-0 JSONL + TensorBoard (+ W&B) logger, and a step timer.

The trainer logs one dict per logging step (losses, CALL/fact ratios, throughput, data skip counters, ...).
``MetricsLogger`` flattens nested dicts into ``a/b/c`` keys and writes each call as one JSON line to
``run_dir/metrics.jsonl`` and every numeric value as a TensorBoard scalar. A resumed run continues both,
after dropping what the interrupted run logged past the checkpoint it resumes from, so that every step
appears once. Texts (the validation samples) go to TensorBoard's text tab.

With ``metrics.wandb`` the same records and texts go to Weights & Biases too (an optional dependency, the
``tracking`` extra). The W&B run's id is kept in ``run_dir/wandb-run-id``, so a resumed run continues the same
W&B run; W&B does not rewind it to the checkpoint as the JSONL and TensorBoard are rewound, so the steps an
interrupted run logged past its checkpoint are logged to it twice.
``StepTimer`` splits step time into time blocked on the dataloader and the rest, and ``mfu`` turns the
measured throughput into model FLOPs utilisation using ``lacy_stream.models.gpt2.flops_per_token``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from ..config.job_config import ConfigError, MetricsConfig
from ..html_page import markdown_html

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

WANDB_MODES = ("", "online", "offline")
WANDB_RUN_ID_FILE = "wandb-run-id"

TERA = 1e12

# Dense (no 2:4 sparsity) peak FLOP/s per device and compute dtype. Vendor datasheets list tensor-core
# figures "with sparsity"; the dense figure is half of that. Sources:
#   H100 SXM / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet.
#   H200 / H200 NVL: NVIDIA H200 datasheet (same compute as H100 SXM / H100 NVL, more memory).
#   A100: NVIDIA A100 datasheet (40GB and 80GB, SXM and PCIe all list the same compute).
#   L40S: NVIDIA L40S datasheet.
#   A10G: NVIDIA publishes no A10G datasheet; these are the NVIDIA A10 datasheet figures. AWS's A10G
#     runs at lower clocks, so treat its MFU as a lower bound.
# "fp32" is plain CUDA-core FP32; matmuls with TF32 enabled should use "tf32".
# The CPU entry is a placeholder: there is no meaningful peak, so MFU is not reported.
PEAK_FLOPS: dict[str, dict[str, float] | None] = {
    "H100 SXM": {"bf16": 989.5 * TERA, "fp16": 989.5 * TERA, "fp8": 1979 * TERA, "tf32": 494.5 * TERA,
                 "fp32": 67 * TERA},
    "H100 PCIe": {"bf16": 756.5 * TERA, "fp16": 756.5 * TERA, "fp8": 1513 * TERA, "tf32": 378 * TERA,
                  "fp32": 51 * TERA},
    "H100 NVL": {"bf16": 835.5 * TERA, "fp16": 835.5 * TERA, "fp8": 1670.5 * TERA, "tf32": 417.5 * TERA,
                 "fp32": 60 * TERA},
    "H200": {"bf16": 989.5 * TERA, "fp16": 989.5 * TERA, "fp8": 1979 * TERA, "tf32": 494.5 * TERA,
             "fp32": 67 * TERA},
    "H200 NVL": {"bf16": 835.5 * TERA, "fp16": 835.5 * TERA, "fp8": 1670.5 * TERA, "tf32": 417.5 * TERA,
                 "fp32": 60 * TERA},
    "A100": {"bf16": 312 * TERA, "fp16": 312 * TERA, "tf32": 156 * TERA, "fp32": 19.5 * TERA},
    "L40S": {"bf16": 362.05 * TERA, "fp16": 362.05 * TERA, "fp8": 733 * TERA, "tf32": 183 * TERA,
             "fp32": 91.6 * TERA},
    "A10G": {"bf16": 125 * TERA, "fp16": 125 * TERA, "tf32": 62.5 * TERA, "fp32": 31.2 * TERA},
    "cpu": None,
}

DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
    "tf32": "tf32",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}


def canonical_device(device_name: str) -> str | None:
    """Map a device name (e.g. ``torch.cuda.get_device_name()``'s "NVIDIA H100 80GB HBM3", or a
    ``PEAK_FLOPS`` key) to its ``PEAK_FLOPS`` key, or None when the device is not in the table."""
    # Whole tokens, so that "A10G" never matches "A100" and vice versa.
    tokens = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    if "CPU" in tokens:
        return "cpu"
    if "H100" in tokens:
        if "PCIE" in tokens:
            return "H100 PCIe"
        if "NVL" in tokens:
            return "H100 NVL"
        return "H100 SXM"  # the SXM part reports itself as e.g. "NVIDIA H100 80GB HBM3"
    if "H200" in tokens:
        return "H200 NVL" if "NVL" in tokens else "H200"
    for key in ("A100", "L40S", "A10G"):
        if key in tokens:
            return key
    return None


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device for a compute dtype ("bf16", "bfloat16", "torch.bfloat16", ...);
    None for unknown devices or dtypes, the CPU, and dtypes the device has no tensor cores for."""
    device = canonical_device(device_name)
    per_dtype = PEAK_FLOPS.get(device) if device is not None else None
    dtype_key = DTYPE_ALIASES.get(dtype.lower().removeprefix("torch."))
    if per_dtype is None or dtype_key is None:
        return None
    return per_dtype.get(dtype_key)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction of ``peak``; None when the peak is unknown.

    ``tokens_per_s`` and ``peak`` must describe the same hardware: per-device throughput with one
    device's peak, or global throughput with the peak times the world size."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / peak


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into ``outer/inner`` keys, e.g. {"data": {"skipped": {"empty": 3}}} ->
    {"data/skipped/empty": 3}. None values are dropped."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}/"))
        elif value is not None:
            flat[name] = value
    return flat


def round_float(value: float, significant_digits: int = 6) -> float:
    """Round to significant digits rather than decimals, so a learning rate of 3e-5 survives intact."""
    if not math.isfinite(value) or value == 0:
        return value
    return round(value, significant_digits - 1 - math.floor(math.log10(abs(value))))


def is_scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_metrics_config(config: MetricsConfig) -> None:
    """The ``metrics`` section: a known W&B mode, and wandb installed when it is asked for (``ConfigError``)."""
    if config.wandb_mode not in WANDB_MODES:
        raise ConfigError(f"metrics.wandb_mode: {config.wandb_mode!r} is not online, offline or empty ($WANDB_MODE)")
    if config.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("metrics.wandb=true needs the wandb package: pip install 'lacy-stream[tracking]'")


class MetricsLogger:
    """Writes metrics to ``run_dir/metrics.jsonl``, TensorBoard (``run_dir/tensorboard``) and, with
    ``metrics.wandb``, Weights & Biases on rank 0; on every other rank all methods are no-ops."""

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int = 0,
        enabled_tensorboard: bool = True,
        start_step: int = 0,
        config: MetricsConfig | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> None:
        """``start_step``: the step the run starts after (its checkpoint's); records of later steps are dropped.
        ``run_config``: the job config, as the W&B run's config."""
        self.enabled = rank == 0
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        self._jsonl: TextIO | None = None
        self._tensorboard: SummaryWriter | None = None
        self._wandb: Any = None
        if not self.enabled:
            return
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        _drop_records_after(self.jsonl_path, start_step)
        # Append mode: a resumed run continues the same file.
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        if enabled_tensorboard:
            # Imported here so that non-zero ranks and TensorBoard-less runs don't pay for the import.
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        if config is not None and config.wandb:
            self._wandb = _start_wandb(Path(run_dir), config, run_config or {})

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Record ``values`` (nested dicts allowed, None values skipped) for ``step``."""
        if not self.enabled:
            return
        flat = {
            key: round_float(value) if isinstance(value, float) else value
            for key, value in flatten(values).items()
        }
        record = {"step": step, "time": round(time.time(), 3), **flat}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()  # a crashed run keeps every line logged before the crash
        if self._tensorboard is not None:
            for key, value in flat.items():
                if is_scalar(value):
                    self._tensorboard.add_scalar(key, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(flat, step=step)

    def log_text(self, step: int, tag: str, markdown: str) -> None:
        """Record a markdown text under ``tag`` for ``step``: TensorBoard's text tab, and W&B as HTML."""
        if not self.enabled:
            return
        if self._tensorboard is not None:
            self._tensorboard.add_text(tag, markdown, global_step=step)
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Html(markdown_html(markdown))}, step=step)

    def close(self, *, failed: bool = False) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(failed=exc is not None)


def _start_wandb(run_dir: Path, config: MetricsConfig, run_config: Mapping[str, Any]) -> Any:
    """The W&B run of ``run_dir``: the one its id file names (resumed), else a new one whose id is written there.

    Its files go to ``run_dir/wandb`` unless ``$WANDB_DIR`` says otherwise."""
    import wandb

    id_file = run_dir / WANDB_RUN_ID_FILE
    run = wandb.init(
        project=config.wandb_project,
        entity=config.wandb_entity or None,
        name=config.wandb_run_name or run_dir.resolve().name,
        id=id_file.read_text().strip() if id_file.is_file() else None,
        resume="allow",
        dir=None if os.environ.get("WANDB_DIR") else run_dir,
        mode=config.wandb_mode or None,
        config=dict(run_config),
    )
    id_file.write_text(run.id + "\n")
    return run


def _drop_records_after(jsonl_path: Path, step: int) -> None:
    """Rewrites ``jsonl_path`` without the records of steps after ``step`` (and a line cut off by a crash)."""
    if not jsonl_path.exists():
        return
    kept = []
    for line in jsonl_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record["step"] <= step:
            kept.append(line + "\n")
    temporary = jsonl_path.with_name(f".{jsonl_path.name}.partial")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, jsonl_path)


class StepTimer:
    """Per-step wall time split into time blocked on the dataloader and the rest.

    A step runs from one ``step_done`` call (or the timer's creation) to the next, so everything in the
    loop counts, checkpointing and evaluation included. Wrap every dataloader fetch of the step in
    ``data_wait()`` (several per step are summed, e.g. with gradient accumulation)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._step_start = clock()
        self._reset_totals()

    def _reset_totals(self) -> None:
        self._steps = 0
        self._tokens = 0
        self._step_time = 0.0
        self._data_wait_time = 0.0

    @contextmanager
    def data_wait(self) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self._data_wait_time += self.clock() - start

    def step_done(self, tokens: int) -> None:
        """End the current step, which processed ``tokens`` tokens, and start the next one."""
        now = self.clock()
        self._step_time += now - self._step_start
        self._step_start = now
        self._tokens += tokens
        self._steps += 1

    def summary(self) -> dict[str, float | None]:
        """Averages over the steps since the last summary, then reset. Values are None when no step has
        finished (or no time has passed) since then."""
        if self._steps == 0 or self._step_time <= 0:
            result: dict[str, float | None] = dict.fromkeys(("tokens_per_s", "data_wait_share", "step_time_s"))
        else:
            result = {
                "tokens_per_s": self._tokens / self._step_time,
                "data_wait_share": self._data_wait_time / self._step_time,
                "step_time_s": self._step_time / self._steps,
            }
        self._reset_totals()
        return result
