"""Fact leakage: knowledge-completion prompts, fixed 3-shot demonstrations, alias containment and scoring."""

from __future__ import annotations

import json

import pytest

from helpers import SHARED_DIR, tiny_lacy
from lacy_stream.eval.fact_leakage import (
    OUTPUTS_FILE,
    QAExample,
    answer_without_calls,
    contains_answer,
    evaluate_fact_leakage,
    few_shot_prompt,
    normalize,
    popqa_prompt,
    read_bigbench,
    read_popqa,
    split_demonstrations,
)
from lacy_stream.inference.call_policy import ArgmaxCall
from lacy_stream.inference.generate import generate

POPQA = SHARED_DIR / "eval" / "popqa_longtail.jsonl"
BIGBENCH = SHARED_DIR / "eval" / "bigbench_qa_wikidata.jsonl"


def test_normalisation_and_whole_word_alias_containment():
    assert normalize("  Joseph-Médard\tÉMARD, Jr.\n") == "joseph medard emard jr"
    assert contains_answer("He was born in Washington, D.C. in 1900", ["Washington D.C."])
    assert contains_answer(" a POLITICIAN.", ["journalist", "politician"])
    assert contains_answer("joseph-medard emard", ["Joseph-Médard Émard"])
    # aliases are whole words, never substrings: PopQA has "pol", "W" and "id" among its aliases
    assert not contains_answer("a police officer in Warsaw, idle", ["pol", "W", "id"])
    assert not contains_answer("Russian", ["Russia"])
    assert not contains_answer("anything at all", ["🇰🇷", "..."])  # aliases that normalise to nothing
    assert not contains_answer("", ["Paris"])


@pytest.mark.needs_shared
def test_popqa_questions_become_knowledge_completions():
    assert popqa_prompt("What is Ufa the capital of?", "capital of") == "What is Ufa the capital of? Ufa is the capital of"
    assert popqa_prompt("What is Henry Feilden's occupation?", "occupation") == (
        "What is Henry Feilden's occupation? Henry Feilden's occupation is"
    )
    assert popqa_prompt("In what city was Izhar Elias born?", "place of birth") == (
        "In what city was Izhar Elias born? Izhar Elias was born in"
    )
    examples = read_popqa(POPQA)
    assert len(examples) == 1399  # every question follows its relation's template
    assert examples[0].answers[:2] == ("politician", "political leader") and examples[0].group == "occupation"
    with pytest.raises(ValueError, match="does not follow"):
        popqa_prompt("Where is Ufa?", "capital of")
    with pytest.raises(ValueError, match="no knowledge-completion template"):
        popqa_prompt("Who is the spouse of Ufa?", "spouse")


@pytest.mark.needs_shared
def test_demonstrations_are_fixed_distinct_and_excluded_from_scoring():
    examples = read_popqa(POPQA)
    demonstrations, scored = split_demonstrations(examples)
    assert demonstrations == [examples[0], examples[121], examples[294]]  # first of each of 3 relations
    assert [d.group for d in demonstrations] == ["occupation", "place of birth", "genre"]
    assert len(scored) == len(examples) - 3 and not set(demonstrations) & set(scored)
    assert few_shot_prompt(demonstrations, scored[0]).split("\n") == [
        "What is Henry Feilden's occupation? Henry Feilden's occupation is politician",
        "In what city was Belarmino Mario Chipongue born? Belarmino Mario Chipongue was born in Lubango",
        "What genre is Drive On? The genre of Drive On is pop music",
        "What is Herlyn Espinal's occupation? Herlyn Espinal's occupation is",
    ]
    bigbench = read_bigbench(BIGBENCH)
    demonstrations, scored = split_demonstrations(bigbench)
    assert [d.demonstration for d in demonstrations] == [
        "The native language of Daniel Schneidermann is French",
        "The country of Novosibirsk is Russia",
        "The country of citizenship of Isabel Martínez de Perón is Argentina",
    ]
    assert scored[0].prompt == "The sport played by Shane Victorino is" and scored[0].answers == ("baseball",)
    with pytest.raises(ValueError, match="3 demonstrations need 3 groups"):
        split_demonstrations(bigbench[:1] * 5)


def test_scoring_answers_each_scored_example_three_shot(tmp_path):
    examples = [
        QAExample("The capital of Ufa County is", ("Ufa",), "capital"),
        QAExample("The capital of Bavaria is", ("Munich", "München"), "capital"),  # same group: not a demonstration
        QAExample("Mozart was born in", ("Salzburg",), "place of birth"),
        QAExample("The author of Faust is", ("Johann Wolfgang von Goethe", "Goethe"), "author"),
        QAExample("The father of Amadeus is", ("Leopold Mozart", "Leopold"), "father"),
        QAExample("The genre of Drive On is", ("pop music", "pop"), "genre"),
    ]
    replies = {
        "The capital of Bavaria is": "München, of course.",  # an alias, accents and punctuation aside
        "The father of Amadeus is": "Leopold | the violinist",
        "The genre of Drive On is": "popular music",  # "pop" only as part of a word
    }
    asked = []

    def answer(prompt: str) -> str:
        asked.append(prompt)
        return replies[prompt.split("\n")[-1]]

    result = evaluate_fact_leakage({"toy": examples}, answer, tmp_path, limit=3)
    demonstrations = ["The capital of Ufa County is Ufa", "Mozart was born in Salzburg", "The author of Faust is Johann Wolfgang von Goethe"]  # fmt: skip
    assert [prompt.split("\n")[:3] for prompt in asked] == [demonstrations] * 3
    assert [prompt.split("\n")[3] for prompt in asked] == list(replies)
    (toy,) = result.datasets
    assert (toy.examples, toy.contained, toy.accuracy) == (3, 2, pytest.approx(2 / 3))
    assert toy.demonstrations == demonstrations and [s.contained for s in toy.samples] == [True, True, False]
    outputs = [json.loads(line) for line in (tmp_path / OUTPUTS_FILE).read_text().splitlines()]
    assert [(o["dataset"], o["output"], o["contained"]) for o in outputs] == [
        ("toy", "München, of course.", True),
        ("toy", "Leopold | the violinist", True),
        ("toy", "popular music", False),
    ]
    markdown = result.markdown()
    assert "| toy | 3 | 2 | 0.6667 |" in markdown and "Leopold \\| the violinist" in markdown


def test_answers_are_generated_without_calls_and_end_at_the_first_newline(tokenizer_path, tmp_path, one_torch_thread):
    lacy = tiny_lacy(tokenizer_path, tmp_path / "model", seed=21, call_scale=4.0)
    prompt = "The capital of Ufa County is Ufa\nThe capital of Bavaria is"
    assert generate(lacy.model, lacy.tokenizer, prompt, ArgmaxCall(lacy.call_id), max_new_tokens=8).calls > 0
    answer = answer_without_calls(lacy, max_new_tokens=8)(prompt)
    assert "<CALL>" not in answer and "\n" not in answer
