"""``lacy-stream inspect``: read shards once, as the trainer would, and count what is in them."""

from __future__ import annotations

import time

from ..tokenizer import Tokenizer
from .documents import ReadStats
from .shard_reader import read_shard
from .streams import StreamOptions


def inspect_shards(
    urls: list[str],
    *,
    options: StreamOptions = StreamOptions(),
    tokenizer: Tokenizer | None = None,
    max_doc_chars: int = 1_000_000,
) -> dict:
    """Counts for one pass over ``urls``: documents (a split document counts once), document parts, text
    bytes, tokens (with a tokenizer; EOS included), skips by reason, and read throughput."""
    stats = ReadStats()
    parts = 0
    tokens = 0
    started = time.perf_counter()
    for shard, url in enumerate(urls):
        for doc in read_shard(url, shard, stats, options=options, max_doc_chars=max_doc_chars):
            parts += 1
            if tokenizer is not None:
                tokens += len(tokenizer.encode(doc.text)) + (1 if doc.is_last_part else 0)
    seconds = time.perf_counter() - started
    report = stats.as_dict()
    report["parts"] = parts
    if tokenizer is not None:
        report["tokens"] = tokens
    report["seconds"] = round(seconds, 3)
    report["docs_per_s"] = round(stats.docs / seconds, 1) if seconds > 0 else None
    report["text_mb_per_s"] = round(stats.text_bytes / 1e6 / seconds, 2) if seconds > 0 else None
    return report
