"""Mask properties for every method of Table 5, edge cases, and global selection over 2 gloo processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import spawn_gloo
from lacy_stream.labels import JUDGE_CALL, JUDGE_KEEP, TokenClass, TokenLabels
from lacy_stream.loss.masks import METHODS, MaskInputs, methods_table, select_masks

BUDGETED = ("rho1", "spacy", "lacy", "spacy_refloss", "lacy_ignorefacts", "lacy_ignore")
FACT_ONLY = ("spacy", "lacy", "spacy_refloss", "lacy_ignorefacts", "lacy_ignore")


def random_inputs(n: int, seed: int = 0, fact_share: float = 0.3) -> MaskInputs:
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(n, generator=generator)
    token_class = torch.full((n,), int(TokenClass.OTHER), dtype=torch.int8)
    token_class[uniform < fact_share] = TokenClass.FACT
    token_class[uniform > 0.75] = TokenClass.GRAMMAR
    return MaskInputs(
        token_loss=torch.rand(n, generator=generator) * 10,
        valid=torch.rand(n, generator=generator) > 0.05,
        labels=TokenLabels(
            token_class=token_class,
            judge=torch.rand(n, generator=generator) < 0.15,
            ref_loss=torch.rand(n, generator=generator) * 10,
        ),
    )


def keys_for(method: str, inputs: MaskInputs) -> torch.Tensor | None:
    return {
        "rho1": inputs.labels.ref_loss - inputs.token_loss,
        "lacy": inputs.token_loss,
        "lacy_ignorefacts": inputs.token_loss,
        "lacy_ignore": inputs.token_loss,
        "spacy_refloss": inputs.labels.ref_loss,
    }.get(method)


@pytest.mark.parametrize("fact_share", [0.25, 0.4])
@pytest.mark.parametrize("method", METHODS)
def test_mask_properties(method, fact_share):
    inputs = random_inputs(1000, fact_share=fact_share)
    masks = select_masks(method, inputs, seed=1, step=5)
    valid = inputs.valid
    fact = valid & (inputs.labels.token_class == TokenClass.FACT)
    k = round(0.15 * int(valid.sum()))
    assert masks.valid_tokens == int(valid.sum())
    assert not (masks.call & ~valid).any() and not (masks.ignore & ~valid).any()
    assert not (masks.call & masks.ignore).any()
    if method in BUDGETED:
        assert int(masks.call.sum()) == k == masks.wanted_calls and masks.call_shortfall == 0
    if method in FACT_ONLY:
        assert not (masks.call & ~fact).any()
    keys = keys_for(method, inputs)
    if keys is not None:
        eligible = valid if method == "rho1" else fact
        assert keys[masks.call].min() >= keys[eligible & ~masks.call].max()
    if method == "baseline":
        assert not masks.call.any() and not masks.ignore.any()
    if method == "llm_judge":
        assert torch.equal(masks.call, inputs.labels.judge & valid)
    if method == "lacy_ignorefacts":
        assert torch.equal(masks.ignore, fact & ~masks.call)
    if method == "lacy_ignore":
        remaining_facts = int((fact & ~masks.call).sum())
        assert int(masks.ignore.sum()) == max(round(0.15 * int(valid.sum())), remaining_facts)
        extra = masks.ignore & ~fact
        other = valid & (inputs.labels.token_class == TokenClass.OTHER)
        assert not (extra & ~other).any()
        if extra.any():
            assert inputs.token_loss[extra].min() >= inputs.token_loss[other & ~extra].max()
    if method not in ("lacy_ignorefacts", "lacy_ignore"):
        assert not masks.ignore.any()


def test_lacy_calls_the_highest_loss_facts_up_to_the_budget():
    """The paper's example: with 25% facts, a 15% budget delegates the 60% highest-loss facts."""
    inputs = random_inputs(4000, fact_share=0.25)
    inputs.valid[:] = True
    masks = select_masks("lacy", inputs)
    fact = inputs.labels.token_class == TokenClass.FACT
    assert int(masks.call.sum()) == 600
    assert abs(int(masks.call.sum()) / int(fact.sum()) - 0.6) < 0.05


def test_random_methods_are_seeded_and_hit_their_rate():
    inputs = random_inputs(20000)
    first = select_masks("loss_based", inputs, seed=3, step=7)
    assert torch.equal(first.call, select_masks("loss_based", inputs, seed=3, step=7).call)
    assert not torch.equal(first.call, select_masks("loss_based", inputs, seed=3, step=8).call)
    assert abs(int(first.call.sum()) / int(inputs.valid.sum()) - 0.15) < 0.01
    spacy = select_masks("spacy", inputs, seed=3, step=7)
    assert not torch.equal(spacy.call, select_masks("spacy", inputs, seed=4, step=7).call)


