"""The ``lacy-stream`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config.job_config import ConfigError, DataConfig, load_job_config

DEMO_DIR = Path("shards/demo")
DEMO_VOCAB_SIZE = 8000


def _add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard URL spec (file, directory, brace range, http(s)://, ::)")
    parser.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (runs a shell command)")
    parser.add_argument("--max-doc-chars", type=int, default=DataConfig.max_doc_chars)


def _options_from_arguments(args: argparse.Namespace):
    from .data.urls import StreamOptions

    return StreamOptions(allow_pipe=args.allow_pipe)


def cmd_make_shards(args: argparse.Namespace) -> int:
    from .data.make_shards import make_shards

    if not args.inputs and not args.demo:
        raise SystemExit("make-shards: give INPUT files or --demo")
    manifest = make_shards(
        args.inputs,
        Path(args.out),
        docs_per_shard=args.docs_per_shard,
        compress=None if args.compress == "none" else args.compress,
        demo=args.demo,
        prefix=args.prefix or ("wiki" if args.demo else "shard"),
        text_field=args.text_field,
        id_field=args.id_field,
    )
    print(
        f"wrote {len(manifest['shards'])} shards, {manifest['documents']} documents to {args.out}"
        + (f"; skipped {manifest['skipped']}" if manifest.get("skipped") else "")
    )
    return 0


def _document_texts(urls: list[str], options, max_docs: int | None = None, max_doc_chars: int = DataConfig.max_doc_chars):
    from .data.documents import ReadStats
    from .data.shard_reader import read_shard

    stats = ReadStats()
    for shard, url in enumerate(urls):
        for doc in read_shard(url, shard, stats, options=options, max_doc_chars=max_doc_chars):
            if max_docs is not None and stats.docs > max_docs:
                return
            yield doc.text


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from .data.urls import expand_shard_spec
    from .tokenizer import train_tokenizer

    options = _options_from_arguments(args)
    urls = expand_shard_spec(args.shards, options)
    texts = _document_texts(urls, options, args.max_docs, args.max_doc_chars)
    tokenizer = train_tokenizer(texts, args.out, args.vocab_size)
    print(f"wrote {args.out}: {tokenizer.num_pieces} pieces, <CALL> = {tokenizer.call_id}, vocab {tokenizer.vocab_size}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .data.inspection import inspect_shards
    from .data.urls import expand_shard_spec
    from .tokenizer import Tokenizer

    options = _options_from_arguments(args)
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
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .bench import bench_stream
    from .data.loader import stream_options
    from .data.make_shards import make_shards
    from .data.urls import expand_shard_spec
    from .tokenizer import train_tokenizer

    config = load_job_config(args.config, args.overrides)
    shards = Path(config.data.shards)
    if config.data.shards == str(DEMO_DIR) and not (shards / "manifest.json").exists():
        print(f"building the demo shards (gensim's English Wikipedia excerpt) in {shards}")
        make_shards([], shards, docs_per_shard=16, demo=True, prefix="wiki")
    tokenizer_path = Path(config.tokenizer.path)
    if not tokenizer_path.exists():
        print(f"training a {DEMO_VOCAB_SIZE}-piece SentencePiece tokenizer on {config.data.shards} -> {tokenizer_path}")
        options = stream_options(config.data)
        texts = _document_texts(expand_shard_spec(config.data.shards, options), options)
        train_tokenizer(texts, tokenizer_path, DEMO_VOCAB_SIZE)
    report = bench_stream(config, batches=args.batches)
    print(json.dumps(report, indent=2))
    return 0


def cmd_bench_stream(args: argparse.Namespace) -> int:
    from .bench import bench_stream

    config = load_job_config(args.config, args.overrides)
    report = bench_stream(config, batches=args.batches)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


def cmd_bench_loss(args: argparse.Namespace) -> int:
    from .bench import bench_loss

    rows = bench_loss(hidden_sizes=tuple(args.hidden), tokens=args.tokens, vocab=args.vocab, repeats=args.repeats)
    if args.json:
        print(json.dumps(rows))
        return 0
    print("| case | hidden | tokens | device | ms (fwd+bwd) | peak MiB |\n|---|---|---|---|---|---|")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['case']} | {row['hidden']} | {row['tokens']} | skipped: {row['skipped']} | | |")
        else:
            print(f"| {row['case']} | {row['hidden']} | {row['tokens']} | {row['device']} {row['dtype']} | {row['ms']} | {row['peak_mib']} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lacy-stream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-shards", help="build webdataset shards from jsonl, jsonl.zst, parquet, hf: or --demo")
    make.add_argument("inputs", nargs="*", help="input files, or hf:NAME[:SPLIT] for a Hugging Face dataset")
    make.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    make.add_argument("--docs-per-shard", type=int, default=1000)
    make.add_argument("--compress", choices=["none", "zstd"], default="none")
    make.add_argument("--demo", action="store_true", help="the embedded demo corpus (gensim's Wikipedia excerpt)")
    make.add_argument("--prefix", help="shard file prefix (default: shard, or wiki with --demo)")
    make.add_argument("--text-field", default="text")
    make.add_argument("--id-field", default="id")
    make.set_defaults(run=cmd_make_shards)

    tok = commands.add_parser("train-tokenizer", help="train a SentencePiece tokenizer on shards")
    _add_stream_arguments(tok)
    tok.add_argument("--vocab-size", type=int, required=True, help="SentencePiece pieces (<CALL> is added after them)")
    tok.add_argument("--out", required=True, help="output .model file")
    tok.add_argument("--max-docs", type=int, help="train on at most this many documents")
    tok.set_defaults(run=cmd_train_tokenizer)

    inspect = commands.add_parser("inspect", help="read shards as the trainer would and count documents, tokens, skips")
    _add_stream_arguments(inspect)
    inspect.add_argument("--tokenizer", help="a SentencePiece model, to count tokens")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(run=cmd_inspect)

    demo = commands.add_parser("demo", help="the main job on the embedded default: demo shards, tokenizer, streaming")
    demo.add_argument("--config", help="a TOML job config")
    demo.add_argument("--batches", type=int, default=50)
    demo.set_defaults(run=cmd_demo)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    stream = bench.add_parser("stream", help="loader throughput: shards -> packed batches")
    stream.add_argument("--config", help="a TOML job config")
    stream.add_argument("--batches", type=int, default=200)
    stream.add_argument("--json", action="store_true")
    stream.set_defaults(run=cmd_bench_stream)
    loss = bench.add_parser("loss", help="LaCy loss: fused kernel vs eager vs F.linear_cross_entropy, time and memory")
    loss.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    loss.add_argument("--tokens", type=int, default=8 * 1024)
    loss.add_argument("--vocab", type=int, default=32001)
    loss.add_argument("--repeats", type=int, default=3)
    loss.add_argument("--json", action="store_true")
    loss.set_defaults(run=cmd_bench_loss)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    if overrides and args.run not in (cmd_demo, cmd_bench_stream):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        sys.exit(args.run(args))
    except ConfigError as error:
        raise SystemExit(f"lacy-stream: config error: {error}") from None
    except (ValueError, OSError) as error:
        if args.verbose:
            raise
        raise SystemExit(f"lacy-stream: error: {error} (rerun with -v for the traceback)") from None
