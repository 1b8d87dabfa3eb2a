"""Every kind of bad input is a counted, logged skip (or a clear error), and good documents survive it."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import pytest
import zstandard
from helpers import tar_bytes

from lacy_stream.shards.documents import ReadStats
from lacy_stream.shards.shard_reader import read_shard


def sample(key: str, text: bytes | None, meta: bytes | None = b'{"id": 1}') -> tuple[str, dict[str, bytes]]:
    members = {}
    if text is not None:
        members["txt"] = text
    if meta is not None:
        members["json"] = meta
    return key, members


GOOD = [sample(f"{i:03d}", f"Document number {i}. It is fine.".encode()) for i in range(20)]


def read(path, **kwargs) -> tuple[list, ReadStats]:
    stats = ReadStats()
    return list(read_shard(str(path), 0, stats, **kwargs)), stats


def test_good_shard(tmp_path):
    path = tmp_path / "good.tar"
    path.write_bytes(tar_bytes(GOOD))
    docs, stats = read(path)
    assert [d.text for d in docs] == [s[1]["txt"].decode() for s in GOOD]
    assert [d.index for d in docs] == list(range(20))
    assert docs[0].meta == {"id": 1}
    assert stats.docs == 20 and stats.shards == 1 and not stats.skipped


def test_bad_samples_are_counted_and_logged(tmp_path, caplog):
    bad = [
        sample("100", b"\xff\xfe not utf-8"),
        sample("101", b"lone surrogate \xed\xa0\x80 here"),
        sample("102", None),
        sample("103", b"   \n\t "),
        sample("104", b"fine text", meta=b"{not json"),
        sample("105", b"fine text", meta=b"[1, 2]"),
    ]
    path = tmp_path / "bad.tar"
    path.write_bytes(tar_bytes(GOOD[:2] + bad + GOOD[2:4]))
    with caplog.at_level(logging.WARNING):
        docs, stats = read(path)
    assert len(docs) == 4 and stats.docs == 4
    assert stats.skipped == {"invalid_utf8": 2, "missing_text": 1, "empty_document": 1, "invalid_metadata": 2}
    assert f"{path}:101.txt (invalid_utf8)" in caplog.text
    assert f"{path}:102 (missing_text)" in caplog.text


def test_a_member_named_in_another_encoding_is_logged_with_escapes(tmp_path, caplog):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:  # the name's byte 0xff is not UTF-8
        info = tarfile.TarInfo("7\udcff.txt")
        tar.addfile(info, io.BytesIO(b""))
    path = tmp_path / "latin.tar"
    path.write_bytes(buffer.getvalue())
    with caplog.at_level(logging.WARNING):
        docs, stats = read(path)
    assert docs == [] and stats.skipped == {"empty_document": 1}
    assert f"{path}:7\\udcff.txt (empty_document)" in caplog.text
    caplog.text.encode("utf-8")  # a UTF-8 log file can write every line


@pytest.mark.parametrize("cut", [0.3, 0.75, 2048 * 7])
def test_truncated_tar_keeps_what_came_before(tmp_path, cut):
    data = tar_bytes(GOOD)
    path = tmp_path / "cut.tar"
    path.write_bytes(data[: int(len(data) * cut) if cut < 1 else cut])  # 2048 * 7: right after sample 7
    docs, stats = read(path)
    assert 0 < len(docs) < 20
    assert [d.index for d in docs] == list(range(len(docs)))
    assert stats.skipped == {"corrupt_tar": 1}


def test_corrupt_tar_header(tmp_path):
    data = bytearray(tar_bytes(GOOD))
    data[512 * 6 : 512 * 6 + 100] = b"\x00garbage" * 12 + b"\x00" * 4
    path = tmp_path / "corrupt.tar"
    path.write_bytes(bytes(data))
    docs, stats = read(path)
    assert len(docs) < 20 and sum(stats.skipped.values()) == 1


def test_truncated_zstd_is_detected(tmp_path):
    compressed = zstandard.ZstdCompressor().compress(tar_bytes(GOOD))
    whole = tmp_path / "whole.tar.zst"
    whole.write_bytes(compressed)
    assert len(read(whole)[0]) == 20
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(compressed[: len(compressed) - 40])
    docs, stats = read(cut)
    assert len(docs) < 20
    assert stats.skipped.keys() <= {"truncated_stream", "corrupt_tar"} and sum(stats.skipped.values()) == 1


def test_unreachable_shard(tmp_path):
    docs, stats = read(tmp_path / "nothing-here.tar")
    assert docs == [] and stats.skipped == {"unreachable_shard": 1} and stats.shards == 0


def test_huge_document_is_split_losslessly(tmp_path):
    text = "\n\n".join(f"Paragraph {i} is about the river. " * 30 for i in range(40))
    path = tmp_path / "huge.tar"
    path.write_bytes(tar_bytes([sample("999", text.encode()), GOOD[0]]))
    docs, stats = read(path, max_doc_chars=5000)
    parts = [d for d in docs if d.key == "999"]
    assert len(parts) > 1 and all(len(p.text) <= 5000 for p in parts)
    assert "".join(p.text for p in parts) == text
    assert [p.part for p in parts] == list(range(len(parts))) and parts[-1].is_last_part
    assert stats.docs == 2 and stats.split_docs == 1


def test_strided_and_resumed_reads(tmp_path):
    path = tmp_path / "good.tar"
    path.write_bytes(tar_bytes(GOOD))
    docs, _ = read(path, stride=3, offset=1)
    assert [d.index for d in docs] == list(range(1, 20, 3))
    docs, stats = read(path, start=10, resumed=True)
    assert [d.index for d in docs] == list(range(10, 20))
    assert stats.docs == 9 and stats.shards == 0  # the shard and sample 10 were counted before the resume


def test_metadata_with_annotated_text_passes_through(tmp_path):
    meta = {"id": "x", "title": "T", "annotated_text": "born [dblookup('A', 'born') -> 1900] 1900"}
    path = tmp_path / "meta.tar"
    path.write_bytes(tar_bytes([sample("000", b"born 1900", json.dumps(meta).encode())]))
    assert read(path)[0][0].meta == meta


@pytest.mark.parametrize(
    "meta",
    [b"[" * 100_000, b'{"id": ' + b"9" * 5000 + b"}", b'{"id": 1}\x00', '{"id": 1}'.encode("utf-16"), b"null"],
    ids=["nested-too-deep", "integer-too-long", "nul-byte", "utf-16", "null"],
)
def test_metadata_the_json_parser_rejects_is_a_skip_not_an_exception(tmp_path, meta):
    path = tmp_path / "meta.tar"
    path.write_bytes(tar_bytes([GOOD[0], sample("100", b"fine text", meta=meta), GOOD[1]]))
    docs, stats = read(path)
    assert [d.key for d in docs] == ["000", "001"]
    assert stats.skipped == {"invalid_metadata": 1} and stats.docs == 2


def test_annotated_text_that_is_not_a_string_is_a_skip(tmp_path):
    path = tmp_path / "meta.tar"
    path.write_bytes(tar_bytes([sample("100", b"fine text", meta=b'{"annotated_text": ["x"]}'), GOOD[0]]))
    docs, stats = read(path)
    assert [d.key for d in docs] == ["000"]
    assert stats.skipped == {"non_string_annotated_text": 1}


def test_lone_surrogates_in_metadata_and_member_names_are_repaired(tmp_path):
    meta = b'{"id": "a\\ud800", "title": "\\udfff", "annotated_text": "born 1900", "pages": 3}'
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [("100.txt", b"born 1900"), ("100.json", meta), ("k\udcff.txt", b"a name not in UTF-8")]:
            info = tarfile.TarInfo(name)  # written with surrogateescape: "\udcff" becomes the byte 0xff
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "surrogates.tar"
    path.write_bytes(buffer.getvalue())
    docs, stats = read(path)
    assert docs[0].meta == {"id": "a\ufffd", "title": "\ufffd", "annotated_text": "born 1900", "pages": 3}
    assert docs[1].key == "k\ufffd"
    assert stats.repaired == {"lone_surrogate": 2} and not stats.skipped
    docs, stats = read(path, start=0, resumed=True)  # the resumed sample was counted by the first read
    assert len(docs) == 2 and stats.repaired == {"lone_surrogate": 1}
