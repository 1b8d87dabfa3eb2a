"""GPT-2 model: shapes, causality, weight tying, initialisation, parameter counts, presets, learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lacy_stream.models.gpt2 import PRESETS, KVCache, ModelArgs, Transformer, flops_per_token, model_args, num_params

VOCAB = 97


def tiny_model(seed: int = 0, **overrides: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_args("tiny", vocab_size=VOCAB, **overrides))


def random_tokens(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def test_forward_shape_and_dtype() -> None:
    model = tiny_model()
    tokens = random_tokens(3, 17)
    hidden = model(tokens)
    assert hidden.shape == (3, 17, model.args.dim)
    assert hidden.dtype == torch.float32
    logits = model.logits(hidden)
    assert logits.shape == (3, 17, VOCAB)  # no padding columns
    assert torch.equal(logits, hidden @ model.tok_embeddings.weight[:VOCAB].T)

    hidden_bf16 = model.to(torch.bfloat16)(tokens)
    assert hidden_bf16.dtype == torch.bfloat16


def test_full_context_accepted_and_longer_rejected() -> None:
    model = tiny_model()
    max_len = model.args.max_seq_len
    assert model(random_tokens(1, max_len)).shape == (1, max_len, model.args.dim)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_tokens(1, max_len + 1))
    with pytest.raises(ValueError, match="batch, seq_len"):
        model(random_tokens(1, 8)[0])


def test_causality() -> None:
    model = tiny_model().eval()
    tokens = random_tokens(2, 32)
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :20], after[:, :20], rtol=0, atol=0)
    assert not torch.allclose(before[:, 20:], after[:, 20:])


def test_kv_cache_continues_the_sequence_exactly() -> None:
    model = tiny_model().eval()
    tokens = random_tokens(2, 40)
    cache = KVCache(model.args.n_layers)
    with torch.no_grad():
        full = model(tokens)
        # a prompt, one token at a time, then a block of several (a partner's pieces), then one more
        pieces = [model(tokens[:, :20], cache=cache)]
        pieces += [model(tokens[:, position : position + 1], cache=cache) for position in range(20, 30)]
        pieces += [model(tokens[:, 30:39], cache=cache), model(tokens[:, 39:], cache=cache)]
    assert cache.length == 40
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds"):
        model(random_tokens(2, model.args.max_seq_len - 39), cache=cache)


def test_output_weight_is_the_token_embedding() -> None:
    model = tiny_model()
    assert model.output_weight is model.tok_embeddings.weight
    assert isinstance(model.output_weight, torch.nn.Parameter)
    # One gradient, accumulated from the lookup and the projection alike.
    model.logits(model(random_tokens(2, 8))).sum().backward()
    assert model.output_weight.grad is model.tok_embeddings.weight.grad
    assert model.output_weight.grad is not None


def test_init_statistics() -> None:
    n_layers = 12
    model = tiny_model(n_layers=n_layers)
    residual_std = 0.02 / math.sqrt(2 * n_layers)
    for layer in model.layers:
        for residual_weight in (layer.attention.out_proj.weight, layer.mlp.down_proj.weight):
            assert residual_weight.std().item() == pytest.approx(residual_std, rel=0.1)
        for weight in (layer.attention.qkv_proj.weight, layer.mlp.up_proj.weight):
            assert weight.std().item() == pytest.approx(0.02, rel=0.05)
        for linear in (layer.attention.qkv_proj, layer.attention.out_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert torch.count_nonzero(linear.bias) == 0
        for norm in (layer.attention_norm, layer.mlp_norm):
            assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    for weight in (model.tok_embeddings.weight[:VOCAB], model.pos_embeddings.weight):
        assert weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert abs(weight.mean().item()) < 2e-3


def test_meta_device_then_init_weights() -> None:
    """The FSDP2 route: build on meta, materialise with to_empty, then init_weights."""
    with torch.device("meta"):
        model = Transformer(model_args("tiny", vocab_size=VOCAB))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    reference = Transformer(model_args("tiny", vocab_size=VOCAB))
    torch.manual_seed(0)
    reference.init_weights()
    for (name, param), (_, expected) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(param, expected, rtol=0, atol=0, msg=name)
    assert model.output_weight is model.tok_embeddings.weight


@pytest.mark.parametrize(("preset", "paper_count", "rel_tolerance"), [("334m", 334e6, 0.01), ("1.3b", 1.27e9, 0.02)])
def test_parameter_counts_match_paper(preset: str, paper_count: float, rel_tolerance: float) -> None:
    with torch.device("meta"):
        model = Transformer(model_args(preset))
    args = model.args
    assert args.vocab_size == 32001 and args.max_seq_len == 1024
    total = num_params(model)
    assert total == pytest.approx(paper_count, rel=rel_tolerance)

    assert args.padded_vocab_size == 32128 and model.tok_embeddings.weight.shape[0] == 32128
    embeddings = args.padded_vocab_size * args.dim + args.max_seq_len * args.dim
    assert num_params(model, include_embeddings=False) == total - embeddings
    # Counted once: the tied embedding is not also counted as an output projection.
    assert total == sum(p.numel() for p in model.state_dict().values())

    # 6N (blocks + final norm + the tied output projection) plus the attention term.
    non_embedding = num_params(model, include_embeddings=False)
    expected_flops = 6 * (non_embedding + args.padded_vocab_size * args.dim) + 12 * args.n_layers * args.dim * 1024
    assert flops_per_token(args, 1024) == expected_flops


def test_vocabulary_padded_to_its_multiple_with_zero_rows() -> None:
    assert model_args("tiny", vocab_size=VOCAB).padded_vocab_size == 128
    assert model_args("tiny", vocab_size=128).padded_vocab_size == 128
    assert model_args("tiny", vocab_size=VOCAB, vocab_multiple=1).padded_vocab_size == VOCAB
    assert model_args("tiny", vocab_size=VOCAB, vocab_multiple=64).padded_vocab_size == 128
    weight = tiny_model().tok_embeddings.weight
    assert weight.shape[0] == 128 and (weight[VOCAB:] == 0).all() and (weight[:VOCAB] != 0).all()
    with pytest.raises(ValueError, match="vocab_multiple must be a positive integer"):
        model_args("tiny", vocab_multiple=0)


def test_flops_per_token_rejects_bad_seq_len() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(PRESETS["tiny"], PRESETS["tiny"].max_seq_len + 1)


def test_presets_and_validation() -> None:
    assert set(PRESETS) >= {"tiny", "334m", "1.3b"}
    assert PRESETS["334m"] == ModelArgs(dim=1024, n_heads=16, n_layers=24)
    assert PRESETS["1.3b"] == ModelArgs(dim=2048, n_heads=16, n_layers=24)
    assert model_args("tiny", vocab_size=500).vocab_size == 500
    assert PRESETS["tiny"].vocab_size == 32001  # overrides leave the preset alone

    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny.*334m.*1.3b"):
        model_args("huge")
    with pytest.raises(ValueError, match="unknown ModelArgs field"):
        model_args("tiny", hidden_size=64)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ModelArgs(dim=100, n_heads=3, n_layers=2)
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        model_args("tiny", n_layers=0)
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        ModelArgs(dim=64, n_heads=4, n_layers=2, vocab_size=-1)
    with pytest.raises(ValueError, match="norm_eps"):
        ModelArgs(dim=64, n_heads=4, n_layers=2, norm_eps=0.0)


def test_tiny_model_overfits_one_batch() -> None:
    model = tiny_model(seed=1, n_layers=2, max_seq_len=32)
    tokens = random_tokens(4, 33, seed=1)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model.logits(model(inputs)).flatten(0, 1), targets.flatten())

    initial = loss().item()
    assert initial == pytest.approx(math.log(VOCAB), rel=0.1)
    for _ in range(50):
        optimizer.zero_grad()
        step_loss = loss()
        step_loss.backward()
        optimizer.step()
    assert loss().item() < 0.5 * initial
