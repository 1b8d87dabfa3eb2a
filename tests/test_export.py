"""Hugging Face export: transformers loads the directory offline and reproduces our logits and token ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lacy_stream.models.hf_export import PROBE_TEXTS, export_hf
from lacy_stream.models.gpt2 import Transformer, model_args
from lacy_stream.tokenizer import CALL_TOKEN, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: str) -> Tokenizer:
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(model_args("tiny", vocab_size=tokenizer.vocab_size))
    model.init_weights()
    return model.eval()


@pytest.fixture(scope="module")
def export_dir(model: Transformer, tokenizer_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_hf(model, tokenizer_path, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def hf_model(export_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(export_dir, local_files_only=True).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(export_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(export_dir, local_files_only=True)


def test_logits_match(model: Transformer, hf_model, tokenizer: Tokenizer) -> None:
    assert hf_model.config.activation_function == "gelu_pytorch_tanh"
    assert hf_model.lm_head.weight.data_ptr() == hf_model.transformer.wte.weight.data_ptr()
    tokens = torch.randint(0, tokenizer.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.logits(model(tokens))
        theirs = hf_model(tokens).logits
    assert theirs.dtype == torch.float32
    assert (ours - theirs).abs().max().item() < 1e-4


def test_the_export_holds_the_real_vocabulary_without_padding_rows(model: Transformer, export_dir: Path, hf_model,
                                                                  tokenizer: Tokenizer) -> None:
    assert model.tok_embeddings.weight.shape[0] == 128 * -(-tokenizer.vocab_size // 128) > tokenizer.vocab_size
    assert load_file(str(export_dir / "model.safetensors"))["transformer.wte.weight"].shape[0] == tokenizer.vocab_size
    assert hf_model.config.vocab_size == tokenizer.vocab_size
    assert hf_model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == tokenizer.vocab_size


def test_tokenizer_reproduces_ours(hf_tokenizer, tokenizer: Tokenizer) -> None:
    texts = [
        *PROBE_TEXTS,
        "Wolfgang Amadeus Mozart was born in 1756.\nHe died in 1791!",
        "tab\tand\u00a0nbsp",
        "special strings stay text: <s> </s> <unk> <CALL>",
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert hf_tokenizer(text)["input_ids"] == ids, "no BOS/EOS is added"
        assert hf_tokenizer.decode(ids) == tokenizer.decode(ids), text
    assert hf_tokenizer.convert_tokens_to_ids(CALL_TOKEN) == tokenizer.call_id
    assert len(hf_tokenizer) == tokenizer.vocab_size
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id
    assert hf_tokenizer.decode([tokenizer.call_id]) == CALL_TOKEN
    called = [*tokenizer.encode("born in"), tokenizer.call_id, *tokenizer.encode("museum"), tokenizer.call_id]
    assert hf_tokenizer.decode(called) == tokenizer.decode(called)


def test_greedy_generate_picks_our_models_most_likely_tokens(model: Transformer, hf_model,
                                                             tokenizer: Tokenizer) -> None:
    """transformers' generate, with its own KV cache, continues a prompt as our model does token by token."""
    prompt = tokenizer.encode("The museum was founded in")
    expected = list(prompt)
    with torch.no_grad():
        while len(expected) < len(prompt) + 8 and expected[-1] != tokenizer.eos_id:
            expected.append(int(model.logits(model(torch.tensor([expected])))[0, -1].argmax()))
    generated = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=8, do_sample=False)
    assert generated[0].tolist() == expected


def test_directory_holds_safetensors_and_no_pickle(export_dir: Path) -> None:
    names = {path.name for path in export_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]


def test_state_dict_export_in_bfloat16(model: Transformer, tokenizer_path: str, tmp_path: Path) -> None:
    out = export_hf(model.state_dict(), tokenizer_path, tmp_path, args=model.args, dtype=torch.bfloat16)
    tensors = load_file(out / "model.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    qkv_weight = model.layers[1].attention.qkv_proj.weight
    assert torch.equal(tensors["transformer.h.1.attn.c_attn.weight"], qkv_weight.T.bfloat16())


def test_state_dict_needs_args(model: Transformer, tokenizer_path: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ModelArgs"):
        export_hf(model.state_dict(), tokenizer_path, tmp_path)


def test_a_failed_export_leaves_the_previous_one(model: Transformer, tokenizer_path: str, tmp_path: Path, monkeypatch) -> None:
    import lacy_stream.models.hf_export as export_module

    export_hf(model, tokenizer_path, tmp_path / "hf")
    before = {path.name: path.read_bytes() for path in (tmp_path / "hf").iterdir()}

    def broken_check(*args) -> None:
        raise ValueError("the exported tokenizer encodes differently")

    monkeypatch.setattr(export_module, "_check_tokenizer", broken_check)
    with pytest.raises(ValueError, match="encodes differently"):
        export_hf(model, tokenizer_path, tmp_path / "hf", dtype=torch.bfloat16)
    assert {path.name: path.read_bytes() for path in (tmp_path / "hf").iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf"]  # no staging directory left behind
