"""The command line as a user runs it: make-shards -> train-tokenizer -> inspect, the demo, the benchmarks,
clear errors. Every test starts ``lacy-stream`` in a subprocess: all are slow."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from helpers import SHARED_DIR, run_cli, tar_bytes
from lacy_stream.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dwiki_jsonl(tmp_path_factory) -> Path:
    """200 real dwiki documents plus a few bad lines (for tests marked ``needs_shared``)."""
    lines = (SHARED_DIR / "data" / "dwiki-dev.jsonl").read_text().splitlines()[:200]
    path = tmp_path_factory.mktemp("input") / "dwiki.jsonl"
    path.write_text("\n".join(lines[:100] + ["{broken json", '{"id": 1, "text": ""}'] + lines[100:]) + "\n")
    return path


@pytest.mark.needs_shared
def test_make_shards_train_tokenizer_inspect(tmp_path, dwiki_jsonl):
    out = tmp_path / "dwiki"
    made = run_cli("make-shards", str(dwiki_jsonl), "--out", str(out), "--docs-per-shard", "64", "--compress", "zstd", "--prefix", "dwiki")
    assert "wrote 4 shards, 200 documents" in made.stdout
    assert "invalid_json" in made.stdout and "empty_document" in made.stdout

    run_cli("train-tokenizer", "--shards", str(out), "--vocab-size", "2000", "--out", str(out / "tok.model"))
    tokenizer = Tokenizer(out / "tok.model")
    assert tokenizer.call_id == 2000

    report = json.loads(run_cli("inspect", "--shards", str(out), "--tokenizer", str(out / "tok.model"), "--json").stdout)
    assert report["docs"] == 200 and report["shards"] == 4 and report["skipped"] == {}
    texts = [json.loads(line)["text"] for line in dwiki_jsonl.read_text().splitlines() if line.startswith('{"id": "dwiki')]
    assert report["tokens"] == sum(len(tokenizer.encode(text)) + 1 for text in texts)

    spec = str(out / "dwiki-{000000..000001}.tar.zst")
    assert json.loads(run_cli("inspect", "--shards", spec, "--json").stdout)["docs"] == 128


def test_inspect_counts_skips_by_reason(tmp_path):
    good = [(f"{i:03d}", {"txt": b"A fine document."}) for i in range(3)]
    (tmp_path / "a.tar").write_bytes(tar_bytes(good + [("100", {"txt": b"\xff"}), ("101", {"json": b"{}"})]))
    (tmp_path / "b.tar").write_bytes(tar_bytes(good)[:1500])
    report = json.loads(run_cli("inspect", "--shards", f"{tmp_path}/{{a,b,c}}.tar", "--json").stdout)
    assert report["docs"] == 3
    assert report["skipped"] == {"invalid_utf8": 1, "missing_text": 1, "corrupt_tar": 1, "unreachable_shard": 1}


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "--shards", "/nonexistent-dir/"], "manifest"),
        (["inspect", "--shards", "pipe:cat x.tar"], "allow them with --allow-pipe"),
        (["make-shards", "nothing.txt", "--out", "x"], "unsupported input"),
        (["demo", "--data.seq_len=abc"], "expected int"),
        (["demo", "--data.sequence=3"], "unknown key"),
    ],
)
def test_clear_errors(tmp_path, args, message):
    (tmp_path / "nonexistent-dir").mkdir()
    args = [a.replace("/nonexistent-dir/", str(tmp_path / "nonexistent-dir")) for a in args]
    result = run_cli(*args, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_demo_main_job_shows_its_result_and_the_commands_to_try_next(tmp_path):
    """The README's main command, on a small budget: builds the demo shards, their held-out split and the tokenizer,
    trains with validation, prints a cascade sample and the tour's commands, which run as written; run again, it
    says that it has nothing to do, and with more steps that it resumes."""
    budget = ["--train.log_every=2", "--checkpoint.every=2", "--data.seq_len=64", "--data.batch_size=2",
              "--train.val_every=2", "--train.val_batches=2"]
    result = run_cli("demo", "--train.steps=4", *budget, cwd=tmp_path)
    manifest = json.loads((tmp_path / "shards/demo/manifest.json").read_text())
    assert manifest["heldout"] == {"path": "heldout", "documents": 8}
    assert json.loads((tmp_path / "shards/demo/heldout/manifest.json").read_text())["documents"] == 8
    assert (tmp_path / "shards/demo/tokenizer.model").exists()
    run_dir = tmp_path / "runs/tiny-cpu"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4]
    assert all(0.05 < record["fact_ratio"] < 0.6 and record["call_ratio"] > 0 and record["val/loss"] > 0
               for record in records)
    assert records[-1]["data/skipped"] == {} if "data/skipped" in records[-1] else records[-1]["data/docs"] > 0
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert list((run_dir / "tensorboard").iterdir())
    assert (run_dir / "hf" / "model.safetensors").is_file()
    # No terminal: a plain progress line every train.log_every steps, with the held-out loss when validated
    assert re.findall(r"^step (\d)/4  loss [\d.]+  [\d,]+ tokens/s  ETA \w+  val loss [\d.]+$", result.stderr,
                      flags=re.M) == ["2", "4"]

    output = result.stdout
    assert "step 4: loss " in output and "model:" in output
    assert re.search(r"^held out \(shards/demo/heldout\): val/loss [\d.]+ at step 4 \(step 2: [\d.]+\)", output, re.M)
    sample = output.split("a cascade sample: the calibrated policy calls at 15% of the steps", 1)[1]
    assert re.search(r"^-- \d+ calls in 32 steps \(\d+\.\d%\)", sample, flags=re.M)
    tour = output.split("\nnext:\n", 1)[1].splitlines()
    assert [line.startswith("  # ") for line in tour] == [True, False] * 6
    commands = [shlex.split(line) for line in tour[1::2]]
    assert [command[1] for command in commands] == ["annotate", "generate", "eval", "train", "compare", "demo"]
    for command in commands[:-1]:
        run_cli(*command[1:], cwd=tmp_path)
    assert (run_dir / "eval" / "report.md").is_file() and (tmp_path / "runs/tiny-cpu-compare/comparison.md").is_file()

    again = run_cli("demo", "--train.steps=4", *budget, cwd=tmp_path)
    assert "nothing to do: runs/tiny-cpu is at step 4 of train.steps=4; raise --train.steps to train on" in again.stderr
    more = run_cli(*commands[-1][1:], cwd=tmp_path)
    assert "resuming runs/tiny-cpu from the checkpoint of step 4: 4 steps to go" in more.stderr.splitlines()


def test_annotate_text_brackets_facts_when_not_a_terminal_and_draws_every_label(tmp_path):
    page = tmp_path / "labels.html"
    result = run_cli("annotate", "--text", "Marie Curie was born in [dblookup('Marie Curie', 'birth place') -> Warsaw] "
                     "Warsaw in 1867. Curie studied physics.", "--html", str(page))
    assert result.stdout.strip() == "[Marie Curie] was born in [Warsaw] in [1867]. Curie studied [physics]."
    assert "[brackets]: facts" in result.stderr and "1 LLM-judge values" in result.stderr
    assert re.search(r">\s*judge\s*</span>", page.read_text()) and "1 LLM-judge value spans" in page.read_text()


@pytest.mark.needs_shared
def test_annotate_jsonl_for_tools(tmp_path, dwiki_jsonl):
    source = tmp_path / "few.jsonl"
    source.write_text("\n".join(dwiki_jsonl.read_text().splitlines()[98:103]) + "\n")
    result = run_cli("annotate", "--input", str(source), "--output", str(tmp_path / "out.jsonl"))
    assert "skipped {'invalid_json': 1}" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in source.read_text().splitlines() if line.startswith('{"id": "')}
    assert len(records) == 4 and {r["id"] for r in records} <= set(texts) | {1}
    for record in records:
        if record["id"] == 1:
            assert record["spans"] == []
            continue
        text = texts[record["id"]]
        assert all(text[b:e].strip() == text[b:e] and name in ("fact", "grammar", "other") for b, e, name in record["spans"])
        assert sum(name == "fact" for _, _, name in record["spans"]) > 5


@pytest.mark.needs_shared
def test_annotate_shards_offline_then_inspect(tmp_path, dwiki_jsonl, tokenizer_path):
    source = tmp_path / "few.jsonl"
    source.write_text("\n".join(dwiki_jsonl.read_text().splitlines()[:6]) + "\n")
    run_cli("make-shards", str(source), "--out", str(tmp_path / "raw"), "--docs-per-shard", "3")
    result = run_cli("annotate", "--shards", str(tmp_path / "raw"), "--out", str(tmp_path / "annotated"), "--tokenizer", tokenizer_path)
    assert "wrote 2 annotated shards, 6 documents" in result.stdout
    manifest = json.loads((tmp_path / "annotated" / "manifest.json").read_text())
    assert "tokenizer:" in manifest["labeler"]
    report = json.loads(run_cli("inspect", "--shards", str(tmp_path / "annotated"), "--json").stdout)
    assert report["docs"] == 6 and report["skipped"] == {}


@pytest.mark.needs_shared
def test_bench_annotate_reports_every_case(tmp_path, dwiki_jsonl, tokenizer_path):
    result = run_cli("bench", "annotate", "--input", str(dwiki_jsonl), "--max-docs", "4", "--workers", "1", "--repeats", "1",
                     "--tokenizer", tokenizer_path, "--json")
    report = json.loads(result.stdout)
    for case in ("spacy_full", "full_path", "cache_write", "cached_epoch"):
        assert report[case]["tokens_per_s"] > 0, case
    assert report["cached_epoch"]["sources"] == {"cached": 4}
    assert [row["workers"] for row in report["workers"]] == [1]
    assert 0 < report["labels"]["fact_fraction"] < 1 and report["labels"]["judge_calls_labeled_fact"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["annotate"], "exactly one of"),
        (["annotate", "--shards", "x"], "--out and --tokenizer"),
        (["annotate", "--text", "x", "--spacy-model", "no_such_model"], "no_such_model"),
        (["bench", "annotate"], "--input"),
    ],
)
def test_annotate_clear_errors(tmp_path, args, message):
    result = run_cli(*args, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
