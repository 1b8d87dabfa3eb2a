"""Documents from any source a command takes: a record file (``.jsonl``, ``.jsonl.zst``, ``.parquet``, ``hf:NAME``),
read as ``make-shards`` reads it, or a shard spec, read as the trainer reads it. Either way a bad record or sample
is a counted, logged skip, and a document the shard reader cut into parts comes back whole."""

from __future__ import annotations

from collections.abc import Iterator

from .documents import ReadStats
from .make_shards import FieldNames, iter_source_records
from .shard_reader import read_shard
from .specs import expand_shard_spec
from .streams import StreamOptions

RECORD_FILE_SUFFIXES = (".jsonl", ".jsonl.zst", ".parquet")


def read_documents(
    source: str, *, options: StreamOptions = StreamOptions(), max_skip_ratio: float | None = None
) -> Iterator[dict]:
    """``{"id", "text"}`` records (and ``annotated_text``, and for record files ``source``, where the source has
    them) of ``source``, in order.

    With ``max_skip_ratio``, a source read to its end is checked as ``ReadStats.check_skips`` checks it.
    """
    stats = ReadStats()
    if source.startswith("hf:") or source.lower().endswith(RECORD_FILE_SUFFIXES):
        for record in iter_source_records(source, FieldNames(), stats):
            stats.docs += 1  # the shard reader counts its own; the record readers leave it to the caller
            yield {key: value for key, value in record.items() if key in ("id", "text", "annotated_text", "source")}
    else:
        parts: list[str] = []
        for shard, url in enumerate(expand_shard_spec(source, options)):
            for document in read_shard(url, shard, stats, options=options):
                parts.append(document.text)
                if document.is_last_part:
                    record = {"id": document.meta.get("id", document.key), "text": "".join(parts)}
                    if document.meta.get("annotated_text") is not None:
                        record["annotated_text"] = document.meta["annotated_text"]
                    yield record
                    parts = []
    if max_skip_ratio is not None:
        stats.check_skips(max_skip_ratio, source)
