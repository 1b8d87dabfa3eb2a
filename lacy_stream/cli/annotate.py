"""``annotate`` (a text highlighted, a jsonl file, or shards offline) and ``distill-labeler``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..config.job_config import AnnotationConfig, DataConfig
from .arguments import (
    add_max_skip_ratio, add_url_options, count, dropout_share, positive_count, stream_options_from_arguments, weight,
)
from .exit_status import UsageError


def add_annotate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", help="print this text with its facts highlighted; [dblookup('E', 'R') -> V] "
                                       "markup in it gives the LLM judge's labels")
    parser.add_argument("--html", help="--text: also write a page of every label (facts, grammar, judge values) here")
    parser.add_argument("--input", help="jsonl of {id, text} objects; writes {id, spans} objects to --output")
    parser.add_argument("--output", help="output jsonl for --input (replaced only when the run succeeds)")
    parser.add_argument("--shards", help="shard URL spec to annotate offline into --out")
    parser.add_argument("--out", help="output directory of annotated shards")
    parser.add_argument("--tokenizer", help="SentencePiece model the stored labels are aligned to (--shards)")
    parser.add_argument("--compress", choices=["none", "zstd"], default="none")
    add_url_options(parser)
    parser.add_argument("--max-doc-chars", type=int, default=DataConfig.max_doc_chars)
    add_max_skip_ratio(parser)
    parser.add_argument("--spacy-model", default=AnnotationConfig.spacy_model)
    parser.add_argument("--batch-size", type=int, default=AnnotationConfig.batch_size)
    parser.add_argument("--labeler", default=AnnotationConfig.labeler, help="--shards: spacy or student:PATH")
    parser.add_argument("--reference", help="also store a reference model's per-token losses (rho1, spacy_refloss)")
    parser.add_argument("--device", default="cpu", help="torch device of the --reference model")


def run_annotate(args: argparse.Namespace) -> int:
    modes = [args.text is not None, args.input is not None, args.shards is not None]
    if sum(modes) != 1:
        raise UsageError("give exactly one of --text, --input (with --output) or --shards (with --out)")
    if args.html and args.text is None:
        raise UsageError("--html needs --text")
    if args.text is not None:
        from ..annotate.annotation import FactAnnotator
        from ..annotate.judge import strip_markup
        from ..annotate.views import labels_page, terminal_legend, terminal_view

        text, judge_spans = strip_markup(args.text)
        word_spans = FactAnnotator(args.spacy_model).annotate_text(text).spans(text)
        color = sys.stdout.isatty()
        print(terminal_view(text, word_spans, color=color))
        print(terminal_legend(color=color, judge_values=len(judge_spans)), file=sys.stderr)
        if args.html:
            Path(args.html).write_text(labels_page(text, word_spans, judge_spans), encoding="utf-8")
            print(f"wrote {args.html}", file=sys.stderr)
        return 0
    if args.input is not None:
        if not args.output:
            raise UsageError("--input needs --output")
        from ..annotate.annotation import annotate_jsonl

        counts = annotate_jsonl(
            Path(args.input),
            Path(args.output),
            args.spacy_model,
            batch_size=args.batch_size,
            max_doc_chars=args.max_doc_chars,
            max_skip_ratio=args.max_skip_ratio,
        )
        print(
            f"annotated {counts['documents']} documents -> {args.output}"
            + (f"; skipped {counts['skipped']}" if counts["skipped"] else "")
            + (f"; repaired {counts['repaired']}" if counts["repaired"] else ""),
            file=sys.stderr,
        )
        return 0
    if not args.out or not args.tokenizer:
        raise UsageError("--shards needs --out and --tokenizer")
    from ..annotate.annotate_shards import annotate_shards
    from ..shards.specs import expand_shard_spec

    options = stream_options_from_arguments(args)
    reference = None
    if args.reference:
        from ..inference.reference_loss import ReferenceScorer

        reference = ReferenceScorer(args.reference, args.tokenizer, device=args.device)
    manifest = annotate_shards(
        expand_shard_spec(args.shards, options),
        args.out,
        args.tokenizer,
        spacy_model=args.spacy_model,
        labeler=args.labeler,
        batch_size=args.batch_size,
        max_doc_chars=args.max_doc_chars,
        options=options,
        compress=None if args.compress == "none" else args.compress,
        reference=reference,
        max_skip_ratio=args.max_skip_ratio,
    )
    print(
        f"wrote {len(manifest['shards'])} annotated shards, {manifest['documents']} documents to {args.out}"
        + (f"; skipped {manifest['skipped']}" if manifest["skipped"] else "")
    )
    return 0


def add_distill_labeler_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", action="append", required=True, help="shard URL spec or jsonl file; repeatable")
    parser.add_argument("--tokenizer", required=True, help="the SentencePiece model the student labels pieces of")
    parser.add_argument("--out", required=True, help="the student file to write (student.pt)")
    parser.add_argument("--tokens", type=positive_count, help="train on at most this many pieces (default: all)")
    parser.add_argument("--max-docs", type=int, default=1_000_000, help="documents per --shards source")
    parser.add_argument("--epochs", type=positive_count, help="passes over the training pieces, copies included "
                                                             "(default 12 / (1 + --augment): the steps of 12 "
                                                             "passes without copies)")
    parser.add_argument("--width", type=positive_count, help="channels of the network (default 128; 96 agrees with "
                                                  "spaCy 0.1 points less and is ~25%% faster, the choice where the "
                                                  "CPU has no native bfloat16): its time per piece grows with the "
                                                  "square")
    parser.add_argument("--layers", type=positive_count, help="dilated convolutions (default 4); each doubles the context "
                                                   "a piece sees")
    parser.add_argument("--word-dim", type=count, help="channels of the word features (default 16; 0: none): the "
                                                     "word's case, the piece's place in it, sentence start")
    parser.add_argument("--known-words", type=count, help="words the network knows by identity: the most frequent "
                                                        "of its training, each seen 10 times or more (default "
                                                        "32768; 0: none)")
    parser.add_argument("--auxiliary-weight", type=weight, help="weight in the training loss of learning spaCy's tag, "
                                                              "dependency label and entity type of each piece's "
                                                              "word (default 0.3; 0: none); labeling never computes them")
    parser.add_argument("--dropout", type=dropout_share, help="share of the network's channels zeroed at random "
                                                             "in training (default 0.1; 0: none)")
    parser.add_argument("--augment", type=count,
                        help="copies of each training document with words swapped for others spaCy tags the same "
                             "way, labeled by spaCy like the rest: more examples of its labeling (default 1; 0: "
                             "none, half the spaCy time)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="spaCy processes for new targets")
    parser.add_argument("--spacy-model", default=AnnotationConfig.spacy_model)
    parser.add_argument("--cache-dir", help="where spaCy's targets are kept for the next run (default: the label cache)")
    parser.add_argument("--no-cache", action="store_true")


def run_distill_labeler(args: argparse.Namespace) -> int:
    from ..annotate.distill import AUGMENT, AUXILIARY_WEIGHT, KNOWN_WORDS, distill
    from ..annotate.label_cache import default_cache_dir
    from ..annotate.student_labeler import StudentConfig

    report = distill(
        args.shards,
        args.tokenizer,
        args.out,
        max_docs=args.max_docs,
        max_pieces=args.tokens,
        spacy_model=args.spacy_model,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        workers=args.workers,
        epochs=args.epochs,
        width=args.width or StudentConfig.width,
        layers=args.layers or StudentConfig.layers,
        word_dim=StudentConfig.word_dim if args.word_dim is None else args.word_dim,
        known_words=KNOWN_WORDS if args.known_words is None else args.known_words,
        auxiliary_weight=AUXILIARY_WEIGHT if args.auxiliary_weight is None else args.auxiliary_weight,
        dropout=StudentConfig.dropout if args.dropout is None else args.dropout,
        augment=AUGMENT if args.augment is None else args.augment,
    )
    print(json.dumps(report))
    print(f"wrote {args.out}; use it with --annotation.labeler=student:{args.out}", file=sys.stderr)
    return 0
