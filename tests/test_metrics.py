"""Metrics: JSONL + TensorBoard logging on rank 0 only, resume appends, peak FLOPs lookup, MFU, StepTimer."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lacy_stream.config.job_config import ConfigError, MetricsConfig
from lacy_stream.trainer.metrics import MetricsLogger, StepTimer, check_metrics_config, mfu, peak_flops

TRAIN_VALUES = {
    "loss": 3.14159265358979,
    "call_loss": 0.5,
    "noncall_loss": 3.2,
    "call_ratio": 0.0125,
    "fact_ratio": 0.3,
    "tokens_per_s": 123456.789,
    "lr": 3e-5,
    "mfu": None,
    "data": {"skipped": {"too_short": 4, "bad_utf8": 1}},
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_records_required_keys_and_flattens_nested_counters(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, enabled_tensorboard=False) as logger:
        logger.log(10, TRAIN_VALUES)
        logger.log(20, {"loss": 2.0})
    first, second = read_jsonl(tmp_path / "metrics.jsonl")
    for key in ("step", "time", "loss", "call_loss", "noncall_loss", "call_ratio", "fact_ratio", "tokens_per_s"):
        assert key in first
    assert first["step"] == 10 and second["step"] == 20
    assert first["data/skipped/too_short"] == 4 and first["data/skipped/bad_utf8"] == 1
    assert "data" not in first and "mfu" not in first  # nested dicts flattened, None left out
    assert first["loss"] == 3.14159  # six significant digits
    assert first["tokens_per_s"] == 123457.0
    assert first["lr"] == 3e-5
    assert set(second) == {"step", "time", "loss"}


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {**TRAIN_VALUES, "phase": "warmup"})
        logger.log(2, {"loss": 2.5})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "call_ratio", "data/skipped/too_short"} <= set(tags)
    assert "phase" not in tags  # strings go to the JSONL only
    loss = events.Scalars("loss")
    assert [event.step for event in loss] == [1, 2]
    assert loss[1].value == pytest.approx(2.5)
    assert events.Scalars("data/skipped/too_short")[0].value == pytest.approx(4)


def test_non_zero_rank_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, rank=1) as logger:
        logger.log(1, TRAIN_VALUES)
    assert not run_dir.exists()


def test_reopening_appends_to_the_same_jsonl(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, enabled_tensorboard=False) as logger:
        logger.log(1, {"loss": 4.0})
    with MetricsLogger(tmp_path, enabled_tensorboard=False, start_step=1) as logger:
        logger.log(2, {"loss": 3.0})
    assert [record["step"] for record in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_resumed_run_drops_what_was_logged_after_its_checkpoint(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": 4.0 - step})
    with (tmp_path / "metrics.jsonl").open("a") as jsonl:
        jsonl.write('{"step": 4, "lo')  # killed while writing
    with MetricsLogger(tmp_path, start_step=2) as logger:  # resumed from the checkpoint of step 2
        logger.log(3, {"loss": 0.5})
    assert [(record["step"], record["loss"]) for record in read_jsonl(tmp_path / "metrics.jsonl")] == [
        (1, 3.0), (2, 2.0), (3, 0.5)
    ]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("loss")] == [(1, 3.0), (2, 2.0), (3, 0.5)]


def test_texts_go_to_the_tensorboard_text_tab(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path) as logger:
        logger.log_text(5, "val/sample_0", "**Warsaw** in `1867`")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    (event,) = events.Tensors("val/sample_0/text_summary")
    assert event.step == 5 and event.tensor_proto.string_val == [b"**Warsaw** in `1867`"]


@pytest.mark.slow
def test_wandb_mirrors_the_records_offline_and_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-files"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-files").mkdir()
    run_dir = tmp_path / "run"
    tracking = MetricsConfig(wandb=True, wandb_project="lacy-stream-test")
    with MetricsLogger(run_dir, enabled_tensorboard=False, config=tracking, run_config={"loss": {"method": "lacy"}}) as logger:
        logger.log(1, {"loss": 3.25, "val": {"noncall_loss": 2.875}})
        logger.log_text(1, "val/sample_0", "**Warsaw**")
    run_id = (run_dir / "wandb-run-id").read_text().strip()
    (offline,) = (tmp_path / "wandb-files" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    wanted = (b"loss", b"3.25", b"val/noncall_loss", b"2.875", b"val/sample_0", b"lacy-stream-test", b"method")
    deadline = time.monotonic() + 60
    while not all(key in offline.read_bytes() for key in wanted) and time.monotonic() < deadline:
        time.sleep(0.2)  # wandb's service process may still be writing the records after finish()
    assert [key for key in wanted if key not in offline.read_bytes()] == []
    assert list(offline.parent.glob("files/media/html/val/sample_0_*.html"))
    time.sleep(1.1)  # wandb names an offline run's directory by the second it started in
    with MetricsLogger(run_dir, enabled_tensorboard=False, config=tracking, start_step=1) as logger:
        logger.log(2, {"loss": 3.0})
    assert (run_dir / "wandb-run-id").read_text().strip() == run_id
    assert len(list((tmp_path / "wandb-files" / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_metrics_config_is_checked(monkeypatch):
    check_metrics_config(MetricsConfig())
    with pytest.raises(ConfigError, match="metrics.wandb_mode: 'sometimes'"):
        check_metrics_config(MetricsConfig(wandb_mode="sometimes"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'lacy-stream\[tracking\]'"):
        check_metrics_config(MetricsConfig(wandb=True))
    check_metrics_config(MetricsConfig(wandb=False))


@pytest.mark.parametrize(
    ("device_name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.5e12),
        ("NVIDIA H100 80GB HBM3", "torch.bfloat16", 989.5e12),
        ("NVIDIA H100 PCIe", "bf16", 756.5e12),
        ("NVIDIA H200", "bf16", 989.5e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A10G", "bf16", 125e12),  # must not be mistaken for an A100
        ("NVIDIA L40S", "fp32", 91.6e12),
        ("NVIDIA A100-SXM4-80GB", "fp8", None),  # no FP8 tensor cores on Ampere
        ("NVIDIA H100 80GB HBM3", "int4", None),
        ("Some Future Accelerator", "bf16", None),
        ("cpu", "float32", None),
    ],
)
def test_peak_flops_lookup(device_name: str, dtype: str, expected: float | None) -> None:
    assert peak_flops(device_name, dtype) == (None if expected is None else pytest.approx(expected))


def test_mfu_of_known_cases() -> None:
    assert mfu(tokens_per_s=1000.0, flops_per_token=1e9, peak=4e12) == pytest.approx(0.25)
    # 250,000 tokens/s of 1.979 GFLOP each is 494.75 TFLOP/s: half an H100's dense bf16 peak of 989.5 TFLOP/s.
    assert mfu(250_000.0, 1.979e9, peak_flops("NVIDIA H100 80GB HBM3", "bf16")) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, peak=None) is None
    assert mfu(1000.0, 1e9, peak=0.0) is None
    assert mfu(1000.0, 1e9, peak_flops("cpu", "float32")) is None  # no known peak: no MFU, never a made-up one


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run_step(timer: StepTimer, clock: FakeClock, wait_s: float, compute_s: float, tokens: int) -> None:
    with timer.data_wait():
        clock.advance(wait_s)
    clock.advance(compute_s)
    timer.step_done(tokens)


def test_step_timer_shares_and_reset() -> None:
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    run_step(timer, clock, wait_s=1.0, compute_s=3.0, tokens=400)
    run_step(timer, clock, wait_s=0.0, compute_s=4.0, tokens=400)
    assert timer.summary() == pytest.approx({"tokens_per_s": 100.0, "data_wait_share": 0.125, "step_time_s": 4.0})

    # Time outside data_wait between steps (e.g. logging) counts as step time.
    clock.advance(1.0)
    run_step(timer, clock, wait_s=2.0, compute_s=1.0, tokens=100)
    assert timer.summary() == pytest.approx({"tokens_per_s": 25.0, "data_wait_share": 0.5, "step_time_s": 4.0})

    assert timer.summary() == {"tokens_per_s": None, "data_wait_share": None, "step_time_s": None}
