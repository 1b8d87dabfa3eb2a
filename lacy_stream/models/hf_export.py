"""Export a trained model and its tokenizer as a Hugging Face GPT-2 checkpoint directory.

``export_hf`` writes what ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
load offline: ``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer files,
plus ``sentencepiece.model`` (our tokenizer, which ``lacy_stream.inference.loading`` reads back).

Model. ``lacy_stream.models.gpt2.Transformer`` is GPT-2 layer for layer (pre-LayerNorm blocks, learned positions,
biases everywhere, tied output), so only names and layouts change:

    tok_embeddings / pos_embeddings      -> transformer.wte / transformer.wpe
    layers.{i}.attention_norm            -> transformer.h.{i}.ln_1
    layers.{i}.attention.qkv_proj        -> transformer.h.{i}.attn.c_attn   (transposed)
    layers.{i}.attention.out_proj        -> transformer.h.{i}.attn.c_proj   (transposed)
    layers.{i}.mlp_norm                  -> transformer.h.{i}.ln_2
    layers.{i}.mlp.up_proj               -> transformer.h.{i}.mlp.c_fc      (transposed)
    layers.{i}.mlp.down_proj             -> transformer.h.{i}.mlp.c_proj    (transposed)
    norm                                 -> transformer.ln_f

GPT-2's ``Conv1D`` keeps its weight as [in, out], the transpose of ``nn.Linear``'s [out, in]; biases and the
q|k|v order inside ``c_attn`` are the same. Our MLP calls ``F.gelu(approximate="tanh")``, which is exactly
transformers' ``gelu_pytorch_tanh``; GPT-2's default ``gelu_new`` is the same formula written out by hand,
so it would only agree up to rounding. The tied output projection is stored once, as ``wte``, and
``tie_word_embeddings`` restores ``lm_head``. Weights go to safetensors only, so the directory holds no pickle.

Tokenizer. transformers 5 dropped the sentencepiece-backed slow ``LlamaTokenizer`` and its converters change
between versions, so the fast tokenizer (``tokenizer.json``) is built here with the ``tokenizers`` library,
straight from the SentencePiece model proto. It mirrors SentencePiece BPE: the same vocabulary and ids, merges
ranked by the score of the piece they produce (the order SentencePiece merges in), byte fallback, and a
normalizer that only adds the dummy-prefix "▁" and turns spaces into "▁" (we train with the identity rule and
keep extra whitespace). Nothing splits the text before BPE, as in SentencePiece; Llama's Metaspace
pre-tokenizer would not do, since it skips the dummy prefix when a text starts with a space. ``<CALL>`` is an
added special token with our id (the number of pieces), no BOS/EOS is added, and ``split_special_tokens``
makes "<s>", "</s>", "<unk>" and "<CALL>" in text plain characters, so the exported tokenizer encodes every
text exactly like ``Tokenizer.encode`` (text never encodes to ``<CALL>``). After saving, the reloaded
tokenizer must reproduce ``Tokenizer.encode`` on probe texts, or the export fails. The tokenizer is declared
as ``PreTrainedTokenizerFast``, which transformers 4 and 5 both load (5 would name its own class otherwise).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer as FastTokenizerCore
from tokenizers import decoders, models, normalizers
from torch import nn
from transformers import AutoTokenizer, GenerationConfig, GPT2Config, PreTrainedTokenizerFast

from lacy_stream.atomic import replace_directory, staging_directory
from lacy_stream.models.gpt2 import ModelArgs, Transformer
from lacy_stream.tokenizer import CALL_TOKEN, Tokenizer

WEIGHTS_FILE = "model.safetensors"
SENTENCEPIECE_FILE = "sentencepiece.model"  # our own tokenizer model, for lacy-stream's inference

# Our per-layer module -> (its GPT-2 name, whether it is a Linear that GPT-2 stores as a transposed Conv1D).
_LAYER_MODULES: dict[str, tuple[str, bool]] = {
    "attention_norm": ("ln_1", False),
    "attention.qkv_proj": ("attn.c_attn", True),
    "attention.out_proj": ("attn.c_proj", True),
    "mlp_norm": ("ln_2", False),
    "mlp.up_proj": ("mlp.c_fc", True),
    "mlp.down_proj": ("mlp.c_proj", True),
}

# Texts the exported tokenizer must encode exactly like ours: spaces, digits, newlines, bytes, scripts.
PROBE_TEXTS = (
    "",
    " ",
    "The river city museum was founded in 1887 by a painter.",
    "  two leading spaces,  double  inside and trailing   ",
    "digits 0123456789 and 3.14159, -42, 1e-5",
    "line one\nline two\n\n\tindented\r\nwindows",
    "Ünïcödé façade, naïve café, Straße",
    "東京 and Москва and ελληνικά and 🤖🚀 emoji",
    "punctuation!? (brackets) [x] {y} 'quotes' \"double\" a/b\\c",
)


def export_hf(
    model: Transformer | Mapping[str, torch.Tensor],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    *,
    args: ModelArgs | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a Hugging Face GPT-2 checkpoint of ``model`` and its tokenizer to ``out_dir``; returns the directory.

    The export is written beside ``out_dir`` and replaces it whole once complete (its old content goes).

    ``model`` is a ``Transformer`` on any device, or its full (not sharded) state dict together with ``args``.
    Parameters are saved in ``dtype``.
    """
    if isinstance(model, nn.Module):
        args = args or model.args
        state = model.state_dict()
    elif args is None:
        raise ValueError("exporting a state dict needs its ModelArgs (args=...)")
    else:
        state = model
    tokenizer = Tokenizer(tokenizer_path)
    if args.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"model vocabulary ({args.vocab_size}) does not match the tokenizer's "
            f"({tokenizer.num_pieces} pieces + {CALL_TOKEN} = {tokenizer.vocab_size})"
        )

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer.model_path).read_bytes())
    bos_id = proto.trainer_spec.bos_id if proto.trainer_spec.bos_id >= 0 else None

    final = Path(out_dir)
    with staging_directory(final.parent, final.name) as out:
        try:
            save_file(gpt2_tensors(state, args, dtype), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
        except SafetensorError as error:  # a full disk among them: an I/O error, in one line
            raise OSError(f"could not write the export to {final}: {error}") from None
        gpt2_config(args, bos_id, tokenizer.eos_id, dtype).save_pretrained(out)
        GenerationConfig(
            bos_token_id=bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.eos_id,  # the tokenizer has no padding piece; batched generate pads with EOS
        ).save_pretrained(out)
        hf_tokenizer(proto, model_max_length=args.max_seq_len).save_pretrained(out)
        _declare_tokenizer_class(out, "PreTrainedTokenizerFast")
        _check_tokenizer(out, tokenizer)
        shutil.copyfile(tokenizer.model_path, out / SENTENCEPIECE_FILE)
        replace_directory(out, final)
    return final


def gpt2_tensors(state: Mapping[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict renamed and laid out as ``GPT2LMHeadModel``'s, as contiguous CPU tensors in ``dtype``; the
    embedding without its padding rows (an export holds the real vocabulary, which transformers expects)."""
    names = _gpt2_names(args.n_layers)
    _check_names(names.keys(), state.keys(), f"a {args.n_layers}-layer Transformer")
    tensors = {}
    for ours, (theirs, transpose) in names.items():
        tensor = state[ours].detach()
        if ours == "tok_embeddings.weight":
            tensor = tensor[: args.vocab_size]
        tensors[theirs] = (tensor.t() if transpose else tensor).to("cpu", dtype).contiguous()
    return tensors


def state_dict_from_gpt2(tensors: Mapping[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Inverse of ``gpt2_tensors``: a GPT-2 checkpoint's tensors as our ``Transformer`` state dict."""
    names = _gpt2_names(n_layers)
    tensors = {name: tensor for name, tensor in tensors.items() if name != "lm_head.weight"}  # tied to wte
    _check_names({theirs for theirs, _ in names.values()}, tensors.keys(), f"a {n_layers}-layer GPT-2")
    state = {}
    for ours, (theirs, transpose) in names.items():
        tensor = tensors[theirs]
        state[ours] = (tensor.t() if transpose else tensor).contiguous()
    return state


def _gpt2_names(n_layers: int) -> dict[str, tuple[str, bool]]:
    """Our parameter name -> (GPT-2's name, whether GPT-2 stores it transposed)."""
    names = {
        "tok_embeddings.weight": ("transformer.wte.weight", False),
        "pos_embeddings.weight": ("transformer.wpe.weight", False),
        "norm.weight": ("transformer.ln_f.weight", False),
        "norm.bias": ("transformer.ln_f.bias", False),
    }
    for layer in range(n_layers):
        for ours, (theirs, is_conv1d) in _LAYER_MODULES.items():
            names[f"layers.{layer}.{ours}.weight"] = (f"transformer.h.{layer}.{theirs}.weight", is_conv1d)
            names[f"layers.{layer}.{ours}.bias"] = (f"transformer.h.{layer}.{theirs}.bias", False)
    return names


def _check_names(expected: Iterable[str], got: Iterable[str], what: str) -> None:
    missing, unexpected = set(expected) - set(got), set(got) - set(expected)
    if missing or unexpected:
        raise ValueError(f"not a state dict of {what}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def gpt2_config(args: ModelArgs, bos_id: int | None, eos_id: int, dtype: torch.dtype = torch.float32) -> GPT2Config:
    return GPT2Config(
        vocab_size=args.vocab_size,
        n_positions=args.max_seq_len,
        n_embd=args.dim,
        n_layer=args.n_layers,
        n_head=args.n_heads,
        activation_function="gelu_pytorch_tanh",
        layer_norm_epsilon=args.norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        torch_dtype=dtype,  # transformers 5 reads it as `dtype`
        architectures=["GPT2LMHeadModel"],
    )


def hf_tokenizer(proto: sentencepiece_model_pb2.ModelProto, model_max_length: int) -> PreTrainedTokenizerFast:
    """A fast tokenizer with our ids: the SentencePiece BPE model ``proto`` rebuilt in ``tokenizers``, plus
    ``<CALL>`` right after its pieces."""
    spec = proto.trainer_spec
    if spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ValueError("only BPE SentencePiece models can be exported")
    if proto.normalizer_spec.name != "identity":
        raise ValueError(f"only identity normalization is supported, not {proto.normalizer_spec.name!r}")

    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    unk_token = proto.pieces[spec.unk_id].piece
    core = FastTokenizerCore(
        models.BPE(
            vocab=vocab,
            merges=_bpe_merges(proto, vocab),
            unk_token=unk_token,
            fuse_unk=True,
            byte_fallback=spec.byte_fallback,
        )
    )
    dummy_prefix = proto.normalizer_spec.add_dummy_prefix
    dummy_prefix_step = [normalizers.Prepend("▁")] if dummy_prefix else []
    core.normalizer = normalizers.Sequence([*dummy_prefix_step, normalizers.Replace(" ", "▁")])
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix:
        decode_steps.append(decoders.Strip(content=" ", left=1, right=0))
    core.decoder = decoders.Sequence(decode_steps)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=unk_token,
        bos_token=proto.pieces[spec.bos_id].piece if spec.bos_id >= 0 else None,
        eos_token=proto.pieces[spec.eos_id].piece,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )
    fast.add_special_tokens({"additional_special_tokens": [CALL_TOKEN]})
    return fast


def _bpe_merges(proto: sentencepiece_model_pb2.ModelProto, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every way to build each normal piece from two pieces, ranked by the built piece's score (best first).

    SentencePiece merges the adjacent pair whose union scores highest, so ranking each merge by its result
    reproduces its order. Between splits of one piece (equal scores) SentencePiece takes the leftmost pair,
    here the one with the lower ids goes first; the two only differ when such pairs overlap, e.g. "ab|a|ba"
    for the piece "aba".
    """
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    by_score = sorted(
        (piece for piece in proto.pieces if piece.type == normal and len(piece.piece) > 1),
        key=lambda piece: -piece.score,
    )
    merges = []
    for piece in by_score:
        text = piece.piece
        splits = [(text[:cut], text[cut:]) for cut in range(1, len(text))]
        merges += sorted(
            ((left, right) for left, right in splits if left in vocab and right in vocab),
            key=lambda pair: (vocab[pair[0]], vocab[pair[1]]),
        )
    return merges


def _declare_tokenizer_class(out_dir: Path, class_name: str) -> None:
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = class_name
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _check_tokenizer(out_dir: Path, tokenizer: Tokenizer) -> None:
    exported = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if exported.convert_tokens_to_ids(CALL_TOKEN) != tokenizer.call_id:
        raise RuntimeError(f"exported {CALL_TOKEN} has id {exported.convert_tokens_to_ids(CALL_TOKEN)}, not ours")
    for text in PROBE_TEXTS:
        expected, got = tokenizer.encode(text), exported.encode(text, add_special_tokens=False)
        if got != expected:
            raise RuntimeError(f"exported tokenizer encodes {text!r} as {got}, ours as {expected}")
