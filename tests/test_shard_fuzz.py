"""Fuzzed shards: whatever one sample's members hold, it ends as a document or as one counted skip.

Shards are built from seeded random choices among adversarial members (JSON nested past the parser's
recursion limit, integers too long to convert, lone surrogates, NUL bytes, text that is not UTF-8, empty
members, odd extensions, repeated keys, stored labels that are not a zip) and random bytes; then whole
shards are damaged at random, where a break may cost the rest of the shard but must not raise.
"""

from __future__ import annotations

import io
import json
import random
import tarfile

import numpy as np
import pytest
from helpers import synthetic_text

from lacy_stream.cli import EXIT_TOO_MANY_SKIPS, main
from lacy_stream.shards.documents import DOCUMENT_SKIP_REASONS, SHARD_SKIP_REASONS, ReadStats
from lacy_stream.shards.shard_reader import LABELS_MEMBER, read_shard

PARSER_BREAKERS = [
    b"[" * 100_000,
    b'{"a": ' * 50_000,
    b'{"id": ' + b"9" * 5000 + b"}",
    b'{"id": -' + b"1" * 4301 + b"}",
]
"""JSON the parser fails on with an exception other than a decode error: recursion, integer conversion."""
METADATA = [
    *PARSER_BREAKERS,
    b'{"id": 1e999, "title": -1e999}',
    b'{"id": "\\ud800", "title": "x\\udfff", "annotated_text": "\\udc00 born"}',
    b'{"id": "nul \\u0000 escaped"}',
    b'{"id": "raw nul \x00"}',
    b'{"id": 1}\x00',
    b"\xff\xfe{}",
    '{"id": 1}'.encode("utf-16"),
    b"",
    b"null",
    b"[]",
    b'"a string"',
    b"NaN",
    b'{"annotated_text": 5}',
    b'{"annotated_text": null, "title": {"nested": [1, {"deeper": [null]}]}}',
    b'{"id": 1, "id": 2, "title": "repeated key"}',
    b'{"id": "ok", "annotated_text": "[dblookup(\'A\', \'B\') -> 1900] 1900"}',
]
TEXTS = [
    b"",
    b" \n\t ",
    b"\xff\xfe not UTF-8",
    b"encoded surrogate \xed\xa0\x80 here",
    b"a NUL \x00 byte",
    b"\xef\xbb\xbfa byte order mark",
    "latin-1 caf\u00e9".encode("latin-1"),
    bytes(range(256)),
]
ODD_EXTENSIONS = ["TXT", "txt.gz", "json.bak", "", "npz", "x" * 60, "tar", "txt~", "JSON"]


def real_labels() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, identity=np.array("some labeler"), part_lengths=np.array([1]))
    return buffer.getvalue()


LABELS = [b"", b"not a zip", b"PK\x03\x04 a broken zip", real_labels()]


def random_member(rng: random.Random, choices: list[bytes], good: bytes) -> bytes:
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(choices)
    if roll < 0.7:
        return rng.randbytes(rng.randint(0, 300))
    return good


def random_sample(rng: random.Random, number: int) -> dict[str, bytes]:
    members = {}
    if rng.random() < 0.9:
        members["txt"] = random_member(rng, TEXTS, synthetic_text(rng, 2).encode())
    if rng.random() < 0.8:
        members["json"] = random_member(rng, METADATA, json.dumps({"id": number, "title": "T"}).encode())
    if rng.random() < 0.2:
        members[LABELS_MEMBER] = rng.choice(LABELS)
    if rng.random() < 0.2:
        members[rng.choice(ODD_EXTENSIONS)] = rng.randbytes(rng.randint(0, 50))
    return members or {"json": b"{}"}


def fuzzed_samples(seed: int, count: int) -> list[tuple[str, dict[str, bytes]]]:
    """``count`` samples; about one in twenty repeats the key and members of the one before (a sample of
    its own: a repeated member starts a new sample)."""
    rng = random.Random(seed)
    samples = []
    for number in range(count):
        if samples and rng.random() < 0.05:
            samples.append(samples[-1])
        else:
            key = f"{number:06d}" if rng.random() < 0.95 else f"{number:06d}\udcff"  # a name that is not UTF-8
            samples.append((key, random_sample(rng, number)))
    return samples


def shard_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A tar of the samples' members as they are (webdataset's writer would compress a ``.gz`` member)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def read_all(path) -> tuple[list, ReadStats]:
    stats = ReadStats()
    return list(read_shard(str(path), 0, stats, max_doc_chars=200)), stats


@pytest.mark.parametrize("seed", range(5))
def test_every_fuzzed_sample_is_a_document_or_a_counted_skip(tmp_path, seed):
    samples = fuzzed_samples(seed, 300)
    path = tmp_path / "fuzzed.tar"
    path.write_bytes(shard_bytes(samples))
    docs, stats = read_all(path)

    document_skips = sum(stats.skipped[reason] for reason in DOCUMENT_SKIP_REASONS)
    assert stats.docs + document_skips == len(samples)
    assert not any(stats.skipped[reason] for reason in SHARD_SKIP_REASONS)
    assert stats.docs > 30 and document_skips > 30  # the mix is really mixed
    assert len({doc.index for doc in docs}) == stats.docs
    assert stats.repaired["lone_surrogate"] > 0
    for doc in docs:
        key, members = samples[doc.index]
        assert doc.text in members["txt"].decode("utf-8")
        assert doc.labels == members.get(LABELS_MEMBER)
        doc.key.encode("utf-8")  # every string a document hands on can be written out as UTF-8
        for value in doc.meta.values():
            if isinstance(value, str):
                value.encode("utf-8")
        assert isinstance(doc.meta.get("annotated_text", ""), (str, type(None)))


@pytest.mark.parametrize("seed", range(3))
def test_damaged_shards_never_raise(tmp_path, seed):
    """Bytes overwritten anywhere, or a shard cut short: the samples before a break are read, the rest of the
    shard is at most one shard skip."""
    rng = random.Random(seed)
    data = shard_bytes(fuzzed_samples(seed, 40))
    path = tmp_path / "damaged.tar"
    for _ in range(100):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        if rng.random() < 0.3:
            damaged = damaged[: rng.randrange(len(damaged))]
        path.write_bytes(bytes(damaged))
        _, stats = read_all(path)
        assert sum(stats.skipped[reason] for reason in SHARD_SKIP_REASONS) <= 1
    path.write_bytes(rng.randbytes(10_000))
    docs, stats = read_all(path)
    assert not docs and stats.skipped == {"corrupt_tar": 1}


def test_inspect_of_a_fuzzed_shard_counts_its_skips_and_exits_without_a_traceback(tmp_path, capsys):
    samples = fuzzed_samples(0, 300)
    path = tmp_path / "fuzzed.tar"
    path.write_bytes(shard_bytes(samples))
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--shards", str(path), "--json"])
    assert exit_info.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["docs"] + sum(report["skipped"].values()) == len(samples)

    junk = [(f"{number:03d}", {"txt": b"fine text", "json": meta}) for number, meta in enumerate(PARSER_BREAKERS)]
    path.write_bytes(shard_bytes(junk))
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--shards", str(path), "--json"])
    assert exit_info.value.code == EXIT_TOO_MANY_SKIPS
    output = capsys.readouterr()
    assert json.loads(output.out)["docs"] == 0
    assert "Traceback" not in output.err and "no usable document" in output.err.splitlines()[-1]
