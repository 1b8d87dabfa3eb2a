from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path

# The machine running the tests is offline; hf: inputs here are local directories.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pyarrow
import pyarrow.parquet
import pytest
import webdataset
import zstandard

from helpers import SHARED_DIR
from lacy_stream.shards.demo_corpus import wikitext_to_plain
from lacy_stream.shards.documents import TooManySkipsError
from lacy_stream.shards.make_shards import ShardInputError, make_shards, parse_hf_spec

DWIKI_DEV = SHARED_DIR / "data" / "dwiki-dev.jsonl"

RECORDS = [
    {"id": "doc-a", "title": "Ada Lovelace", "text": "Ada Lovelace\n\nAda Lovelace was an English mathematician."},
    {"id": 17, "text": "Plain text without a title, with unicode: Ærøskøbing – 東京 – 🚀."},
    {
        "id": "doc-c",
        "text": "Ralph Earl\n\nRalph Earl was an American painter.",
        "annotated_text": "Ralph Earl was an [dblookup('Ralph Earl', 'Nationality') -> American] American painter.",
    },
    {"id": "doc-d", "title": "Tabs", "text": "line one\n\tline two\r\nline three  "},
    {"id": "doc-e", "title": None, "text": "x"},
]


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def expected_documents(records: list[dict]) -> list[dict]:
    """What a shard's samples should hold for ``records``: text plus metadata, id defaulting to the ordinal."""
    documents = []
    for ordinal, record in enumerate(records):
        meta = {"id": record.get("id", ordinal), "title": record.get("title")}
        if "annotated_text" in record:
            meta["annotated_text"] = record["annotated_text"]
        documents.append({"key": f"{ordinal:09d}", "text": record["text"], "meta": meta})
    return documents


def read_tar_documents(data: bytes) -> list[dict]:
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        for member in archive:
            key, extension = member.name.split(".", 1)
            members.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return [
        {"key": key, "text": parts["txt"].decode("utf-8"), "meta": json.loads(parts["json"])}
        for key, parts in members.items()
    ]


def read_shards(out_dir: Path, manifest: dict) -> list[dict]:
    documents = []
    for shard in manifest["shards"]:
        data = (out_dir / shard["name"]).read_bytes()
        if shard["name"].endswith(".zst"):
            data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
        documents.extend(read_tar_documents(data))
    return documents


