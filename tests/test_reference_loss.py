"""Reference losses: the scorer against a direct forward pass, the reference-loss cache, offline shards."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_corpus, synthetic_text

from lacy_stream.annotate.annotate_shards import annotate_shards
from lacy_stream.annotate.label_cache import REFERENCE_CACHE_COLUMNS, LabelCache
from lacy_stream.annotate.labeling import DocumentLabeler
from lacy_stream.models.hf_export import export_hf
from lacy_stream.inference.reference_loss import (
    ReferenceMismatchError,
    ReferenceScorer,
    check_reference,
)
from lacy_stream.models.gpt2 import Transformer, model_args
from lacy_stream.shards.documents import Document, ReadStats
from lacy_stream.shards.shard_reader import read_shard
from lacy_stream.shards.specs import expand_shard_spec
from lacy_stream.tokenizer import Tokenizer, train_tokenizer

CONTEXT = 32


def export_random_model(directory: Path, tokenizer_path: str, seed: int) -> Path:
    torch.manual_seed(seed)
    args = model_args("tiny", vocab_size=Tokenizer(tokenizer_path).vocab_size, max_seq_len=CONTEXT)
    model = Transformer(args)
    return export_hf(model.state_dict(), tokenizer_path, directory, args=args)


@pytest.fixture(scope="module")
def references(tmp_path_factory, tokenizer_path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("references")
    return export_random_model(root / "a", tokenizer_path, 0), export_random_model(root / "b", tokenizer_path, 1)


def direct_losses(model: Transformer, tokens: torch.Tensor, call_id: int) -> torch.Tensor:
    """Cross-entropy without <CALL> of ``tokens[1:]`` after ``tokens[:-1]``, in one forward pass."""
    with torch.no_grad():
        logits = model.logits(model(tokens[None, :-1]))[0].double()
    logits[:, call_id] = float("-inf")
    return torch.logsumexp(logits, -1) - logits.gather(1, tokens[1:, None]).squeeze(1)


def test_scorer_scores_each_token_after_its_document_start(references, tokenizer_path):
    scorer = ReferenceScorer(references[0], tokenizer_path)
    tokenizer = Tokenizer(tokenizer_path)
    ids = np.array(tokenizer.encode(synthetic_text(random.Random(0), 12)), dtype=np.int64)
    assert len(ids) > 2 * CONTEXT
    losses = scorer.score(ids)
    assert losses.dtype == np.float32 and losses.shape == ids.shape and np.isfinite(losses).all()

    stream = torch.tensor(np.concatenate([[tokenizer.eos_id], ids]))
    # The first window: every token with all of its document before it.
    first = direct_losses(scorer.model, stream[: CONTEXT + 1], scorer.call_id)
    np.testing.assert_allclose(losses[:CONTEXT], first.numpy(), rtol=1e-5, atol=1e-5)
    # Later tokens come from windows that overlap by half: token p from the window starting at p - p % 16 - 16.
    stride = CONTEXT // 2
    for position in (CONTEXT, CONTEXT + 5, len(ids) - 1):
        start = (position - CONTEXT) // stride * stride + stride
        window = direct_losses(scorer.model, stream[start : start + CONTEXT + 1], scorer.call_id)
        assert losses[position] == pytest.approx(window[position - start].item(), rel=1e-5, abs=1e-5)
    assert scorer.score(np.array([], dtype=np.int64)).shape == (0,)


def documents(count: int, url: str = "mem://shard-0") -> list[Document]:
    rng = random.Random(5)
    return [Document(text=synthetic_text(rng, rng.randint(1, 6)), key=f"{i:05d}", url=url, shard=0, index=i)
            for i in range(count)]


def labeler_with(reference: Path, tokenizer_path: str, cache_root: Path) -> DocumentLabeler:
    scorer = ReferenceScorer(reference, tokenizer_path)
    cache = LabelCache(cache_root, scorer.identity, REFERENCE_CACHE_COLUMNS)
    return DocumentLabeler(Tokenizer(tokenizer_path), None, reference=scorer, reference_cache=cache)


def label_all(labeler: DocumentLabeler, docs: list[Document]) -> list[np.ndarray]:
    return [labels["ref_loss"] for _, _, labels in labeler.label((None, doc) for doc in docs)]


@pytest.mark.slow
def test_reference_cache_hits_misses_on_another_reference_and_survives_corruption(references, tokenizer_path, tmp_path):
    docs = documents(5)
    first = labeler_with(references[0], tokenizer_path, tmp_path)
    scored = label_all(first, docs)
    assert first.counts["reference_scored"] == 5 and first.counts["reference_cached"] == 0

    again = labeler_with(references[0], tokenizer_path, tmp_path)
    cached = label_all(again, docs)
    assert again.counts["reference_cached"] == 5 and again.counts["reference_scored"] == 0
    for expected, actual in zip(scored, cached):
        np.testing.assert_array_equal(expected, actual)

    other = labeler_with(references[1], tokenizer_path, tmp_path)
    other_losses = label_all(other, docs)
    assert other.counts["reference_scored"] == 5 and other.counts["reference_cached"] == 0
    assert not np.allclose(other_losses[0], scored[0])

    for column in (tmp_path / again.reference_cache.directory.name).glob("*/ref_loss.npy"):
        column.write_bytes(column.read_bytes()[:-8])  # a truncated segment
    after_corruption = labeler_with(references[0], tokenizer_path, tmp_path)
    recomputed = label_all(after_corruption, docs)
    assert after_corruption.counts["reference_scored"] == after_corruption.counts["reference_cache_corrupt"] == 5
    np.testing.assert_allclose(recomputed[0], scored[0], rtol=1e-6)


@pytest.mark.slow
def test_offline_shards_store_reference_losses(references, tokenizer_path, tmp_path):
    make_corpus(tmp_path / "corpus", shards=1, docs_per_shard=4)
    urls = expand_shard_spec(str(tmp_path / "corpus"))
    scorer = ReferenceScorer(references[0], tokenizer_path)
    manifest = annotate_shards(urls, tmp_path / "annotated", tokenizer_path, reference=scorer)
    assert manifest["reference"] == scorer.identity

    stored_docs = list(read_shard(expand_shard_spec(str(tmp_path / "annotated"))[0], 0, ReadStats()))
    labeler = DocumentLabeler(Tokenizer(tokenizer_path), None, reference=scorer)
    labeler.identity = manifest["labeler"]  # read the stored fact labels as the annotating labeler made them
    stored = label_all(labeler, stored_docs)
    assert labeler.counts["stored"] == 4 and labeler.counts["reference_scored"] == 0
    for doc, losses in zip(stored_docs, stored):
        np.testing.assert_allclose(losses, scorer.score(np.array(Tokenizer(tokenizer_path).encode(doc.text))), rtol=1e-6)

    other = DocumentLabeler(Tokenizer(tokenizer_path), None, reference=ReferenceScorer(references[1], tokenizer_path))
    other.identity = manifest["labeler"]
    label_all(other, stored_docs)
    assert other.counts["reference_scored"] == 4  # stored losses of another reference are not used


def test_reference_with_another_tokenizer_is_refused(references, tmp_path):
    other = tmp_path / "other.model"
    train_tokenizer([synthetic_text(random.Random(7), 20) for _ in range(200)], other, vocab_size=400)
    with pytest.raises(ReferenceMismatchError, match="differs from this run's"):
        check_reference(references[0], other)
    with pytest.raises(ReferenceMismatchError, match="differs from this run's"):
        ReferenceScorer(references[0], other)
