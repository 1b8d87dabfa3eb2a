"""``eval`` (one model, every section of the paper's evaluation) and ``compare`` (finished runs side by side).

Their options are read here and the evaluation modules imported only by the handlers, so that building the command
line does not import spaCy, transformers and the evaluation modules."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..eval.chat_endpoint import API_KEY_ENVIRONMENT_VARIABLE
from ..eval.config import (
    DEFAULT_CALL_RATE,
    DEFAULT_POLICY,
    DEFAULT_SECTIONS,
    PAPER_ACCEPTABILITY_DOCUMENTS,
    PAPER_CALL_RATIO,
    SECTIONS,
    EvalConfig,
    EvalInputs,
)
from ..inference.call_policy import POLICY_NAMES
from ..inference.generate import MAX_NEW_TOKENS
from .arguments import CALL_PIECES_HELP
from .exit_status import UsageError


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lacy-stream eval``."""
    parser.add_argument(
        "--ckpt", required=True, help="the model: a run directory, its hf/ export or a checkpoint directory"
    )
    parser.add_argument(
        "--baseline", help="a model trained without calls (same tokenizer), scored on the model's call masks"
    )
    parser.add_argument(
        "--out", required=True, help="output directory: report.json, report.md, report.html and the files of the sections"
    )
    parser.add_argument(
        "--shared",
        default=os.environ.get("LACY_SHARED_DIR", "../shared"),
        help="the shared data directory, source of every default input (default: $LACY_SHARED_DIR or ../shared)",
    )
    parser.add_argument(
        "--heldout", help="held-out text: jsonl / jsonl.zst / parquet with a text field, or a shard spec"
    )
    parser.add_argument("--arc-easy", help="ARC-Easy {query, choices, gold} jsonl")
    parser.add_argument("--piqa", help="PIQA {query, choices, gold} jsonl")
    parser.add_argument("--hellaswag", help="HellaSwag's own jsonl (e.g. hellaswag_val.jsonl); without it, not run")
    parser.add_argument("--siqa", help="Social IQa's own jsonl (e.g. dev.jsonl, labels in dev-labels.lst beside it); "
                                       "without it, not run")
    parser.add_argument("--factscore-entities", help="FactScore entities, one name a line")
    parser.add_argument("--popqa", help="PopQA long-tail jsonl (fact leakage)")
    parser.add_argument("--bigbench", help="BIG-bench QA Wikidata jsonl (fact leakage)")
    parser.add_argument("--limit", type=int, help="at most this many documents / examples / entities per section")
    parser.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated sections to run, of: {', '.join(SECTIONS)} (default: all but lm_eval)",
    )
    parser.add_argument("--judge-url", help="OpenAI-compatible chat completions URL of the LLM judge")
    parser.add_argument(
        "--judge-model",
        help=f"the judge's model name; an API key is read from ${API_KEY_ENVIRONMENT_VARIABLE} when set",
    )
    parser.add_argument("--judge-workers", type=int, default=8, help="judge requests in flight at once")
    parser.add_argument("--knowledge", help="FactScore knowledge source: jsonl of {title, text} pages")
    parser.add_argument(
        "--cascade",
        help="cascade partner for the FactScore biographies and throughput: hf:DIR, openai:URL#MODEL (key from "
        "OPENAI_API_KEY) or lacy:PATH; without it the model answers its own calls",
    )
    parser.add_argument(
        "--policy", choices=POLICY_NAMES, default=DEFAULT_POLICY, help=f"call policy (default: {DEFAULT_POLICY})"
    )
    parser.add_argument(
        "--call-rate",
        type=float,
        default=DEFAULT_CALL_RATE,
        help="inference-time target call rate (calibrated, ilacy-*) or random rate (default: %(default)s; "
        "0.22 is the paper's realised call budget)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="tokens per biography (default: %(default)s)"
    )
    parser.add_argument("--call-pieces", type=int, metavar="N", help=CALL_PIECES_HELP)
    parser.add_argument("--background-dir", help="background texts <name>.txt for the partner's RAG prompt")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda when available, else cpu",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows or scoring requests per forward pass")
    parser.add_argument(
        "--call-ratio",
        type=float,
        default=PAPER_CALL_RATIO,
        help="share of tokens in the validation call mask (train-time ratio; default: %(default)s)",
    )
    parser.add_argument(
        "--acceptability-docs", type=int, default=PAPER_ACCEPTABILITY_DOCUMENTS, help="held-out documents analysed"
    )
    parser.add_argument("--judged-tokens", type=int, default=2000, help="positions sampled for the acceptability judge")
    parser.add_argument("--loss-buckets", type=int, default=10)
    parser.add_argument("--spacy-model", default="en_core_web_sm")


