"""``make-shards``, ``train-tokenizer`` and ``inspect``: shards built, a tokenizer trained on them, shards counted."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from ..config.job_config import DataConfig
from ..shards.streams import StreamOptions
from .arguments import add_max_skip_ratio, add_stream_arguments, stream_options_from_arguments
from .exit_status import UsageError


def add_make_shards_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="input files, or hf:NAME[:SPLIT] for a Hugging Face dataset")
    parser.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    parser.add_argument("--docs-per-shard", type=int, default=1000)
    parser.add_argument("--compress", choices=["none", "zstd"], default="none")
    parser.add_argument("--demo", action="store_true", help="the embedded demo corpus (gensim's Wikipedia excerpt)")
    parser.add_argument("--prefix", help="shard file prefix (default: shard, or wiki with --demo)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--id-field", default="id")
    parser.add_argument("--heldout-docs", type=int, default=0, metavar="N",
                        help="put the last N documents in OUT/heldout/ instead, shards of their own: a held-out split "
                             "for --train.val_shards, eval --heldout and compare --val-shards")
    add_max_skip_ratio(parser)


def run_make_shards(args: argparse.Namespace) -> int:
    from ..shards.make_shards import make_shards

    if not args.inputs and not args.demo:
        raise UsageError("give INPUT files or --demo")
    manifest = make_shards(
        args.inputs,
        Path(args.out),
        docs_per_shard=args.docs_per_shard,
        compress=None if args.compress == "none" else args.compress,
        demo=args.demo,
        prefix=args.prefix or ("wiki" if args.demo else "shard"),
        text_field=args.text_field,
        id_field=args.id_field,
        max_skip_ratio=args.max_skip_ratio,
        heldout_docs=args.heldout_docs,
    )
    heldout = manifest.get("heldout")
    print(
        f"wrote {len(manifest['shards'])} shards, {manifest['documents']} documents to {args.out}"
        + (f"; held out {heldout['documents']} documents in {Path(args.out) / heldout['path']}" if heldout else "")
        + (f"; skipped {manifest['skipped']}" if manifest.get("skipped") else "")
        + (f"; repaired {manifest['repaired']}" if manifest.get("repaired") else "")
    )
    return 0


def add_train_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    add_stream_arguments(parser)
    parser.add_argument("--vocab-size", type=int, required=True, help="SentencePiece pieces (<CALL> is added after them)")
    parser.add_argument("--out", required=True, help="output .model file")
    parser.add_argument("--max-docs", type=int, help="train on at most this many documents")


def run_train_tokenizer(args: argparse.Namespace) -> int:
    from ..tokenizer import train_tokenizer

    texts = document_texts(args.shards, stream_options_from_arguments(args), max_docs=args.max_docs,
                           max_skip_ratio=args.max_skip_ratio)
    tokenizer = train_tokenizer(texts, args.out, args.vocab_size)
    print(f"wrote {args.out}: {tokenizer.num_pieces} pieces, <CALL> = {tokenizer.call_id}, vocab {tokenizer.vocab_size}")
    return 0


def document_texts(source: str, options: StreamOptions, *, max_docs: int | None = None,
                   max_skip_ratio: float = DataConfig.max_skip_ratio) -> Iterator[str]:
    """The texts of ``source``'s documents (a record file or a shard spec), the first ``max_docs`` of them."""
    from ..shards.sources import read_documents

    documents = read_documents(source, options=options, max_skip_ratio=max_skip_ratio)
    return (document["text"] for document in islice(documents, max_docs))


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    add_stream_arguments(parser)
    parser.add_argument("--tokenizer", help="a SentencePiece model, to count tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_inspect(args: argparse.Namespace) -> int:
    from ..shards.documents import ReadStats
    from ..shards.inspection import inspect_shards
    from ..shards.specs import expand_shard_spec
    from ..tokenizer import Tokenizer

    options = stream_options_from_arguments(args)
    report = inspect_shards(
        expand_shard_spec(args.shards, options),
        options=options,
        tokenizer=Tokenizer(args.tokenizer) if args.tokenizer else None,
        max_doc_chars=args.max_doc_chars,
    )
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>14}: {value}")
    ReadStats.from_dict(report).check_skips(args.max_skip_ratio, args.shards)
    return 0
