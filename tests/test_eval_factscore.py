"""FactScore prompts, FactScore's input format, retrieval and scoring against the judge test double."""

from __future__ import annotations

import json

import pytest

from helpers import SHARED_DIR, RuleBasedJudge
from lacy_stream.eval.factscore import (
    DECISIONS_FILE,
    Bio,
    KnowledgeSource,
    Passage,
    bio_prompt,
    evaluate_factscore,
    generate_bios,
    parse_fact_list,
    read_entities,
    write_factscore_input,
)

KNOWLEDGE = [
    {"title": "Kang Ji-hwan", "text": ["Kang Ji-hwan is a South Korean actor.", "He was born in Seoul."]},
    {"title": "Kalki Koechlin", "text": "Kalki Koechlin is a French actress and writer. She works in Hindi films."},
    {"title": "William Post", "text": "William Post was an American actor. " + "He appeared in plays. " * 200},
]


@pytest.mark.needs_shared
def test_entities_and_prompts():
    entities = read_entities(SHARED_DIR / "eval" / "factscore_prompt_entities_183.txt")
    assert len(entities) == 183 and entities[0] == "Kang Ji-hwan"
    assert bio_prompt("Kang Ji-hwan") == "Tell me a bio of Kang Ji-hwan. Kang Ji-hwan is"
    assert read_entities(SHARED_DIR / "eval" / "factscore_prompt_entities_183.txt", limit=2) == entities[:2]


def test_export_is_factscores_input_format(tmp_path):
    prompts = []

    def generate(prompt: str) -> str:
        prompts.append(prompt)
        return " a South Korean actor."

    bios = generate_bios(["Kang Ji-hwan", "Kalki Koechlin"], generate)
    path = write_factscore_input(bios, tmp_path / "input.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert prompts == [bio_prompt("Kang Ji-hwan"), bio_prompt("Kalki Koechlin")]
    # factscore.factscorer --input_path: one object per line with "topic" (the entity) and "output" (the text)
    assert records == [
        {"topic": "Kang Ji-hwan", "output": "Kang Ji-hwan is a South Korean actor."},
        {"topic": "Kalki Koechlin", "output": "Kalki Koechlin is a South Korean actor."},
    ]


def test_retrieval_prefers_the_topics_page_and_the_matching_passage(tmp_path):
    path = tmp_path / "knowledge.jsonl"
    path.write_text("".join(json.dumps(page) + "\n" for page in KNOWLEDGE))
    knowledge = KnowledgeSource.from_jsonl(path, passage_words=50)
    assert sum(passage.title == "William Post" for passage in knowledge.passages) > 1  # long page, several passages
    assert knowledge.retrieve("Kang Ji-hwan", "born in Seoul", k=1) == [
        Passage("Kang Ji-hwan", "He was born in Seoul.")
    ]
    assert {p.title for p in knowledge.retrieve("kalki  koechlin", "actress", k=5)} == {"Kalki Koechlin"}
    # no page for the topic: all passages compete
    assert knowledge.retrieve("Nobody", "French actress writer", k=1)[0].title == "Kalki Koechlin"


def test_parse_fact_list():
    assert parse_fact_list("Here are the facts:\n- A is B.\n* C is D.\n-\n  - E is F.") == [
        "A is B.",
        "C is D.",
        "E is F.",
    ]


def test_scoring_with_the_judge_test_double(tmp_path):
    path = tmp_path / "knowledge.jsonl"
    path.write_text("".join(json.dumps(page) + "\n" for page in KNOWLEDGE))
    continuations = {
        "Kang Ji-hwan": " a South Korean actor. Kang Ji-hwan was born in Busan.",
        "Kalki Koechlin": " a French actress. Kalki Koechlin is a writer.",
        "William Post": "",  # "William Post is" states nothing: no fact, no response
    }
    with RuleBasedJudge() as judge:
        result = evaluate_factscore(
            list(continuations),
            lambda prompt: continuations[prompt.split("Tell me a bio of ")[1].split(".")[0]],
            tmp_path,
            endpoint=judge.endpoint(),
            knowledge=KnowledgeSource.from_jsonl(path),
        )
    # rule: supported when every word of the fact occurs in the retrieved passages of the topic's page
    assert [[d.supported for d in bio.facts] for bio in result.bios] == [[True, False], [True, True], []]
    assert result.score == pytest.approx((0.5 + 1.0) / 2)  # over the biographies that state facts
    assert result.respond_ratio == pytest.approx(2 / 3) and result.facts_per_response == 2.0
    assert (tmp_path / result.input_file).read_text().count("\n") == 3
    assert len((tmp_path / DECISIONS_FILE).read_text().splitlines()) == 3
    assert "| FactScore |" in result.markdown()


def test_without_judge_only_the_input_file_is_written(tmp_path):
    result = evaluate_factscore(["Kang Ji-hwan"], lambda prompt: " an actor.", tmp_path)
    assert result.score is None and "Not scored" in result.note
    assert json.loads((tmp_path / result.input_file).read_text()) == {
        "topic": "Kang Ji-hwan",
        "output": "Kang Ji-hwan is an actor.",
    }
    assert Bio("X", " y.").output == "X is y."
