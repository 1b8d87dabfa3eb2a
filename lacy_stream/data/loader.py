"""The streaming loader: shards split over ranks and workers, packed windows, exact resume.

Every (rank, worker) pair is a *slot*. Each epoch, the shard list is shuffled with ``(seed, epoch)``, the
same on every rank, and dealt to the slots round robin. With fewer shards than slots, the slots that share
a shard read every k-th sample of it, so every document of an epoch is read by exactly one slot and no
slot is left without data. Streams cycle epochs forever: every rank yields as many batches as the trainer
asks for (training ends by steps or tokens), and a rank never waits on a rank that ran out.

Each worker runs three stages, composable iterators over one another:

1. :func:`slot_documents`: this slot's documents, epoch after epoch, from a :class:`DocumentSource`
   (:func:`~lacy_stream.shards.shard_reader.read_shard` for tar shards);
2. the labeler (:meth:`~lacy_stream.annotate.labeling.DocumentLabeler.label`): token ids and labels;
3. :func:`packed_windows`: documents -> windows of ``seq_len + 1`` tokens, each with the cursor right after it.

Resume: each worker's state is its :class:`Cursor` (epoch, shard, sample, part, tokens consumed), the one
resume object both ends of the pipeline read (the source starts at its sample, the packer at its token),
plus its read counters; :class:`TokenLoader` wraps torchdata's ``StatefulDataLoader``, which snapshots the
workers' states in step with the batches it hands out, and reads the counters from those snapshots.
Resuming with another world size, worker count, seed or shard list is refused with a clear error, never
silently re-split.
"""

from __future__ import annotations

import faulthandler
import functools
import hashlib
import logging
import multiprocessing
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from .. import logs, stop_signals
from ..annotate.alignment import warm_up as warm_up_alignment
from ..annotate.label_cache import (
    LABEL_CACHE_COLUMNS,
    REFERENCE_CACHE_COLUMNS,
    LabelCache,
    default_cache_dir,
    file_digest,
)
from ..annotate.labeling import Audit, DocumentLabeler, Labels, TokenScorer, build_annotator, student_path
from ..annotate.spacy_pipeline import resolve_model
from ..config.job_config import AnnotationConfig, DataConfig
from ..shards.documents import MAX_SKIP_RATIO, Document, ReadStats, TooManySkipsError
from ..shards.shard_reader import read_shard
from ..shards.specs import expand_shard_spec
from ..shards.streams import StreamOptions
from ..tokenizer import Tokenizer
from .packing import COLUMNS, WindowPacker, document_columns

log = logging.getLogger(__name__)


class ResumeMismatchError(ValueError):
    """A saved loader state does not belong to this data layout."""


@dataclass(frozen=True)
class ShardAssignment:
    """One shard for one slot in one epoch: the slot reads samples ``i`` with ``i % stride == offset``."""

    shard: int
    stride: int = 1
    offset: int = 0


