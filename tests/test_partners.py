"""Cascade partners (Hugging Face, OpenAI-compatible HTTP, lacy checkpoints), RAG prompt and tokenizer bridging."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from helpers import CompletionServer
from lacy_stream.models.hf_export import export_hf
from lacy_stream.inference.call_policy import RandomCall
from lacy_stream.inference.generate import Generation, TokenSource, generate
from lacy_stream.inference.partners import (
    MAX_BACKGROUND_CHARS,
    Candidate,
    Cascade,
    HFPartner,
    LacyPartner,
    OpenAIPartner,
    Partner,
    PartnerError,
    RagPartner,
    RagPrompt,
    TokenBridge,
    partner_from_spec,
    person_from_prompt,
)
from lacy_stream.models.gpt2 import Transformer, model_args
from lacy_stream.tokenizer import Tokenizer

PROMPT = "Tell me a bio of Wolfgang Amadeus Mozart. Wolfgang Amadeus Mozart was born in"
LONG_TEXT = PROMPT + " the river city museum" * 20  # longer than the partners' 64 positions


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: str) -> Tokenizer:
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def bridge(tokenizer: Tokenizer) -> TokenBridge:
    return TokenBridge(tokenizer)


def tiny_model(tokenizer: Tokenizer, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_args("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=64)).eval()


@pytest.fixture(scope="module")
def small_model(tokenizer: Tokenizer) -> Transformer:
    return tiny_model(tokenizer, seed=0)


@pytest.fixture(scope="module")
def partner_dir(tokenizer: Tokenizer, tokenizer_path: str, tmp_path_factory) -> Path:
    """A partner as a Hugging Face export: transformers, the test server and ``load_lacy`` all read it."""
    return export_hf(tiny_model(tokenizer, seed=1), tokenizer_path, tmp_path_factory.mktemp("partner"))


def pieces(tokenizer: Tokenizer, ids: list[int] | None) -> list[str] | None:
    return None if ids is None else [tokenizer.id_to_piece(token) for token in ids]


class RecordingCascade(Cascade):
    """A cascade that remembers each call's context and answer."""

    def __init__(self, partner: Partner, tokenizer: Tokenizer) -> None:
        super().__init__(partner, tokenizer)
        self.calls: list[tuple[list[int], list[int]]] = []

    def next_pieces(self, context_ids) -> list[int]:
        answer = super().next_pieces(context_ids)
        self.calls.append((list(context_ids), answer))
        return answer


def cascade_generation(
    model: Transformer, tokenizer: Tokenizer, partner: Partner
) -> tuple[Generation, RecordingCascade]:
    """40 tokens after ``PROMPT``, about every other step a call (the same steps for every partner)."""
    cascade = RecordingCascade(partner, tokenizer)
    policy = RandomCall(0.5, seed=0)
    return generate(model, tokenizer, PROMPT, policy, delegate=cascade, max_new_tokens=40), cascade


# Bridging ----------------------------------------------------------------------------------------------


def test_bridge_splits_digits_and_appends_every_piece_unless_capped(tokenizer: Tokenizer, bridge: TokenBridge) -> None:
    assert pieces(tokenizer, bridge.pieces("1887")) == ["1", "8", "8", "7"]  # Appendix A.5: all of them
    assert pieces(tokenizer, bridge.pieces(" 1887")) == ["▁", "1", "8", "8", "7"]
    capped = TokenBridge(tokenizer, max_pieces=3)
    assert pieces(tokenizer, capped.pieces("1887")) == ["1", "8", "8"]
    assert pieces(tokenizer, capped.pieces(" 1887")) == ["▁", "1", "8"]
    assert pieces(tokenizer, capped.pieces("42")) == ["4", "2"]
    with pytest.raises(ValueError, match="at least one piece"):
        TokenBridge(tokenizer, max_pieces=0)


def test_bridge_leading_space_and_multi_piece_tokens(tokenizer: Tokenizer, bridge: TokenBridge) -> None:
    context = tokenizer.encode("The river city")
    spaced = bridge.pieces(" museum")
    assert pieces(tokenizer, spaced) == ["▁m", "useum"]
    assert tokenizer.decode(context + spaced) == "The river city museum"
    continued = bridge.pieces("useum")  # continues "m" inside a word: no "▁"
    assert pieces(tokenizer, continued) == ["useum"]
    assert tokenizer.decode(tokenizer.encode("The m") + continued) == "The museum"


@pytest.mark.parametrize("context", ["The river city", "Wolfgang Amadeus Mozart was born in", "He studied la"])
@pytest.mark.parametrize("candidate", [" museum", " 1756", "w", " and", ".", " Mozart", " king"])
def test_bridge_is_the_in_context_encoding(tokenizer: Tokenizer, context: str, candidate: str) -> None:
    """Where context and candidate share no piece, the bridge adds what encoding both together adds."""
    alone, together = tokenizer.encode(context), tokenizer.encode(context + candidate)
    if together[: len(alone)] != alone:
        pytest.skip("a piece spans the boundary")
    assert TokenBridge(tokenizer, max_pieces=100).pieces(candidate) == together[len(alone) :]


