"""Multiple-choice scoring against a hand computation, the task files in their own formats, and continuation
scoring."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import SHARED_DIR, tiny_lacy
from lacy_stream.eval.nlu import (
    MultipleChoiceExample,
    choice_loglikelihoods,
    evaluate_nlu,
    evaluate_task,
    read_hellaswag,
    read_multiple_choice,
    read_siqa,
)
from lacy_stream.eval.scoring import encode_pair, score_continuations

EXAMPLES = [
    MultipleChoiceExample(
        context="Question: Where did the painter study law?\nAnswer:", choices=["at university", "river"], gold=0
    ),
    MultipleChoiceExample(
        context="Question: Who founded the museum?\nAnswer:", choices=["a king", "the composer Mozart", "in 1887"],
        gold=1,
    ),
]


@pytest.fixture(scope="module")
def lacy(tokenizer_path, tmp_path_factory):
    return tiny_lacy(tokenizer_path, tmp_path_factory.mktemp("nlu"), seed=5, call_scale=4.0)


def hand_loglikelihood(lacy, context: str, choice: str) -> float:
    """log p(" choice" | EOS + context) with <CALL> excluded, one forward pass over the full text."""
    tokenizer = lacy.tokenizer
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + " " + choice)
    assert whole[: len(context_ids)] == context_ids  # no merge across the boundary in these examples
    ids = torch.tensor([[tokenizer.eos_id, *whole]])
    with torch.no_grad():
        logits = lacy.model.logits(lacy.model(ids[:, :-1]))[0]
    logits[:, lacy.call_id] = float("-inf")
    logprobs = F.log_softmax(logits, dim=-1)
    return sum(float(logprobs[position, ids[0, position + 1]]) for position in range(len(context_ids), len(whole)))


def test_choice_loglikelihoods_match_hand_computation(lacy):
    scores = choice_loglikelihoods(lacy, EXAMPLES, batch_size=2)
    for example, example_scores in zip(EXAMPLES, scores):
        expected = [hand_loglikelihood(lacy, example.context, choice) for choice in example.choices]
        assert example_scores == pytest.approx(expected, abs=1e-4)

    result = evaluate_task(lacy, "toy", EXAMPLES, batch_size=3)
    hand_acc = [max(range(len(s)), key=s.__getitem__) == e.gold for e, s in zip(EXAMPLES, scores)]
    hand_norm = [max(range(len(s)), key=lambda i: s[i] / len(e.choices[i])) == e.gold for e, s in zip(EXAMPLES, scores)]
    assert result.examples == 2
    assert result.acc == sum(hand_acc) / 2 and result.acc_norm == sum(hand_norm) / 2


def test_call_logit_does_not_change_the_scores(lacy, tokenizer_path, tmp_path):
    """<CALL> is excluded from the softmax: scaling its output row (call_scale) leaves every score unchanged."""
    other = tiny_lacy(tokenizer_path, tmp_path, seed=5, call_scale=0.0)
    flat = [score for scores in choice_loglikelihoods(lacy, EXAMPLES) for score in scores]
    assert flat == pytest.approx(
        [score for scores in choice_loglikelihoods(other, EXAMPLES) for score in scores], abs=1e-5
    )


@pytest.mark.needs_shared
def test_shared_tasks_are_scored_with_limit(lacy):
    tasks = {"arc_easy": SHARED_DIR / "eval" / "arc_easy.jsonl", "piqa": SHARED_DIR / "eval" / "piqa.jsonl",
             "hellaswag": None, "siqa": None}
    result = evaluate_nlu(lacy, tasks, limit=3, batch_size=4)
    assert [(task.task, task.examples) for task in result.tasks] == [("arc_easy", 3), ("piqa", 3)]
    assert result.not_run == ("hellaswag: no local file (--hellaswag); the Hugging Face hub is not read; "
                              "siqa: no local file (--siqa); the Hugging Face hub is not read")
    assert all(0.0 <= task.acc <= 1.0 and 0.0 <= task.acc_norm <= 1.0 for task in result.tasks)
    assert "| arc_easy | 3 |" in result.markdown()


def test_read_multiple_choice_rejects_bad_gold(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"query": "Question: ?", "choices": ["a", "b"], "gold": 2}) + "\n")
    with pytest.raises(ValueError, match="gold 2 for 2 choices"):
        read_multiple_choice(path)


def test_scores_are_independent_of_batching_and_windows_cover_long_texts(lacy):
    tokenizer = lacy.tokenizer
    long_text = " ".join(["the river city museum"] * 40)  # far beyond the context of 64 tokens
    pairs = [
        encode_pair(tokenizer, long_text, " painter"),  # context truncated from the left
        encode_pair(tokenizer, "The king", long_text),  # continuation scored in several windows
        encode_pair(tokenizer, "", "The king"),
        *(encode_pair(tokenizer, example.context, " " + choice) for example in EXAMPLES for choice in example.choices),
    ]
    one_by_one = [score_continuations(lacy, [pair], batch_size=1)[0] for pair in pairs]
    batched = score_continuations(lacy, pairs, batch_size=3)
    for alone, together, (_, continuation) in zip(one_by_one, batched, pairs):
        assert together.logprob == pytest.approx(alone.logprob, abs=1e-3)
        assert together.is_greedy == alone.is_greedy and together.num_tokens == alone.num_tokens == len(continuation)
    assert encode_pair(tokenizer, "", "The king")[0] == [tokenizer.eos_id]
    with pytest.raises(ValueError, match="empty continuation"):
        encode_pair(tokenizer, "context", "")


def test_read_multiple_choice_prompts_as_the_harness_arc_and_piqa_tasks(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"query": "Question: Which is a mammal?\n", "choices": ["whale", "trout"], "gold": 0}))
    assert read_multiple_choice(path) == [
        MultipleChoiceExample(context="Question: Which is a mammal?\nAnswer:", choices=["whale", "trout"], gold=0)
    ]


def test_hellaswag_in_its_own_format_is_prompted_and_cleaned_as_the_harness_does(tmp_path):
    record = {  # a line of hellaswag_val.jsonl, shortened
        "ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering "
        "the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "ctx": "...",
        "split": "val", "split_type": "indomain", "source_id": "activitynet~v_-1IBHYS3L-Y", "label": 3,
        "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two "
                    "men supporting the head of the person wearing winter clothes snow as the we girls sled.",
                    ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing "
                    "the snow on his car. [title] Keep scraping."],
    }
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record | {"label": "0"}) + "\n")
    first, second = read_hellaswag(path)
    assert first.context == ("Removing ice from car: Then, the man writes over the snow covering the window of a car, "
                             "and a woman wearing winter clothes smiles. Then")
    assert first.choices[3] == ", the man continues removing the snow on his car.. Keep scraping."
    assert first.gold == 3 and second.gold == 0 and read_hellaswag(path, limit=1) == [first]


def test_siqa_reads_its_labels_from_the_labels_file_beside_it_or_a_field(tmp_path):
    record = {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
              "question": "What does Tracy need to do before this?", "answerA": "make a new plan",
              "answerB": "Go home and see Riley", "answerC": "Find somewhere to go"}
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    (tmp_path / "dev-labels.lst").write_text("3\n1\n")
    first, second = read_siqa(path)
    assert first.context == ("Q: Tracy didn't go home that evening and resisted Riley's attacks. "
                             "What does Tracy need to do before this?\nA:")
    assert first.choices == ["make a new plan", "Go home and see Riley", "Find somewhere to go"]
    assert (first.gold, second.gold) == (2, 0)
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text(json.dumps(record | {"label": "2"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"labeled.jsonl: example 2: no label field, and no line of labeled-labels"):
        read_siqa(labeled)
    assert read_siqa(labeled, limit=1)[0].gold == 1


def test_a_task_file_in_another_format_is_one_clear_error(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"query": "Question: ?", "choices": ["a", "b"], "gold": 0}) + "\n")
    with pytest.raises(ValueError, match=r"arc.jsonl: example 1 lacks the field 'ctx_a' of the task's format"):
        read_hellaswag(path)


def test_the_four_tasks_run_from_local_files(lacy, tmp_path):
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"query": "Question: Who founded the museum?", "choices": ["a king", "in 1887"],
                               "gold": 0}) + "\n")
    hellaswag = tmp_path / "hellaswag.jsonl"
    hellaswag.write_text(json.dumps({"activity_label": "Painting", "ctx_a": "The painter studies law.", "ctx_b": "he",
                                     "endings": [" paints.", " sings.", " rows.", " runs."], "label": 0}) + "\n")
    siqa = tmp_path / "siqa.jsonl"
    siqa.write_text(json.dumps({"context": "The king founded a museum.", "question": "Why?", "answerA": "art",
                                "answerB": "law", "answerC": "river", "label": "1"}) + "\n")
    result = evaluate_nlu(lacy, {"arc_easy": arc, "piqa": arc, "hellaswag": hellaswag, "siqa": siqa})
    assert [task.task for task in result.tasks] == ["arc_easy", "piqa", "hellaswag", "siqa"]
    assert result.not_run is None
