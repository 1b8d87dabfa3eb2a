"""Cascade generation: call policies, greedy decoding with repetition penalty, rendering and the CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from lacy_stream.annotate.annotation import FactAnnotator
from lacy_stream.cli import EXIT_USAGE, main
from lacy_stream.cli.inference import warn_of_argmax_calls
from lacy_stream.models.hf_export import export_hf
from lacy_stream.inference.call_policy import (
    ArgmaxCall,
    CalibratedCall,
    CallRateController,
    ILacyCall,
    NeverCall,
    RandomCall,
    negative_top_logprob,
    policy_from_name,
    top_k_entropy,
)
from lacy_stream.inference.generate import (
    TokenSource,
    generate,
    next_token_logits,
    penalize_repetition,
    prompt_call_logits,
    render,
)
from lacy_stream.models.gpt2 import Transformer, model_args
from lacy_stream.tokenizer import Tokenizer

PROMPTS = (
    "Tell me a bio of Wolfgang Amadeus Mozart. Wolfgang Amadeus Mozart is",
    "The river city museum was founded in",
    "The king and queen of the island",
    "Professor",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: str) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def tiny_model(tokenizer: Tokenizer, seed: int, **overrides: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_args("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=64, **overrides)).eval()


def fixed_logits_model(tokenizer: Tokenizer, logits: dict[int, float]) -> Transformer:
    """A model whose next-token logits are the same after any context: ``logits`` for some ids, 0 for the rest.

    The final LayerNorm's weight is zeroed and its bias set to the first unit vector, so every hidden state
    is that vector and the (tied) output projection reads the first column of the embedding.
    """
    model = tiny_model(tokenizer, seed=0)
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.zero_()
        model.norm.bias[0] = 1.0
        model.tok_embeddings.weight[:, 0] = 0.0
        for token, logit in logits.items():
            model.tok_embeddings.weight[token, 0] = logit
    return model


def piece_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


class FixedDelegate:
    """Answers every call with the same pieces, and remembers the contexts it was asked about."""

    def __init__(self, pieces: list[int]) -> None:
        self.pieces = pieces
        self.contexts: list[list[int]] = []

    def next_pieces(self, context_ids) -> list[int]:
        self.contexts.append(list(context_ids))
        return list(self.pieces)


# Repetition penalty, EOS, call mechanics ---------------------------------------------------------------


def test_penalize_repetition_is_ctrl_style() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    penalized = penalize_repetition(logits, [0, 1, 1, 4], 1.2)
    assert penalized.tolist() == pytest.approx([2.0 / 1.2, -1.2, 0.5, 3.0, -2.4])
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0], "the input is left alone"
    assert penalize_repetition(logits, [0, 1], 1.0) is logits


def test_repetition_penalty_moves_greedy_off_a_repeated_token(tokenizer: Tokenizer) -> None:
    first, second = 300, 301
    model = fixed_logits_model(tokenizer, {first: 2.0, second: 1.8})
    assert not {first, second} & set(tokenizer.encode("The"))
    plain = generate(model, tokenizer, "The", NeverCall(), max_new_tokens=5, repetition_penalty=1.0)
    assert plain.ids == [first] * 5
    # 2.0 / 1.2 < 1.8 after the first token; once both are seen, 2.0 / 1.2 > 1.8 / 1.2 again.
    penalized = generate(model, tokenizer, "The", NeverCall(), max_new_tokens=5, repetition_penalty=1.2)
    assert penalized.ids == [first, second, first, first, first]


def test_stops_at_eos(tokenizer: Tokenizer) -> None:
    token = 300
    model = fixed_logits_model(tokenizer, {token: 2.0, tokenizer.eos_id: 1.9})
    generation = generate(model, tokenizer, "The", NeverCall(), max_new_tokens=50)
    assert generation.ids == [token]  # penalised to 2.0 / 1.2, the token falls below EOS
    assert generation.stopped_at_eos and generation.steps == 2


def test_padding_rows_are_never_generated(tokenizer: Tokenizer) -> None:
    """Padding rows with the largest logits of all: the generator still only sees the real vocabulary."""
    model = fixed_logits_model(tokenizer, {300: 2.0})
    with torch.no_grad():
        model.tok_embeddings.weight[tokenizer.vocab_size :, 0] = 50.0
    assert model.tok_embeddings.weight.shape[0] > tokenizer.vocab_size
    generation = generate(model, tokenizer, "The", NeverCall(), max_new_tokens=3, repetition_penalty=1.0)
    assert generation.ids == [300] * 3


def test_cached_generation_equals_recomputing_every_step(tokenizer: Tokenizer) -> None:
    """Past the 64-token context the generator slides its window; before, it reads only new tokens."""
    model = tiny_model(tokenizer, seed=3)
    delegate = FixedDelegate(piece_ids(tokenizer, " river city"))
    cached, recomputed = (
        generate(model, tokenizer, PROMPTS[0], RandomCall(0.2, seed=1), delegate=delegate, max_new_tokens=70,
                 kv_cache=kv_cache)
        for kv_cache in (True, False)
    )
    assert len(recomputed.prompt_ids) + len(recomputed.ids) > model.args.max_seq_len
    assert cached.ids == recomputed.ids and cached.sources == recomputed.sources and cached.calls > 0


def test_stops_once_the_new_text_holds_the_stop_string(tokenizer: Tokenizer) -> None:
    newline = next(token for token in tokenizer.encode("a\nb") if tokenizer.id_to_piece(token) == "<0x0A>")
    model = fixed_logits_model(tokenizer, {300: 2.0, newline: 1.7})
    # Once 300 is written, the repetition penalty puts it below the newline: 2.0 / 1.2 < 1.7.
    endless = generate(model, tokenizer, "The", NeverCall(), max_new_tokens=12)
    assert newline in endless.ids and len(endless.ids) == 12
    stopped = generate(model, tokenizer, "The", NeverCall(), max_new_tokens=12, stop="\n")
    assert stopped.ids == endless.ids[: endless.ids.index(newline) + 1]
    assert not stopped.stopped_at_eos


def test_never_call_never_calls_even_when_call_is_on_top(tokenizer: Tokenizer) -> None:
    token = 300
    model = fixed_logits_model(tokenizer, {tokenizer.call_id: 10.0, token: 1.0})
    never = NeverCall()
    generation = generate(model, tokenizer, "The", never, delegate=FixedDelegate([301]), max_new_tokens=20)
    assert generation.calls == 0 and never.calls == 0 and never.steps == 20
    assert generation.ids == [token] * 20 and set(generation.sources) == {TokenSource.MODEL}

    argmax = generate(model, tokenizer, "The", ArgmaxCall(tokenizer.call_id), max_new_tokens=20)
    assert argmax.call_rate == 1.0
    assert argmax.ids == [token] * 20, "without a partner the model's best token other than <CALL> stands in"
    assert set(argmax.sources) == {TokenSource.MODEL_AT_CALL}


def test_partner_pieces_are_appended_and_capped_at_the_token_budget(tokenizer: Tokenizer) -> None:
    model = fixed_logits_model(tokenizer, {tokenizer.call_id: 10.0})
    pieces = piece_ids(tokenizer, " museum 1887")[:3]
    delegate = FixedDelegate(pieces)
    generation = generate(model, tokenizer, "The", ArgmaxCall(tokenizer.call_id), delegate=delegate, max_new_tokens=7)
    assert generation.ids == (pieces * 3)[:7]
    assert generation.steps == generation.calls == 3, "a call that adds three pieces is one step"
    assert set(generation.sources) == {TokenSource.PARTNER}
    prompt = tokenizer.encode("The")
    assert delegate.contexts == [prompt, prompt + pieces, prompt + pieces * 2]
    assert tokenizer.call_id not in generation.ids


def test_prompt_is_read_after_an_unpenalised_eos(tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer, seed=0)
    shown: list[tuple[torch.Tensor, list[int]]] = []

    class Recording(NeverCall):
        def _is_call(self, logits, context_ids) -> bool:
            shown.append((logits, list(context_ids)))
            return False

    generate(model, tokenizer, PROMPTS[1], Recording(), max_new_tokens=1)
    prompt = tokenizer.encode(PROMPTS[1])
    with torch.no_grad():
        raw = model.logits(model(torch.tensor([[tokenizer.eos_id, *prompt]]))[0, -1])
    ((logits, context),) = shown
    assert context == prompt, "policies and partners never see the EOS"
    assert torch.allclose(logits, penalize_repetition(raw, prompt, 1.2), atol=1e-6)
    assert logits[tokenizer.eos_id] == raw[tokenizer.eos_id]


def test_context_slides_over_the_models_window(tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer, seed=0)
    generation = generate(model, tokenizer, PROMPTS[0], NeverCall(), max_new_tokens=80)
    assert len(generation.prompt_ids) + len(generation.ids) > model.args.max_seq_len
    assert len(generation.ids) == 80 or generation.stopped_at_eos


def test_render_highlights_partner_and_unanswered_calls(tokenizer: Tokenizer) -> None:
    model = fixed_logits_model(tokenizer, {tokenizer.call_id: 10.0, 300: 1.0})
    policy = RandomCall(0.5, seed=3)
    answers = iter([piece_ids(tokenizer, " museum"), []] * 20)

    class Alternating:
        def next_pieces(self, context_ids) -> list[int]:
            return next(answers)

    generation = generate(model, tokenizer, "The", policy, delegate=Alternating(), max_new_tokens=12)
    assert {TokenSource.PARTNER, TokenSource.MODEL_AT_CALL} <= set(generation.sources)
    plain = render(generation, tokenizer, color=False)
    assert plain.startswith("The") and " [[museum]]" in plain and "{{" in plain
    unmarked = plain.replace("[[", "").replace("]]", "").replace("{{", "").replace("}}", "")
    assert unmarked == "The" + generation.completion(tokenizer)
    colored = render(generation, tokenizer, color=True)
    assert "\033[1;36mmuseum\033[0m" in colored and "[[" not in colored


# Call rates --------------------------------------------------------------------------------------------


def drifting_call_logits(steps: int, seed: int) -> list[float]:
    """A non-stationary <CALL> logit: regime jumps every 400 steps, an upward trend, a slow wave, noise."""
    rng = random.Random(seed)
    scores, level = [], 0.0
    for step in range(steps):
        if step % 400 == 0:
            level = rng.uniform(-3.0, 3.0)
        scores.append(level + 4.0 * step / steps + 1.5 * math.sin(step / 60) + rng.gauss(0.0, 1.0))
    return scores


def logits_with_call(score: float, call_id: int, vocab_size: int) -> torch.Tensor:
    logits = torch.zeros(vocab_size)
    logits[call_id] = score
    return logits


@pytest.mark.parametrize("target", [0.15, 0.22, 0.45])
def test_calibrated_rate_tracks_target_on_drifting_logits(tokenizer: Tokenizer, target: float) -> None:
    scores = drifting_call_logits(2000, seed=int(target * 100))
    policy = CalibratedCall(tokenizer.call_id, target)
    for score in scores:
        policy.decide(logits_with_call(score, tokenizer.call_id, tokenizer.vocab_size), [])
    assert policy.steps == 2000
    assert abs(policy.call_rate - target) <= 0.02, policy.state_dict()

    # The drift matters: a plain running quantile (no feedback) overshoots, as the paper's 15% -> 22%.
    plain = CallRateController(target, horizon=1e12)
    plain_rate = sum(plain.decide(score) for score in scores) / len(scores)
    assert plain_rate - target > 0.02


@pytest.mark.slow
def test_calibrated_rate_tracks_target_over_real_generations(tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer, seed=0, dim=64, n_layers=2)  # 2000 steps recompute the window: keep it cheap
    policy = CalibratedCall(tokenizer.call_id, 0.15)
    generations = []
    while policy.steps < 2000:
        prompt = PROMPTS[len(generations) % len(PROMPTS)]
        generations.append(generate(model, tokenizer, prompt, policy, max_new_tokens=256))
    assert sum(g.steps for g in generations) == policy.steps, "one budget over all prompts"
    assert sum(g.calls for g in generations) == policy.calls
    assert abs(policy.call_rate - 0.15) <= 0.02, policy.state_dict()
    assert all(g.calls > 0 for g in generations)


def test_a_controller_primed_with_a_prompt_does_not_call_its_first_low_score() -> None:
    cold = CallRateController(0.15)
    assert cold.decide(-5.0), "alone in its window, the first score is its own top 15%"
    primed = CallRateController(0.15)
    primed.observe([float(score) for score in range(20)])
    assert not primed.decide(-5.0) and primed.decide(25.0)
    primed.observe([100.0])  # only an empty window is primed
    assert len(primed._scores) == 22


def test_the_first_generation_primes_a_calibrated_policy_with_its_prompt(tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer, seed=0, dim=64, n_layers=2)
    prompt_ids = tokenizer.encode(PROMPTS[0])
    with torch.inference_mode():
        scores = prompt_call_logits(model, [tokenizer.eos_id, *prompt_ids], tokenizer.call_id)
        assert len(scores) == len(prompt_ids)
        for prefix in (1, len(prompt_ids)):  # the <CALL> logit where prompt token `prefix` was predicted
            expected = next_token_logits(model, [tokenizer.eos_id, *prompt_ids[: prefix - 1]])[tokenizer.call_id]
            assert scores[prefix - 1] == pytest.approx(float(expected), abs=1e-4)
    policy = CalibratedCall(tokenizer.call_id, 0.15)
    assert policy.wants_prompt
    first = generate(model, tokenizer, PROMPTS[0], policy, max_new_tokens=4)
    assert not policy.wants_prompt
    assert len(policy.controller._scores) == len(prompt_ids) + first.steps
    second = generate(model, tokenizer, PROMPTS[1], policy, max_new_tokens=4)
    assert len(policy.controller._scores) == len(prompt_ids) + first.steps + second.steps


def test_random_call_rate_is_seeded() -> None:
    logits = torch.zeros(10)
    policy = RandomCall(0.3, seed=7)
    decisions = [policy.decide(logits, []) for _ in range(4000)]
    assert abs(policy.call_rate - 0.3) <= 0.02
    again = RandomCall(0.3, seed=7)
    assert [again.decide(logits, []) for _ in range(4000)] == decisions
    state = {"policy": "random", "steps": 4000, "calls": sum(decisions), "call_rate": policy.call_rate}
    assert policy.state_dict() == state | {"rate": 0.3, "seed": 7}


def test_controller_meets_target_when_only_some_steps_are_eligible() -> None:
    rng = random.Random(0)
    controller = CallRateController(0.15)
    calls = 0
    for step in range(2000):
        if rng.random() < 0.3 * (1 + 0.8 * math.sin(step / 100)):  # fact-rich and fact-poor stretches
            calls += controller.decide(rng.gauss(step / 500, 1.0))
        else:
            controller.skip()
    assert abs(calls / 2000 - 0.15) <= 0.02


# i-LaCy ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def annotator() -> FactAnnotator:
    return FactAnnotator()


def test_uncertainty_scores() -> None:
    uniform = torch.zeros(50)
    assert negative_top_logprob(uniform) == pytest.approx(math.log(50))
    assert top_k_entropy(uniform) == pytest.approx(math.log(20)), "over the renormalised top 20"
    peaked = torch.full((50,), -10.0)
    peaked[3] = 10.0
    assert negative_top_logprob(peaked) < 1e-6 and top_k_entropy(peaked) < 1e-6


ILACY_PROMPT = "Tell me a bio of Wolfgang Amadeus Mozart. Wolfgang Amadeus Mozart"
ILACY_SCRIPT = " was born in 1756 and studied law at the university. He was a painter in Paris."


def run_script(policy: ILacyCall, tokenizer: Tokenizer, seed: int = 0) -> list[tuple[str, bool]]:
    """Offer the script's pieces one by one as the model's top token, with varying confidence."""
    rng = random.Random(seed)
    context = tokenizer.encode(ILACY_PROMPT)
    decisions = []
    for piece in tokenizer.encode(ILACY_PROMPT + ILACY_SCRIPT)[len(context) :]:
        logits = torch.randn(tokenizer.vocab_size, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        logits[piece] = 4.0 + rng.uniform(0.0, 4.0)
        logits[tokenizer.call_id] = 100.0  # the baseline's untrained <CALL> must not matter
        decisions.append((tokenizer.id_to_piece(piece), policy.decide(logits, context)))
        context.append(piece)
    return decisions


@pytest.mark.parametrize("uncertainty", ["logprob", "entropy"])
def test_ilacy_delegates_only_fact_positions(tokenizer: Tokenizer, annotator: FactAnnotator, uncertainty) -> None:
    everything = ILacyCall(tokenizer, uncertainty, target=1.0, annotator=annotator)
    called = [piece for piece, call in run_script(everything, tokenizer) if call]
    assert called, "the script has facts"
    assert everything.calls == everything.fact_steps < everything.steps
    assert {"1", "7", "5", "6"} <= set(called), "the year is a fact"
    grammar = {"▁was", "▁in", "▁and", "▁the", "▁at", "▁a", "▁", ".", "▁He"}
    assert not grammar & set(called)

    some = ILacyCall(tokenizer, uncertainty, target=0.15, annotator=annotator)
    decisions = run_script(some, tokenizer)
    assert 0 < some.calls < everything.calls
    every_fact = ILacyCall(tokenizer, uncertainty, target=1.0, annotator=annotator)
    fact_positions = [call for _, call in run_script(every_fact, tokenizer)]
    assert all(fact or not call for (_, call), fact in zip(decisions, fact_positions))


# Command line ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tokenizer: Tokenizer, tokenizer_path: str, tmp_path_factory) -> tuple[Path, Path]:
    """A small model and a partner, both as Hugging Face exports (which ``load_lacy`` reads too)."""
    root = tmp_path_factory.mktemp("generate-cli")
    small = export_hf(tiny_model(tokenizer, seed=0), tokenizer_path, root / "small")
    partner = export_hf(tiny_model(tokenizer, seed=1), tokenizer_path, root / "partner")
    return small, partner


def run_cli(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *args])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_cli_generate_json_with_hf_partner_and_background(capsys, exported, tmp_path) -> None:
    small, partner = exported
    background = tmp_path / "mozart.txt"
    background.write_text("Wolfgang Amadeus Mozart (1756-1791) was a prolific composer of the Classical period.")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[1]}\n\n{PROMPTS[2]}\n")
    out = run_cli(
        capsys, "--ckpt", str(small), "--cascade", f"hf:{partner}", "--policy", "calibrated", "--call-rate", "0.3",
        "--max-new-tokens", "30", "--background", str(background), "--person", "Wolfgang Amadeus Mozart",
        "--prompt", PROMPTS[0], "--prompts-file", str(prompts), "--json",
    )  # fmt: skip
    report = json.loads(out)
    assert [g["prompt"] for g in report["generations"]] == [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    assert all(len(g["ids"]) == 30 == len(g["sources"]) for g in report["generations"])
    assert sum(g["partner_tokens"] for g in report["generations"]) > 0
    assert report["policy"]["policy"] == "calibrated" and report["policy"]["steps"] == sum(
        g["steps"] for g in report["generations"]
    )


def test_cli_generate_text_without_partner_and_its_page(capsys, exported, tmp_path) -> None:
    small, _ = exported
    page = tmp_path / "generations.html"
    out = run_cli(capsys, "--ckpt", str(small), "--policy", "random", "--call-rate", "0.5", "--max-new-tokens", "12",
                  "--prompt", PROMPTS[1], "--html", str(page))  # fmt: skip
    assert out.startswith(PROMPTS[1]) and "{{" in out and "\033[" not in out
    assert "calls in 12 steps" in out
    assert "CALL, unanswered" in page.read_text() and "calls in 12 steps" in page.read_text()


def test_cli_generate_ilacy_runs(capsys, exported) -> None:
    small, _ = exported
    out = run_cli(capsys, "--ckpt", str(small), "--policy", "ilacy-entropy", "--max-new-tokens", "8",
                  "--prompt", PROMPTS[0], "--json")  # fmt: skip
    assert json.loads(out)["policy"]["policy"] == "ilacy-entropy"


def test_cli_generate_calls_at_the_target_rate_unless_told_otherwise(capsys, exported) -> None:
    small, _ = exported
    report = json.loads(run_cli(capsys, "--ckpt", str(small), "--max-new-tokens", "40", "--prompt", PROMPTS[0], "--json"))
    assert report["policy"]["policy"] == "calibrated" and report["policy"]["target"] == 0.15
    assert 0 < report["policy"]["calls"] < 20


@pytest.mark.parametrize("policy, calls, warned", [("argmax", 9, True), ("argmax", 8, False), ("calibrated", 16, False)])
def test_argmax_calling_at_most_steps_gets_one_line_of_advice(capsys, tokenizer, policy, calls, warned) -> None:
    made = policy_from_name(policy, tokenizer, 0.15)
    made.steps, made.calls = 16, calls
    warn_of_argmax_calls(made)
    error = capsys.readouterr().err
    assert (error.count("\n"), "--policy calibrated" in error) == ((1, True) if warned else (0, False))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--cascade", "ftp:somewhere"], "cascade partner 'ftp:somewhere' is none of"),
        (["--prompt", "x", "--background", "bio.txt"], "--background needs --cascade"),
        ([], "give --prompt or --prompts-file"),
    ],
)
def test_cli_generate_clear_errors(exported, args, message, capsys) -> None:
    small, _ = exported
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--ckpt", str(small), *args])
    assert exit_info.value.code == EXIT_USAGE
    assert f"lacy-stream generate: error: {message}" in capsys.readouterr().err
