"""Integrity of stored and cached labels: a corrupt entry is a counted, logged miss that is recomputed."""

from __future__ import annotations

import hashlib
import io
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from helpers import synthetic_text

from lacy_stream.annotate.annotation import FactAnnotator
from lacy_stream.annotate.label_cache import LabelCache, document_key
from lacy_stream.annotate.labeling import DocumentLabeler, Labels, stored_labels_bytes
from lacy_stream.shards.documents import Document
from lacy_stream.tokenizer import Tokenizer

SHARD = "mem://shard-0"


@pytest.fixture(scope="module")
def annotator() -> FactAnnotator:
    return FactAnnotator(batch_size=8)


@pytest.fixture
def documents() -> list[Document]:
    rng = random.Random(3)
    return [Document(synthetic_text(rng, 3), f"{i:05d}", SHARD, 0, i) for i in range(6)]


def labeler(tokenizer_path: str, annotator: FactAnnotator, cache_root: Path | None = None) -> DocumentLabeler:
    labeler = DocumentLabeler(Tokenizer(tokenizer_path), annotator, batch_size=4)
    if cache_root is not None:
        labeler.cache = LabelCache(cache_root, labeler.identity)
    return labeler


def label_all(labeler: DocumentLabeler, documents: list[Document]) -> list[Labels]:
    return [labels for _, _, labels in labeler.label((None, doc) for doc in documents)]


def assert_same_labels(expected: list[Labels], actual: list[Labels]) -> None:
    for first, second in zip(expected, actual, strict=True):
        assert first.keys() == second.keys()
        for name in first:
            np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def only_segment(labeler: DocumentLabeler) -> Path:
    (segment,) = [path for path in labeler.cache.directory.iterdir() if path.is_dir()]
    return segment


def token_positions(segment: Path, doc: Document) -> slice:
    """Where ``doc``'s tokens are in the segment's columns."""
    keys = np.load(segment / "keys.npy")
    offsets = np.load(segment / "offsets.npy")
    (row,) = np.flatnonzero((keys == np.frombuffer(document_key(doc.text, None), np.uint8)).all(axis=1))
    return slice(int(offsets[row]), int(offsets[row + 1]))


def overwrite_tokens(segment: Path, positions: slice, new_ids) -> None:
    """Writes ids over the entry's token column in place: the file keeps its size."""
    size = (segment / "tokens.npy").stat().st_size
    column = np.load(segment / "tokens.npy", mmap_mode="r+")
    column[positions] = new_ids(column[positions])
    column.flush()
    del column
    assert (segment / "tokens.npy").stat().st_size == size


def test_an_entry_corrupted_in_place_with_valid_ids_is_recomputed_counted_and_logged_once(
    tmp_path, tokenizer_path, annotator, documents, caplog
):
    first = labeler(tokenizer_path, annotator, tmp_path)
    expected = label_all(first, documents)
    segment = only_segment(first)
    vocabulary = Tokenizer(tokenizer_path).num_pieces
    for doc in documents[1:3]:
        overwrite_tokens(segment, token_positions(segment, doc), lambda ids: (ids + 1) % vocabulary)

    caplog.set_level(logging.WARNING)
    second = labeler(tokenizer_path, annotator, tmp_path)
    assert_same_labels(expected, label_all(second, documents))
    assert second.counts == {"cached": 4, "cache_corrupt": 2, "annotated": 2}
    assert second.cache.stats.corrupt == 2
    warnings = [record.getMessage() for record in caplog.records if "corrupt" in record.getMessage()]
    assert len(warnings) == 1 and str(segment) in warnings[0] and "checksum" in warnings[0]

    third = labeler(tokenizer_path, annotator, tmp_path)
    assert_same_labels(expected, label_all(third, documents))
    assert third.counts == {"cached": 6}, "the entries written again shadow the corrupt ones"


