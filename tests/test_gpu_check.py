"""``scripts/gpu_check.py --dry-run``: every section rehearsed on the CPU, so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, make_corpus
from lacy_stream.bench.gpu_check import SHARES


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_dry_run_passes_every_section(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                   check=True, cwd=tmp_path, timeout=280)
    report = json.loads((out / "gpu_check.json").read_text())
    assert {name: section["status"] for name, section in report["sections"].items()} == dict.fromkeys(SHARES, "ok")
    sections = report["sections"]
    assert {row["case"] for row in sections["kernel_correctness"]["rows"]} == {"odd float32", "logits ~1e4 float32"}
    speed = sections["kernel_speed"]["rows"]
    assert all("ms" in row or "skipped" in row for row in speed)
    assert all("x_floor" in row for row in speed if "ms" in row)  # every case as a multiple of the matmul floor
    assert {row["vocab_rows"] for row in speed if "ms" in row} == {101, 128}  # padded and the old unpadded
    assert sections["kernel_speed"]["targets"][0]["case"] == "lacy chunked"
    training = sections["training"]
    assert {(row["method"], row["variant"], row["label_cache"]) for row in training["rows"]} == {
        ("baseline", "bf16, V padded", "cold"), ("lacy", "bf16, V padded", "cold"), ("lacy", "bf16, V padded", "warm"),
        ("baseline", "V unpadded", "cold"), ("baseline", "fp32 (TF32)", "cold")}
    assert all(row["tokens_per_s"] for row in training["rows"])
    assert training["setup"]["micro_batch_and_global_tokens"] == {"tiny": [2, 128]}  # accumulation rehearsed
    assert training["profile"]["run"] == "tiny lacy, label cache warm" and len(training["profile"]["top_kernels"]) == 15
    keep_up = sections["keep_up"]
    assert set(keep_up["tokens_per_s_per_core"]) == {"spacy", "student"}
    assert keep_up["cores_per_gpu"][0]["consumer"] == "tiny" and keep_up["cores_per_gpu"][0]["spacy_cores"] >= 1
    assert sections["multi_gpu"]["ranks"] == 2
    assert "## training: ok" in (out / "gpu_check.md").read_text()
    assert not (out / "work").exists()


def test_a_section_past_its_share_is_cut_and_the_others_still_run(tmp_path):
    from lacy_stream.bench.gpu_check import Report

    report = Report(tmp_path, budget_s=0.0, dry_run=True)
    report.run("kernel_speed", lambda section: {"ran": section.may_start("first case")})
    report.run("training", lambda section: 1 / 0)
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["kernel_speed"]["status"] == "cut" and "first case" in sections["kernel_speed"]["detail"]
    assert sections["training"]["status"] == "failed" and "ZeroDivisionError" in sections["training"]["detail"]


def test_the_gpu_runs_take_the_presets_batches_and_the_old_settings_run_beside_the_new():
    from lacy_stream.bench.gpu_check import GPU, preset_batches, training_runs

    assert preset_batches(GPU) == {"334m": (32, 131072), "1.3b": (16, 114688)}  # 4 and 7 micro-batches a step
    names = [run.name for run in training_runs(GPU)]
    assert names[:5] == ["334m baseline, label cache cold", "334m lacy, label cache cold", "334m lacy, label cache warm",
                         "1.3b baseline, label cache cold", "1.3b lacy, label cache cold"]
    assert "334m baseline V unpadded, label cache cold" in names and "334m baseline fp32 (TF32), label cache cold" in names
    assert names[-1] == "1.3b lacy compiled, label cache cold"


def test_padded_tokenizer_encodes_as_before_with_the_papers_vocabulary(tokenizer_path, tmp_path):
    from lacy_stream.bench.gpu_check import PADDED_PIECES, pad_tokenizer
    from lacy_stream.tokenizer import Tokenizer

    padded = tmp_path / "padded.model"
    padded.write_bytes(Path(tokenizer_path).read_bytes())
    pad_tokenizer(padded, PADDED_PIECES)
    text = "The museum was founded in 1887 by Wolfgang Amadeus Mozart."
    assert Tokenizer(padded).vocab_size == 32001
    assert Tokenizer(padded).encode(text) == Tokenizer(tokenizer_path).encode(text)


def _spawned_process_groups() -> set[int]:
    """Process groups of the processes that ``multiprocessing``'s spawn started (and what they forked)."""
    groups = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"spawn_main" in (entry / "cmdline").read_bytes():
                groups.add(os.getpgid(int(entry.name)))
        except (OSError, ProcessLookupError):
            pass
    return groups


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_a_run_past_its_share_prints_its_stacks_and_leaves_no_process(tokenizer_path, tmp_path, capfd):
    from lacy_stream.bench.gpu_check import DRY_RUN, _timed_training_run, _training_overrides

    make_corpus(tmp_path / "shards", shards=2, docs_per_shard=20)
    overrides = _training_overrides(DRY_RUN, tmp_path / "runs" / "long", tmp_path / "shards", Path(tokenizer_path),
                                    tmp_path / "labels", "tiny", "lacy", False, DRY_RUN.batches["tiny"])
    overrides.append("--train.steps=1000000")
    groups_before = _spawned_process_groups()
    with pytest.raises(TimeoutError):
        _timed_training_run(overrides, DRY_RUN, seconds=20)
    assert "most recent call first" in capfd.readouterr().err
    deadline = time.monotonic() + 10
    while _spawned_process_groups() - groups_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _spawned_process_groups() - groups_before
