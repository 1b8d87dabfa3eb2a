"""The benchmark commands on tiny inputs: what each reports, whatever the machine's speed (``bench gpu`` has its
dry run in test_gpu_check.py)."""

from __future__ import annotations

import json
import random

import pytest

from helpers import make_corpus, synthetic_text, table_rows
from lacy_stream.bench.loss import FLOOR, LOSS_CASES, VOCAB_MULTIPLE
from lacy_stream.cli import main


def cli_output(capsys: pytest.CaptureFixture, *args: str) -> str:
    """What ``lacy-stream ARGS``, run in this process, prints; the command must succeed."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    output = capsys.readouterr()
    assert exit_info.value.code == 0, output.err
    return output.out


@pytest.mark.parametrize("annotation", [True, False], ids=["spacy", "no-annotation"])
def test_bench_stream_reports_tokens_facts_and_reads(tmp_path, tokenizer_path, capsys, annotation):
    make_corpus(tmp_path / "corpus", shards=2, docs_per_shard=6)
    output = cli_output(capsys, "bench", "stream", "--batches", "3", "--json", f"--data.shards={tmp_path / 'corpus'}",
                        f"--tokenizer.path={tokenizer_path}", "--data.seq_len=32", "--data.batch_size=2",
                        "--data.num_workers=0", f"--annotation.enabled={str(annotation).lower()}")
    report = json.loads(output)
    assert report["batches"] == 3 and report["num_workers"] == 0
    assert report["tokens_per_s"] > 0
    assert 0 < report["fact_fraction"] < 1 if annotation else report["fact_fraction"] == 0
    assert report["read"]["docs"] > 0 and report["read"]["skipped"] == {}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_loss_table_has_every_case_at_its_vocabulary_rows(capsys):
    """On the CPU each case runs in a fresh process."""
    output = cli_output(capsys, "bench", "loss", "--hidden", "32", "--tokens", "64", "--vocab", "200", "--repeats", "1")
    rows = table_rows(output, ["case", "hidden", "tokens", "device", "V rows", "ms (fwd+bwd)", "× floor", "peak MiB",
                               "TFLOP/s"])
    assert [row[0] for row in rows] == list(LOSS_CASES)
    padded_rows = -(-200 // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    for case, hidden, tokens, device, vocab_rows, ms, x_floor, *_ in rows:
        assert (hidden, tokens) == ("32", "64")
        if device.startswith("skipped:"):  # a torch without F.linear_cross_entropy
            assert LOSS_CASES[case].kind == "cross_entropy"
            continue
        assert device == "cpu float32"
        assert int(vocab_rows) == (padded_rows if LOSS_CASES[case].padded else 200), case
        # A time of a few hundredths of a millisecond over a floor slowed by a busy machine prints as "0.0".
        assert float(ms) > 0 and float(x_floor) >= 0, case
    assert next(row for row in rows if row[0] == FLOOR)[6] == "1.0"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_annotate_prints_a_table_of_every_case(tmp_path, tokenizer_path, capsys):
    rng = random.Random(4)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": synthetic_text(rng, 6)}) + "\n" for i in range(10)))
    output = cli_output(capsys, "bench", "annotate", "--input", str(source), "--max-docs", "8", "--workers", "1",
                        "--repeats", "1", "--tokenizer", tokenizer_path)
    assert output.startswith(f"8 documents from {source}")
    rows = table_rows(output, ["case", "cores", "tokens/s", "vs raw spaCy"])
    assert [case.split(" (")[0] for case, *_ in rows] == [
        "raw en_core_web_sm, full pipeline", "full path: read, annotate, align, pack", "first epoch with cache writes",
        "cached epoch", "dataloader, 1 workers",
    ]
    assert all(cores == "1" and int(tokens_per_s) > 0 for _, cores, tokens_per_s, _ in rows)
    labels = next(line for line in output.splitlines() if line.startswith("labels: "))
    assert "of tokens are facts" in labels and labels.endswith("none in this text")  # no judge markup in the input



@pytest.mark.slow
def test_bench_annotate_says_when_the_documents_are_too_few_to_time_the_dataloader(tmp_path, tokenizer_path, capsys):
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"id": 1, "text": "Ada Lovelace wrote notes."}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "annotate", "--input", str(source), "--workers", "1", "--repeats", "1", "--tokenizer",
              tokenizer_path])
    error = capsys.readouterr().err
    assert exit_info.value.code != 0 and "too few to time 1 dataloader worker(s)" in error and "Traceback" not in error