def assert_manifest_matches_files(out_dir: Path, manifest: dict) -> None:
    assert json.loads((out_dir / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert manifest["format"] == "lacy-stream-shards"
    assert manifest["version"] == 1
    assert manifest["documents"] == sum(shard["documents"] for shard in manifest["shards"])
    for shard in manifest["shards"]:
        data = (out_dir / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data)
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert not [path.name for path in out_dir.iterdir() if path.name.endswith(".partial")]


def test_jsonl_round_trip_through_webdataset(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS)
    out_dir = tmp_path / "shards"
    manifest = make_shards([str(source)], out_dir, docs_per_shard=2, prefix="wiki")

    assert manifest["documents"] == len(RECORDS)
    assert manifest["skipped"] == {}
    assert manifest["sources"] == [str(source)]
    assert [shard["name"] for shard in manifest["shards"]] == ["wiki-000000.tar", "wiki-000001.tar", "wiki-000002.tar"]
    assert_manifest_matches_files(out_dir, manifest)

    urls = [str(out_dir / shard["name"]) for shard in manifest["shards"]]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    read_back = [
        {"key": sample["__key__"], "text": sample["txt"].decode("utf-8"), "meta": json.loads(sample["json"])}
        for sample in samples
    ]
    assert read_back == expected_documents(RECORDS)


def test_docs_per_shard_splits_into_full_shards_and_a_remainder(tmp_path: Path) -> None:
    records = [{"id": f"d{index}", "text": f"document number {index}"} for index in range(10)]
    source = write_jsonl(tmp_path / "docs.jsonl", records)
    manifest = make_shards([str(source)], tmp_path / "out", docs_per_shard=3)

    assert [shard["name"] for shard in manifest["shards"]] == [f"shard-{index:06d}.tar" for index in range(4)]
    assert [shard["documents"] for shard in manifest["shards"]] == [3, 3, 3, 1]
    assert read_shards(tmp_path / "out", manifest) == expected_documents(records)


def test_heldout_docs_go_to_a_split_of_their_own_that_a_rebuild_replaces(tmp_path: Path) -> None:
    records = [{"id": f"d{index}", "text": f"document number {index}"} for index in range(10)]
    source = write_jsonl(tmp_path / "docs.jsonl", records)
    out = tmp_path / "out"
    manifest = make_shards([str(source)], out, docs_per_shard=3, heldout_docs=4)

    assert manifest["documents"] == 6 and manifest["heldout"] == {"path": "heldout", "documents": 4}
    assert read_shards(out, manifest) == expected_documents(records[:6])
    heldout = json.loads((out / "heldout" / "manifest.json").read_text())
    assert_manifest_matches_files(out / "heldout", heldout)
    assert read_shards(out / "heldout", heldout) == expected_documents(records[6:])

    make_shards([str(source)], out, docs_per_shard=3)  # an old split would hold documents trained on now
    assert not (out / "heldout").exists()
    with pytest.raises(ShardInputError, match="all 10 documents were held out"):
        make_shards([str(source)], out, heldout_docs=10)


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_builds_are_reproducible(tmp_path: Path, compress: str | None) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS)
    first = make_shards([str(source)], tmp_path / "first", docs_per_shard=2, compress=compress)
    second = make_shards([str(source)], tmp_path / "second", docs_per_shard=2, compress=compress)
    assert [shard["sha256"] for shard in first["shards"]] == [shard["sha256"] for shard in second["shards"]]
    assert first == second


def test_zstd_output_is_one_frame_holding_the_tar(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS)
    out_dir = tmp_path / "out"
    manifest = make_shards([str(source)], out_dir, docs_per_shard=4, compress="zstd")

    assert [shard["name"] for shard in manifest["shards"]] == ["shard-000000.tar.zst", "shard-000001.tar.zst"]
    assert_manifest_matches_files(out_dir, manifest)
    for shard in manifest["shards"]:
        compressed = (out_dir / shard["name"]).read_bytes()
        frame = zstandard.ZstdDecompressor().decompressobj()
        frame.decompress(compressed)
        assert frame.eof and frame.unused_data == b""
    assert read_shards(out_dir, manifest) == expected_documents(RECORDS)


def test_jsonl_zst_input_with_several_frames(tmp_path: Path) -> None:
    lines = "".join(json.dumps(record) + "\n" for record in RECORDS).encode("utf-8")
    middle = len(lines) // 2  # the second frame starts inside a line
    compressor = zstandard.ZstdCompressor()
    source = tmp_path / "docs.jsonl.zst"
    source.write_bytes(compressor.compress(lines[:middle]) + compressor.compress(lines[middle:]))

    manifest = make_shards([str(source)], tmp_path / "out")
    assert read_shards(tmp_path / "out", manifest) == expected_documents(RECORDS)


def test_truncated_jsonl_zst_input_is_a_clear_error(tmp_path: Path) -> None:
    lines = "".join(json.dumps(record) + "\n" for record in RECORDS * 50).encode("utf-8")
    compressed = zstandard.ZstdCompressor().compress(lines)
    source = tmp_path / "cut.jsonl.zst"
    source.write_bytes(compressed[: len(compressed) - 20])
    out_dir = tmp_path / "out"

    with pytest.raises(ShardInputError, match=r"cut\.jsonl\.zst.*truncated"):
        make_shards([str(source)], out_dir, docs_per_shard=100)
    assert not out_dir.exists()

    previous = make_shards([str(write_jsonl(tmp_path / "docs.jsonl", RECORDS))], out_dir, docs_per_shard=2)
    before = sorted(path.name for path in out_dir.iterdir())
    with pytest.raises(ShardInputError, match="truncated"):
        make_shards([str(source)], out_dir, docs_per_shard=100)
    assert sorted(path.name for path in out_dir.iterdir()) == before  # the previous build, whole
    assert json.loads((out_dir / "manifest.json").read_text()) == previous


def test_parquet_input(tmp_path: Path) -> None:
    records = [
        {"doc": f"p{index}", "body": f"parquet document {index}", "title": f"Title {index}"} for index in range(25)
    ]
    source = tmp_path / "docs.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), source, row_group_size=7)

    manifest = make_shards([str(source)], tmp_path / "out", docs_per_shard=10, text_field="body", id_field="doc")
    documents = read_shards(tmp_path / "out", manifest)
    assert [document["text"] for document in documents] == [record["body"] for record in records]
    assert [document["meta"] for document in documents] == [
        {"id": record["doc"], "title": record["title"]} for record in records
    ]


def test_parquet_without_the_text_column_is_a_clear_error(tmp_path: Path) -> None:
    source = tmp_path / "docs.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([{"content": "x"}]), source)
    with pytest.raises(ShardInputError, match=r"docs\.parquet.*'text'"):
        make_shards([str(source)], tmp_path / "out")


def test_hf_local_directory_input(tmp_path: Path) -> None:
    dataset_dir = tmp_path / "dataset"
    dataset_dir.mkdir()
    records = [
        {"id": f"h{index}", "text": f"hub document {index}", "annotated_text": f"ann {index}"} for index in range(6)
    ]
    write_jsonl(dataset_dir / "train.jsonl", records)

    manifest = make_shards([f"hf:{dataset_dir}"], tmp_path / "out", docs_per_shard=4)
    assert manifest["sources"] == [f"hf:{dataset_dir}"]
    assert read_shards(tmp_path / "out", manifest) == expected_documents(
        [{**record, "title": None} for record in records]
    )


def test_hf_spec_parsing(tmp_path: Path) -> None:
    assert parse_hf_spec("kilian-group/LMLM-pretrain-dwiki6.1M") == ("kilian-group/LMLM-pretrain-dwiki6.1M", "train")
    assert parse_hf_spec("kilian-group/LMLM-pretrain-dwiki6.1M:validation") == (
        "kilian-group/LMLM-pretrain-dwiki6.1M",
        "validation",
    )
    assert parse_hf_spec(str(tmp_path)) == (str(tmp_path), "train")
    assert parse_hf_spec(f"{tmp_path}:test") == (str(tmp_path), "test")


def test_every_kind_of_bad_record_is_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = [{"id": "g1", "text": "first good"}, {"id": "g2", "text": "second good"}]
    lines = [
        json.dumps(good[0]).encode(),
        b'{"id": "broken", "text": ',
        b'["a", "list"]',
        b'{"id": "no-text"}',
        b'{"id": "null-text", "text": null}',
        b'{"id": "number", "text": 42}',
        b'{"id": "empty", "text": ""}',
        b'{"id": "blank", "text": " \\n\\t "}',
        b'{"id": "surrogate", "text": "lone \\ud800 surrogate", "title": "T\\udfff"}',
        b'{"id": "surrogates", "text": "\\udc00\\udc01\\udc02 a"}',
        b'{"id": "bad-annotation", "text": "t", "annotated_text": ["x"]}',
        b'{"id": "latin1", "text": "caf\xe9"}',
        b"",
        json.dumps(good[1]).encode(),
    ]
    source = tmp_path / "mixed.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")

    with caplog.at_level(logging.WARNING, logger="lacy_stream.shards.make_shards"):
        manifest = make_shards([str(source)], tmp_path / "out")

    assert manifest["documents"] == 3
    assert manifest["skipped"] == {
        "empty_document": 2,
        "invalid_json": 1,
        "invalid_utf8": 2,
        "missing_text": 2,
        "non_string_annotated_text": 1,
        "non_string_text": 1,
        "not_an_object": 1,
    }
    # One lone surrogate costs a character, not the document; text that is mostly surrogates is skipped.
    assert manifest["repaired"] == {"lone_surrogate": 1}
    repaired = {"id": "surrogate", "title": "T\ufffd", "text": "lone \ufffd surrogate"}
    assert read_shards(tmp_path / "out", manifest) == expected_documents([good[0], repaired, good[1]])
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 11  # one per skip, then the share skipped, above the warning threshold
    assert warnings[-1].endswith("76.9% of the documents were skipped")
    assert any(f"{source}:2 (invalid_json)" in message for message in warnings)
    assert any(f"{source}:10 (invalid_utf8): mostly lone surrogates" in message for message in warnings)
    assert any(f"{source}:12 (invalid_utf8)" in message for message in warnings)