def test_out_of_range_ids_in_the_cache_are_recomputed_not_an_index_error(
    tmp_path, tokenizer_path, annotator, documents
):
    first = labeler(tokenizer_path, annotator, tmp_path)
    expected = label_all(first, documents)
    segment = only_segment(first)
    overwrite_tokens(segment, token_positions(segment, documents[0]), lambda ids: ids + 10_000_000)

    second = labeler(tokenizer_path, annotator, tmp_path)
    assert_same_labels(expected, label_all(second, documents))
    assert second.counts == {"cached": 5, "cache_corrupt": 1, "annotated": 1}

    # An entry with a valid checksum but ids no tokenizer of this namespace made (a writer's bug).
    shard = second.cache.shard("mem://shard-1")
    key = document_key(documents[0].text, None)
    shard.put(key, {**expected[0], "tokens": expected[0]["tokens"] + 10_000_000})
    shard.flush()
    moved = [Document(doc.text, doc.key, "mem://shard-1", 1, doc.index) for doc in documents[:1]]
    third = labeler(tokenizer_path, annotator, tmp_path)
    assert_same_labels(expected[:1], label_all(third, moved))
    assert third.counts == {"cache_corrupt": 1, "annotated": 1}
    fourth = labeler(tokenizer_path, annotator, tmp_path)
    assert_same_labels(expected[:1], label_all(fourth, moved))
    assert fourth.counts == {"cached": 1}


@pytest.mark.parametrize("column", ["tokens.npy", "offsets.npy", "checksums.npy"])
def test_a_truncated_file_makes_its_entries_corrupt_misses(
    tmp_path, tokenizer_path, annotator, documents, column, caplog
):
    first = labeler(tokenizer_path, annotator, tmp_path)
    expected = label_all(first, documents)
    path = only_segment(first) / column
    path.write_bytes(path.read_bytes()[:-5])

    caplog.set_level(logging.WARNING)
    second = labeler(tokenizer_path, annotator, tmp_path)
    assert_same_labels(expected, label_all(second, documents))
    assert second.counts == {"cache_corrupt": 6, "annotated": 6}
    assert sum(str(path.parent) in record.getMessage() for record in caplog.records) == 1


def test_a_segment_with_unreadable_keys_is_skipped_whole(tmp_path, tokenizer_path, annotator, documents, caplog):
    first = labeler(tokenizer_path, annotator, tmp_path)
    expected = label_all(first, documents)
    keys = only_segment(first) / "keys.npy"
    keys.write_bytes(keys.read_bytes()[:40])

    caplog.set_level(logging.WARNING)
    second = labeler(tokenizer_path, annotator, tmp_path)
    assert_same_labels(expected, label_all(second, documents))
    assert second.counts == {"annotated": 6}
    assert second.cache.stats.unreadable_segments == 1 and str(keys.parent) in caplog.text


def test_a_cache_written_before_the_checksums_is_not_read(tmp_path, tokenizer_path, annotator, documents):
    """Format 1 had no checksums.npy, in the namespace named by the identity alone."""
    first = labeler(tokenizer_path, annotator, None)
    expected = label_all(first, documents)
    old_segment = tmp_path / hashlib.sha256(first.identity.encode()).hexdigest()[:16] / "0123456789abcdef-old"
    old_segment.mkdir(parents=True)
    keys = b"".join(document_key(doc.text, None) for doc in documents)
    np.save(old_segment / "keys.npy", np.frombuffer(keys, dtype=np.uint8).reshape(-1, 16))
    np.save(old_segment / "offsets.npy", np.cumsum([0] + [len(labels["tokens"]) for labels in expected]))
    for name, dtype in (("tokens", np.int32), ("token_class", np.int8), ("judge", np.int8)):
        np.save(old_segment / f"{name}.npy", np.concatenate([labels[name] for labels in expected]).astype(dtype))

    second = labeler(tokenizer_path, annotator, tmp_path)
    assert second.cache.directory != old_segment.parent
    assert_same_labels(expected, label_all(second, documents))
    assert second.counts == {"annotated": 6}


def with_stored_labels(documents: list[Document], payloads: list[bytes]) -> list[Document]:
    return [Document(doc.text, doc.key, SHARD, 0, doc.index, labels=labels) for doc, labels in zip(documents, payloads)]


