"""The scripts under scripts/ on tiny inputs, as a user runs them (gpu_check.py: test_gpu_check.py;
multinode_train.sh: test_train.py; slurm_train.sbatch's requeue decision: test_cli_operations.py)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, synthetic_text, table_rows, tiny_lacy
from lacy_stream.loss.masks import METHODS

SCRIPTS = REPO / "scripts"


def run_script(*command: str, cwd: Path, **environment: str) -> str:
    """The stdout of ``command``, run from ``cwd`` on this checkout; it must succeed."""
    finished = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=280,
                              env={**os.environ, "PYTHONPATH": str(REPO), **environment})
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return finished.stdout


@pytest.mark.parametrize("script", sorted(path.name for path in SCRIPTS.iterdir() if path.suffix in (".sh", ".sbatch")))
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True).stderr == ""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_streaming_measures_every_reader_and_loader_setting(tmp_path):
    """On the demo corpus, which its tokenizer of 8,000 pieces needs (a tiny corpus has too few distinct pieces)."""
    output = run_script(sys.executable, str(SCRIPTS / "bench_streaming.py"), "--passes", "1", "--batches", "2",
                        "--seq-len", "32", cwd=tmp_path)
    assert re.match(r"corpus: demo \(\d+ documents, \d+ shards\)\n", output)
    read = table_rows(output, ["read (1 process)", "docs/s", "text MB/s"])
    assert [name for name, *_ in read] == ["tar", "tar.zst", "http tar"]
    assert all(int(docs_per_s) > 0 and float(megabytes_per_s) > 0 for _, docs_per_s, megabytes_per_s in read)
    loader = table_rows(output, ["loader (seq_len 32, batch 8)", "tokens/s"])
    assert [name for name, _ in loader] == ["0 workers", "1 workers", "2 workers"]
    assert all(int(tokens_per_s) > 0 for _, tokens_per_s in loader)
    assert not list(tmp_path.iterdir())  # its shards and tokenizer were in a temporary directory


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_generate_times_each_variant_every_round(tmp_path, tokenizer_path):
    tiny_lacy(tokenizer_path, tmp_path / "model", seed=0)
    output = run_script(sys.executable, str(SCRIPTS / "bench_generate.py"), "--ckpt", str(tmp_path / "model"),
                        "--cascade", f"hf:{tmp_path / 'model'}", "--max-new-tokens", "4", "--rounds", "2", "--json",
                        cwd=tmp_path)
    report = json.loads(output)
    assert report["max_new_tokens"] == 4 and report["prompts"] == 3
    assert set(report["tokens_per_s"]) == {"kv_cache", "recompute", "cascade"}
    assert all(len(rates) == 2 and min(rates) > 0 for rates in report["tokens_per_s"].values())
    assert report["ratio_to_kv_cache"]["kv_cache"] == 1.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_methods_trains_the_nine_methods_and_compares_them(tmp_path):
    """Two steps of each method on 40 synthetic documents (about a minute: eleven lacy-stream processes)."""
    rng = random.Random(2)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"doc-{i}", "text": synthetic_text(rng, 8)}) + "\n" for i in range(40)))
    out = tmp_path / "compare"
    output = run_script("bash", str(SCRIPTS / "compare_methods.sh"), str(corpus), str(out), cwd=tmp_path,
                        STEPS="2", SEQ_LEN="32", BATCH="2", VOCAB="400", WORKERS="0", HELDOUT_DOCS="10",
                        COMPARE_BATCHES="2", LACY=f"{sys.executable} -m lacy_stream",
                        TRAIN_ARGS="--train.seed=3 --train.log_every=1")
    summaries = re.findall(r"^(\w+) +step 2/2  loss [\d.]+  [\d,]+ tokens/s  ETA 0s  val loss [\d.]+(.*)$", output,
                           flags=re.M)
    assert [method for method, _ in summaries] == list(METHODS)  # one line per run, in training order
    leaving_out = {method for method, note in summaries if note == "  (its loss leaves the ignored tokens out)"}
    assert leaving_out == {name for name, method in METHODS.items() if method.ignore_mask != "none"}
    for method in leaving_out:
        assert "leaves its ignored tokens" in (out / "logs" / f"{method}.log").read_text()
    assert all([path.name for path in (out / "runs" / method / "checkpoints").iterdir()] == ["step-00000002"]
               for method in METHODS)  # the final checkpoint only
    comparison = json.loads((out / "comparison" / "comparison.json").read_text())
    runs = comparison["runs"]
    assert runs[0]["method"] == "baseline"  # trained first: the reference model of rho1 and spacy_refloss
    assert sorted(run["method"] for run in runs) == sorted(METHODS)
    assert all(run["steps"] == 2 and run["flags"] == [] and run["data"] == str(out / "train") for run in runs)
    assert len({run["tokenizer"] for run in runs}) == 1
    for method in METHODS:  # TRAIN_ARGS reach every run
        train_config = json.loads((out / "runs" / method / "config.json").read_text())["train"]
        assert (train_config["seed"], train_config["log_every"]) == (3, 1)
    assert (out / "comparison" / "comparison.md").is_file()
    held_out = json.loads((out / "heldout" / "manifest.json").read_text())
    assert held_out["documents"] == 10
