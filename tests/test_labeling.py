"""Labeled documents and batches: sources of labels, the label cache, offline shards, the loader."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from helpers import SHARED_DIR, synthetic_text

from lacy_stream.annotate import annotation
from lacy_stream.annotate.annotate_shards import annotate_shards
from lacy_stream.annotate.annotation import FactAnnotator
from lacy_stream.annotate.label_cache import LabelCache
from lacy_stream.annotate.labeling import DocumentLabeler
from lacy_stream.config.job_config import AnnotationConfig
from lacy_stream.data.loader import TokenLoader
from lacy_stream.labels import JUDGE_CALL, JUDGE_UNKNOWN, TokenClass
from lacy_stream.shards.documents import Document, ReadStats
from lacy_stream.shards.make_shards import make_shards
from lacy_stream.shards.shard_reader import read_shard
from lacy_stream.shards.specs import expand_shard_spec
from lacy_stream.tokenizer import Tokenizer, train_tokenizer

DWIKI = SHARED_DIR / "data" / "dwiki-dev.jsonl"


@pytest.fixture(scope="module")
def annotator() -> FactAnnotator:
    return FactAnnotator(batch_size=8)


def doc(text: str, index: int = 0, meta: dict | None = None, url: str = "mem://a") -> Document:
    return Document(text=text, key=f"{index:05d}", url=url, shard=0, index=index, meta=meta or {})


def test_pieces_inherit_their_words_class(tokenizer_path, annotator):
    tokenizer = Tokenizer(tokenizer_path)
    text = "The painter Wolfgang Amadeus Mozart was born in 1756. Mozart met the queen."
    labels = DocumentLabeler(tokenizer, annotator).label_document(doc(text))
    assert labels["tokens"].tolist() == tokenizer.encode(text)
    pieces = [tokenizer.id_to_piece(int(t)) for t in labels["tokens"]]
    by_piece = list(zip(pieces, labels["token_class"].tolist()))
    digits = [cls for piece, cls in by_piece if piece.strip("▁").isdigit()]
    assert digits == [TokenClass.FACT] * 4, "every digit piece of 1756 is part of the number"
    assert (labels["judge"] == JUDGE_UNKNOWN).all()
    assert (labels["token_class"] == TokenClass.FACT).sum() > 4


def test_labeler_without_annotator_labels_everything_other(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    labels = DocumentLabeler(tokenizer, None).label_document(doc("Mozart met the king in 1780."))
    assert (labels["token_class"] == TokenClass.OTHER).all()


def test_label_order_follows_input_order_across_batches(tokenizer_path, annotator):
    tokenizer = Tokenizer(tokenizer_path)
    rng = random.Random(0)
    docs = [doc(synthetic_text(rng, 3), i) for i in range(21)]
    labeler = DocumentLabeler(tokenizer, annotator, batch_size=4)
    out = list(labeler.label((d.index, d) for d in docs))
    assert [item for item, _, _ in out] == list(range(21))
    assert all(labels["tokens"].tolist() == tokenizer.encode(d.text) for _, d, labels in out)


def test_cache_serves_later_epochs_and_is_invalidated_by_any_input(tmp_path, tokenizer_path, annotator, monkeypatch):
    tokenizer = Tokenizer(tokenizer_path)
    rng = random.Random(1)
    docs = [doc(synthetic_text(rng, 4), i, url=f"mem://shard-{i // 3}") for i in range(10)]

    def run(labeler: DocumentLabeler, documents=docs) -> list[dict]:
        labeler.cache = LabelCache(tmp_path / "cache", labeler.identity)
        return [labels for _, _, labels in labeler.label((None, d) for d in documents)]

    first_labeler = DocumentLabeler(tokenizer, annotator, batch_size=4)
    first = run(first_labeler)
    assert first_labeler.counts["annotated"] == 10 and first_labeler.cache.stats.written == 10
    again = DocumentLabeler(tokenizer, annotator, batch_size=3)
    second = run(again)
    assert again.counts["cached"] == 10 and again.counts["annotated"] == 0
    for a, b in zip(first, second):
        assert all(np.array_equal(a[name], b[name]) for name in a)

    edited = [doc(d.text + " Extra words.", d.index, url=d.url) for d in docs[:2]] + docs[2:]
    changed_text = DocumentLabeler(tokenizer, annotator, batch_size=3)
    run(changed_text, edited)
    assert changed_text.counts["annotated"] == 2 and changed_text.counts["cached"] == 8

    with_judge = [doc(docs[0].text, 0, {"annotated_text": docs[0].text}, url=docs[0].url)] + docs[1:]
    changed_markup = DocumentLabeler(tokenizer, annotator, batch_size=3)
    run(changed_markup, with_judge)
    assert changed_markup.counts["annotated"] == 1

    other_tokenizer_path = tmp_path / "other.model"
    train_tokenizer([synthetic_text(rng, 20) for _ in range(200)], other_tokenizer_path, vocab_size=380)
    other_tokenizer = DocumentLabeler(Tokenizer(other_tokenizer_path), annotator, batch_size=3)
    run(other_tokenizer)
    assert other_tokenizer.counts["annotated"] == 10

    monkeypatch.setattr(annotation, "RULES_VERSION", "lacy-rules-test")
    new_rules = DocumentLabeler(tokenizer, FactAnnotator(batch_size=3), batch_size=3)
    run(new_rules)
    assert new_rules.counts["annotated"] == 10


@pytest.mark.needs_shared
def test_judge_labels_mark_the_values_of_the_markup(tokenizer_path, annotator):
    tokenizer = Tokenizer(tokenizer_path)
    record = json.loads(DWIKI.open().readline())
    labeler = DocumentLabeler(tokenizer, annotator)
    labels = labeler.label_document(doc(record["text"], meta={"annotated_text": record["annotated_text"]}))
    called = labels["tokens"][labels["judge"] == JUDGE_CALL]
    assert "August 16, 1801" in tokenizer.decode(called.tolist()).replace("  ", " ") or len(called) > 10
    assert "1801" in tokenizer.decode(called.tolist())
    assert labeler.counts["judge_values"] > 5 and labeler.counts["judge_unmapped"] == 0
    assert ((labels["judge"] == JUDGE_CALL) & (labels["token_class"] == TokenClass.FACT)).sum() > 0


def dwiki_shards(tmp_path, documents: int = 12):
    source = tmp_path / "dwiki.jsonl"
    with DWIKI.open() as lines:
        source.write_text("".join(line for _, line in zip(range(documents), lines)))
    make_shards([str(source)], tmp_path / "raw", docs_per_shard=4)
    return expand_shard_spec(str(tmp_path / "raw"))


def all_batches_of_epoch_zero(loader: TokenLoader, limit: int = 400) -> dict[str, np.ndarray]:
    columns: dict[str, list] = {}
    for count, batch in enumerate(loader):
        epochs = batch["doc_ids"].numpy() >> 44
        if (epochs > 0).all() or count == limit:
            break
        for name in ("tokens", "token_class", "judge", "doc_ids"):
            columns.setdefault(name, []).append(batch[name].numpy()[epochs == 0])
    return {name: np.concatenate(parts) for name, parts in columns.items()}


@pytest.mark.needs_shared
@pytest.mark.slow
def test_offline_annotated_shards_give_the_online_labels(tmp_path, tokenizer_path, annotator):
    urls = dwiki_shards(tmp_path)
    manifest = annotate_shards(urls, tmp_path / "annotated", tokenizer_path, batch_size=5, max_doc_chars=3000)
    assert manifest["documents"] == 12 and manifest["labeler"].endswith(annotation.RULES_VERSION + "|tokenizer:" + manifest["labeler"].split(":")[-1])

    tokenizer = Tokenizer(tokenizer_path)
    offline_labeler = DocumentLabeler(tokenizer, annotator)
    stats = ReadStats()
    annotated_urls = expand_shard_spec(str(tmp_path / "annotated"))
    offline = list(offline_labeler.label((None, d) for i, u in enumerate(annotated_urls) for d in read_shard(u, i, stats, max_doc_chars=3000)))
    assert offline_labeler.counts["stored"] == len(offline) and offline_labeler.counts["annotated"] == 0
    online_labeler = DocumentLabeler(tokenizer, annotator)
    online = list(online_labeler.label((None, d) for i, u in enumerate(urls) for d in read_shard(u, i, stats, max_doc_chars=3000)))
    assert len(online) == len(offline) > 12, "documents were split into parts"
    for (_, _, a), (_, _, b) in zip(online, offline):
        assert all(np.array_equal(a[name], b[name]) for name in a)

    def loader(spec_urls):
        return TokenLoader(spec_urls, tokenizer_path, seq_len=64, batch_size=2, num_workers=2,
                           annotation=AnnotationConfig(batch_size=5, cache=False), max_doc_chars=3000)

    online_batches = all_batches_of_epoch_zero(loader(urls))
    offline_batches = all_batches_of_epoch_zero(loader(annotated_urls))
    for name in ("tokens", "token_class", "judge"):
        assert np.array_equal(online_batches[name], offline_batches[name]), name

    other_split = DocumentLabeler(tokenizer, annotator)
    docs = [d for i, u in enumerate(annotated_urls) for d in read_shard(u, i, stats)]
    list(other_split.label((None, d) for d in docs))
    assert other_split.counts["stored_labels_stale"] > 0, "labels stored for another split are not used"


@pytest.mark.needs_shared
@pytest.mark.slow
def test_loader_yields_labeled_batches_with_workers_and_resumes_exactly(tmp_path, tokenizer_path):
    urls = dwiki_shards(tmp_path, documents=8)
    config = AnnotationConfig(batch_size=3)

    def loader():
        return TokenLoader(urls, tokenizer_path, seq_len=128, batch_size=2, num_workers=2, annotation=config)

    reference = loader()
    batches = [b for _, b in zip(range(12), reference)]
    for batch in batches:
        tokens, classes = batch["tokens"].numpy(), batch["token_class"].numpy()
        assert ((tokens == Tokenizer(tokenizer_path).eos_id) == (classes == TokenClass.IGNORE)).all()
    classes = np.concatenate([b["token_class"].numpy().ravel() for b in batches])
    assert 0.1 < (classes == TokenClass.FACT).mean() < 0.6
    assert (np.concatenate([b["judge"].numpy().ravel() for b in batches]) == JUDGE_CALL).any()

    interrupted = loader()
    iterator = iter(interrupted)
    for _ in range(5):
        next(iterator)
    state = interrupted.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    for expected, batch in zip(batches[5:], resumed):
        for name in ("tokens", "token_class", "judge", "positions", "doc_ids"):
            assert np.array_equal(expected[name].numpy(), batch[name].numpy()), name


def test_bad_annotation_settings_fail_before_any_worker_starts(tmp_path, tokenizer_path):
    urls = [str(tmp_path / "unused.tar")]
    with pytest.raises(OSError, match="no_such_model"):
        TokenLoader(urls, tokenizer_path, seq_len=8, batch_size=1, num_workers=2,
                    annotation=AnnotationConfig(spacy_model="no_such_model"))
    with pytest.raises(ValueError, match="batch_size"):
        TokenLoader(urls, tokenizer_path, seq_len=8, batch_size=1, annotation=AnnotationConfig(batch_size=0))
