"""``lacy-stream bench annotate``: annotation throughput per CPU core, all cases on the same text in one run.

Cases:

- ``spacy_full``: the raw ``en_core_web_sm`` pipeline as shipped, ``nlp.pipe`` on one core (the paper's
  labeler without its rules: a lower bound of its cost);
- ``full_path``: our path on one core: read shards -> pruned spaCy + rules -> alignment -> packing;
- ``cache_write`` / ``cached_epoch``: the same path with the label cache, first writing, then reading;
- ``workers``: the dataloader with 1..N worker processes over all cores (scaling), in steady state;
- ``student_path`` (with ``labeler="student:PATH"``): the full path with the distilled student instead of
  spaCy, alternating with ``full_path``, and its agreement with spaCy's labels. The documents are then only
  those the student held out from its training (one in ten, by content hash). Where the student labels in
  bf16 (:func:`.labeling_dtype`), the same student in fp32 alternates with them too (``student.fp32``).

Tokens are SentencePiece tokens of the text (plus one EOS per document on the full path). Single-core cases
pin the process to one CPU and count tokens per CPU-second of it (on a shared VM, wall time also counts
time taken by other tenants; both are reported); the two main cases alternate ``repeats`` times and report medians (their
ratio is the median of the per-round ratios: both cases of a round saw the same machine load).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from spacy.language import Language

from ..annotate.alignment import warm_up as warm_up_alignment
from ..annotate.annotation import FactAnnotator
from ..annotate.distill import agreement, split_held_out
from ..annotate.label_cache import LabelCache
from ..annotate.labeling import DocumentLabeler, student_path
from ..annotate.spacy_pipeline import load_pipeline
from ..annotate.student_labeler import StudentAnnotator, labeling_dtype
from ..config.job_config import AnnotationConfig
from ..data.loader import TokenLoader
from ..data.packing import WindowPacker, document_columns, split_doc_uid
from ..labels import JUDGE_CALL, TokenClass
from ..shards.documents import ReadStats
from ..shards.make_shards import make_shards
from ..shards.shard_reader import read_shard
from ..shards.sources import read_documents
from ..shards.specs import expand_shard_spec
from ..shards.streams import StreamOptions
from ..tokenizer import Tokenizer


@contextmanager
def one_core() -> Iterator[None]:
    allowed, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {min(allowed)})
    torch.set_num_threads(1)
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(threads)


def bench_annotate(
    source: str,
    tokenizer_path: str,
    *,
    workers: int,
    max_docs: int = 120,
    repeats: int = 3,
    spacy_model: str = "en_core_web_sm",
    batch_size: int = 64,
    seq_len: int = 1024,
    options: StreamOptions = StreamOptions(),
    labeler: str = "spacy",
    gpu_tokens_per_s: dict[str, float] | None = None,
) -> dict:
    """Every case of the module docstring on the first ``max_docs`` documents of ``source``; with
    ``gpu_tokens_per_s`` (a name -> the tokens/s a GPU trains at), the worker cores each labeler needs to keep
    up with each (:func:`cores_to_keep_up`)."""
    documents = list(islice(read_documents(source, options=options), max_docs))
    students: dict[str, StudentAnnotator] = {}
    if student_path(labeler):
        students = {dtype: StudentAnnotator.load(student_path(labeler), Tokenizer(tokenizer_path), dtype)
                    for dtype in dict.fromkeys((labeling_dtype(), "fp32"))}
        documents = [documents[i] for i in split_held_out([document["text"] for document in documents])[1]]
    if not documents:
        raise ValueError(f"{source}: no documents to benchmark")
    texts = [document["text"] for document in documents]
    tokenizer = Tokenizer(tokenizer_path)
    with tempfile.TemporaryDirectory(prefix="lacy-bench-") as scratch:
        scratch = Path(scratch)
        corpus = scratch / "input.jsonl"
        corpus.write_text("".join(json.dumps(document) + "\n" for document in documents), encoding="utf-8")
        docs_per_shard = max(1, math.ceil(len(documents) / (4 * max(workers, 1))))
        make_shards([str(corpus)], scratch / "shards", docs_per_shard=docs_per_shard)
        urls = expand_shard_spec(str(scratch / "shards"))

        def steady_labeler() -> DocumentLabeler:
            """Full batches from the start, as in a long stream (the loader starts small for latency)."""
            return DocumentLabeler(tokenizer, annotator, batch_size=batch_size, first_batch_size=batch_size)

        with one_core():
            full_pipeline = load_pipeline(spacy_model, prune=False)
            annotator = FactAnnotator(spacy_model, batch_size=batch_size)
            list(full_pipeline.pipe(texts[:4]))
            list(annotator.annotate(texts[:4]))
            warm_up_alignment()
            # The two main cases alternate, so that a noisy machine slows both alike; medians are reported.
            raw_runs, path_runs = [], []
            student_runs: dict[str, list[dict]] = {dtype: [] for dtype in students}
            # Both start each run with spaCy's vocabulary as loaded: words first seen in the run cost both alike.
            for _ in range(repeats):
                with full_pipeline.memory_zone():
                    raw_runs.append(_raw_spacy(texts, tokenizer, full_pipeline))
                annotator.release_memory()
                path_runs.append(_full_path(urls, steady_labeler(), seq_len))
                for dtype, student in students.items():
                    student_runs[dtype].append(_full_path(urls, DocumentLabeler(tokenizer, student), seq_len))
            raw, path = _median_run(raw_runs), _median_run(path_runs)
            comparison = _student_report(urls, steady_labeler(), students, student_runs, path_runs) if students else None
            word_classes = np.concatenate([labels.classes for labels in annotator.annotate(texts)])
            cached_labeler = steady_labeler()
            cached_labeler.cache = LabelCache(scratch / "cache", cached_labeler.identity)
            annotator.release_memory()
            cache_write = _full_path(urls, cached_labeler, seq_len)
            cached = _full_path(urls, cached_labeler, seq_len)
        scaling = [_loader_throughput(urls, tokenizer_path, count, spacy_model, batch_size, seq_len, path["tokens"])
                   for count in range(1, workers + 1)]

    per_core = {"spacy": path["tokens_per_s"]}
    if comparison:
        per_core["student"] = comparison["full_path"]["tokens_per_s"]
    single = scaling[0]["tokens_per_s"]
    for row in scaling:
        row["speedup"] = round(row["tokens_per_s"] / single, 2)
        row["efficiency"] = round(row["speedup"] / row["workers"], 2)
    return {
        "source": source,
        "documents": len(documents),
        "cpus": len(os.sched_getaffinity(0)),
        "spacy_full": raw,
        "full_path": {key: value for key, value in path.items() if key != "labels"},
        "full_path_vs_spacy_full": _median_ratio(path_runs, raw_runs),
        "full_path_vs_paper": round(path["tokens_per_s"] / PAPER_TOKENS_PER_S_PER_CORE, 2),
        "cache_write": {key: value for key, value in cache_write.items() if key != "labels"},
        "cached_epoch": {key: value for key, value in cached.items() if key != "labels"},
        "cached_vs_first_epoch": round(cached["tokens_per_s"] / path["tokens_per_s"], 1),
        "workers": scaling,
        "labels": {**path["labels"], "word_fact_fraction": round(float((word_classes == TokenClass.FACT).mean()), 4)},
        "student": comparison,
        "keep_up": cores_to_keep_up(per_core, gpu_tokens_per_s or {}),
    }


def cores_to_keep_up(tokens_per_s_per_core: dict[str, float], gpu_tokens_per_s: dict[str, float]) -> list[dict]:
    """For each GPU consumer (name -> tokens/s it trains at), the worker cores each labeler (name -> tokens/s
    its full path labels on one core) needs to feed it: consumption over per-core throughput, rounded up to
    whole cores (dataloader workers scale about linearly with cores: the ``workers`` case measures it)."""
    return [
        {"consumer": consumer, "gpu_tokens_per_s": rate,
         **{f"{labeler}_cores": math.ceil(rate / per_core) for labeler, per_core in tokens_per_s_per_core.items()}}
        for consumer, rate in gpu_tokens_per_s.items()
    ]


def _student_report(
    urls: list[str],
    spacy_labeler: DocumentLabeler,
    students: dict[str, StudentAnnotator],
    student_runs: dict[str, list[dict]],
    path_runs: list[dict],
) -> dict:
    """The student's full path next to spaCy's, and its labels against spaCy's on the same documents; with two
    dtypes, the first's report holds the fp32 one's under ``fp32`` and its speed over it under ``vs_fp32``."""
    documents = [doc for shard, url in enumerate(urls) for doc in read_shard(url, shard, ReadStats())]
    teacher = [spacy_labeler.label_document(doc)["token_class"] for doc in documents]
    reports = []
    for dtype, student in students.items():
        student_labeler = DocumentLabeler(spacy_labeler.tokenizer, student)
        predicted = [student_labeler.label_document(doc)["token_class"] for doc in documents]
        path = _median_run(student_runs[dtype])
        reports.append({
            "identity": student.identity,
            "dtype": dtype,
            "full_path": {key: value for key, value in path.items() if key != "labels"},
            "vs_spacy_path": _median_ratio(student_runs[dtype], path_runs),
            "labels": path["labels"],
            "agreement": agreement(teacher, predicted),
        })
    report, *in_fp32 = reports
    if in_fp32:
        report["fp32"], report["vs_fp32"] = in_fp32[0], _median_ratio(*student_runs.values())
    return report


def _median_ratio(ours: list[dict], theirs: list[dict]) -> float:
    """The median of the per-round throughput ratios of two alternating cases."""
    return round(statistics.median(one["tokens_per_s"] / other["tokens_per_s"] for one, other in zip(ours, theirs)), 2)


PAPER_TOKENS_PER_S_PER_CORE = 1827
"""Table 2 of the paper: 152 CPU-hours per 1B tokens."""


def _median_run(runs: list[dict]) -> dict:
    ranked = sorted(runs, key=lambda run: run["tokens_per_s"])
    return {**ranked[len(ranked) // 2], "runs_tokens_per_s": [run["tokens_per_s"] for run in runs]}


def _raw_spacy(texts: list[str], tokenizer: Tokenizer, nlp: Language) -> dict:
    started, wall_started = time.process_time(), time.perf_counter()
    words = 0
    for doc in nlp.pipe(texts):
        words += sum(not token.is_space for token in doc)
    seconds, wall_seconds = time.process_time() - started, time.perf_counter() - wall_started
    tokens = sum(len(tokenizer.encode(text)) for text in texts)
    return {
        "words": words,
        "tokens": tokens,
        "cpu_seconds": round(seconds, 2),
        "wall_seconds": round(wall_seconds, 2),
        "words_per_s": round(words / seconds),
        "tokens_per_s": round(tokens / seconds),
    }


def _full_path(urls: list[str], labeler: DocumentLabeler, seq_len: int) -> dict:
    """Read -> label -> pack every document once, in this process."""
    stats = ReadStats()
    labeler.counts.clear()
    packer = WindowPacker(seq_len)
    tokens = facts = targets = judge_calls = judge_facts = 0
    started, wall_started = time.process_time(), time.perf_counter()
    documents = (
        (None, doc) for shard, url in enumerate(urls) for doc in read_shard(url, shard, stats)
    )
    for _, doc, labels in labeler.label(documents):
        columns = document_columns(doc, labels, labeler.tokenizer.eos_id, 0, 0)
        for _ in packer.add(columns):
            pass
        tokens += len(columns["tokens"])
        classes, judge = columns["token_class"], columns["judge"]
        targets += int((classes != TokenClass.IGNORE).sum())
        facts += int((classes == TokenClass.FACT).sum())
        called = judge == JUDGE_CALL
        judge_calls += int(called.sum())
        judge_facts += int((called & (classes == TokenClass.FACT)).sum())
    seconds, wall_seconds = time.process_time() - started, time.perf_counter() - wall_started
    return {
        "tokens": tokens,
        "cpu_seconds": round(seconds, 2),
        "wall_seconds": round(wall_seconds, 2),
        "tokens_per_s": round(tokens / seconds),
        "sources": dict(labeler.counts),
        "labels": {
            "fact_fraction": round(facts / max(targets, 1), 4),
            "judge_call_fraction": round(judge_calls / max(targets, 1), 4),
            "judge_calls_labeled_fact": round(judge_facts / judge_calls, 4) if judge_calls else None,
        },
    }


def _loader_throughput(
    urls: list[str], tokenizer_path: str, workers: int, spacy_model: str, batch_size: int, seq_len: int, epoch_tokens: int
) -> dict:
    """Steady tokens/s of the dataloader with ``workers`` processes over epoch 0.

    The clock starts once every worker has delivered a batch (spaCy loaded, first documents parsed), so
    start-up is left out alike for every worker count (a worker's first annotation batch is one document,
    so little work is done before that point). Tokens are counted from then to the end of epoch 0.
    """
    annotation = AnnotationConfig(spacy_model=spacy_model, batch_size=batch_size, cache=False)
    loader = TokenLoader(urls, tokenizer_path, seq_len=seq_len, batch_size=1, num_workers=workers, annotation=annotation)
    seen = counted = 0
    started = None
    for number, batch in enumerate(loader, start=1):
        epoch_zero = int((np.vectorize(lambda uid: split_doc_uid(uid)[0])(batch["doc_ids"].numpy()) == 0).sum())
        seen += epoch_zero
        if started is not None:
            counted += epoch_zero
        elif number == workers:
            started = time.perf_counter()
        if seen >= epoch_tokens:
            break
    if not counted:
        raise ValueError(f"the documents fill only {seen} tokens, too few to time {workers} dataloader worker(s) past "
                         f"their first batches of {seq_len} tokens: give more documents")
    seconds = time.perf_counter() - started
    return {"workers": workers, "tokens_per_s": round(counted / seconds), "seconds": round(seconds, 2)}
