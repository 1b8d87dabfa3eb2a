"""The options of ``lacy-stream eval``, kept apart from the evaluation code so that building the command line
does not import spaCy, transformers and the evaluation modules."""

from __future__ import annotations

import argparse
import os

import torch

from ..inference.call_policy import POLICY_NAMES
from ..inference.generate import MAX_NEW_TOKENS
from .chat_endpoint import API_KEY_ENVIRONMENT_VARIABLE

SECTIONS = ("validation", "nlu", "lm_eval", "acceptability", "fact_leakage", "factscore", "generation_throughput")
DEFAULT_SECTIONS = tuple(name for name in SECTIONS if name != "lm_eval")
PAPER_CALL_RATIO = 0.15
"""Share of tokens in the validation call mask (Appendix A.4.3), the train-time call ratio."""
PAPER_ACCEPTABILITY_DOCUMENTS = 112  # Sec. 3: one validation batch of 112 documents
DEFAULT_POLICY = "calibrated"
DEFAULT_CALL_RATE = 0.15
"""As ``lacy-stream generate``. The paper's 15% target realised about 22% calls (Appendix A.5); the
calibrated policy realises its target, so 0.22 gives the paper's call budget."""


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lacy-stream eval``."""
    parser.add_argument(
        "--ckpt", required=True, help="the model: a run directory, its hf/ export or a checkpoint directory"
    )
    parser.add_argument(
        "--baseline", help="a model trained without calls (same tokenizer), scored on the model's call masks"
    )
    parser.add_argument(
        "--out", required=True, help="output directory: report.json, report.md and the files of the sections"
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