def test_tampered_or_invalid_stored_labels_fall_back_to_annotation(tokenizer_path, annotator, documents, caplog):
    online = labeler(tokenizer_path, annotator)
    expected = label_all(online, documents)
    payloads = [stored_labels_bytes(online.identity, [labels]) for labels in expected]

    in_range_id = (expected[0]["tokens"][3] + 1) % Tokenizer(tokenizer_path).num_pieces
    tampered = payloads[0].replace(expected[0]["tokens"][3:4].tobytes(), np.int64(in_range_id).tobytes(), 1)
    assert len(tampered) == len(payloads[0]) and tampered != payloads[0]
    payloads[0] = tampered
    payloads[1] = payloads[1][: len(payloads[1]) // 2]  # truncated
    payloads[2] = stored_labels_bytes(online.identity, [{**expected[2], "tokens": expected[2]["tokens"] - 1000}])

    caplog.set_level(logging.WARNING)
    offline = labeler(tokenizer_path, annotator)
    assert_same_labels(expected, label_all(offline, with_stored_labels(documents, payloads)))
    assert offline.counts == {"stored": 3, "stored_labels_corrupt": 3, "annotated": 3}
    warnings = [record.getMessage() for record in caplog.records if "stored labels are corrupt" in record.getMessage()]
    assert len(warnings) == 1 and "CRC" in warnings[0], "logged once per shard, with the first reason"


def test_stored_labels_of_split_documents_are_checked_as_a_whole(tokenizer_path, annotator, documents):
    online = labeler(tokenizer_path, annotator)
    parts = label_all(online, documents[:2])
    whole = stored_labels_bytes(online.identity, parts)
    split = [Document(doc.text, "00000", SHARD, 0, 0, part=part, num_parts=2, labels=whole)
             for part, doc in enumerate(documents[:2])]
    assert_same_labels(parts, label_all(labeler(tokenizer_path, annotator), split))

    short = io.BytesIO()
    with np.load(io.BytesIO(whole)) as members:
        np.savez(short, **{**{name: members[name] for name in members.files}, "judge": members["judge"][:-1]})
    shortened = [Document(doc.text, doc.key, SHARD, 0, 0, part=doc.part, num_parts=2, labels=short.getvalue())
                 for doc in split]
    offline = labeler(tokenizer_path, annotator)
    assert_same_labels(parts, label_all(offline, shortened))
    assert offline.counts == {"stored_labels_corrupt": 2, "annotated": 2}


def test_a_cache_that_cannot_be_written_is_a_warning_and_labels_stay_right(tmp_path, tokenizer_path, annotator,
                                                                          documents, caplog, monkeypatch):
    """A full disk under the cache: one warning, no partial segment, the labels of the run unchanged."""
    expected = label_all(labeler(tokenizer_path, annotator), documents)
    cached = labeler(tokenizer_path, annotator, tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    with caplog.at_level(logging.WARNING):
        assert_same_labels(expected, label_all(cached, documents))
        cached.cache.shard(SHARD).flush()
    assert [record.message for record in caplog.records if "could not write" in record.message] == [
        f"label cache: could not write a segment to {cached.cache.directory}: No space left on device; this worker "
        "caches nothing more"]
    assert not [path for path in cached.cache.directory.iterdir() if path.is_dir()]


def test_the_label_sources_reach_the_loaders_read_counters(tmp_path, tokenizer_path):
    from helpers import make_corpus
    from lacy_stream.config.job_config import AnnotationConfig, DataConfig
    from lacy_stream.data.loader import TokenLoader

    make_corpus(tmp_path / "corpus", shards=1, docs_per_shard=3)
    data = DataConfig(shards=str(tmp_path / "corpus"), seq_len=32, batch_size=1, num_workers=0)
    loader = TokenLoader.from_config(data, tokenizer_path, AnnotationConfig(cache_dir=str(tmp_path / "cache")))
    for _ in zip(range(40), loader):
        pass
    assert loader.label_counts()["annotated"] >= 3
