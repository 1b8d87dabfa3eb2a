"""Validation losses (Appendix A.4.3) against a plain, position-by-position reference computation."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_CONTEXT, synthetic_text, tiny_lacy
from lacy_stream.eval.heldout import pack_windows, read_heldout_texts
from lacy_stream.eval.validation import call_mask, evaluate_validation

BATCH = 3
RATIO = 0.15


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(7)
    return [synthetic_text(rng, rng.randint(1, 5)) for _ in range(8)]


@pytest.fixture(scope="module")
def baseline(tokenizer_path, tmp_path_factory):
    return tiny_lacy(tokenizer_path, tmp_path_factory.mktemp("baseline"), seed=11)


def reference(lacy, texts, baseline, *, batch: int, ratio: float) -> dict:
    """Validation losses the plain way: one position at a time, sorted by hand."""
    eos, call = lacy.tokenizer.eos_id, lacy.call_id
    stream = [eos]
    for text in texts:
        stream += lacy.tokenizer.encode(text) + [eos]
    size = TINY_CONTEXT + 1
    windows = [stream[start : start + size] for start in range(0, len(stream), size)]
    windows[-1] = windows[-1] + [eos] * (size - len(windows[-1]))
    sums = {"call": 0.0, "non_call": 0.0, "base_call": 0.0, "base_non_call": 0.0}
    counts = {"call": 0, "non_call": 0, "top": 0}
    for first in range(0, len(windows), batch):
        tokens = torch.tensor(windows[first : first + batch])
        with torch.no_grad():
            logits = lacy.model.logits(lacy.model(tokens[:, :-1]))
            base_logits = baseline.model.logits(baseline.model(tokens[:, :-1]))
        positions = []
        for row in range(tokens.shape[0]):
            for t in range(TINY_CONTEXT):
                if int(tokens[row, t + 1]) != eos:
                    is_top = int(logits[row, t].argmax()) == call
                    positions.append((row, t, is_top, float(logits[row, t, call])))
        counts["top"] += sum(is_top for _, _, is_top, _ in positions)
        ranked = sorted(range(len(positions)), key=lambda i: (not positions[i][2], -positions[i][3], i))
        chosen = set(ranked[: round(ratio * len(positions))])
        for index, (row, t, _, _) in enumerate(positions):
            target = int(tokens[row, t + 1])
            for prefix, scores in (("", logits[row, t]), ("base_", base_logits[row, t])):
                if index in chosen:
                    sums[prefix + "call"] -= float(F.log_softmax(scores, dim=-1)[target])
                else:
                    without_call = scores.clone()
                    without_call[call] = float("-inf")
                    sums[prefix + "non_call"] -= float(F.log_softmax(without_call, dim=-1)[target])
            counts["call" if index in chosen else "non_call"] += 1
    total = counts["call"] + counts["non_call"]
    return {
        "tokens": total,
        "calls": counts["call"],
        "top_rate": counts["top"] / total,
        "model": (
            sums["call"] / counts["call"],
            sums["non_call"] / counts["non_call"],
            (sums["call"] + sums["non_call"]) / total,
        ),
        "baseline": (
            sums["base_call"] / counts["call"],
            sums["base_non_call"] / counts["non_call"],
            (sums["base_call"] + sums["base_non_call"]) / total,
        ),
    }


@pytest.mark.parametrize("call_scale, side", [(2.0, "filled"), (6.0, "capped")])
def test_validation_losses_match_reference(tokenizer_path, tmp_path, texts, baseline, call_scale, side):
    lacy = tiny_lacy(tokenizer_path, tmp_path / "model", seed=3, call_scale=call_scale)
    expected = reference(lacy, texts, baseline, batch=BATCH, ratio=RATIO)
    # The two cases exercise both branches: <CALL> on top at fewer / more positions than the budget.
    assert (expected["top_rate"] < RATIO) == (side == "filled") and expected["top_rate"] > 0.01

    result = evaluate_validation(lacy, texts, baseline=baseline, batch_size=BATCH, call_ratio=RATIO)

    assert result.tokens == expected["tokens"] and result.calls == expected["calls"]
    assert result.top_call_rate == pytest.approx(expected["top_rate"])
    assert (result.model.call_loss, result.model.non_call_loss, result.model.total_loss) == pytest.approx(
        expected["model"], rel=1e-5
    )
    assert result.baseline is not None
    assert (result.baseline.call_loss, result.baseline.non_call_loss, result.baseline.total_loss) == pytest.approx(
        expected["baseline"], rel=1e-5
    )
    assert "baseline on the model's C_M" in result.markdown()


def test_call_mask_takes_exactly_the_budget_with_top_positions_first():
    valid = torch.ones(20, dtype=torch.bool)
    valid[[4, 9]] = False  # 18 valid -> budget round(2.7) = 3
    logits = torch.arange(20, dtype=torch.float)  # later positions have higher <CALL> logits
    one_top = torch.zeros(20, dtype=torch.bool)
    one_top[2] = True
    # fill: the one top position, then the highest other logits among valid positions
    assert call_mask(logits, one_top, valid, call_ratio=0.15).nonzero().flatten().tolist() == [2, 18, 19]
    many_top = torch.zeros(20, dtype=torch.bool)
    many_top[[0, 1, 3, 5, 6, 9]] = True
    # cap: only top positions, the highest logits among them (9 is top but not valid)
    assert call_mask(logits, many_top, valid, call_ratio=0.15).nonzero().flatten().tolist() == [3, 5, 6]


def test_pack_windows_marks_document_ends_and_padding_invalid():
    windows = pack_windows([[5, 6, 7], [8]], eos_id=2, seq_len=3)
    assert windows.tokens.tolist() == [[2, 5, 6, 7], [2, 8, 2, 2]]
    assert windows.valid.tolist() == [[True, True, True], [True, False, False]]


def test_read_heldout_texts_from_jsonl_and_shards(tmp_path):
    from lacy_stream.shards.make_shards import make_shards

    records = [{"id": str(i), "text": f"Document number {i}."} for i in range(5)]
    source = tmp_path / "heldout.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert read_heldout_texts(str(source), limit=3) == [record["text"] for record in records[:3]]
    make_shards([str(source)], tmp_path / "shards", docs_per_shard=2)
    assert read_heldout_texts(str(tmp_path / "shards")) == [record["text"] for record in records]