def test_missing_ids_become_global_ordinals(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"id": "named", "text": "two"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"text": "three"}])
    manifest = make_shards([str(first), str(second)], tmp_path / "out")
    documents = read_shards(tmp_path / "out", manifest)
    assert [document["meta"]["id"] for document in documents] == [0, "named", 2]
    assert [document["key"] for document in documents] == ["000000000", "000000001", "000000002"]


def test_rebuild_replaces_its_prefix_and_removes_stale_shards(tmp_path: Path) -> None:
    records = [{"id": index, "text": f"doc {index}"} for index in range(10)]
    source = write_jsonl(tmp_path / "docs.jsonl", records)
    out_dir = tmp_path / "out"
    make_shards([str(source)], out_dir, docs_per_shard=3)
    (out_dir / "other-000000.tar").write_bytes(b"not ours")
    (out_dir / "notes.txt").write_text("kept")

    manifest = make_shards([str(source)], out_dir, docs_per_shard=5, compress="zstd")
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "manifest.json",
        "notes.txt",
        "other-000000.tar",
        "shard-000000.tar.zst",
        "shard-000001.tar.zst",
    ]
    assert_manifest_matches_files(out_dir, manifest)
    assert read_shards(out_dir, manifest) == expected_documents(records)


def test_rebuild_keeps_the_users_files_and_the_directory_permissions(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS)
    out_dir = tmp_path / "out"
    make_shards([str(source)], out_dir, docs_per_shard=2)
    (out_dir / "tokenizer.model").write_bytes(b"model bytes")
    (out_dir / "extra").mkdir()
    (out_dir / "extra" / "notes.txt").write_text("kept")
    (out_dir / "latest").symlink_to("tokenizer.model")
    out_dir.chmod(0o750)

    manifest = make_shards([str(source)], out_dir, docs_per_shard=3)
    assert_manifest_matches_files(out_dir, manifest)
    assert (out_dir / "tokenizer.model").read_bytes() == b"model bytes"
    assert (out_dir / "extra" / "notes.txt").read_text() == "kept"
    assert os.readlink(out_dir / "latest") == "tokenizer.model"
    assert out_dir.stat().st_mode & 0o777 == 0o750
    assert sorted(path.name for path in tmp_path.iterdir()) == ["docs.jsonl", "out"]  # nothing left beside it