def test_edge_cases():
    no_facts = random_inputs(100)
    no_facts.labels.token_class[:] = TokenClass.OTHER
    masks = select_masks("lacy", no_facts)
    assert not masks.call.any() and masks.call_shortfall == masks.wanted_calls > 0

    few_facts = random_inputs(100)
    few_facts.valid[:] = True
    few_facts.labels.token_class[:] = TokenClass.OTHER
    few_facts.labels.token_class[[3, 50, 99]] = TokenClass.FACT
    masks = select_masks("lacy", few_facts)
    assert masks.call.nonzero().flatten().tolist() == [3, 50, 99] and masks.call_shortfall == 12

    nothing_valid = random_inputs(50)
    nothing_valid.valid[:] = False
    for method in METHODS:
        masks = select_masks(method, nothing_valid)
        assert masks.valid_tokens == 0 and not masks.call.any() and not masks.ignore.any()

    single = random_inputs(1)
    single.valid[:] = True
    single.labels.token_class[:] = TokenClass.FACT
    assert select_masks("lacy", single, call_ratio=1.0).call.tolist() == [True]


def test_ties_go_to_the_lower_index():
    inputs = random_inputs(40)
    inputs.valid[:] = True
    inputs.labels.token_class[:] = TokenClass.FACT
    inputs.token_loss[:] = 1.0
    assert select_masks("lacy", inputs, call_ratio=0.25).call.nonzero().flatten().tolist() == list(range(10))


def test_missing_inputs_and_bad_arguments():
    inputs = random_inputs(10)
    with pytest.raises(ValueError, match="ref_loss"):
        select_masks("rho1", MaskInputs(inputs.token_loss, inputs.valid))
    with pytest.raises(ValueError, match="token_class"):
        select_masks("lacy", MaskInputs(inputs.token_loss, inputs.valid))
    with pytest.raises(ValueError, match="judge"):
        select_masks("llm_judge", MaskInputs(inputs.token_loss, inputs.valid))
    with pytest.raises(ValueError, match="unknown method"):
        select_masks("lacy2", inputs)
    with pytest.raises(ValueError, match="judge must be"):
        select_masks("llm_judge", MaskInputs(inputs.token_loss, inputs.valid, TokenLabels(judge=inputs.token_loss)))
    with pytest.raises(ValueError, match="call_ratio"):
        select_masks("lacy", inputs, call_ratio=1.5)


def _global_selection_worker(rank: int, world: int) -> dict:
    whole = random_inputs(2 * 300, seed=11)
    part = slice(rank * 300, (rank + 1) * 300)
    local = MaskInputs(
        whole.token_loss[part],
        whole.valid[part],
        TokenLabels(**{name: getattr(whole.labels, name)[part] for name in ("token_class", "judge", "ref_loss")}),
    )
    # Equal keys across the two ranks check that ties are broken by global index.
    local.token_loss[:5] = 4.0
    results = {}
    for method in METHODS:
        masks = select_masks(method, local, seed=2, step=9, group=dist.group.WORLD)
        results[method] = (masks.call, masks.ignore, masks.valid_tokens, masks.call_shortfall)
    return results


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_global_selection_over_two_gloo_processes_equals_one_process(tmp_path):
    results = spawn_gloo(_global_selection_worker, 2, tmp_path)
    whole = random_inputs(600, seed=11)
    whole.token_loss[:5] = 4.0
    whole.token_loss[300:305] = 4.0
    for method in METHODS:
        expected = select_masks(method, whole, seed=2, step=9)
        call = torch.cat([results[0][method][0], results[1][method][0]])
        ignore = torch.cat([results[0][method][1], results[1][method][1]])
        assert torch.equal(call, expected.call), method
        assert torch.equal(ignore, expected.ignore), method
        assert results[0][method][2] == expected.valid_tokens and results[1][method][3] == expected.call_shortfall


def test_llm_judge_accepts_the_raw_judge_column():
    inputs = random_inputs(200)
    delegated = inputs.labels.judge
    raw = torch.where(delegated, JUDGE_CALL, JUDGE_KEEP).to(torch.int8)
    raw[::7] = -1  # documents without judge markup
    from_raw = select_masks("llm_judge", MaskInputs(inputs.token_loss, inputs.valid, TokenLabels(judge=raw)))
    assert torch.equal(from_raw.call, inputs.valid & (raw == JUDGE_CALL))


def test_selection_keys_keep_fp64():
    """Keys that differ below fp32 resolution still rank correctly: the selection does not round them."""
    n = 4
    token_loss = torch.tensor([1.0, 1.0 + 1e-12, 1.0 + 2e-12, 1.0 + 3e-12], dtype=torch.float64)
    inputs = MaskInputs(token_loss, torch.ones(n, dtype=torch.bool),
                        TokenLabels(token_class=torch.full((n,), int(TokenClass.FACT), dtype=torch.int8)))
    assert select_masks("lacy", inputs, call_ratio=0.5).call.tolist() == [False, False, True, True]


def test_every_registered_method_lists_what_it_needs():
    for method in METHODS.values():
        assert method.needs <= {"token_class", "judge", "ref_loss"}
        inputs = random_inputs(100)
        missing = MaskInputs(inputs.token_loss, inputs.valid)
        if method.needs:
            with pytest.raises(ValueError, match="needs per-token"):
                select_masks(method.name, missing)
        else:
            select_masks(method.name, missing)


def test_the_method_table_of_the_docs_is_the_registry():
    page = (Path(__file__).resolve().parents[1] / "docs" / "loss-and-methods.md").read_text()
    assert methods_table() in page
