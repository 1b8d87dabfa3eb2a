"""``bench annotate``, ``bench stream``, ``bench loss`` and ``bench gpu``: throughput of each stage, every GPU figure."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..config.job_config import AnnotationConfig, TokenizerConfig, load_job_config
from ..markdown import markdown_table
from .arguments import add_url_options, stream_options_from_arguments
from .exit_status import UsageError


def add_bench_annotate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="a jsonl file of {id, text[, annotated_text]}")
    parser.add_argument("--shards", help="a shard URL spec")
    parser.add_argument("--tokenizer", default=TokenizerConfig.path)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-docs", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of the two main cases")
    parser.add_argument("--spacy-model", default=AnnotationConfig.spacy_model)
    parser.add_argument("--batch-size", type=int, default=AnnotationConfig.batch_size)
    add_url_options(parser)
    parser.add_argument("--labeler", default="spacy", help="student:PATH: also the student's path and agreement")
    parser.add_argument(
        "--gpu-tokens-per-s", action="append", type=_consumer, metavar="[NAME=]TOKENS_PER_S",
        help="a GPU's training throughput (repeatable): the worker cores each labeler needs to keep up with it "
             f"(default: the GPU check's H200 figures, {', '.join(f'{n}={r:,.0f}' for n, r in GPU_CHECK_THROUGHPUT.items())})",
    )
    parser.add_argument("--json", action="store_true")


GPU_CHECK_THROUGHPUT = {"334m on an H200": 68_647.0, "1.3b on an H200": 31_443.0}
"""Tokens/s of the 334M and 1.3B presets on one H200, 8 x 1,024-token steps (docs/benchmarks.md): examples."""


def _consumer(text: str) -> tuple[str, float]:
    name, _, rate = text.rpartition("=")
    try:
        return name or f"{float(rate):,.0f} tokens/s", float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not [NAME=]TOKENS_PER_S") from None


def run_bench_annotate(args: argparse.Namespace) -> int:
    from ..bench.annotation import PAPER_TOKENS_PER_S_PER_CORE, bench_annotate

    if (args.input is None) == (args.shards is None):
        raise UsageError("give --input FILE.jsonl or --shards URL")
    report = bench_annotate(
        args.input or args.shards,
        args.tokenizer,
        workers=args.workers,
        max_docs=args.max_docs,
        repeats=args.repeats,
        spacy_model=args.spacy_model,
        batch_size=args.batch_size,
        options=stream_options_from_arguments(args),
        labeler=args.labeler,
        gpu_tokens_per_s=dict(args.gpu_tokens_per_s or GPU_CHECK_THROUGHPUT.items()),
    )
    if args.json:
        print(json.dumps(report))
        return 0
    raw, path, student = report["spacy_full"], report["full_path"], report["student"]
    print(f"{report['documents']} documents from {report['source']}, {report['cpus']} CPUs\n")
    rows = [
        [f"raw en_core_web_sm, full pipeline ({raw['words_per_s']} words/s)", 1, raw["tokens_per_s"], "1.00"],
        ["full path: read, annotate, align, pack", 1, path["tokens_per_s"], report["full_path_vs_spacy_full"]],
    ]
    if student:
        for case in (student, student.get("fp32")):
            if case:
                rows.append([f"full path with the student in {case['dtype']} ({case['identity']})", 1,
                             case["full_path"]["tokens_per_s"], f"x{case['vs_spacy_path']} vs the spaCy path"])
    rows += [
        ["first epoch with cache writes", 1, report["cache_write"]["tokens_per_s"], ""],
        ["cached epoch", 1, report["cached_epoch"]["tokens_per_s"], f"x{report['cached_vs_first_epoch']} vs first epoch"],
    ]
    rows += [
        [f"dataloader, {row['workers']} workers", row["workers"], row["tokens_per_s"],
         f"speedup {row['speedup']}, efficiency {row['efficiency']}"]
        for row in report["workers"]
    ]
    print(markdown_table(["case", "cores", "tokens/s", "vs raw spaCy"], rows))
    print(f"\nfull path vs the paper's {PAPER_TOKENS_PER_S_PER_CORE:,} tokens/s per core: x{report['full_path_vs_paper']}")
    labels = report["labels"]
    print(
        f"labels: {labels['fact_fraction']:.1%} of tokens are facts ({labels['word_fact_fraction']:.1%} of spaCy tokens); "
        f"judge calls: {labels['judge_call_fraction']:.1%} of tokens, "
        + (f"{labels['judge_calls_labeled_fact']:.1%} of them labeled fact" if labels["judge_calls_labeled_fact"] is not None else "none in this text")
    )
    if student:
        agreement, recall = student["agreement"], student["labels"]["judge_calls_labeled_fact"]
        print(
            f"student vs spaCy on {agreement['pieces']} held-out pieces: {agreement['agreement']:.1%} agree (3 classes), "
            f"fact precision {agreement['fact_precision']:.1%}, recall {agreement['fact_recall']:.1%}; "
            + (f"judge calls labeled fact: {recall:.1%} (spaCy {labels['judge_calls_labeled_fact']:.1%})" if recall is not None else "no judge markup")
        )
    labelers = [name for name in ("spacy", "student") if report["keep_up"] and f"{name}_cores" in report["keep_up"][0]]
    print("\nworker cores to keep up (one core per dataloader worker):\n")
    print(markdown_table(["GPU", "tokens/s", *(f"{name} cores" for name in labelers)],
                         [[row["consumer"], f"{row['gpu_tokens_per_s']:,.0f}", *(row[f"{name}_cores"] for name in labelers)]
                          for row in report["keep_up"]]))
    return 0


def add_bench_stream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML job config")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--json", action="store_true")


def run_bench_stream(args: argparse.Namespace) -> int:
    from ..bench.stream import bench_stream

    config = load_job_config(args.config, args.overrides)
    report = bench_stream(config, batches=args.batches)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


def add_bench_loss_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--tokens", type=int, default=8 * 1024)
    parser.add_argument("--vocab", type=int, default=32001)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")


def run_bench_loss(args: argparse.Namespace) -> int:
    from ..bench.loss import bench_loss

    rows = bench_loss(hidden_sizes=tuple(args.hidden), tokens=args.tokens, vocab=args.vocab, repeats=args.repeats)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(markdown_table(
        ["case", "hidden", "tokens", "device", "V rows", "ms (fwd+bwd)", "× floor", "peak MiB", "TFLOP/s"],
        [
            [row["case"], row["hidden"], row["tokens"], f"skipped: {row['skipped']}", "", "", "", "", ""]
            if "skipped" in row else
            [row["case"], row["hidden"], row["tokens"], f"{row['device']} {row['dtype']}", row["vocab_rows"], row["ms"],
             row.get("x_floor", ""), row["peak_mib"], row["tflops"] or ""]
            for row in rows
        ],
    ))
    return 0


def run_bench_gpu(args: argparse.Namespace) -> int:
    from ..bench.gpu_check import run_check

    return run_check(Path(args.out), budget_s=args.budget_s, dry_run=args.dry_run, corpus=args.corpus)
