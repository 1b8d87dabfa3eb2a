"""What ``lacy-stream eval`` runs: the sections, the paper's settings they default to, and the typed config of a run
(``EvalConfig``, with its input files ``EvalInputs``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..inference.call_policy import DEFAULT_CALL_RATE, DEFAULT_POLICY, POLICY_NAMES
from ..inference.generate import MAX_NEW_TOKENS
from .chat_endpoint import ChatEndpoint

SECTIONS = ("validation", "nlu", "lm_eval", "acceptability", "fact_leakage", "factscore", "generation_throughput")
DEFAULT_SECTIONS = tuple(name for name in SECTIONS if name != "lm_eval")
PAPER_CALL_RATIO = 0.15
"""Share of tokens in the validation call mask (Appendix A.4.3), the train-time call ratio."""
PAPER_ACCEPTABILITY_DOCUMENTS = 112  # Sec. 3: one validation batch of 112 documents


@dataclass(frozen=True)
class EvalInputs:
    """The data files of the sections; by default all from the shared directory."""

    heldout: str
    """Held-out text: a jsonl / jsonl.zst / parquet file with a ``text`` field, or a shard spec."""
    arc_easy: Path
    piqa: Path
    factscore_entities: Path
    popqa: Path
    bigbench: Path
    hellaswag: Path | None = None
    """HellaSwag's own jsonl (its validation file); None: the task does not run (the shared data has none)."""
    siqa: Path | None = None
    """Social IQa's own jsonl, its labels in a ``label`` field or the ``-labels.lst`` file beside it."""

    @classmethod
    def from_shared(cls, shared: str | Path) -> "EvalInputs":
        shared = Path(shared)
        return cls(
            heldout=str(shared / "data" / "dwiki-dev.jsonl"),
            arc_easy=shared / "eval" / "arc_easy.jsonl",
            piqa=shared / "eval" / "piqa.jsonl",
            factscore_entities=shared / "eval" / "factscore_prompt_entities_183.txt",
            popqa=shared / "eval" / "popqa_longtail.jsonl",
            bigbench=shared / "eval" / "bigbench_qa_wikidata.jsonl",
        )

    @property
    def nlu_tasks(self) -> dict[str, Path | None]:
        """The paper's four NLU tasks (Appendix B); None: no file given."""
        return {"arc_easy": self.arc_easy, "piqa": self.piqa, "hellaswag": self.hellaswag, "siqa": self.siqa}

    @property
    def lm_eval_tasks(self) -> dict[str, Path]:
        """The tasks the ``lm_eval`` section gives lm-evaluation-harness as local task configs."""
        return {"arc_easy": self.arc_easy, "piqa": self.piqa}


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str
    out_dir: Path
    inputs: EvalInputs
    baseline: str | None = None
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    limit: int | None = None
    """At most this many documents, examples or entities per section (quick runs); None: all."""
    device: str = "cpu"
    batch_size: int = 8
    call_ratio: float = PAPER_CALL_RATIO
    judge: ChatEndpoint | None = None
    knowledge: Path | None = None
    """FactScore's knowledge source: a jsonl of ``{title, text}`` pages."""
    cascade: str | None = None
    """The cascade partner: ``hf:DIR``, ``openai:URL#MODEL`` or ``lacy:PATH``; None: no partner."""
    policy: str = DEFAULT_POLICY
    call_rate: float = DEFAULT_CALL_RATE
    """The policy's target (calibrated, i-LaCy) or random call rate."""
    max_new_tokens: int = MAX_NEW_TOKENS
    """Tokens per biography (FactScore and throughput)."""
    call_pieces: int | None = None
    """Pieces one call appends at most; None: all the pieces of the partner's token (Appendix A.5)."""
    background_dir: Path | None = None
    """Background texts ``<name>.txt`` for the partner's RAG prompt (FactScore)."""
    acceptability_documents: int = PAPER_ACCEPTABILITY_DOCUMENTS
    judged_tokens: int = 2000
    loss_buckets: int = 10
    spacy_model: str = "en_core_web_sm"

    def __post_init__(self) -> None:
        unknown = set(self.sections) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown call policy {self.policy!r}; known: {', '.join(POLICY_NAMES)}")
        if self.call_pieces is not None and self.call_pieces < 1:
            raise ValueError(f"a call must append at least one piece, got --call-pieces {self.call_pieces}")
        if self.background_dir is not None and self.cascade is None:
            raise ValueError("background texts (--background-dir) are for the cascade partner: give --cascade")

    def describe(self) -> dict:
        """The configuration as JSON values (the judge without its API key)."""
        described = {
            item.name: getattr(self, item.name)
            for item in dataclasses.fields(self)
            if item.name not in ("inputs", "judge")
        }
        described["inputs"] = {name: str(value) for name, value in dataclasses.asdict(self.inputs).items()}
        described["judge"] = self.judge.describe() if self.judge else None
        return json.loads(json.dumps(described, default=str))
