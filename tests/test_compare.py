"""``lacy-stream compare`` on tiny runs: the numbers of comparison.json against a direct computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import overrides
from lacy_stream.cli import main as cli_main
from lacy_stream.config.job_config import load_job_config
from lacy_stream.eval.compare import auc, left_counts, read_heldout_batches, word_initial_pieces
from lacy_stream.eval.scoring import TokenStatistics
from lacy_stream.tokenizer import Tokenizer
from lacy_stream.inference.loading import load_lacy
from lacy_stream.labels import JUDGE_CALL, JUDGE_UNKNOWN, TokenClass
from lacy_stream.trainer.train import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, judged_corpus, tokenizer_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for method, steps in (("baseline", 4), ("lacy", 4), ("llm_judge", 3)):
        run_dir = root / method
        args = overrides(judged_corpus, tokenizer_path, run_dir, f"--train.steps={steps}", f"--loss.method={method}",
                         f"--annotation.cache_dir={root / 'cache'}")
        args.remove("--annotation.enabled=false")
        if method == "lacy":  # probe windows, for compare's trajectories
            args += [f"--train.val_shards={judged_corpus}", "--train.val_every=2", "--train.val_batches=1",
                     "--train.probe_windows=2"]
        train(load_job_config(None, args))
        made[method] = run_dir
    return made


def test_auc_counts_ties_as_half():
    assert auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0]), torch.tensor([1.0, 2.0])) == 0.25
    assert auc(torch.tensor([]), torch.tensor([1.0])) is None


def test_what_a_model_leaves_to_itself_when_its_calls_are_answered():
    # Six targets: facts at 0, 1, 2 and 4; the model's top token is right at 1 and 3; the mask calls 0 and 3.
    targets = torch.tensor([[10, 11, 12, 13, 14, 15]])
    top = torch.tensor([[99, 11, 98, 13, 97, 96]])
    no_call_logprob = torch.tensor([[-5.0, -1.0, -3.0, -0.5, -7.0, -2.0]])
    stats = TokenStatistics(full_logprob=no_call_logprob, no_call_logprob=no_call_logprob,
                            call_logit=torch.zeros(1, 6), call_log_odds=torch.zeros(1, 6),
                            call_is_top=torch.zeros(1, 6, dtype=torch.bool), top_token=top)
    valid = torch.tensor([[True, True, True, True, True, False]])
    fact = torch.tensor([[True, True, True, False, True, False]])
    mask = torch.tensor([[True, False, False, True, False, False]])
    counts = {name: float(value) for name, value in left_counts(stats, targets, valid, fact, mask).items()}
    # Outside the mask: facts 1 (right), 2 and 4 (wrong); the non-fact 5 is not valid.
    assert counts == {"facts_wrong_left": 2, "wrong_left": 2, "fact_nll_left": 1 + 3 + 7, "facts_left": 3}
    nothing_called = left_counts(stats, targets, valid, fact, torch.zeros_like(mask))
    assert int(nothing_called["facts_wrong_left"]) == 3 and int(nothing_called["wrong_left"]) == 3


def test_word_initial_pieces_are_those_that_begin_with_the_word_marker(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    begins = word_initial_pieces(tokenizer)
    assert begins.shape == (tokenizer.vocab_size,) and not begins[tokenizer.call_id]
    ids = tokenizer.encode("Lovelace wrote notes")
    pieces = [tokenizer.id_to_piece(token) for token in ids]
    assert begins[ids].tolist() == [piece.startswith("\u2581") for piece in pieces] and begins[ids[0]]


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_compare_writes_the_table_and_its_numbers_are_right(tmp_path, runs, judged_corpus):
    out = tmp_path / "comparison"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["compare", "--runs", str(runs["baseline"]), str(runs["lacy"]), str(runs["llm_judge"]),
                  "--val-shards", str(judged_corpus), "--out", str(out), "--batches", "3", "--batch-size", "2"])
    assert exit_info.value.code == 0
    report = json.loads((out / "comparison.json").read_text())
    assert (out / "comparison.png").stat().st_size > 0
    page = (out / "comparison.html").read_text()
    assert "<td>llm_judge</td>" in page and "3 steps, not 4" in page and "data:image/png;base64," in page
    markdown = (out / "comparison.md").read_text()
    assert "`lacy`" in markdown and "3 steps, not 4" in markdown
    assert [run["method"] for run in report["runs"]] == ["baseline", "lacy", "llm_judge"]
    assert report["runs"][1]["flags"] == [] and report["runs"][2]["flags"] == ["3 steps, not 4"]
    assert report["scores"][0]["call_loss"] is None and report["scores"][0]["calls"] == 0
    baseline_trajectory, lacy_trajectory, _ = report["trajectories"]
    assert baseline_trajectory is None and lacy_trajectory["steps"] == [2, 4]
    assert all(loss > 0 for loss in lacy_trajectory["fact_loss"] + lacy_trajectory["other_loss"])
    assert (out / "trajectories.png").stat().st_size > 0 and "loss trajectories of the probes" in page

    # The lacy run, computed directly from the same held-out windows.
    lacy, baseline = load_lacy(runs["lacy"]), load_lacy(runs["baseline"])
    batches = read_heldout_batches(str(judged_corpus), lacy.tokenizer.model_path, seq_len=32, batch_size=2, batches=3)
    sums = {"call": 0.0, "calls": 0, "non_call": 0.0, "non_calls": 0, "base_call": 0.0, "facts_called": 0,
            "judge_called": 0, "judged_calls": 0, "facts": 0, "facts_wrong_left": 0, "initial_called": 0}
    fact_odds, other_odds = [], []
    for batch in batches:
        inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]
        valid = batch.token_class != TokenClass.IGNORE
        with torch.no_grad():
            logits = lacy.model.logits(lacy.model(inputs)).double()
            base_logits = baseline.model.logits(baseline.model(inputs)).double()
        call_logit = logits[..., lacy.call_id]
        others = logits.clone()
        others[..., lacy.call_id] = float("-inf")
        is_top = call_logit > others.max(-1).values
        # C_M: round(15% of the valid tokens), top-call positions first, then by <CALL> logit.
        budget = round(0.15 * int(valid.sum()))
        ranked = sorted(valid.flatten().nonzero().flatten().tolist(),
                        key=lambda i: (not bool(is_top.flatten()[i]), -float(call_logit.flatten()[i]), i))
        mask = torch.zeros(valid.numel(), dtype=torch.bool)
        mask[ranked[:budget]] = True
        mask = mask.view_as(valid)
        full = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        no_call = others.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        base_full = base_logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        sums["call"] -= float(full[mask].sum())
        sums["calls"] += int(mask.sum())
        sums["non_call"] -= float(no_call[valid & ~mask].sum())
        sums["non_calls"] += int((valid & ~mask).sum())
        sums["base_call"] -= float(base_full[mask].sum())
        fact = valid & (batch.token_class == TokenClass.FACT)
        sums["facts_called"] += int((mask & fact).sum())
        sums["judged_calls"] += int((mask & (batch.judge != JUDGE_UNKNOWN)).sum())
        sums["judge_called"] += int((mask & (batch.judge == JUDGE_CALL)).sum())
        log_odds = call_logit - torch.logsumexp(others, -1)
        wrong = others.argmax(-1) != targets
        begins = torch.tensor([lacy.tokenizer.id_to_piece(t).startswith("\u2581") for t in targets.flatten().tolist()])
        sums["facts"] += int(fact.sum())
        sums["facts_wrong_left"] += int((fact & ~mask & wrong).sum())
        sums["initial_called"] += int((mask & fact & begins.view_as(fact)).sum())
        fact_odds.append(log_odds[fact])
        other_odds.append(log_odds[valid & ~fact])
    fact_odds, other_odds = torch.cat(fact_odds), torch.cat(other_odds)
    pairs = (fact_odds[:, None] > other_odds[None, :]).double() + 0.5 * (fact_odds[:, None] == other_odds[None, :])

    scores = report["scores"][1]
    assert scores["calls"] == sums["calls"] > 0
    assert scores["call_loss"] == pytest.approx(sums["call"] / sums["calls"], rel=1e-4)
    assert scores["non_call_loss"] == pytest.approx(sums["non_call"] / sums["non_calls"], rel=1e-4)
    assert scores["baseline_call_loss"] == pytest.approx(sums["base_call"] / sums["calls"], rel=1e-4)
    assert scores["fact_share_of_calls"] == pytest.approx(sums["facts_called"] / sums["calls"])
    assert scores["judge_share_of_calls"] == pytest.approx(sums["judge_called"] / sums["judged_calls"])
    assert scores["fact_call_auc"] == pytest.approx(pairs.mean().item(), abs=1e-4)
    assert scores["fact_errors_left"] == pytest.approx(sums["facts_wrong_left"] / sums["facts"])
    assert scores["word_initial_share_of_calls"] == pytest.approx(sums["initial_called"] / sums["calls"])
    assert "fact errors left" in markdown and "word-initial facts in C_M" in page
    assert report["scores"][0]["fact_errors_left_log_odds"] is None and report["scores"][0]["fact_errors_left"] > 0