def test_bridge_keeps_the_text_when_a_merge_would_cross_the_boundary(tokenizer: Tokenizer, bridge: TokenBridge) -> None:
    context = tokenizer.encode("The university of ")
    assert tokenizer.id_to_piece(context[-1]) == "▁"
    added = bridge.pieces("the")
    assert tokenizer.decode(context + added) == "The university of the"
    assert tokenizer.encode("The university of the")[: len(context)] != context, "the lone '▁' would merge"


def test_bridge_falls_back_to_the_next_representable_candidate(tokenizer: Tokenizer, bridge: TokenBridge) -> None:
    unrepresentable = [
        Candidate("\ufffd", -0.2),  # a partner token that ends inside a UTF-8 character
        Candidate("", -0.3),  # EOS and other special tokens add no text
    ]
    assert all(bridge.pieces(candidate.text) is None for candidate in unrepresentable)
    # "Z" and "ü" are byte pieces here: taking 3 of its pieces would cut "ü", so a capped bridge skips it
    assert bridge.pieces("Zürich") is not None and TokenBridge(tokenizer, max_pieces=3).pieces("Zürich") is None
    fitting = [Candidate(" museum", -1.0), Candidate(" king", -2.0)]
    assert bridge.best([*unrepresentable, *fitting]) == bridge.pieces(" museum")
    assert bridge.best(unrepresentable) == []


def test_bridge_spells_characters_outside_the_vocabulary_in_byte_pieces(tokenizer: Tokenizer, bridge: TokenBridge) -> None:
    assert pieces(tokenizer, bridge.pieces("\n")) == ["<0x0A>"]
    umlaut = bridge.pieces("ü")
    assert pieces(tokenizer, umlaut) == ["<0xC3>", "<0xBC>"]
    assert tokenizer.decode(tokenizer.encode("Z") + umlaut) == "Zü"


# Partners ----------------------------------------------------------------------------------------------


def reference_candidates(directory: Path, text: str, top_k: int, *, as_lacy: bool = False) -> list[Candidate]:
    """Candidates computed with transformers alone: its repetition penalty, its decoding.

    ``as_lacy``: as :class:`LacyPartner` reads a lacy model: after an EOS, the penalty over the whole text
    (the window is cut after it), ``<CALL>`` left out.
    """
    hf_tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    positions = model.config.n_positions
    ids = hf_tokenizer(text)["input_ids"]
    if as_lacy:
        window = ([hf_tokenizer.eos_token_id] + ids)[-positions:]
    else:
        ids = window = ids[-positions:]
    with torch.no_grad():
        logits = model(torch.tensor([window])).logits[:, -1]
    if as_lacy:
        logits[:, hf_tokenizer.convert_tokens_to_ids("<CALL>")] = -math.inf
    logprobs = torch.log_softmax(RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([ids]), logits), dim=-1)[0]
    top = logprobs.topk(top_k)
    before = hf_tokenizer.decode(ids, skip_special_tokens=True)
    return [
        Candidate(hf_tokenizer.decode([*ids, token], skip_special_tokens=True)[len(before) :], value)
        for value, token in zip(top.values.tolist(), top.indices.tolist())
    ]


def assert_same_candidates(ours: list[Candidate], theirs: list[Candidate]) -> None:
    assert [c.text for c in ours] == [c.text for c in theirs]
    assert [c.logprob for c in ours] == pytest.approx([c.logprob for c in theirs], abs=1e-4)


def test_hf_partner_ranks_like_transformers(partner_dir: Path, tokenizer: Tokenizer) -> None:
    partner = HFPartner(partner_dir, top_k=10)
    for text in (PROMPT, LONG_TEXT):
        assert_same_candidates(partner.candidates(text), reference_candidates(partner_dir, text, 10))


def test_hf_partner_cuts_a_long_text_to_its_positions_without_a_warning(partner_dir: Path, capfd, caplog) -> None:
    partner = HFPartner(partner_dir, top_k=10)
    assert len(partner.tokenizer(LONG_TEXT, verbose=False)["input_ids"]) > partner.max_positions
    partner.candidates(LONG_TEXT)
    assert "sequence length" not in capfd.readouterr().err + caplog.text


def test_cascade_with_hf_partner(partner_dir: Path, small_model: Transformer, tokenizer: Tokenizer, bridge) -> None:
    generation, cascade = cascade_generation(small_model, tokenizer, HFPartner(partner_dir))
    assert len(cascade.calls) == generation.calls > 0
    assert generation.sources.count(TokenSource.PARTNER) == sum(len(answer) for _, answer in cascade.calls) > 0
    for context, answer in cascade.calls:
        expected = bridge.best(reference_candidates(partner_dir, tokenizer.decode(context), 10))
        assert answer == expected


