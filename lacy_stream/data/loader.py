"""The streaming loader: shards split over ranks and workers, packed windows, exact resume.

Every (rank, worker) pair is a *slot*. Each epoch, the shard list is shuffled with ``(seed, epoch)``, the
same on every rank, and dealt to the slots round robin. With fewer shards than slots, the slots that share
a shard read every k-th sample of it, so every document of an epoch is read by exactly one slot and no
slot is left without data. Streams cycle epochs forever: every rank yields as many batches as the trainer
asks for (training ends by steps or tokens), and a rank never waits on a rank that ran out.

Resume: each worker's state is its cursor (epoch, shard, sample, part, tokens consumed) plus its read
counters; :class:`TokenLoader` wraps torchdata's ``StatefulDataLoader``, which snapshots those states in
step with the batches it hands out. Resuming with another world size, worker count, seed or shard list is
refused with a clear error, never silently re-split.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from ..config.job_config import AnnotationConfig, DataConfig
from ..tokenizer import Tokenizer
from .alignment import warm_up as warm_up_alignment
from .annotation import FactAnnotator
from .documents import MAX_SKIP_RATIO, Document, ReadStats, TooManySkipsError
from .label_cache import REFERENCE_CACHE_COLUMNS, LabelCache, default_cache_dir
from .labeling import DocumentLabeler, file_digest
from .spacy_pipeline import resolve_model
from .packing import COLUMNS, WindowPacker, document_columns
from .shard_reader import read_shard
from .urls import StreamOptions, expand_shard_spec

log = logging.getLogger(__name__)

# torchdata 0.11 calls a torch function that torch has since deprecated, on every loader.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


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
        reference: str = "",
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
        self.annotation = annotation
        self.reference = reference
        self.max_skip_ratio = max_skip_ratio
        self.cursor = Cursor()
        self.stats = ReadStats()
        self._stats_at_cursor = self.stats.as_dict()

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
        return {"layout": self.layout(), "cursor": asdict(self.cursor), "stats": self._stats_at_cursor}

    def load_state_dict(self, state: dict) -> None:
        check_layout(state["layout"], self.layout())
        self.cursor = Cursor(**state["cursor"])
        self.stats = ReadStats.from_dict(state["stats"])
        self._stats_at_cursor = self.stats.as_dict()

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        if worker is not None:
            torch.set_num_threads(1)  # one core per worker: spaCy is single-threaded, torch must not fan out
        num_workers = worker.num_workers if worker else 1
        slot = self.rank * num_workers + (worker.id if worker else 0)
        tokenizer = Tokenizer(self.tokenizer_path)
        labeler = build_labeler(tokenizer, self.annotation, self.max_doc_chars, self.reference)
        packer = WindowPacker(self.seq_len)
        resume = self.cursor if self.cursor.sample >= 0 else None
        position_base = 0
        for position, doc, labels in labeler.label(self._documents(slot, self.world_size * num_workers)):
            start = 0
            if doc.part == 0:
                position_base = 0
            if resume is not None:
                start, position_base = resume.token_offset, resume.position_base
                resume = None
            columns = document_columns(doc, labels, tokenizer.eos_id, position.epoch, position_base)
            for window, consumed in packer.add(columns, start):
                self.cursor = Cursor(position.epoch, position.assignment, doc.index, doc.part, consumed, position_base)
                self._stats_at_cursor = position.read_stats
                window["read_stats"] = position.read_stats
                window["slot"] = slot
                yield window
            position_base += len(columns["tokens"])

    def _documents(self, slot: int, num_slots: int) -> Iterator[tuple["_StreamPosition", Document]]:
        """Every document of this slot, epoch after epoch, from the cursor on (its document first)."""
        resume = self.cursor if self.cursor.sample >= 0 else None
        epoch, first_assignment = self.cursor.epoch, self.cursor.assignment
        while True:
            assignments = assign_shards(len(self.urls), num_slots, slot, epoch, self.seed)
            documents_this_epoch = resume is not None
            for number in range(first_assignment, len(assignments)):
                assignment = assignments[number]
                documents = read_shard(
                    self.urls[assignment.shard],
                    assignment.shard,
                    self.stats,
                    options=self.options,
                    max_doc_chars=self.max_doc_chars,
                    start=resume.sample if resume else 0,
                    stride=assignment.stride,
                    offset=assignment.offset,
                    resumed=resume is not None,
                )
                for doc in documents:
                    documents_this_epoch = True
                    if resume is not None and doc.index == resume.sample and doc.part < resume.part:
                        continue
                    yield _StreamPosition(epoch, number, self.stats.as_dict()), doc
                resume = None
            worker = f"rank {self.rank} worker {slot % (num_slots // self.world_size)}"
            if not documents_this_epoch:
                raise TooManySkipsError(
                    f"{worker} read no document in epoch {epoch}: "
                    f"its share of the {len(self.urls)} shards is empty or every sample was skipped "
                    f"({dict(self.stats.skipped)}); use fewer workers or ranks, or more data"
                )
            self.stats.check_skips(self.max_skip_ratio, f"{worker} after epoch {epoch}")
            epoch, first_assignment = epoch + 1, 0


@dataclass(frozen=True)
class _StreamPosition:
    """Where a document came from, and the read counters right after it was read."""

    epoch: int
    assignment: int
    read_stats: dict


def check_annotation_config(annotation: AnnotationConfig, tokenizer: Tokenizer) -> None:
    """Fail in the calling process, before any worker starts, on settings a worker would trip over."""
    if annotation.batch_size < 1:
        raise ValueError(f"annotation.batch_size must be at least 1, got {annotation.batch_size}")
    if annotation.enabled and student_path(annotation.labeler):
        from .student_labeler import load_student

        load_student(student_path(annotation.labeler), tokenizer)
    elif annotation.enabled:
        resolve_model(annotation.spacy_model)


def student_path(labeler: str) -> str | None:
    """The student file of ``annotation.labeler`` (``student:PATH``); None for ``spacy``."""
    if labeler == "spacy":
        return None
    if labeler.startswith("student:") and labeler[len("student:") :]:
        return labeler[len("student:") :]
    raise ValueError(f"annotation.labeler must be 'spacy' or 'student:PATH', got {labeler!r}")


def build_labeler(
    tokenizer: Tokenizer, annotation: AnnotationConfig, max_doc_chars: int, reference: str = ""
) -> DocumentLabeler:
    """The labeler of one worker: spaCy or a student as ``annotation`` says, a reference model's losses with
    ``reference``."""
    annotator = None
    if annotation.enabled and student_path(annotation.labeler):
        from .student_labeler import StudentAnnotator  # torch: only when needed

        annotator = StudentAnnotator.load(student_path(annotation.labeler), tokenizer)
    elif annotation.enabled:
        annotator = FactAnnotator(annotation.spacy_model, batch_size=annotation.batch_size)
        # Documents are split to max_doc_chars before spaCy sees them; spaCy's own guard would stop a worker.
        annotator.nlp.max_length = max(annotator.nlp.max_length, max_doc_chars)
    labeler = DocumentLabeler(tokenizer, annotator, batch_size=annotation.batch_size)
    cache_root = annotation.cache_dir or default_cache_dir()
    if annotation.cache and annotator is not None:
        labeler.cache = LabelCache(cache_root, labeler.identity)
    if reference:
        from .reference_loss import ReferenceScorer  # loads torch models and transformers: only when needed

        labeler.reference = ReferenceScorer(reference, tokenizer.model_path)
        if annotation.cache:
            identity = f"{labeler.reference.identity}|tokenizer:{file_digest(tokenizer.model_path)}"
            labeler.reference_cache = LabelCache(cache_root, identity, REFERENCE_CACHE_COLUMNS)
    return labeler


def stream_options(data: DataConfig) -> StreamOptions:
    return StreamOptions(timeout_s=data.http_timeout_s, retries=data.http_retries, allow_pipe=data.allow_pipe)


def check_layout(saved: dict, current: dict) -> None:
    differences = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    if differences:
        described = ", ".join(f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in differences.items())
        raise ResumeMismatchError(
            f"the saved data-loader state was made with another data layout ({described}); resume with the "
            "same shards, seed, sequence length, world size and number of workers, or start a new run"
        )


def collate_windows(windows: list[dict]) -> dict:
    batch = {name: torch.from_numpy(np.stack([window[name] for window in windows])) for name in COLUMNS}
    batch["read_stats"] = windows[-1]["read_stats"]
    batch["slot"] = windows[-1]["slot"]
    return batch


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
        reference: str = "",
        max_skip_ratio: float = MAX_SKIP_RATIO,
    ) -> None:
        check_annotation_config(annotation, Tokenizer(tokenizer_path))
        if reference:
            from .reference_loss import check_reference

            check_reference(reference, tokenizer_path)
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
        self.loader = StatefulDataLoader(
            self.dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_windows,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=False,
        )
        self._slot_stats: dict[int, dict] = {}

    @classmethod
    def from_config(
        cls,
        data: DataConfig,
        tokenizer_path: str,
        annotation: AnnotationConfig = AnnotationConfig(),
        *,
        reference: str = "",
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
        try:
            for batch in self.loader:
                self._slot_stats[batch.pop("slot")] = batch.pop("read_stats")
                yield batch
        except TooManySkipsError as error:
            # From a worker process, the error's message is the worker's whole traceback; its own message,
            # the traceback's last line, is what the user needs.
            message = str(error).rpartition(f"{TooManySkipsError.__name__}: ")[2].strip()
            if message == str(error):
                raise
            raise TooManySkipsError(message) from None

    def read_stats(self) -> dict:
        total = ReadStats()
        for stats in self._slot_stats.values():
            total.add_dict(stats)
        return total.as_dict()

    def state_dict(self) -> dict:
        return {"layout": self._layout(), "loader": self.loader.state_dict(), "slot_stats": dict(self._slot_stats)}

    def load_state_dict(self, state: dict) -> None:
        check_layout(state["layout"], self._layout())
        self.loader.load_state_dict(state["loader"])
        self._slot_stats = dict(state["slot_stats"])
