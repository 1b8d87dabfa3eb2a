"""Shard reading: one webdataset tar shard -> its documents, with every bad sample a counted skip.

A sample is the group of consecutive tar members sharing a key (the member name up to the first dot of
its base name): ``{key}.txt`` holds the UTF-8 text, ``{key}.json`` the metadata (``id``, ``title``,
``annotated_text``). A shard that cannot be opened, or that breaks off (corrupt tar, truncated zstd,
dropped connection), ends with one skip naming the URL; the documents read before the break are kept.

Whatever one sample's members hold, decoding it ends in a document or in one counted skip of that sample,
never in an exception: text that is not UTF-8, metadata that is not a JSON object (malformed, nested too
deep, an integer too long to convert, not UTF-8), an ``annotated_text`` that is not a string. Lone
surrogates in the key or in the metadata's top-level strings become U+FFFD, a counted repair. A
``labels.npz`` member is passed on undecoded (the labeler checks it); members of other extensions are ignored.
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import BinaryIO, Iterator

from .documents import Document, ReadStats, repair_lone_surrogates, split_document
from .streams import HostUnreachableError, ShardOpenError, StreamOptions, TruncatedStreamError, open_shard

TEXT_MEMBER = "txt"
META_MEMBER = "json"
LABELS_MEMBER = "labels.npz"
"""Stored labels of a sample of an offline-annotated shard (written by ``lacy-stream annotate --shards``)."""


class TruncatedTarError(tarfile.ReadError):
    """The archive ended without its end-of-archive blocks: it was cut off at a member boundary."""


class _TailRecorder:
    """Passes reads through and remembers the last bytes read (tarfile accepts an archive that simply
    stops at a member boundary; its missing zero blocks are how such a cut shows)."""

    def __init__(self, stream: BinaryIO, keep: int) -> None:
        self._stream = stream
        self._keep = keep
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.tail = (self.tail + data)[-self._keep :]
        return data

    def drain(self) -> None:
        while self.read(1 << 16):
            pass


_END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)


def iter_tar_samples(stream: BinaryIO) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """Group a tar stream's regular-file members into samples ``(key, {extension: data})``.

    Raises :class:`TruncatedTarError` when the archive stops without its end-of-archive blocks; the
    sample being read at the cut is not yielded (it may be missing members).
    """
    recorder = _TailRecorder(stream, len(_END_OF_ARCHIVE))
    key, members = None, {}
    with tarfile.open(fileobj=recorder, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            directory, base = os.path.split(info.name)
            if base.startswith("."):
                continue
            stem, _, extension = base.partition(".")
            member_key = os.path.join(directory, stem)
            if member_key != key or extension in members:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            member_file = tar.extractfile(info)
            members[extension] = member_file.read() if member_file is not None else None
    recorder.drain()
    if recorder.tail != _END_OF_ARCHIVE:
        raise TruncatedTarError("the archive ends without its end-of-archive blocks (truncated)")
    if key is not None:
        yield key, members


def read_shard(
    url: str,
    shard: int,
    stats: ReadStats,
    *,
    options: StreamOptions = StreamOptions(),
    max_doc_chars: int = 1_000_000,
    start: int = 0,
    stride: int = 1,
    offset: int = 0,
    resumed: bool = False,
) -> Iterator[Document]:
    """Yield the documents of one shard, in order, as parts no longer than ``max_doc_chars``.

    Only samples whose index ``i`` satisfies ``i >= start`` and ``i % stride == offset`` are decoded
    (several data-loading workers can share a shard this way). With ``resumed``, the shard and the
    sample at ``start`` were already counted in ``stats`` by the run being resumed.
    """
    try:
        stream = open_shard(url, options)
    except ShardOpenError as error:
        reason = "host_unreachable" if isinstance(error, HostUnreachableError) else "unreachable_shard"
        stats.skip(reason, url, detail=str(error))
        return
    if not resumed:
        stats.shards += 1
    try:
        with stream:
            for index, (key, members) in enumerate(iter_tar_samples(stream)):
                if index < start or index % stride != offset:
                    continue
                counted_before = resumed and index == start
                document = _decode_sample(url, shard, index, key, members, ReadStats() if counted_before else stats)
                if document is None:
                    continue
                if not counted_before:
                    stats.docs += 1
                    stats.text_bytes += len(members[TEXT_MEMBER])
                    if len(document.text) > max_doc_chars:
                        stats.split_docs += 1
                yield from split_document(document, max_doc_chars)
    except TruncatedStreamError as error:
        stats.skip("truncated_stream", url, detail=str(error))
    except (tarfile.TarError, EOFError) as error:
        stats.skip("corrupt_tar", url, detail=f"{type(error).__name__}: {error}")
    except OSError as error:
        stats.skip("read_error", url, detail=f"{type(error).__name__}: {error}")


def _decode_sample(
    url: str, shard: int, index: int, key: str, members: dict[str, bytes | None], stats: ReadStats
) -> Document | None:
    data = members.get(TEXT_MEMBER)
    if data is None:
        stats.skip("missing_text", url, key, f"members: {sorted(members)}")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        stats.skip("invalid_utf8", url, f"{key}.{TEXT_MEMBER}", str(error))
        return None
    if not text.strip():
        stats.skip("empty_document", url, f"{key}.{TEXT_MEMBER}")
        return None
    meta: dict = {}
    if members.get(META_MEMBER) is not None:
        try:
            meta = _decode_metadata(members[META_MEMBER])
        except (ValueError, RecursionError) as error:
            stats.skip("invalid_metadata", url, f"{key}.{META_MEMBER}", f"{type(error).__name__}: {error}")
            return None
        annotated_text = meta.get("annotated_text")
        if annotated_text is not None and not isinstance(annotated_text, str):
            stats.skip("non_string_annotated_text", url, f"{key}.{META_MEMBER}", type(annotated_text).__name__)
            return None
    key, *values = repair_lone_surrogates([key, *meta.values()], f"{url}:{key}", stats)
    meta = dict(zip(meta, values))
    return Document(text=text, key=key, url=url, shard=shard, index=index, meta=meta, labels=members.get(LABELS_MEMBER))


def _decode_metadata(data: bytes) -> dict:
    """The ``.json`` member as a dict; raises ``ValueError`` (undecodable, not an object) or ``RecursionError``
    (nested deeper than the parser's recursion limit)."""
    meta = json.loads(data.decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    return meta
