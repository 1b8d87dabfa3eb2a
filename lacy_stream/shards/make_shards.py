"""Building webdataset shards from raw-text corpora.

Inputs are ``.jsonl`` / ``.jsonl.zst`` files, ``.parquet`` files, Hugging Face datasets (``hf:NAME``,
``hf:NAME:SPLIT`` or ``hf:LOCAL_DIR``) and the embedded demo corpus. Every input is read as a stream of
records ``{"id", "title", "text", "annotated_text"?}``; a record that cannot become a document is counted
and logged under a reason, never dropped silently; the build fails when more than ``max_skip_ratio`` of
the records (by default: all of them) are skipped. Lone surrogates (a JSON ``"\ud800"`` escape, which
UTF-8 cannot hold) are replaced by U+FFFD and the repair counted.

Each document becomes one tar sample: ``{key}.txt`` holds the UTF-8 text and ``{key}.json`` holds
``{"id", "title", "annotated_text"?}``, where the key is the 9-digit zero-padded global document ordinal.
Shards are ``{prefix}-{index:06d}.tar`` (``.tar.zst`` when zstd-compressed as a whole) and
``manifest.json`` lists them with their document count, size and sha256. Builds are reproducible: the
same inputs give byte-identical shards. With ``heldout_docs`` the last documents of the inputs go to
``heldout/`` inside the output directory instead, shards with a manifest of their own: a held-out split for
``train.val_shards``, ``eval --heldout`` and ``compare --val-shards``.

Publishing (``publish_shards``, shared with ``annotate --shards``): a build is written into a staging directory
beside the output directory and, once complete with its manifest, takes the output directory's place whole
(``lacy_stream.atomic.replace_directory``). A reader of the output directory finds the previous build or the new
one, each with a manifest that matches its shards, never a mix (on file systems that cannot swap two paths in one
step the directory can be missing for a moment; see ``lacy_stream.atomic``); a run killed while publishing is
completed by the next one. Files of the output directory that are not a build's own (the manifest, the shards of
the build's prefix and partial files next to them) are carried into the new directory, so a tokenizer or notes kept
there stay; shards of the prefix that the new build did not write go with the old directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import deque
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator

import zstandard

from ..atomic import replace_directory, staging_directory
from .demo_corpus import DEMO_SOURCE, iter_demo_documents
from .documents import LONE_SURROGATE, MAX_SKIP_RATIO, ReadStats, repair_lone_surrogates
from .shard_reader import LABELS_MEMBER
from .specs import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION
from .streams import ShardOpenError, TruncatedStreamError, open_shard

log = logging.getLogger(__name__)

COMPRESSIONS = ("none", "zstd")
HELDOUT_DIRECTORY = "heldout"

# A fixed member mtime keeps the tar bytes, hence the sha256, independent of the build time.
_TAR_MTIME = 0
_ZSTD_LEVEL = 3
_PARQUET_BATCH_ROWS = 1024
_KEY_DIGITS = 9
_HF_DEFAULT_SPLIT = "train"
_UTF8_BOM = b"\xef\xbb\xbf"


class ShardInputError(ValueError):
    """An input that cannot be read at all: missing, of an unknown kind, truncated or corrupt."""


@dataclass(frozen=True)
class FieldNames:
    """Where a record keeps its text and id; ``title`` and ``annotated_text`` have fixed names."""

    text: str = "text"
    id: str = "id"


def make_shards(
    inputs: list[str],
    out_dir: Path,
    *,
    docs_per_shard: int = 1000,
    compress: str | None = None,
    demo: bool = False,
    prefix: str = "shard",
    text_field: str = "text",
    id_field: str = "id",
    max_skip_ratio: float = MAX_SKIP_RATIO,
    heldout_docs: int = 0,
) -> dict:
    """Builds shards + manifest.json in out_dir; returns the manifest dict.

    ``inputs`` are read in order, then the demo corpus when ``demo`` is set; the last ``heldout_docs`` documents
    go to ``out_dir/heldout`` (the manifest's ``heldout``: its path and documents). Shards are written into a
    staging directory and published only when the build succeeds (see ``publish_shards``); a failed build
    leaves ``out_dir`` as it was. Raises ``TooManySkipsError`` when more than ``max_skip_ratio`` of the
    records were skipped or none is usable.
    """
    if docs_per_shard < 1:
        raise ValueError(f"docs_per_shard must be at least 1, got {docs_per_shard}")
    if heldout_docs < 0:
        raise ValueError(f"heldout_docs must not be negative, got {heldout_docs}")
    compression = compress or "none"
    if compression not in COMPRESSIONS:
        raise ValueError(f"compress must be one of {', '.join(COMPRESSIONS)}, got {compress!r}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a plain file name prefix, got {prefix!r}")
    if not inputs and not demo:
        raise ValueError("no inputs given (pass input files, hf:NAME datasets or demo=True)")
    for source in inputs:
        check_source(source)

    out_dir = Path(out_dir)
    fields = FieldNames(text=text_field, id=id_field)
    skips = ReadStats()
    with shard_staging(out_dir) as staging:
        records = _iter_all_records(inputs, demo, fields, skips)
        heldout_records: deque[dict] = deque()
        shards = _write_shards(_holding_back(records, heldout_docs, heldout_records), staging, prefix, compression,
                               docs_per_shard)
        documents = sum(shard["documents"] for shard in shards)
        skips.docs = documents + len(heldout_records)
        skips.check_skips(max_skip_ratio, "the inputs")
        if heldout_records and not shards:
            raise ShardInputError(f"all {len(heldout_records)} documents were held out (heldout_docs={heldout_docs}): "
                                  "none is left to train on")
        sources = [*inputs, *([DEMO_SOURCE] if demo else [])]
        manifest = _manifest(documents, skips, sources, shards)
        if heldout_records:
            heldout = staging / HELDOUT_DIRECTORY
            heldout.mkdir()
            heldout_shards = _write_shards(heldout_records, heldout, prefix, compression, docs_per_shard)
            heldout_manifest = _manifest(len(heldout_records), ReadStats(), sources, heldout_shards)
            (heldout / MANIFEST_NAME).write_text(json.dumps(heldout_manifest, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
            manifest["heldout"] = {"path": HELDOUT_DIRECTORY, "documents": len(heldout_records)}
        publish_shards(staging, out_dir, prefix, manifest)
    log.info("wrote %d documents in %d shards to %s (skipped: %s)", documents, len(shards), out_dir, manifest["skipped"])
    return manifest


def _manifest(documents: int, skips: ReadStats, sources: list[str], shards: list[dict]) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "documents": documents,
        "skipped": dict(sorted(skips.skipped.items())),
        "repaired": dict(sorted(skips.repaired.items())),
        "sources": sources,
        "shards": shards,
    }


def _holding_back(records: Iterable[dict], count: int, held_back: deque[dict]) -> Iterator[dict]:
    """``records`` but their last ``count``, which end up in ``held_back`` once the records are exhausted."""
    for record in records:
        held_back.append(record)
        if len(held_back) > count:
            yield held_back.popleft()


def check_source(source: str) -> None:
    """Fails fast on an input that is neither an ``hf:`` dataset nor an existing file of a known kind."""
    if source.startswith("hf:"):
        if not source[3:]:
            raise ShardInputError("hf: needs a dataset name or a local directory, as in hf:NAME[:SPLIT]")
        return
    if _file_kind(source) is None:
        raise ShardInputError(f"{source}: unsupported input; expected .jsonl, .jsonl.zst, .parquet or hf:NAME[:SPLIT]")
    if not Path(source).is_file():
        raise ShardInputError(f"{source}: no such file")


def _file_kind(source: str) -> str | None:
    name = source.lower()
    for suffix in (".jsonl.zst", ".jsonl", ".parquet"):
        if name.endswith(suffix):
            return suffix
    return None


def iter_source_records(source: str, fields: FieldNames, skips: ReadStats) -> Iterator[dict]:
    """Yields the records of one input; a missing id is ``None`` (the shard builder numbers it)."""
    check_source(source)
    if source.startswith("hf:"):
        yield from iter_hf_records(source[3:], fields, skips)
        return
    if _file_kind(source) == ".parquet":
        yield from iter_parquet_records(Path(source), fields, skips)
    else:
        yield from iter_jsonl_records(Path(source), fields, skips)


def _iter_all_records(inputs: list[str], demo: bool, fields: FieldNames, skips: ReadStats) -> Iterator[dict]:
    for source in inputs:
        log.info("reading %s", source)
        yield from iter_source_records(source, fields, skips)
    if demo:
        log.info("reading the demo corpus")
        for document in iter_demo_documents():
            record = record_from_object(document, f"{DEMO_SOURCE} page {document['id']}", FieldNames(), skips)
            if record is not None:
                yield record


def iter_jsonl_records(path: Path, fields: FieldNames, skips: ReadStats) -> Iterator[dict]:
    """Reads a ``.jsonl`` or ``.jsonl.zst`` file line by line; each line is decoded as strict UTF-8."""
    try:
        with open_shard(str(path)) as stream:
            for line_number, line in enumerate(stream, start=1):
                if line_number == 1:
                    line = line.removeprefix(_UTF8_BOM)
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    decoded = line.decode("utf-8")
                except UnicodeDecodeError as error:
                    skips.skip("invalid_utf8", where, detail=str(error))
                    continue
                try:
                    obj = json.loads(decoded)
                except (ValueError, RecursionError) as error:
                    skips.skip("invalid_json", where, detail=str(error))
                    continue
                record = record_from_object(obj, where, fields, skips)
                if record is not None:
                    yield record
    except (ShardOpenError, TruncatedStreamError) as error:
        raise ShardInputError(str(error)) from error


def iter_parquet_records(path: Path, fields: FieldNames, skips: ReadStats) -> Iterator[dict]:
    """Reads a parquet file batch by batch, loading only the columns a record uses."""
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowException as error:
        raise ShardInputError(f"{path}: not a readable parquet file: {error}") from error
    available = parquet.schema_arrow.names
    if fields.text not in available:
        raise ShardInputError(f"{path}: no column {fields.text!r} (columns: {', '.join(available)})")
    wanted = dict.fromkeys((fields.text, fields.id, "title", "annotated_text"))
    columns = [name for name in wanted if name in available]
    row_number = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                record = record_from_object(row, f"{path} row {row_number}", fields, skips)
                row_number += 1
                if record is not None:
                    yield record
    except pyarrow.ArrowException as error:
        raise ShardInputError(f"{path}: unreadable parquet data after row {row_number}: {error}") from error


def parse_hf_spec(spec: str) -> tuple[str, str]:
    """``NAME``, ``NAME:SPLIT`` or a local directory (optionally ``DIR:SPLIT``) -> (name or path, split)."""
    if Path(spec).exists():
        return spec, _HF_DEFAULT_SPLIT
    name, colon, split = spec.rpartition(":")
    if colon and name and split:
        return name, split
    return spec, _HF_DEFAULT_SPLIT


def iter_hf_records(spec: str, fields: FieldNames, skips: ReadStats) -> Iterator[dict]:
    """Streams one split of a Hugging Face dataset (a hub name or a local directory of jsonl/parquet files)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("hf: inputs need the datasets package: pip install 'lacy-stream[hf]'") from error
    name, split = parse_hf_spec(spec)
    for row_number, row in enumerate(datasets.load_dataset(name, split=split, streaming=True)):
        record = record_from_object(row, f"hf:{name}:{split} row {row_number}", fields, skips)
        if record is not None:
            yield record


def record_from_object(obj: object, where: str, fields: FieldNames, skips: ReadStats) -> dict | None:
    """Validates one input object into a record, or counts and logs why it cannot be one."""
    if not isinstance(obj, dict):
        skips.skip("not_an_object", where, detail=type(obj).__name__)
        return None
    text = obj.get(fields.text)
    if text is None:
        skips.skip("missing_text", where, detail=f"no {fields.text!r} field")
        return None
    if not isinstance(text, str):
        skips.skip("non_string_text", where, detail=type(text).__name__)
        return None
    if not text.strip():
        skips.skip("empty_document", where)
        return None
    if len(LONE_SURROGATE.findall(text)) > len(text) / 2:
        skips.skip("invalid_utf8", where, detail="mostly lone surrogates")
        return None
    annotated_text = obj.get("annotated_text")
    if annotated_text is not None and not isinstance(annotated_text, str):
        skips.skip("non_string_annotated_text", where, detail=type(annotated_text).__name__)
        return None
    title = obj.get("title")
    if title is not None and not isinstance(title, str):
        title = str(title)
    doc_id = obj.get(fields.id)
    if doc_id is not None and not isinstance(doc_id, (str, int, float)):
        doc_id = str(doc_id)
    text, title, annotated_text, doc_id = repair_lone_surrogates([text, title, annotated_text, doc_id], where, skips)
    record = {"id": doc_id, "title": title, "text": text}
    if annotated_text is not None:
        record["annotated_text"] = annotated_text
    if isinstance(obj.get("source"), str):  # where a document of a mixed corpus comes from (packaged_corpus)
        record["source"] = obj["source"]
    return record


def shard_name(prefix: str, index: int, compression: str) -> str:
    return f"{prefix}-{index:06d}.tar{'.zst' if compression == 'zstd' else ''}"


def _write_shards(
    records: Iterable[dict], out_dir: Path, prefix: str, compression: str, docs_per_shard: int
) -> list[dict]:
    shards: list[dict] = []
    shard: ShardFile | None = None
    try:
        for ordinal, record in enumerate(records):
            if shard is None:
                shard = ShardFile(out_dir / shard_name(prefix, len(shards), compression), compression)
            shard.write(ordinal, record)
            if shard.documents == docs_per_shard:
                shards.append(shard.finish())
                shard = None
        if shard is not None:
            shards.append(shard.finish())
            shard = None
    finally:
        if shard is not None:
            shard.abort()
    return shards


class _HashingWriter:
    """Passes bytes through to a file while hashing them, so that a shard is never read back."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()


class ShardFile:
    """One shard being written under a temporary name, renamed into place once complete."""

    def __init__(self, path: Path, compression: str) -> None:
        # Importing webdataset pulls in torch; only a build needs it.
        from webdataset import TarWriter

        self.path = path
        self.temp_path = path.with_name(f".{path.name}.partial")
        self.documents = 0
        self._file = open(self.temp_path, "wb")
        self._hashing = _HashingWriter(self._file)
        self._zstd = (
            zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True).stream_writer(self._hashing, closefd=False)
            if compression == "zstd"
            else None
        )
        self._tar = TarWriter(self._zstd if self._zstd is not None else self._hashing, encoder=False, mtime=_TAR_MTIME)

    def write(self, ordinal: int, record: dict) -> None:
        doc_id = record["id"] if record["id"] is not None else ordinal
        meta = {"id": doc_id, "title": record["title"]}
        if "annotated_text" in record:
            meta["annotated_text"] = record["annotated_text"]
        sample = {
            "__key__": f"{ordinal:0{_KEY_DIGITS}d}",
            "txt": record["text"].encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        }
        if "labels" in record:
            sample[LABELS_MEMBER] = record["labels"]
        self._tar.write(sample)
        self.documents += 1

    def finish(self) -> dict:
        self._tar.close()
        if self._zstd is not None:
            self._zstd.close()
        self._file.close()
        os.replace(self.temp_path, self.path)
        log.info("wrote %s (%d documents)", self.path, self.documents)
        return {
            "name": self.path.name,
            "documents": self.documents,
            "bytes": self.path.stat().st_size,
            "sha256": self._hashing.sha256.hexdigest(),
        }

    def abort(self) -> None:
        # The writers are closed before the file, or their finalizers would write to a closed file.
        for writer in (self._tar, self._zstd):
            if writer is not None:
                with suppress(Exception):
                    writer.close()
        self._file.close()
        self.temp_path.unlink(missing_ok=True)


@contextmanager
def shard_staging(out_dir: Path) -> Iterator[Path]:
    """The staging directory for a build of ``out_dir``, beside it; what a killed build left is recovered first."""
    target = out_dir.resolve()  # a symlinked out_dir stays a link to the directory that is replaced
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{out_dir} is not a directory")
    with staging_directory(target.parent, target.name) as staging:
        yield staging


def publish_shards(staging: Path, out_dir: Path, prefix: str, manifest: dict) -> None:
    """Writes ``manifest`` into ``staging`` (from ``shard_staging``), which holds its shards, and puts ``staging`` in
    the place of ``out_dir``, carrying over the files that are not a build's own (see ``_is_build_file``): shards of
    ``prefix`` that the new build did not write go with the old directory."""
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    replace_directory(staging, out_dir.resolve(), carry=lambda name: not _is_build_file(name, prefix))


def _is_build_file(name: str, prefix: str) -> bool:
    """The manifest, the shards of ``prefix`` (either compression), the held-out split (an old one would hold documents
    the new build trains on), and the partial files and staging directories that killed builds of the earlier in-place
    publishing left among them."""
    own = rf"{re.escape(MANIFEST_NAME)}|{re.escape(prefix)}-\d{{6}}\.tar(\.zst)?"
    if name == HELDOUT_DIRECTORY:
        return True
    left_by_killed_builds = rf"\.({own})\.partial|\.{re.escape(prefix)}\.partial-.+"
    return re.fullmatch(rf"{own}|{left_by_killed_builds}", name) is not None
