"""The Section 3 acceptability analysis, with the LLM judge replaced by a loopback test double."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import RuleBasedJudge, acceptability_rule, synthetic_text, tiny_lacy
from lacy_stream.eval.acceptability import (
    JUDGE_PROMPT,
    evaluate_acceptability,
    judge_prompt,
    label_documents,
    parse_verdict,
    score_documents,
    token_text,
)
from lacy_stream.eval.chat_endpoint import JudgeError
from lacy_stream.labels import TokenClass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lacy(tokenizer_path, tmp_path_factory):
    return tiny_lacy(tokenizer_path, tmp_path_factory.mktemp("acceptability"), seed=13, call_scale=3.0)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(3)
    return [synthetic_text(rng, rng.randint(3, 9)) for _ in range(5)]


def test_prompt_is_the_papers_with_escaped_newlines():
    assert JUDGE_PROMPT.startswith("# Task\nYou must evaluate whether a proposed next token is a valid continuation")
    assert "**starting_text**: Alan Turing was an English\n**proposed_next_token**: linguist" in JUDGE_PROMPT
    assert JUDGE_PROMPT.count("{}") == 3
    prompt = judge_prompt("Mozart\n\n (27 January 17", "6", "5")
    assert prompt.endswith("**starting_text**: ’Mozart\\n\\n (27 January 17’\n**proposed_next_token**: ’6’\n"
                           "**reference_next_token**: ’5’\n**explanation**:")  # fmt: skip


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("**explanation**: fine.\n**output**: 1", 1),
        ("The year differs. **output**: 0", 0),
        ("output: 1 ... on reflection **Output**: 0", 0),
        ("1", 1),
        ("I am not sure.", None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


@pytest.mark.slow
def test_accuracy_buckets_and_plot_without_judge(lacy, texts, tmp_path):
    result = evaluate_acceptability(lacy, texts, out_dir=tmp_path, buckets=4, batch_size=3)

    documents = label_documents(lacy.tokenizer, texts, "en_core_web_sm")
    scored = score_documents(lacy, documents)
    assert result.tokens == len(scored) == sum(len(labels["tokens"]) - 1 for labels in documents)
    assert result.fact_tokens == sum(t.is_fact for t in scored) > 0 and result.fact_tokens < result.tokens
    assert result.accuracy == pytest.approx(sum(t.proposal == t.target for t in scored) / len(scored))
    assert sum(row.tokens for row in result.rows) == result.tokens
    assert {row.group for row in result.rows} == {"fact", "non-fact"}
    for row in result.rows:
        members = [t for t in scored if t.group == row.group and row.loss_from <= t.loss <= row.loss_to]
        assert len(members) == row.tokens
        assert row.accuracy == pytest.approx(sum(t.proposal == t.target for t in members) / len(members))
        assert row.acceptability is None and row.judged == 0
    assert result.acceptability is None and result.judge is None
    assert "not run" in result.note and "not run" in result.markdown()
    assert result.not_run.startswith("accuracy only") and "*Accuracy*: the share of target tokens" in result.markdown()
    assert (tmp_path / result.plot).read_bytes().startswith(PNG_SIGNATURE)


def test_scores_are_the_models_view_of_each_target(lacy, texts):
    documents = label_documents(lacy.tokenizer, texts[:1], "en_core_web_sm")
    scored = score_documents(lacy, documents)
    ids = torch.tensor([documents[0]["tokens"].tolist()])
    with torch.no_grad():
        logits = lacy.model.logits(lacy.model(ids[:, :64]))[0]
    logits[:, lacy.call_id] = float("-inf")
    logprobs = torch.log_softmax(logits, dim=-1)
    for token in scored[:64]:  # the first window: context from token 0
        assert token.context_start == 0
        assert token.target == int(ids[0, token.position])
        assert token.proposal == int(logits[token.position - 1].argmax())
        assert token.loss == pytest.approx(-float(logprobs[token.position - 1, token.target]), abs=1e-4)
        assert token.is_fact == (int(documents[0]["token_class"][token.position]) == TokenClass.FACT)


@pytest.mark.slow
def test_acceptability_with_the_judge_test_double(lacy, texts, tmp_path):
    with RuleBasedJudge() as judge:
        result = evaluate_acceptability(
            lacy, texts, out_dir=tmp_path, endpoint=judge.endpoint(workers=4), buckets=4, judged_tokens=40, seed=1
        )
        prompts = list(judge.prompts)

    documents = label_documents(lacy.tokenizer, texts, "en_core_web_sm")
    scored = score_documents(lacy, documents)
    sample = sorted(random.Random(1).sample(range(len(scored)), 40))
    mismatched = [scored[i] for i in sample if scored[i].proposal != scored[i].target]
    assert result.judged_tokens == 40 and result.judge_requests == len(mismatched) == len(prompts)
    assert result.unparsed_replies == 0

    def rule_verdict(index: int) -> int:
        token = scored[index]
        if token.proposal == token.target:
            return 1  # acceptable by definition, without a request
        return acceptability_rule(token_text(lacy.tokenizer, token.proposal), token_text(lacy.tokenizer, token.target))

    assert result.acceptability == pytest.approx(sum(map(rule_verdict, sample)) / len(sample))
    assert sum(row.judged for row in result.rows) == 40
    first = mismatched[0]
    context = lacy.tokenizer.decode(documents[first.document]["tokens"][first.context_start : first.position].tolist())
    assert (
        judge_prompt(context, token_text(lacy.tokenizer, first.proposal), token_text(lacy.tokenizer, first.target))
        in prompts
    )
    assert "rule-based-test-double" in result.note
    assert (tmp_path / result.plot).read_bytes().startswith(PNG_SIGNATURE)


def test_endpoint_retries_rate_limits_and_reports_errors():
    with RuleBasedJudge() as judge:
        assert parse_verdict(judge.endpoint(model="flaky-judge").complete(judge_prompt("The", " cat", " time"))) == 1
        assert len(judge.rejected_once) == 1 and len(judge.prompts) == 1  # answered on the retry
        with pytest.raises(JudgeError, match="HTTP 400"):
            judge.endpoint(model="broken").complete("anything")