def test_an_out_dir_reached_through_a_symlink_stays_a_symlink(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", RECORDS)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    make_shards([str(source)], tmp_path / "link", docs_per_shard=2)
    manifest = make_shards([str(source)], tmp_path / "link", docs_per_shard=4)
    assert (tmp_path / "link").is_symlink()
    assert_manifest_matches_files(tmp_path / "real", manifest)


def test_an_out_dir_that_is_a_file_is_refused_before_building(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        make_shards([str(write_jsonl(tmp_path / "docs.jsonl", RECORDS))], tmp_path / "out")
    assert (tmp_path / "out").read_text() == "a file"


def test_input_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ShardInputError, match="no such file"):
        make_shards([str(tmp_path / "absent.jsonl")], tmp_path / "out")
    with pytest.raises(ShardInputError, match="unsupported input"):
        make_shards([str(write_jsonl(tmp_path / "docs.csv", RECORDS))], tmp_path / "out")
    with pytest.raises(ValueError, match="no inputs"):
        make_shards([], tmp_path / "out")
    with pytest.raises(ValueError, match="compress"):
        make_shards([str(write_jsonl(tmp_path / "docs.jsonl", RECORDS))], tmp_path / "out", compress="gzip")
    with pytest.raises(TooManySkipsError, match="no usable document"):
        make_shards([str(write_jsonl(tmp_path / "empty.jsonl", [{"text": " "}]))], tmp_path / "out")


def test_wikitext_conversion_keeps_prose_and_drops_markup() -> None:
    wikitext = (
        "{{Infobox person|name=X}}'''Ada''' ({{lang-fr|Ada}}; born 1815) was a [[mathematics|mathematician]]"
        " from [[London]].<ref>{{cite book|title=T}}</ref><!-- hidden -->\n"
        "[[File:Ada.jpg|thumb|A caption with a [[link]]\nover two lines]]\n"
        "== Early life ==\nShe met [[Charles Babbage]]&nbsp;in 1833.\n"
        '{| class="wikitable"\n|-\n| cell || cell\n|}\n'
        "* a listed [http://example.org work]\n"
        "== References ==\n{{reflist}}\n[[Category:Mathematicians]]\n[[de:Ada Lovelace]]\n"
    )
    assert wikitext_to_plain(wikitext) == (
        "Ada (born 1815) was a mathematician from London.\n\n"
        "Early life.\nShe met Charles Babbage\xa0in 1833.\na listed work"
    )


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("demo")
    return out_dir, make_shards([], out_dir, docs_per_shard=16, demo=True, prefix="wiki")


@pytest.mark.slow
def test_demo_corpus_gives_clean_articles(demo_build: tuple[Path, dict]) -> None:
    out_dir, manifest = demo_build
    assert manifest["documents"] > 50
    assert manifest["sources"] == ["demo:enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"]
    assert_manifest_matches_files(out_dir, manifest)
    documents = read_shards(out_dir, manifest)
    assert len(documents) == manifest["documents"]
    for document in documents:
        text, title = document["text"], document["meta"]["title"]
        assert isinstance(document["meta"]["id"], int)
        assert text.startswith(f"{title}\n\n")
        assert "#redirect" not in text.lower()
        for leftover in ("{{", "}}", "[[", "]]", "thumb|", "{|", "|}", "<ref", "<!--", "&nbsp;"):
            assert leftover not in text, (title, leftover)
        assert "\n\n\n" not in text
        assert text == text.strip()
    titles = [document["meta"]["title"] for document in documents]
    assert len(titles) == len(set(titles))
    assert {"Anarchism", "Autism", "Albedo"} <= set(titles)
    # The dump's first page, AccessibleComputing, is a redirect; its only non-article page is one too.
    assert "AccessibleComputing" not in titles
    assert not [title for title in titles if ":" in title]


@pytest.mark.needs_shared
def test_shared_dwiki_converts_with_annotations(tmp_path: Path) -> None:
    records = [json.loads(line) for line in DWIKI_DEV.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(records) == 749
    manifest = make_shards([str(DWIKI_DEV)], tmp_path / "out", docs_per_shard=200, compress="zstd")
    assert manifest["documents"] == 749
    assert manifest["skipped"] == {}
    documents = read_shards(tmp_path / "out", manifest)
    assert [document["meta"]["id"] for document in documents] == [record["id"] for record in records]
    assert [document["text"] for document in documents] == [record["text"] for record in records]
    assert [document["meta"]["annotated_text"] for document in documents] == [
        record["annotated_text"] for record in records
    ]
