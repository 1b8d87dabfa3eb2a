"""The ``lacy-stream`` command line.

Exit statuses (README, "Exit statuses"): 0 done; 1 an error, named on stderr; 2 the arguments or the config
were not understood; 65 (EX_DATAERR) no usable document was read, or more was skipped than
``--max-skip-ratio`` allows; 75 (EX_TEMPFAIL) training stopped on SIGTERM after saving a checkpoint, so the
same command continues it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from . import stop_signals
from .config.job_config import (
    RUN_CONFIGS,
    AnnotationConfig,
    ConfigError,
    DataConfig,
    TokenizerConfig,
    load_job_config,
)
from .eval.options import add_eval_arguments
from .bench.gpu_check import add_arguments as add_gpu_check_arguments
from .inference.call_policy import POLICY_NAMES, policy_from_name
from .shards.documents import SKIP_WARNING_RATIO, TooManySkipsError
from .shards.make_shards import ShardInputError
from .shards.streams import PipeNotAllowedError, ShardOpenError

DEMO_DIR = Path("shards/demo")
DEMO_VOCAB_SIZE = 8000

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TOO_MANY_SKIPS = 65
EXIT_INTERRUPTED = 75


def _add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, help="shard URL spec (file, directory, brace range, http(s)://, ::)")
    _add_url_options(parser)
    parser.add_argument("--max-doc-chars", type=int, default=DataConfig.max_doc_chars)
    _add_max_skip_ratio(parser)


def _add_url_options(parser: argparse.ArgumentParser) -> None:
    """The options of every command that reads shard URLs, with the trainer's defaults."""
    parser.add_argument("--allow-pipe", action="store_true", help="allow pipe: URLs (runs a shell command)")
    parser.add_argument("--http-timeout", type=float, default=DataConfig.http_timeout_s, metavar="SECONDS",
                        help="connect and read timeout of http(s) shards (default: %(default)s)")
    parser.add_argument("--http-deadline", type=float, default=DataConfig.http_deadline_s, metavar="SECONDS",
                        help="how long one http request may wait for the server in all (default: %(default)s)")
    parser.add_argument("--http-retries", type=int, default=DataConfig.http_retries,
                        help="retries after a failed or dropped http request (default: %(default)s)")


def _add_max_skip_ratio(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-skip-ratio", type=_share, default=DataConfig.max_skip_ratio, metavar="R",
        help=f"exit with status {EXIT_TOO_MANY_SKIPS} when more than this share of the shards or documents was "
             f"skipped (default: %(default)s, only when nothing was read); above {SKIP_WARNING_RATIO * 100:g}%% a warning",
    )


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1")
    return value


def _options_from_arguments(args: argparse.Namespace):
    from .shards.streams import StreamOptions

    return StreamOptions(
        timeout_s=args.http_timeout, deadline_s=args.http_deadline, retries=args.http_retries,
        allow_pipe=args.allow_pipe,
    )


def cmd_make_shards(args: argparse.Namespace) -> int:
    from .shards.make_shards import make_shards

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
        max_skip_ratio=args.max_skip_ratio,
    )
    print(
        f"wrote {len(manifest['shards'])} shards, {manifest['documents']} documents to {args.out}"
        + (f"; skipped {manifest['skipped']}" if manifest.get("skipped") else "")
        + (f"; repaired {manifest['repaired']}" if manifest.get("repaired") else "")
    )
    return 0


