"""GPT-2 language model used for LaCy pretraining (paper Appendix A.3, Table 3).

Pre-LayerNorm transformer with learned absolute position embeddings, GELU MLPs of width 4·dim, biases
everywhere as in GPT-2, and no dropout. The token embedding doubles as the output projection, but the
model stops at the final LayerNorm: ``forward`` returns hidden states and the loss applies
``output_weight`` itself (so it can, e.g., compute logits chunk by chunk). ``logits`` is the plain
full-vocabulary projection for inference and evaluation.

The embedding has ``padded_vocab_size`` rows: the vocabulary rounded up to a multiple of
``vocab_multiple`` (128), as nanoGPT pads GPT-2's 50,257 to 50,304. With 32,001 rows every output-projection
matmul has an unaligned dimension, which keeps cuBLAS off its fastest kernels. The padding rows are no
token: no input uses them, ``logits`` leaves them out, the loss gives them no probability (so they get no
gradient), and exports drop them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config.job_config import ConfigError, ModelConfig

INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_heads: int
    n_layers: int
    vocab_size: int = 32001  # Llama 2's 32,000 SentencePiece pieces + <CALL>
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    vocab_multiple: int = 128
    """The embedding's rows are the vocabulary rounded up to a multiple of this (1: no padding rows)."""

    def __post_init__(self) -> None:
        for name in ("dim", "n_heads", "n_layers", "vocab_size", "max_seq_len", "vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ModelArgs.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelArgs.norm_eps must be positive, got {self.norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token embedding and output projection: ``vocab_size`` rounded up to ``vocab_multiple``."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


PRESETS: dict[str, ModelArgs] = {
    # CPU tests and demos; the vocabulary is usually overridden by the demo tokenizer's.
    "tiny": ModelArgs(dim=128, n_heads=4, n_layers=4, max_seq_len=256),
    "334m": ModelArgs(dim=1024, n_heads=16, n_layers=24),
    "1.3b": ModelArgs(dim=2048, n_heads=16, n_layers=24),
}


def check_model_config(model: ModelConfig) -> None:
    """The ``[model]`` section's preset, as this module knows them."""
    if model.preset not in PRESETS:
        raise ConfigError(f"model.preset: {model.preset!r} is not one of {', '.join(PRESETS)}")


def model_args(preset: str, **overrides: int | float) -> ModelArgs:
    """The preset's arguments with some fields replaced, e.g. ``model_args("tiny", vocab_size=4001)``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known presets: {', '.join(PRESETS)}")
    unknown = set(overrides) - {field.name for field in dataclasses.fields(ModelArgs)}
    if unknown:
        raise ValueError(f"unknown ModelArgs field(s) {sorted(unknown)} in overrides for preset {preset!r}")
    return dataclasses.replace(PRESETS[preset], **overrides)


class CausalSelfAttention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.qkv_proj = nn.Linear(args.dim, 3 * args.dim)
        self.out_proj = nn.Linear(args.dim, args.dim)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        batch, seq_len, dim = x.shape
        # [B, T, 3·dim] -> three [B, n_heads, T, head_dim]
        q, k, v = (
            t.view(batch, seq_len, self.n_heads, dim // self.n_heads).transpose(1, 2)
            for t in self.qkv_proj(x).split(dim, dim=2)
        )
        if cache is None or cache.length == 0:
            if cache is not None:
                cache.append(k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # The new tokens see every cached one and, among themselves, only those before them.
            past = cache.length
            k, v = cache.append(k, v)
            visible = torch.ones(seq_len, past + seq_len, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq_len, dim))


class LayerCache:
    """One layer's keys and values of the tokens seen so far, for decoding without recomputing them."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add [B, n_heads, T, head_dim] keys and values; return all of them so far."""
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=2)
        self.values = values if self.values is None else torch.cat([self.values, values], dim=2)
        return self.keys, self.values


