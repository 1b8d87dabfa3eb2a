"""`lacy-stream eval` end to end: every section filled on a tiny checkpoint, failures and defaults reported."""

from __future__ import annotations

import argparse
import json

import pytest

from helpers import SHARED_DIR, CompletionServer, RuleBasedJudge, one_token_partner, tiny_lacy
from lacy_stream.cli import main
from lacy_stream.cli.evaluation import add_eval_arguments, config_from_arguments
from lacy_stream.cli.exit_status import UsageError
from lacy_stream.eval.config import SECTIONS
from lacy_stream.eval.factscore import read_entities
from lacy_stream.eval.runner import run_eval

CONTEXT = 256  # the tiny test tokenizer spells real text in many pieces


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def parse(*arguments: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(arguments))


@pytest.mark.needs_shared
@pytest.mark.slow
def test_report_on_a_tiny_checkpoint_with_every_section_filled(tokenizer_path, tmp_path):
    tiny_lacy(tokenizer_path, tmp_path / "model", seed=21, call_scale=3.0, max_seq_len=CONTEXT)
    tiny_lacy(tokenizer_path, tmp_path / "baseline", seed=22, max_seq_len=CONTEXT)
    partner = one_token_partner(tokenizer_path, tmp_path / "partner", ".")
    knowledge = tmp_path / "knowledge.jsonl"
    knowledge.write_text(json.dumps({"title": "Kang Ji-hwan", "text": "Kang Ji-hwan is a South Korean actor."}) + "\n")
    entities = read_entities(SHARED_DIR / "eval" / "factscore_prompt_entities_183.txt", limit=2)
    backgrounds = tmp_path / "backgrounds"
    backgrounds.mkdir()
    for name in entities:
        (backgrounds / f"{name}.txt").write_text(f"{name} is a person of note.")
    hellaswag, siqa = tmp_path / "hellaswag_val.jsonl", tmp_path / "dev.jsonl"
    hellaswag.write_text(2 * (json.dumps({"activity_label": "Painting", "ctx_a": "The painter studies law.",
                                          "ctx_b": "he", "endings": [" paints.", " sings.", " rows.", " runs."],
                                          "label": 0}) + "\n"))
    siqa.write_text(2 * (json.dumps({"context": "The king founded a museum.", "question": "Why?", "answerA": "art",
                                     "answerB": "law", "answerC": "river"}) + "\n"))
    (tmp_path / "dev-labels.lst").write_text("1\n3\n")
    out = tmp_path / "report"
    with RuleBasedJudge() as judge, CompletionServer(partner, "tiny-partner") as server:
        with pytest.raises(SystemExit) as exit_info:
            main([
                "eval", "--ckpt", str(tmp_path / "model"), "--baseline", str(tmp_path / "baseline"),
                "--out", str(out), "--shared", str(SHARED_DIR), "--limit", "2", "--sections", ",".join(SECTIONS),
                "--device", "cpu", "--judge-url", judge.url, "--judge-model", "rule-based-test-double",
                "--knowledge", str(knowledge), "--judged-tokens", "30", "--loss-buckets", "3", "--batch-size", "4",
                "--cascade", f"openai:{server.base_url}#tiny-partner", "--call-rate", "0.5",
                "--max-new-tokens", "24", "--background-dir", str(backgrounds),
                "--hellaswag", str(hellaswag), "--siqa", str(siqa),
            ])  # fmt: skip
        partner_prompts = [request["prompt"] for request in server.requests]
    assert exit_info.value.code == 0

    report = json.loads((out / "report.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(SECTIONS)
    assert {name: section["status"] for name, section in sections.items()} == {name: "run" for name in SECTIONS}
    assert all(section["results"] for section in sections.values())

    validation = sections["validation"]["results"]
    assert validation["documents"] == 2 and validation["calls"] / validation["tokens"] == pytest.approx(0.15, abs=0.01)
    assert validation["baseline"]["call_loss"] > 0 and validation["model"]["non_call_loss"] > 0
    assert [task["examples"] for task in sections["nlu"]["results"]["tasks"]] == [2, 2, 2, 2]
    assert [task["acc"] for task in sections["lm_eval"]["results"]["tasks"]] == [
        task["acc"] for task in sections["nlu"]["results"]["tasks"][:2]  # arc_easy and piqa
    ]
    acceptability = sections["acceptability"]["results"]
    assert acceptability["documents"] == 2 and acceptability["judged_tokens"] == 30
    assert (out / acceptability["plot"]).is_file()

    leakage = sections["fact_leakage"]["results"]
    assert [(d["dataset"], d["examples"]) for d in leakage["datasets"]] == [("popqa", 2), ("bigbench", 2)]
    assert all(d["accuracy"] is not None and len(d["demonstrations"]) == 3 for d in leakage["datasets"])
    assert len((out / leakage["outputs_file"]).read_text().splitlines()) == 4

    factscore = sections["factscore"]["results"]
    assert factscore["entities"] == 2 and factscore["score"] is not None and factscore["judge"]
    assert len((out / factscore["input_file"]).read_text().splitlines()) == 2
    cascade = factscore["cascade"]
    assert cascade["partner"] == f"openai:{server.base_url}#tiny-partner" and cascade["background"]
    assert cascade["policy"]["policy"] == "calibrated" and cascade["policy"]["steps"] == cascade["generation"]["steps"]
    assert 0.3 < cascade["generation"]["call_rate"] < 0.7 and cascade["generation"]["partner_token_share"] > 0
    generations = [json.loads(line) for line in (out / cascade["generations_file"]).read_text().splitlines()]
    assert [g["prompt"] for g in generations] == [f"Tell me a bio of {name}. {name} is" for name in entities]
    # the partner wrote its "." at calls, and read each person's background in the RAG prompt
    assert all("." in g["completion"] for g in generations)
    assert any(f"Here is some background information: {entities[0]} is a person of note." in p for p in partner_prompts)

    throughput = sections["generation_throughput"]["results"]
    assert throughput["prompts"] == 2 and throughput["without_calls"]["calls"] == 0
    assert throughput["without_calls"]["tokens_per_second"] > 0 and throughput["cascade"]["tokens_per_second"] > 0
    assert throughput["cascade"]["partner_tokens"] > 0 and throughput["cascade_vs_without_calls"] > 0

    markdown = (out / "report.md").read_text()
    for name in SECTIONS:
        assert f"| {name} | run |" in markdown and f"\n## {name}\n" in markdown
    page = (out / "report.html").read_text()
    assert all(f"<h2>{name}</h2>" in page for name in SECTIONS)
    assert "<th>call loss (A.5)</th>" in page and '<img alt="accuracy and acceptability by loss bucket"' in page
    assert "| call loss (A.5) | non-call loss (A.6) | total loss |" in markdown
    assert "| dataset | examples | contained | accuracy |" in markdown and "| FactScore |" in markdown
    assert "Cascade speed relative to generation without calls:" in markdown


@pytest.mark.needs_shared
def test_failures_are_reported_and_generation_runs_without_a_partner(tokenizer_path, tmp_path):
    tiny_lacy(tokenizer_path, tmp_path / "model", seed=21, max_seq_len=CONTEXT)
    missing = tmp_path / "missing.jsonl"
    args = parse(
        "--ckpt", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--shared", str(SHARED_DIR),
        "--sections", "nlu,factscore,generation_throughput", "--arc-easy", str(missing), "--limit", "1",
        "--max-new-tokens", "6", "--device", "cpu",
    )  # fmt: skip
    assert run_eval(config_from_arguments(args)) == 1  # nlu failed: its ARC file does not exist

    out = tmp_path / "out"
    sections = json.loads((out / "report.json").read_text())["sections"]
    assert sections["nlu"]["status"] == "failed" and "missing.jsonl" in sections["nlu"]["reason"]
    assert sections["validation"]["status"] == "skipped"
    assert sections["validation"]["reason"] == "not requested (--sections)"
    factscore = sections["factscore"]["results"]
    assert sections["factscore"]["status"] == "partial" and factscore["score"] is None and "Not scored" in factscore["note"]
    assert sections["factscore"]["reason"] == factscore["note"]
    assert factscore["cascade"]["partner"] is None and factscore["cascade"]["generation"]["partner_tokens"] == 0
    throughput = sections["generation_throughput"]["results"]
    assert throughput["cascade"] is None and throughput["cascade_vs_without_calls"] is None
    markdown = (out / "report.md").read_text()
    assert "| factscore | partial |" in markdown and "\n## factscore\n" in markdown
    assert "No cascade partner (--cascade): the model answered its own calls" in markdown
    assert "No cascade partner (--cascade): the cascade was not measured." in markdown


def test_bad_arguments_are_refused():
    with pytest.raises(UsageError, match="--judge-url and --judge-model"):
        config_from_arguments(
            parse("--ckpt", "m", "--out", "o", "--judge-url", "http://localhost:1/v1/chat/completions")
        )
    with pytest.raises(UsageError, match="unknown section"):
        config_from_arguments(parse("--ckpt", "m", "--out", "o", "--sections", "validation,vibes"))
    with pytest.raises(UsageError, match="give --cascade"):
        config_from_arguments(parse("--ckpt", "m", "--out", "o", "--background-dir", "backgrounds"))