def _document_texts(source: str, options, *, max_docs: int | None = None,
                    max_skip_ratio: float = DataConfig.max_skip_ratio) -> Iterator[str]:
    from .shards.sources import read_documents

    documents = read_documents(source, options=options, max_skip_ratio=max_skip_ratio)
    return (document["text"] for document in islice(documents, max_docs))


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from .tokenizer import train_tokenizer

    texts = _document_texts(args.shards, _options_from_arguments(args), max_docs=args.max_docs,
                            max_skip_ratio=args.max_skip_ratio)
    tokenizer = train_tokenizer(texts, args.out, args.vocab_size)
    print(f"wrote {args.out}: {tokenizer.num_pieces} pieces, <CALL> = {tokenizer.call_id}, vocab {tokenizer.vocab_size}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .shards.documents import ReadStats
    from .shards.inspection import inspect_shards
    from .shards.specs import expand_shard_spec
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
    ReadStats.from_dict(report).check_skips(args.max_skip_ratio, args.shards)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .data.loader import stream_options
    from .shards.make_shards import make_shards
    from .tokenizer import train_tokenizer
    from .trainer.train import train

    config = load_job_config(args.config or RUN_CONFIGS / "tiny_cpu.toml", args.overrides)
    shards = Path(config.data.shards)
    if config.data.shards == str(DEMO_DIR) and not (shards / "manifest.json").exists():
        print(f"building the demo shards (gensim's English Wikipedia excerpt) in {shards}")
        make_shards([], shards, docs_per_shard=16, demo=True, prefix="wiki")
    tokenizer_path = Path(config.tokenizer.path)
    if not tokenizer_path.exists():
        print(f"training a {DEMO_VOCAB_SIZE}-piece SentencePiece tokenizer on {config.data.shards} -> {tokenizer_path}")
        texts = _document_texts(config.data.shards, stream_options(config.data))
        train_tokenizer(texts, tokenizer_path, DEMO_VOCAB_SIZE)
    print(f"training the {config.model.preset} model with {config.loss.method} for {config.train.steps} steps "
          f"(spaCy annotates in {config.data.num_workers} dataloader workers)")
    summary = train(config)
    if summary["interrupted"]:
        return _interrupted(summary)
    run_dir = Path(summary["run_dir"])
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    print(json.dumps(summary))
    print(f"last logged step {last['step']}: loss {last['loss']:.3f}, non-call loss {last['noncall_loss']:.3f}, "
          f"call ratio {last['call_ratio']:.3f}, fact ratio {last['fact_ratio']:.3f}, "
          f"{last['tokens_per_s']:.0f} tokens/s, data wait {last['data_wait_share']:.0%} of the step time")
    print(f"checkpoints: {run_dir / 'checkpoints'}\nmetrics:     {run_dir / 'metrics.jsonl'} "
          f"(tensorboard --logdir {run_dir / 'tensorboard'})")
    if summary["hf_dir"]:
        print(f"model:       {summary['hf_dir']} (Hugging Face GPT-2 + tokenizer)")
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    modes = [args.text is not None, args.input is not None, args.shards is not None]
    if sum(modes) != 1:
        raise SystemExit("annotate: give exactly one of --text, --input (with --output) or --shards (with --out)")
    if args.text is not None:
        from .annotate.annotation import FactAnnotator

        labels = FactAnnotator(args.spacy_model).annotate_text(args.text)
        print(highlight_facts(args.text, labels.spans(args.text), color=sys.stdout.isatty()))
        return 0
    if args.input is not None:
        if not args.output:
            raise SystemExit("annotate: --input needs --output")
        from .annotate.annotation import annotate_jsonl

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
        raise SystemExit("annotate: --shards needs --out and --tokenizer")
    from .annotate.annotate_shards import annotate_shards
    from .shards.specs import expand_shard_spec

    options = _options_from_arguments(args)
    reference = None
    if args.reference:
        from .inference.reference_loss import ReferenceScorer

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


def cmd_compare(args: argparse.Namespace) -> int:
    from .eval.compare import compare_runs, write_comparison
    from .eval.factscore import read_entities
    from .eval.config import EvalInputs

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


FACT_COLOR = "\033[1;33m"
RESET = "\033[0m"


def highlight_facts(text: str, spans: list[list], *, color: bool) -> str:
    """The text with runs of fact words in colour (a terminal) or [brackets]."""
    opening, closing = (FACT_COLOR, RESET) if color else ("[", "]")
    out, position, run_start, run_end = [], 0, 0, None
    for begin, end, name in spans:
        if name != "fact":
            continue
        if run_end is not None and not text[run_end:begin].strip():
            run_end = end
            continue
        if run_end is not None:
            out += [text[position:run_start], opening, text[run_start:run_end], closing]
            position = run_end
        run_start, run_end = begin, end
    if run_end is not None:
        out += [text[position:run_start], opening, text[run_start:run_end], closing]
        position = run_end
    out.append(text[position:])
    return "".join(out)


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer.train import train

    summary = train(load_job_config(args.config, args.overrides))
    print(json.dumps(summary))
    return _interrupted(summary) if summary["interrupted"] else 0


def _interrupted(summary: dict) -> int:
    signal_name = summary["stop_signal"]
    if summary["step"] == summary["first_step"]:
        done = f"stopped on {signal_name} before training a step (nothing new to save)"
    else:
        done = f"stopped on {signal_name} after saving the checkpoint of step {summary['checkpoint_step']}"
    print(f"lacy-stream: {done}; run the same command to continue (exit status {EXIT_INTERRUPTED})", file=sys.stderr)
    return EXIT_INTERRUPTED


def cmd_generate(args: argparse.Namespace) -> int:
    from .inference.generate import generate, render
    from .inference.loading import load_lacy
    from .inference.partners import (
        Cascade,
        RagPartner,
        RagPrompt,
        partner_from_spec,
        person_from_prompt,
    )

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("generate: give --prompt or --prompts-file")
    if args.background and not args.cascade:
        raise SystemExit("generate: --background needs --cascade")
    background = Path(args.background).read_text() if args.background else None
    lacy = load_lacy(args.ckpt, device=args.device)
    partner = partner_from_spec(args.cascade, device=args.device) if args.cascade else None
    policy = policy_from_name(args.policy, lacy.tokenizer, args.call_rate, seed=args.seed)
    generations = []
    for prompt in prompts:
        delegate = None
        if partner is not None:
            prompted = partner
            if background is not None:
                person = args.person or person_from_prompt(prompt)
                if person is None:
                    raise SystemExit(f"generate: --background needs --person for the prompt {prompt!r}")
                prompted = RagPartner(partner, RagPrompt(person, background))
            delegate = Cascade(prompted, lacy.tokenizer)
        generation = generate(
            lacy.model,
            lacy.tokenizer,
            prompt,
            policy,
            delegate=delegate,
            max_new_tokens=args.max_new_tokens,
            repetition_penalty=args.repetition_penalty,
        )
        generations.append(generation)
        if not args.json:
            print(render(generation, lacy.tokenizer, color=sys.stdout.isatty()))
            print(
                f"-- {generation.calls} calls in {generation.steps} steps ({generation.call_rate:.1%}), "
                f"{generation.tokens_per_second:.1f} tokens/s" + (", stopped at EOS" if generation.stopped_at_eos else "")
                + "\n"
            )
    if args.json:
        print(json.dumps({"generations": [g.report(lacy.tokenizer) for g in generations], "policy": policy.state_dict()}))
    elif len(generations) > 1:
        print(f"all prompts: {policy.calls} calls in {policy.steps} steps ({policy.call_rate:.1%})")
    return 0


def cmd_distill_labeler(args: argparse.Namespace) -> int:
    from .annotate.distill import distill
    from .annotate.label_cache import default_cache_dir
    from .annotate.student_labeler import StudentConfig

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
    )
    print(json.dumps(report))
    print(f"wrote {args.out}; use it with --annotation.labeler=student:{args.out}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.options import config_from_arguments
    from .eval.runner import run_eval

    return run_eval(config_from_arguments(args))


def cmd_bench_annotate(args: argparse.Namespace) -> int:
    from .bench.annotation import PAPER_TOKENS_PER_S_PER_CORE, bench_annotate

    if (args.input is None) == (args.shards is None):
        raise SystemExit("bench annotate: give --input FILE.jsonl or --shards URL")
    report = bench_annotate(
        args.input or args.shards,
        args.tokenizer,
        workers=args.workers,
        max_docs=args.max_docs,
        repeats=args.repeats,
        spacy_model=args.spacy_model,
        batch_size=args.batch_size,
        options=_options_from_arguments(args),
        labeler=args.labeler,
    )
    if args.json:
        print(json.dumps(report))
        return 0
    raw, path = report["spacy_full"], report["full_path"]
    print(f"{report['documents']} documents from {report['source']}, {report['cpus']} CPUs\n")
    print("| case | cores | tokens/s | vs raw spaCy |\n|---|---|---|---|")
    print(f"| raw en_core_web_sm, full pipeline ({raw['words_per_s']} words/s) | 1 | {raw['tokens_per_s']} | 1.00 |")
    print(f"| full path: read, annotate, align, pack | 1 | {path['tokens_per_s']} | {report['full_path_vs_spacy_full']} |")
    student = report["student"]
    if student:
        print(f"| full path with the student ({student['identity']}) | 1 | {student['full_path']['tokens_per_s']} | x{student['vs_spacy_path']} vs the spaCy path |")
    print(f"| first epoch with cache writes | 1 | {report['cache_write']['tokens_per_s']} | |")
    print(f"| cached epoch | 1 | {report['cached_epoch']['tokens_per_s']} | x{report['cached_vs_first_epoch']} vs first epoch |")
    for row in report["workers"]:
        print(f"| dataloader, {row['workers']} workers | {row['workers']} | {row['tokens_per_s']} | speedup {row['speedup']}, efficiency {row['efficiency']} |")
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
    return 0


def cmd_bench_stream(args: argparse.Namespace) -> int:
    from .bench.stream import bench_stream

    config = load_job_config(args.config, args.overrides)
    report = bench_stream(config, batches=args.batches)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


def cmd_bench_loss(args: argparse.Namespace) -> int:
    from .bench.loss import bench_loss

    rows = bench_loss(hidden_sizes=tuple(args.hidden), tokens=args.tokens, vocab=args.vocab, repeats=args.repeats)
    if args.json:
        print(json.dumps(rows))
        return 0
    print("| case | hidden | tokens | device | V rows | ms (fwd+bwd) | × floor | peak MiB | TFLOP/s |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['case']} | {row['hidden']} | {row['tokens']} | skipped: {row['skipped']} | | | | | |")
        else:
            print(f"| {row['case']} | {row['hidden']} | {row['tokens']} | {row['device']} {row['dtype']} "
                  f"| {row['vocab_rows']} | {row['ms']} | {row.get('x_floor', '')} | {row['peak_mib']} "
                  f"| {row['tflops'] or ''} |")
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from .bench.gpu_check import run_check

    return run_check(Path(args.out), budget_s=args.budget_s, dry_run=args.dry_run, corpus=args.corpus)


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
    _add_max_skip_ratio(make)
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

    demo = commands.add_parser(
        "demo", help="the main job on the embedded default: demo shards and tokenizer, then a tiny LaCy training run"
    )
    demo.add_argument("--config", help="a TOML job config or a shipped run config's name (default: tiny_cpu)")
    demo.set_defaults(run=cmd_demo)

    train = commands.add_parser(
        "train",
        help="pretrain with the LaCy loss (one process, or under torchrun)",
        description="Pretrain with the LaCy loss. Any config value can be overridden with --section.key=value; "
        "--loss.method picks one of the methods below.",
        epilog=_methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="a TOML job config, or a shipped run config's name (tiny_cpu, 334m, ...)")
    train.set_defaults(run=cmd_train)

    annotate = commands.add_parser("annotate", help="label facts: --text (highlighted), --input jsonl, or --shards offline")
    annotate.add_argument("--text", help="print this text with its facts highlighted")
    annotate.add_argument("--input", help="jsonl of {id, text} objects; writes {id, spans} objects to --output")
    annotate.add_argument("--output", help="output jsonl for --input (replaced only when the run succeeds)")
    annotate.add_argument("--shards", help="shard URL spec to annotate offline into --out")
    annotate.add_argument("--out", help="output directory of annotated shards")
    annotate.add_argument("--tokenizer", help="SentencePiece model the stored labels are aligned to (--shards)")
    annotate.add_argument("--compress", choices=["none", "zstd"], default="none")
    _add_url_options(annotate)
    annotate.add_argument("--max-doc-chars", type=int, default=DataConfig.max_doc_chars)
    _add_max_skip_ratio(annotate)
    annotate.add_argument("--spacy-model", default=AnnotationConfig.spacy_model)
    annotate.add_argument("--batch-size", type=int, default=AnnotationConfig.batch_size)
    annotate.add_argument("--labeler", default=AnnotationConfig.labeler, help="--shards: spacy or student:PATH")
    annotate.add_argument("--reference", help="also store a reference model's per-token losses (rho1, spacy_refloss)")
    annotate.add_argument("--device", default="cpu", help="torch device of the --reference model")
    annotate.set_defaults(run=cmd_annotate)

    distill = commands.add_parser("distill-labeler", help="train a student fact labeler on spaCy's labels (see docs/benchmarks.md)")
    distill.add_argument("--shards", action="append", required=True, help="shard URL spec or jsonl file; repeatable")
    distill.add_argument("--tokenizer", required=True, help="the SentencePiece model the student labels pieces of")
    distill.add_argument("--out", required=True, help="the student file to write (student.pt)")
    distill.add_argument("--tokens", type=int, help="train on at most this many pieces (default: all)")
    distill.add_argument("--max-docs", type=int, default=1_000_000, help="documents per --shards source")
    distill.add_argument("--epochs", type=int, default=6)
    distill.add_argument("--width", type=int, help="channels of the network (default 64): its time per piece "
                                                   "grows with the square")
    distill.add_argument("--layers", type=int, help="dilated convolutions (default 4); each doubles the context "
                                                    "a piece sees")
    distill.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="spaCy processes for new targets")
    distill.add_argument("--spacy-model", default=AnnotationConfig.spacy_model)
    distill.add_argument("--cache-dir", help="where spaCy's targets are kept for the next run (default: the label cache)")
    distill.add_argument("--no-cache", action="store_true")
    distill.set_defaults(run=cmd_distill_labeler)

    gen = commands.add_parser("generate", help="greedy generation, calls answered by a cascade partner (partner tokens highlighted)")
    gen.add_argument("--ckpt", required=True, help="the small model: a run, Hugging Face export or checkpoint directory")
    gen.add_argument("--cascade", help="partner: hf:DIR, openai:URL#MODEL (key from OPENAI_API_KEY) or lacy:PATH")
    gen.add_argument("--policy", choices=POLICY_NAMES, default="argmax", help="when a step is a call")
    gen.add_argument("--call-rate", type=float, default=0.15, help="target call rate (calibrated, ilacy-*) or random rate")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--repetition-penalty", type=float, default=1.2)
    gen.add_argument("--background", help="a text file of background for the partner's RAG prompt")
    gen.add_argument("--person", help="the person the background is about (default: from 'Tell me a bio of NAME.')")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="a file with one prompt per line")
    gen.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    gen.add_argument("--device", default="cpu", help="torch device of the model and a local partner")
    gen.add_argument("--json", action="store_true", help="print one JSON object: generations and the policy's state")
    gen.set_defaults(run=cmd_generate)

    evaluation = commands.add_parser(
        "eval", help="evaluate a model into report.json and report.md: losses, NLU, acceptability, fact leakage, FactScore"
    )
    add_eval_arguments(evaluation)
    evaluation.set_defaults(run=cmd_eval)

    compare = commands.add_parser(
        "compare", help="finished runs of several methods side by side on the same held-out windows"
    )
    compare.add_argument("--runs", nargs="+", required=True, help="run directories (lacy-stream train's run_dir)")
    compare.add_argument("--val-shards", required=True, help="held-out shard URL spec, scored by every run")
    compare.add_argument("--out", required=True, help="output directory: comparison.json, .md and .png")
    compare.add_argument("--batches", type=int, default=8, help="held-out batches to score")
    compare.add_argument("--batch-size", type=int, default=8, help="windows per batch (call masks are per batch)")
    compare.add_argument("--seq-len", type=int, help="window length (default: the shortest training seq_len)")
    compare.add_argument("--call-ratio", type=float, default=0.15, help="share of each batch in the call mask C_M")
    compare.add_argument("--cascade", help="partner for calibrated cascade generation: hf:DIR, openai:URL#MODEL, lacy:PATH")
    compare.add_argument("--prompts", type=int, default=3, help="FactScore prompts for --cascade")
    compare.add_argument("--max-new-tokens", type=int, default=48, help="tokens per --cascade generation")
    compare.add_argument("--factscore-entities", help="FactScore entities, one a line (default: from --shared)")
    compare.add_argument("--shared", default=os.environ.get("LACY_SHARED_DIR", "../shared"))
    compare.add_argument("--device", default="cpu")
    compare.set_defaults(run=cmd_compare)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bench_annotate = bench.add_parser("annotate", help="annotation throughput per core, scaling over workers, cache")
    bench_annotate.add_argument("--input", help="a jsonl file of {id, text[, annotated_text]}")
    bench_annotate.add_argument("--shards", help="a shard URL spec")
    bench_annotate.add_argument("--tokenizer", default=TokenizerConfig.path)
    bench_annotate.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    bench_annotate.add_argument("--max-docs", type=int, default=120)
    bench_annotate.add_argument("--repeats", type=int, default=3, help="alternating runs of the two main cases")
    bench_annotate.add_argument("--spacy-model", default=AnnotationConfig.spacy_model)
    bench_annotate.add_argument("--batch-size", type=int, default=AnnotationConfig.batch_size)
    _add_url_options(bench_annotate)
    bench_annotate.add_argument("--labeler", default="spacy", help="student:PATH: also the student's path and agreement")
    bench_annotate.add_argument("--json", action="store_true")
    bench_annotate.set_defaults(run=cmd_bench_annotate)
    stream = bench.add_parser("stream", help="loader throughput: shards -> packed batches")
    stream.add_argument("--config", help="a TOML job config")
    stream.add_argument("--batches", type=int, default=200)
    stream.add_argument("--json", action="store_true")
    stream.set_defaults(run=cmd_bench_stream)
    loss = bench.add_parser("loss", help="LaCy loss: fused kernel vs chunked vs eager vs F.linear_cross_entropy, time and memory")
    loss.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    loss.add_argument("--tokens", type=int, default=8 * 1024)
    loss.add_argument("--vocab", type=int, default=32001)
    loss.add_argument("--repeats", type=int, default=3)
    loss.add_argument("--json", action="store_true")
    loss.set_defaults(run=cmd_bench_loss)
    gpu = bench.add_parser("gpu", help="every GPU figure: kernel correctness and speed, training throughput (report)")
    add_gpu_check_arguments(gpu)
    gpu.set_defaults(run=cmd_bench_gpu)
    for command in [*commands.choices.values(), *bench.choices.values()]:  # -v also after the command's name
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")
    return parser