def config_from_arguments(args: argparse.Namespace) -> EvalConfig:
    """The typed evaluation config of ``lacy-stream eval``'s arguments."""
    from ..eval.chat_endpoint import ChatEndpoint

    if bool(args.judge_url) != bool(args.judge_model):
        raise UsageError("a judge needs both --judge-url and --judge-model")
    shared = EvalInputs.from_shared(args.shared)
    inputs = EvalInputs(
        heldout=args.heldout or shared.heldout,
        arc_easy=Path(args.arc_easy) if args.arc_easy else shared.arc_easy,
        piqa=Path(args.piqa) if args.piqa else shared.piqa,
        factscore_entities=Path(args.factscore_entities) if args.factscore_entities else shared.factscore_entities,
        popqa=Path(args.popqa) if args.popqa else shared.popqa,
        bigbench=Path(args.bigbench) if args.bigbench else shared.bigbench,
        hellaswag=Path(args.hellaswag) if args.hellaswag else None,
        siqa=Path(args.siqa) if args.siqa else None,
    )
    judge = None
    if args.judge_url:
        judge = ChatEndpoint(
            url=args.judge_url,
            model=args.judge_model,
            api_key=os.environ.get(API_KEY_ENVIRONMENT_VARIABLE),
            workers=args.judge_workers,
        )
    try:
        return EvalConfig(
            checkpoint=args.ckpt,
            out_dir=Path(args.out),
            inputs=inputs,
            baseline=args.baseline,
            sections=tuple(name.strip() for name in args.sections.split(",") if name.strip()),
            limit=args.limit,
            device=args.device,
            batch_size=args.batch_size,
            call_ratio=args.call_ratio,
            judge=judge,
            knowledge=Path(args.knowledge) if args.knowledge else None,
            cascade=args.cascade,
            policy=args.policy,
            call_rate=args.call_rate,
            max_new_tokens=args.max_new_tokens,
            call_pieces=args.call_pieces,
            background_dir=Path(args.background_dir) if args.background_dir else None,
            acceptability_documents=args.acceptability_docs,
            judged_tokens=args.judged_tokens,
            loss_buckets=args.loss_buckets,
            spacy_model=args.spacy_model,
        )
    except ValueError as error:  # what EvalConfig refuses in its arguments
        raise UsageError(str(error)) from None


def run_eval(args: argparse.Namespace) -> int:
    from ..eval import runner

    return runner.run_eval(config_from_arguments(args))


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", nargs="+", required=True, help="run directories (lacy-stream train's run_dir)")
    parser.add_argument("--val-shards", required=True, help="held-out shard URL spec, scored by every run")
    parser.add_argument("--out", required=True, help="output directory: comparison.json, .md, .png and .html")
    parser.add_argument("--batches", type=int, default=8, help="held-out batches to score")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch (call masks are per batch)")
    parser.add_argument("--seq-len", type=int, help="window length (default: the shortest training seq_len)")
    parser.add_argument("--call-ratio", type=float, default=0.15, help="share of each batch in the call mask C_M")
    parser.add_argument("--cascade", help="partner for calibrated cascade generation: hf:DIR, openai:URL#MODEL, lacy:PATH")
    parser.add_argument("--prompts", type=int, default=3, help="FactScore prompts for --cascade")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per --cascade generation")
    parser.add_argument("--factscore-entities", help="FactScore entities, one a line (default: from --shared)")
    parser.add_argument("--shared", default=os.environ.get("LACY_SHARED_DIR", "../shared"))
    parser.add_argument("--device", default="cpu")


def run_compare(args: argparse.Namespace) -> int:
    from ..eval.compare import compare_runs, write_comparison
    from ..eval.factscore import read_entities

    entities = []
    if args.cascade:
        path = args.factscore_entities or EvalInputs.from_shared(args.shared).factscore_entities
        entities = read_entities(path, limit=args.prompts)
    comparison = compare_runs(
        args.runs,
        args.val_shards,
        batches=args.batches,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        call_ratio=args.call_ratio,
        cascade=args.cascade,
        entities=entities,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
    )
    out = write_comparison(comparison, args.out)
    print(comparison.markdown())
    print(f"\nwrote {', '.join(sorted(path.name for path in out.iterdir()))} to {out}")
    return 0