def test_openai_partner_over_http_runs_the_model(
    partner_dir: Path, small_model: Transformer, tokenizer: Tokenizer
) -> None:
    hf = HFPartner(partner_dir, top_k=10)
    with CompletionServer(partner_dir, "tiny-partner") as server:
        partner = OpenAIPartner(server.base_url, "tiny-partner", top_k=10, timeout=30)
        served = partner.candidates(PROMPT)
        local = hf.candidates(PROMPT)
        first_of_each_text = [c for i, c in enumerate(local) if c.text not in {d.text for d in local[:i]}]
        assert_same_candidates(served, first_of_each_text)  # the server reports tokens with the same text once

        over_http, cascade = cascade_generation(small_model, tokenizer, partner)
        requests = list(server.requests)
        assert OpenAIPartner(f"{server.base_url}/v1/", "tiny-partner").candidates(PROMPT)[0] == served[0]
    in_process, _ = cascade_generation(small_model, tokenizer, hf)
    assert over_http.ids == in_process.ids and over_http.sources == in_process.sources
    assert over_http.sources.count(TokenSource.PARTNER) > 0
    assert len(requests) == 1 + len(cascade.calls)
    assert all(
        r["max_tokens"] == 1 and r["temperature"] == 0 and r["logprobs"] == 10 and r["repetition_penalty"] == 1.2
        for r in requests
    )
    assert requests[1]["prompt"] == tokenizer.decode(cascade.calls[0][0])


@pytest.mark.slow
def test_openai_partner_errors_are_clear_and_never_hang(partner_dir: Path) -> None:
    with CompletionServer(partner_dir, "tiny-partner") as server:
        with pytest.raises(PartnerError, match="HTTP 404.*does not exist"):
            OpenAIPartner(server.base_url, "another-model").candidates(PROMPT)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = "http://127.0.0.1:%d" % silent.getsockname()[1]
        with pytest.raises(PartnerError, match="did not answer within 0.5 s"):
            OpenAIPartner(url, "tiny-partner", timeout=0.5).candidates(PROMPT)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(PartnerError, match="could not be reached"):
        OpenAIPartner(f"http://127.0.0.1:{port}", "tiny-partner", timeout=5).candidates(PROMPT)


def test_lacy_partner_reads_after_eos_without_call(
    partner_dir: Path, small_model: Transformer, tokenizer: Tokenizer, bridge: TokenBridge
) -> None:
    partner = LacyPartner(partner_dir)
    for text in (PROMPT, LONG_TEXT):
        candidates = partner.candidates(text)
        assert len(candidates) == 10 and all("<CALL>" not in c.text for c in candidates)
        assert_same_candidates(candidates, reference_candidates(partner_dir, text, 10, as_lacy=True))
    generation, cascade = cascade_generation(small_model, tokenizer, partner)
    assert generation.sources.count(TokenSource.PARTNER) > 0
    for context, answer in cascade.calls:
        assert answer == bridge.best(reference_candidates(partner_dir, tokenizer.decode(context), 10, as_lacy=True))


# RAG prompt and partner specs --------------------------------------------------------------------------


class EchoPartner:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def candidates(self, text: str) -> list[Candidate]:
        self.texts.append(text)
        return [Candidate(" composer", -0.5)]


def test_rag_partner_continues_inside_the_template() -> None:
    background = "Mozart was a composer of the Classical period.\n" + "x" * (2 * MAX_BACKGROUND_CHARS)
    inner = EchoPartner()
    partner = RagPartner(inner, RagPrompt("Wolfgang Amadeus Mozart", background))
    assert partner.candidates("Mozart was a") == [Candidate(" composer", -0.5)]
    (text,) = inner.texts
    assert text.startswith("<|im_start|>system\nYou are an assistant who writes biographies")
    assert "Write a short biography about Wolfgang Amadeus Mozart. Here is some background information: Mozart" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nMozart was a")
    wiki_content = text.split("background information: ")[1].split("<|im_end|>")[0]
    assert wiki_content == background[:MAX_BACKGROUND_CHARS]

    short = RagPrompt("Ada Lovelace", "She wrote the first program.\n\n").render("Ada Lovelace is")
    assert "She wrote the first program.<|im_end|>" in short, "no newline before <|im_end|>"


def test_person_from_factscore_prompt() -> None:
    assert person_from_prompt("Tell me a bio of Ada Lovelace. Ada Lovelace is") == "Ada Lovelace"
    assert person_from_prompt("The river city museum") is None


def test_partner_from_spec(partner_dir: Path) -> None:
    assert isinstance(partner_from_spec(f"hf:{partner_dir}"), HFPartner)
    assert isinstance(partner_from_spec(f"lacy:{partner_dir}"), LacyPartner)
    served = partner_from_spec("openai:http://localhost:8000/v1#meta-llama/Llama-3.2-1B")
    assert isinstance(served, OpenAIPartner)
    assert served.url == "http://localhost:8000/v1/completions" and served.model == "meta-llama/Llama-3.2-1B"
    assert OpenAIPartner("http://localhost:8000", "m").url == "http://localhost:8000/v1/completions"
    for spec in ("hf:", "openai:http://localhost:8000", "vllm:http://x#m", str(partner_dir)):
        with pytest.raises(ValueError, match="cascade partner"):
            partner_from_spec(spec)