def _methods_epilog() -> str:
    from .loss.masks import METHODS

    with_reference = " and ".join(name for name, method in METHODS.items() if method.needs_reference)
    lines = [f"methods (--loss.method=NAME; {with_reference} need --loss.reference=RUN):"]
    for method in METHODS.values():
        ignore = f"; ignore: {method.ignore_mask}" if method.ignore_mask != "none" else ""
        lines.append(f"  {method.name:<17} call: {method.call_mask}{ignore}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    if args.run is not cmd_train:
        stop_signals.restore_defaults()  # only training stops at a checkpoint; the rest stops as any program
    if overrides and args.run not in (cmd_demo, cmd_bench_stream, cmd_train):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status = args.run(args)
    except ConfigError as error:
        print(f"lacy-stream: config error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except TooManySkipsError as error:
        _fail(EXIT_TOO_MANY_SKIPS, str(error), verbose=args.verbose)
    except PipeNotAllowedError as error:
        _fail(EXIT_ERROR, f"{error}{_pipe_opt_in(args)}", verbose=args.verbose)
    except (ShardOpenError, ShardInputError) as error:  # nothing to read: no usable document
        _fail(EXIT_TOO_MANY_SKIPS, str(error), verbose=args.verbose)
    except (ValueError, OSError) as error:
        _fail(EXIT_ERROR, str(error), verbose=args.verbose)
    sys.exit(status)


def _pipe_opt_in(args: argparse.Namespace) -> str:
    """How this command allows ``pipe:`` sources, if it can."""
    if hasattr(args, "allow_pipe"):
        return "; allow them with --allow-pipe"
    if hasattr(args, "config"):  # commands that take a job config
        return "; allow them with --data.allow_pipe=true"
    return ""


def _fail(status: int, message: str, *, verbose: bool) -> None:
    """Exit with ``status``; the message is the last line, after the traceback when ``verbose``."""
    if verbose:
        traceback.print_exc()
    hint = "" if verbose else " (rerun with -v for the traceback)"
    print(f"lacy-stream: error: {message}{hint}", file=sys.stderr)
    sys.exit(status)
