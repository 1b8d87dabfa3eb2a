"""Shard streaming throughput, measured side by side in one run.

Builds the same corpus as plain tar and as zstd shards in a temporary directory, then measures:
- reading (tar -> documents, one process): local tar, local tar.zst, tar over loopback http;
- the loader (reading + SentencePiece + packing into windows) with 0, 1 and 2 dataloader workers, without
  fact annotation (``lacy-stream bench annotate`` measures that).

    python scripts/bench_streaming.py                      # the demo corpus (gensim's Wikipedia excerpt)
    python scripts/bench_streaming.py --input ../shared/data/dwiki-dev.jsonl --json
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import tempfile
import threading
import time
from pathlib import Path

from lacy_stream.config.job_config import AnnotationConfig
from lacy_stream.data.loader import TokenLoader
from lacy_stream.markdown import markdown_table
from lacy_stream.shards.documents import ReadStats
from lacy_stream.shards.make_shards import make_shards
from lacy_stream.shards.shard_reader import read_shard
from lacy_stream.shards.specs import expand_shard_spec
from lacy_stream.tokenizer import train_tokenizer


def read_throughput(urls: list[str], passes: int) -> dict:
    stats = ReadStats()
    started = time.perf_counter()
    for _ in range(passes):
        for shard, url in enumerate(urls):
            for _doc in read_shard(url, shard, stats):
                pass
    seconds = time.perf_counter() - started
    return {
        "docs_per_s": round(stats.docs / seconds),
        "text_mb_per_s": round(stats.text_bytes / 1e6 / seconds, 1),
        "skipped": sum(stats.skipped.values()),
    }


def loader_throughput(urls: list[str], tokenizer: str, workers: int, batches: int, seq_len: int) -> dict:
    loader = TokenLoader(
        urls, tokenizer, seq_len=seq_len, batch_size=8, num_workers=workers,
        annotation=AnnotationConfig(enabled=False, cache=False),
    )
    iterator = iter(loader)
    next(iterator)  # worker start-up
    started = time.perf_counter()
    tokens = sum(next(iterator)["tokens"].numel() for _ in range(batches))
    seconds = time.perf_counter() - started
    return {"tokens_per_s": round(tokens / seconds)}


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="a .jsonl/.jsonl.zst/.parquet corpus (default: the demo corpus)")
    parser.add_argument("--passes", type=int, default=5, help="read passes over the shards")
    parser.add_argument("--batches", type=int, default=100, help="loader batches (8 x seq_len tokens) per setting")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        inputs = [args.input] if args.input else []
        manifest = make_shards(inputs, root / "tar", docs_per_shard=64, demo=not args.input, prefix="bench")
        make_shards(inputs, root / "zst", docs_per_shard=64, compress="zstd", demo=not args.input, prefix="bench")
        tokenizer = str(root / "tokenizer.model")
        train_tokenizer((doc.text for doc in read_shard(expand_shard_spec(str(root / "tar"))[0], 0, ReadStats())), tokenizer, 8000)

        server, base = serve(root / "tar")
        try:
            results = {
                "corpus": args.input or "demo",
                "documents": manifest["documents"],
                "shards": len(manifest["shards"]),
                "read": {
                    "tar": read_throughput(expand_shard_spec(str(root / "tar")), args.passes),
                    "tar.zst": read_throughput(expand_shard_spec(str(root / "zst")), args.passes),
                    "http tar": read_throughput(expand_shard_spec(f"{base}/manifest.json"), args.passes),
                },
                "loader": {
                    f"{workers} workers": loader_throughput(
                        expand_shard_spec(str(root / "tar")), tokenizer, workers, args.batches, args.seq_len
                    )
                    for workers in (0, 1, 2)
                },
            }
        finally:
            server.shutdown()

    if args.json:
        print(json.dumps(results))
        return
    print(f"corpus: {results['corpus']} ({results['documents']} documents, {results['shards']} shards)\n")
    print(markdown_table(["read (1 process)", "docs/s", "text MB/s"],
                         [[name, row["docs_per_s"], row["text_mb_per_s"]] for name, row in results["read"].items()]))
    print()
    print(markdown_table([f"loader (seq_len {args.seq_len}, batch 8)", "tokens/s"],
                         [[name, row["tokens_per_s"]] for name, row in results["loader"].items()]))


if __name__ == "__main__":
    main()
