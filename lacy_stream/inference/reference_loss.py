"""Reference loss: a frozen reference model's per-token loss of each document (Rho-1, spaCy + RefLoss).

The reference scores every document on its own, the way training sees a document's start: after an EOS,
in windows of the reference's context length. A document longer than that is scored with windows that
overlap by half, each token taken from the window where it has the most context (at least half a window).
The loss is the statistic the masks compare with the model's own loss: cross-entropy of the token with
``<CALL>`` excluded from the softmax.

So a token's reference loss depends only on its document, the tokenizer and the reference's weights, like
its fact label: it is computed once, in the labeling stage of the dataloader workers, where each worker
holds a replica of the reference (frozen, eval mode, fp32 on the CPU, one thread), and it is stored with
the labels (label cache, offline shards) under the reference's identity, so later epochs skip the
reference forward. ``lacy-stream annotate --shards --reference`` precomputes it offline, on a GPU when
there is one, which is the way for references too large to run in CPU workers.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..annotate.label_cache import file_digest
from ..loss.lacy_loss import logit_stats
from .loading import check_loadable, load_lacy, tokenizer_path_of


class ReferenceMismatchError(ValueError):
    """The reference model cannot score this run's tokens."""


class ReferenceScorer:
    """Per-token reference losses of documents, for one tokenizer."""

    def __init__(self, path: str | Path, tokenizer_path: str | Path, *, device: str | torch.device = "cpu") -> None:
        reference = load_lacy(path, device=device)
        check_same_tokenizer(reference.tokenizer.model_path, tokenizer_path, reference=path)
        self.model = reference.model.requires_grad_(False).eval()
        self.call_id = reference.call_id
        self.eos_id = reference.tokenizer.eos_id
        self.context = self.model.args.max_seq_len
        self.stride = max(self.context // 2, 1)
        self.identity = f"reference:{weights_digest(self.model)}|context:{self.context}/{self.stride}"

    def score(self, ids: np.ndarray) -> np.ndarray:
        """float32 losses, one per token of ``ids`` (a document after an EOS)."""
        count = len(ids)
        losses = np.empty(count, dtype=np.float32)
        if count == 0:
            return losses
        device = self.model.output_weight.device
        tokens = torch.as_tensor(np.concatenate([[self.eos_id], ids]), dtype=torch.long, device=device)
        with torch.inference_mode():
            for start, first_scored in _windows(count, self.context, self.stride):
                end = min(start + self.context, count)
                hidden = self.model(tokens[start:end][None])[0]
                lse, target_logit, _ = logit_stats(hidden, self.model.output_weight, tokens[start + 1 : end + 1],
                                                   self.call_id, vocab_size=self.model.args.vocab_size)
                losses[first_scored:end] = (lse - target_logit)[first_scored - start :].float().cpu().numpy()
        return losses


def _windows(count: int, context: int, stride: int) -> list[tuple[int, int]]:
    """``(window start, first position it scores)`` covering positions ``[0, count)`` once each."""
    windows = [(0, 0)]
    while windows[-1][0] + context < count:
        start = windows[-1][0] + stride
        windows.append((start, start + context - stride))
    return windows


def reference_scorer_factory(path: str, tokenizer_path: str) -> Callable[[], ReferenceScorer] | None:
    """What the dataloader workers call to build their replica of the reference at ``path`` (None: no
    reference), after checking here, in the calling process, that it can score this run's tokens."""
    if not path:
        return None
    check_reference(path, tokenizer_path)
    return functools.partial(ReferenceScorer, path, tokenizer_path)


def check_reference(path: str | Path, tokenizer_path: str | Path) -> None:
    """Fail fast, before any worker loads it, on a reference that is missing or cannot score this run's tokens."""
    try:
        reference_tokenizer = tokenizer_path_of(path)
    except (FileNotFoundError, KeyError, ValueError) as error:
        raise ReferenceMismatchError(f"loss.reference {path}: not a readable lacy-stream model ({error})") from None
    check_same_tokenizer(reference_tokenizer, tokenizer_path, reference=path)
    try:
        check_loadable(path)
    except ValueError as error:
        raise ReferenceMismatchError(f"loss.reference {path}: {error}") from None


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of the model's weights, whatever file they were read from."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_same_tokenizer(reference_tokenizer: str | Path, tokenizer: str | Path, *, reference: str | Path) -> None:
    """A reference scores this run's token ids only when it was trained on the same SentencePiece model
    (same bytes, hence the same pieces and ``<CALL>`` at the same id)."""
    if file_digest(reference_tokenizer) != file_digest(tokenizer):
        raise ReferenceMismatchError(
            f"the reference model {reference} was trained with the tokenizer {reference_tokenizer}, which differs "
            f"from this run's {tokenizer}: its losses would be of other token ids. Use a reference trained with the "
            "same SentencePiece model."
        )