def assign_shards(num_shards: int, num_slots: int, slot: int, epoch: int, seed: int) -> list[ShardAssignment]:
    if num_shards < 1:
        raise ValueError("no shards to read")
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    if num_shards >= num_slots:
        return [ShardAssignment(int(order[i])) for i in range(slot, num_shards, num_slots)]
    position = slot % num_shards
    sharing = num_slots // num_shards + (1 if position < num_slots % num_shards else 0)
    return [ShardAssignment(int(order[position]), sharing, slot // num_shards)]


@dataclass
class Cursor:
    """Where a slot's stream stands right after its last yielded window.

    ``sample`` is the sample being consumed (-1: none yet in this assignment), ``part`` its part,
    ``token_offset`` how many of that part's tokens were packed, ``position_base`` the part's first
    position in its document.
    """

    epoch: int = 0
    assignment: int = 0
    sample: int = -1
    part: int = 0
    token_offset: int = 0
    position_base: int = 0

    @property
    def started(self) -> bool:
        """Whether the stream was stopped inside an assignment (else it starts at the assignment's beginning)."""
        return self.sample >= 0

    def consumed(self, doc: Document) -> bool:
        """Whether ``doc`` (a part of the sample being consumed) was fully packed before the stop."""
        return doc.index == self.sample and doc.part < self.part


class DocumentSource(Protocol):
    """The documents of one shard (``read_shard`` bound to its options): samples ``i >= start`` with
    ``i % stride == offset``, counted in ``stats`` (``resumed``: the shard was already counted)."""

    def __call__(
        self, url: str, shard: int, stats: ReadStats, *, start: int, stride: int, offset: int, resumed: bool
    ) -> Iterator[Document]: ...


@dataclass(frozen=True)
class SlotPlan:
    """Which documents one slot reads: its share of ``urls`` under the layout of ``num_slots`` slots."""

    urls: list[str]
    slot: int
    num_slots: int
    seed: int
    name: str
    """For messages: ``rank R worker W``."""


@dataclass(frozen=True)
class StreamPosition:
    """Where a document came from, and the read counters right after it was read."""

    epoch: int
    assignment: int
    read_stats: dict


def slot_documents(
    plan: SlotPlan, source: DocumentSource, stats: ReadStats, resume: Cursor, max_skip_ratio: float
) -> Iterator[tuple[StreamPosition, Document]]:
    """Every document of the slot, epoch after epoch, from ``resume`` on (its document first)."""
    started = resume.started
    epoch, first_assignment = resume.epoch, resume.assignment
    while True:
        assignments = assign_shards(len(plan.urls), plan.num_slots, plan.slot, epoch, plan.seed)
        documents_this_epoch = started
        for number in range(first_assignment, len(assignments)):
            assignment = assignments[number]
            documents = source(
                plan.urls[assignment.shard], assignment.shard, stats, start=resume.sample if started else 0,
                stride=assignment.stride, offset=assignment.offset, resumed=started,
            )
            for doc in documents:
                documents_this_epoch = True
                if started and resume.consumed(doc):
                    continue
                yield StreamPosition(epoch, number, stats.as_dict()), doc
            started = False
        if not documents_this_epoch:
            raise TooManySkipsError(
                f"{plan.name} read no document in epoch {epoch}: its share of the {len(plan.urls)} shards is empty "
                f"or every sample was skipped ({dict(stats.skipped)}); use fewer workers or ranks, or more data"
            )
        stats.check_skips(max_skip_ratio, f"{plan.name} after epoch {epoch}")
        epoch, first_assignment = epoch + 1, 0


def packed_windows(
    labeled: Iterator[tuple[StreamPosition, Document, Labels]], packer: WindowPacker, eos_id: int, resume: Cursor
) -> Iterator[tuple[dict[str, np.ndarray], Cursor, dict]]:
    """Windows of the labeled documents, each with the cursor and read counters right after it.

    The first document continues where ``resume`` stopped: from its ``token_offset``, at its positions.
    """
    first = resume.started
    position_base = 0
    for position, doc, labels in labeled:
        start = 0
        if doc.part == 0:
            position_base = 0
        if first:
            start, position_base, first = resume.token_offset, resume.position_base, False
        columns = document_columns(doc, labels, eos_id, position.epoch, position_base)
        for window, consumed in packer.add(columns, start):
            cursor = Cursor(position.epoch, position.assignment, doc.index, doc.part, consumed, position_base)
            yield window, cursor, position.read_stats
        position_base += len(columns["tokens"])


def shard_list_digest(urls: list[str]) -> str:
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


class PackedShardDataset(IterableDataset):
    """Infinite stream of packed windows for one rank; each dataloader worker of that rank is one slot."""

    def __init__(
        self,
        urls: list[str],
        tokenizer_path: str,
        *,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        options: StreamOptions = StreamOptions(),
        max_doc_chars: int = 1_000_000,
        annotation: AnnotationConfig = AnnotationConfig(),
        reference: Callable[[], TokenScorer] | None = None,
        max_skip_ratio: float = MAX_SKIP_RATIO,
    ) -> None:
        if not urls:
            raise ValueError("no shards to read")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.urls = list(urls)
        self.tokenizer_path = tokenizer_path
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.options = options
        self.max_doc_chars = max_doc_chars
        # Resolved here: a worker, started from the fork server, does not see the environment as it is now.
        self.annotation = replace(annotation, cache_dir=str(annotation.cache_dir or default_cache_dir()))
        self.reference = reference
        self.max_skip_ratio = max_skip_ratio
        self.source: DocumentSource = functools.partial(read_shard, options=options, max_doc_chars=max_doc_chars)
        self.cursor = Cursor()
        self.stats = ReadStats()
        self._stats_at_cursor = self.stats.as_dict()
        self.label_counts: Counter[str] = Counter()
        """Where the labeler got its labels (``DocumentLabeler.counts``: cached, annotated, cache_corrupt, ...).
        The work done so far, not a position: it counts documents labeled ahead of the cursor, which a resumed
        run labels again (and counts again)."""

    def layout(self) -> dict:
        worker = get_worker_info()
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "num_workers": worker.num_workers if worker else 0,
            "worker": worker.id if worker else 0,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "shards": shard_list_digest(self.urls),
        }

    def state_dict(self) -> dict:
        return {"layout": self.layout(), "cursor": asdict(self.cursor), "stats": self._stats_at_cursor,
                "labels": dict(self.label_counts)}

    def load_state_dict(self, state: dict) -> None:
        check_layout(state["layout"], self.layout())
        self.cursor = Cursor(**state["cursor"])
        self.stats = ReadStats.from_dict(state["stats"])
        self._stats_at_cursor = self.stats.as_dict()
        self.label_counts = Counter(state.get("labels", {}))  # absent from states saved before it was kept

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        if worker is not None:
            torch.set_num_threads(1)  # one core per worker: spaCy is single-threaded, torch must not fan out
        num_workers = worker.num_workers if worker else 1
        worker_id = worker.id if worker else 0
        plan = SlotPlan(
            self.urls, self.rank * num_workers + worker_id, self.world_size * num_workers, self.seed,
            f"rank {self.rank} worker {worker_id}",
        )
        tokenizer = Tokenizer(self.tokenizer_path)
        labeler = build_labeler(tokenizer, self.annotation, self.max_doc_chars, self.reference)
        labeler.counts = self.label_counts
        resume = self.cursor
        documents = slot_documents(plan, self.source, self.stats, resume, self.max_skip_ratio)
        windows = packed_windows(labeler.label(documents), WindowPacker(self.seq_len), tokenizer.eos_id, resume)
        for window, self.cursor, self._stats_at_cursor in windows:
            yield window


def check_annotation_config(annotation: AnnotationConfig, tokenizer: Tokenizer) -> None:
    """Fail in the calling process, before any worker starts, on settings a worker would trip over."""
    if annotation.batch_size < 1:
        raise ValueError(f"annotation.batch_size must be at least 1, got {annotation.batch_size}")
    if annotation.enabled and student_path(annotation.labeler):
        from ..annotate.student_labeler import load_student

        load_student(student_path(annotation.labeler), tokenizer)
    elif annotation.enabled:
        resolve_model(annotation.spacy_model)


def build_labeler(
    tokenizer: Tokenizer,
    annotation: AnnotationConfig,
    max_doc_chars: int,
    reference: Callable[[], TokenScorer] | None = None,
) -> DocumentLabeler:
    """The labeler of one worker: spaCy or a student as ``annotation`` says, a reference model's losses with
    ``reference`` (a factory: each worker builds its own scorer)."""
    annotator = None
    if annotation.enabled:
        annotator = build_annotator(
            annotation.labeler, tokenizer, spacy_model=annotation.spacy_model, batch_size=annotation.batch_size,
            max_doc_chars=max_doc_chars, student_dtype=annotation.student_dtype,
        )
    labeler = DocumentLabeler(tokenizer, annotator, batch_size=annotation.batch_size)
    if annotator is not None and student_path(annotation.labeler) and annotation.audit_ratio > 0:
        teacher = build_annotator("spacy", tokenizer, spacy_model=annotation.spacy_model,
                                  batch_size=annotation.batch_size, max_doc_chars=max_doc_chars)
        labeler.audit = Audit(teacher, annotation.audit_ratio)
    cache_root = annotation.cache_dir  # resolved by the dataset, in the trainer's environment
    if annotation.cache and annotator is not None:
        labeler.cache = _opened_cache(cache_root, labeler.identity, LABEL_CACHE_COLUMNS)
    if reference is not None:
        labeler.reference = reference()
        if annotation.cache:
            identity = f"{labeler.reference.identity}|tokenizer:{file_digest(tokenizer.model_path)}"
            labeler.reference_cache = _opened_cache(cache_root, identity, REFERENCE_CACHE_COLUMNS)
    return labeler


def _opened_cache(root: str, identity: str, columns: dict) -> LabelCache | None:
    """The cache, or None (labels computed every epoch) where its directory cannot be made or written."""
    try:
        return LabelCache(root, identity, columns)
    except OSError as error:
        log.warning("label cache: cannot use %s (%s); labeling without a cache", root, error.strerror or error)
        return None


def stream_options(data: DataConfig) -> StreamOptions:
    return StreamOptions(timeout_s=data.http_timeout_s, deadline_s=data.http_deadline_s, retries=data.http_retries,
                         allow_pipe=data.allow_pipe)


def check_layout(saved: dict, current: dict) -> None:
    differences = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    if differences:
        described = ", ".join(f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in differences.items())
        raise ResumeMismatchError(
            f"the saved data-loader state was made with another data layout ({described}); resume with the "
            "same shards, seed, sequence length, world size and number of workers, or start a new run"
        )


def collate_windows(windows: list[dict]) -> dict:
    return {name: torch.from_numpy(np.stack([window[name] for window in windows])) for name in COLUMNS}


class TokenLoader:
    """Batches of packed windows for one data-parallel rank, with resumable state and read counters.

    Each batch is a dict of ``[batch_size, seq_len + 1]`` tensors, one per column of
    :data:`.packing.COLUMNS` (``tokens``, ``token_class``, ``judge``, ``ref_loss``, ``positions``,
    ``doc_ids``). :meth:`read_stats` sums the read counters of this rank's workers.
    """

    def __init__(
        self,
        urls: list[str],
        tokenizer_path: str,
        *,
        seq_len: int,
        batch_size: int,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        options: StreamOptions = StreamOptions(),
        max_doc_chars: int = 1_000_000,
        prefetch_factor: int = 2,
        annotation: AnnotationConfig = AnnotationConfig(),
        reference: Callable[[], TokenScorer] | None = None,
        max_skip_ratio: float = MAX_SKIP_RATIO,
    ) -> None:
        check_annotation_config(annotation, Tokenizer(tokenizer_path))
        warm_up_alignment()
        self.dataset = PackedShardDataset(
            urls,
            tokenizer_path,
            seq_len=seq_len,
            rank=rank,
            world_size=world_size,
            seed=seed,
            options=options,
            max_doc_chars=max_doc_chars,
            annotation=annotation,
            reference=reference,
            max_skip_ratio=max_skip_ratio,
        )
        self.num_workers = num_workers
        with warnings.catch_warnings():
            # torchdata 0.11 calls a torch function that torch has since deprecated.
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            self.loader = StatefulDataLoader(
                self.dataset,
                batch_size=batch_size,
                num_workers=num_workers,
                collate_fn=collate_windows,
                prefetch_factor=prefetch_factor if num_workers > 0 else None,
                persistent_workers=False,
                multiprocessing_context=_worker_context() if num_workers > 0 else None,
                # A stop signal to the process group is the trainer's to act on: it saves, then ends the workers.
                worker_init_fn=functools.partial(_prepare_worker, log_level=logging.getLogger().getEffectiveLevel()),
                # The workers' base seed from a generator of the loader's own, not torch's global one: drawing it
                # there would shift the trainer's random stream by when a resumed run starts its iterator.
                generator=torch.Generator().manual_seed(seed),
            )

    @classmethod
    def from_config(
        cls,
        data: DataConfig,
        tokenizer_path: str,
        annotation: AnnotationConfig = AnnotationConfig(),
        *,
        reference: Callable[[], TokenScorer] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> "TokenLoader":
        options = stream_options(data)
        return cls(
            expand_shard_spec(data.shards, options),
            tokenizer_path,
            seq_len=data.seq_len,
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            rank=rank,
            world_size=world_size,
            seed=data.seed,
            options=options,
            max_doc_chars=data.max_doc_chars,
            prefetch_factor=data.prefetch_factor,
            annotation=annotation,
            reference=reference,
            max_skip_ratio=data.max_skip_ratio,
        )

    def _layout(self) -> dict:
        layout = self.dataset.layout()
        layout["num_workers"] = self.num_workers
        del layout["worker"]
        return layout

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.loader)
        try:
            yield from batches
        except TooManySkipsError as error:
            # From a worker process, the error's message is the worker's whole traceback; its own message,
            # the traceback's last line, is what the user needs.
            message = str(error).rpartition(f"{TooManySkipsError.__name__}: ")[2].strip()
            if message == str(error):
                raise
            raise TooManySkipsError(message) from None
        finally:
            # The workers end now rather than when the iterator is collected: an error's traceback can hold it
            # until the interpreter exits, where workers, which outlive a SIGTERM for a while, would delay the exit.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            # torch waits 5 s for a worker to finish its document, then sends SIGTERM, which a worker outlives by
            # its grace period (stop_signals). Nothing it makes now is read: it ends here, so that no worker
            # outlives the loader (nor the fork server, whose temporary directory it would still be using).
            for worker in getattr(batches, "_workers", ()):
                if worker.is_alive():
                    worker.kill()
                    worker.join()

    def read_stats(self) -> dict:
        """This rank's read counters, summed over its workers as of the last batch handed out."""
        total = ReadStats()
        for state in _dataset_states(self.loader.state_dict()):
            total.add_dict(state["stats"])
        return total.as_dict()

    def label_counts(self) -> dict:
        """Where this rank's workers got their labels (see ``PackedShardDataset.label_counts``), summed."""
        total: Counter[str] = Counter()
        for state in _dataset_states(self.loader.state_dict()):
            total.update(state.get("labels", {}))
        return dict(sorted(total.items()))

    def state_dict(self) -> dict:
        return {"layout": self._layout(), "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_layout(state["layout"], self._layout())
        self.loader.load_state_dict(state["loader"])


def _dataset_states(loader_state: dict) -> list[dict]:
    """The dataset states (one per worker, or the process's own) in a ``StatefulDataLoader`` state; none
    before the first batch. The keys are torchdata's state format (checkpoints store it as it is)."""
    if "dataset_state" in loader_state:
        return [loader_state["dataset_state"]] if loader_state["dataset_state"] else []
    workers = loader_state.get("_snapshot", {}).get("_worker_snapshots", {})
    return [worker["dataset_state"] for worker in workers.values() if worker.get("dataset_state")]


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers start from a fork server, never forked from the trainer: a fork copies a process mid-flight,
    the locks its threads (OpenMP's pool after a training step, CUDA's, NCCL's) hold included, and a worker
    forked that way can crash at random. The server imports this module (torch, spaCy's) once, so a worker
    starts as fast as a fork."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _prepare_worker(worker_id: int, log_level: int) -> None:
    stop_signals.leave_to_the_main_process()
    logs.configure(log_level)  # a worker starts from the fork server, not from the configured main process
    # A native crash in a worker (spaCy, the student, a decompressor) prints the Python stack of every thread
    # before torch reports the worker's death.
    faulthandler.enable(all_threads=True)
    # A worker's process object was made in the trainer and carries the trainer's multiprocessing temporary
    # directory, which the trainer removes when it exits; the worker's own sockets (torch shares tensors through
    # them) go to a directory of its own, removed when it exits.
    multiprocessing.current_process()._config.pop("tempdir", None)