class KVCache:
    """Keys and values of every layer (inference only): ``Transformer.forward(new_tokens, cache=cache)``
    continues the sequence the cache holds, positions included."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.up_proj = nn.Linear(args.dim, 4 * args.dim)
        self.down_proj = nn.Linear(4 * args.dim, args.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))  # GPT-2's GELU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attention = CausalSelfAttention(args)
        self.mlp_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.padded_vocab_size, args.dim)
        self.pos_embeddings = nn.Embedding(args.max_seq_len, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.init_weights()

    @property
    def output_weight(self) -> nn.Parameter:
        """The output projection [padded_vocab_size, dim], tied to (the same Parameter as) the token embedding;
        rows from ``args.vocab_size`` on are padding."""
        return self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialisation; also the way to fill a model materialised with ``to_empty`` (meta device/FSDP2).

        Weights ~ N(0, 0.02), biases 0, LayerNorms identity, padding rows of the embedding 0. The projections
        that write into the residual stream get std 0.02/sqrt(2·n_layers), since each layer adds two of them to it.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        residual_std = INIT_STD / math.sqrt(2 * self.args.n_layers)
        for layer in self.layers:
            nn.init.normal_(layer.attention.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(layer.mlp.down_proj.weight, mean=0.0, std=residual_std)
        self.tok_embeddings.weight[self.args.vocab_size :].zero_()

    def forward(self, tokens: torch.Tensor, *, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids [B, T] -> final hidden states [B, T, dim] (after the last LayerNorm).

        With a ``cache`` the tokens continue the sequence it holds (at the positions after it), and their
        keys and values are added to it.
        """
        if tokens.dim() != 2:
            raise ValueError(f"expected token ids of shape [batch, seq_len], got shape {tuple(tokens.shape)}")
        start = cache.length if cache is not None else 0
        end = start + tokens.shape[1]
        if end > self.args.max_seq_len:
            raise ValueError(f"sequence length {end} exceeds the model's max_seq_len {self.args.max_seq_len}")
        positions = torch.arange(start, end, device=tokens.device)
        x = self.tok_embeddings(tokens) + self.pos_embeddings(positions)
        for index, layer in enumerate(self.layers):
            x = layer(x) if cache is None else layer(x, cache.layers[index])
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [..., vocab_size] for hidden states from ``forward`` (no padding columns)."""
        return F.linear(hidden, self.output_weight[: self.args.vocab_size])


def num_params(model: Transformer, include_embeddings: bool = True) -> int:
    """Parameter count, the tied embedding counted once. Without embeddings, token and position embeddings
    are both left out (the tied output projection with them). Works on meta-device models."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared Parameter once
    if not include_embeddings:
        total -= model.tok_embeddings.weight.numel() + model.pos_embeddings.weight.numel()
    return total


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token, the PaLM (Appendix B) / nanoGPT estimate:

        6 · (N_non_embedding + padded_vocab_size · dim)  +  12 · n_layers · dim · seq_len

    Every weight costs 2 FLOPs per token forward and 4 backward. N_non_embedding covers the blocks and the
    final norm; embedding lookups cost nothing, but the tied output projection is a real [dim, vocab]
    matmul, so it is counted once as ``padded_vocab_size · dim`` (as nanoGPT does by keeping the tied ``wte``,
    padded, in N): the padding rows are computed like any other.
    The second term is the attention score and weighted-value matmuls (QKᵀ and AV: 2 · 2 · seq_len · dim
    forward per layer, times 3 for training), counted over the full, unmasked seq_len.
    """
    if seq_len <= 0 or seq_len > args.max_seq_len:
        raise ValueError(f"seq_len must be in [1, {args.max_seq_len}], got {seq_len}")
    dim = args.dim
    # Per block: qkv (3·dim² + 3·dim), out_proj (dim² + dim), MLP (8·dim² + 5·dim), two LayerNorms (4·dim).
    block_params = 12 * dim * dim + 13 * dim
    non_embedding_params = args.n_layers * block_params + 2 * dim
    output_projection_params = args.padded_vocab_size * dim
    return 6 * (non_embedding_params + output_projection_params) + 12 * args.n_layers * dim * seq_len
