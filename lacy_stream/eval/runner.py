"""``lacy-stream eval``: run the evaluation sections on a checkpoint into ``report.json``, ``report.md`` and
``report.html``.

Every known section appears in the report with a status: ``run`` (with its results), ``partial`` (it ran, but
a part of it needs what was not given, e.g. acceptability without a judge endpoint: the reason says which),
``skipped`` (with the reason: not requested, a missing optional dependency) or ``failed`` (with the error;
the other sections still run and the command exits with 1).

Sections:

* ``validation`` – call / non-call / total validation losses on held-out text, with ``--baseline`` scored
  on the model's call masks (:mod:`.validation`);
* ``nlu`` – ARC-Easy and PIQA accuracy (:mod:`.nlu`);
* ``lm_eval`` – the same tasks through lm-evaluation-harness (:mod:`.lm_eval_model`); only on request,
  as a cross-check, since it repeats the ``nlu`` computation;
* ``acceptability`` – accuracy and, with a judge endpoint, acceptability by loss bucket for fact and
  non-fact tokens, plus a plot (:mod:`.acceptability`);
* ``fact_leakage`` – PopQA long-tail and BIG-bench QA Wikidata answered 3-shot with the ``<CALL>`` logit
  at -inf, and how often the gold answer is contained (Sec. 5.3, :mod:`.fact_leakage`);
* ``factscore`` – biographies written in the cascade (partner ``--cascade``, call policy ``--policy``,
  :mod:`.generation`), exported in FactScore's input format and, with a judge and ``--knowledge``, scored
  FactScore-style (:mod:`.factscore`);
* ``generation_throughput`` – tokens per second without calls and in the cascade, side by side
  (:mod:`.generation`).

The cascade partner is loaded once, when the first section that needs it runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Protocol

from ..html_page import heading, html_page, html_table, markdown_html
from ..inference.loading import LacyModel, load_lacy
from ..inference.partners import partner_from_spec
from ..markdown import markdown_table
from .acceptability import evaluate_acceptability
from .fact_leakage import (
    answer_without_calls,
    evaluate_fact_leakage,
    read_bigbench,
    read_popqa,
)
from .factscore import KnowledgeSource, read_entities
from .generation import CascadeGenerator, evaluate_cascade_factscore, measure_throughput
from .heldout import read_heldout_texts
from .nlu import evaluate_nlu
from .config import SECTIONS, EvalConfig
from .validation import evaluate_validation

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
REPORT_HTML = "report.html"


class SectionSkipped(Exception):
    """A section that cannot run in this configuration; the message says why."""


class SectionResult(Protocol):
    """What a section returns. One that ran in part also has ``not_run``: what did not run and why (None: all ran)."""

    def to_dict(self) -> dict: ...

    def markdown(self) -> str: ...


@dataclass
class SectionOutcome:
    name: str
    status: str
    """``run``, ``partial``, ``skipped`` or ``failed``."""
    reason: str | None = None
    seconds: float = 0.0
    results: dict = field(default_factory=dict)
    markdown: str = ""


@dataclass
class EvalReport:
    config: EvalConfig
    created: str
    sections: list[SectionOutcome]

    @property
    def failed(self) -> list[str]:
        return [section.name for section in self.sections if section.status == "failed"]

    def to_dict(self) -> dict:
        return {
            "checkpoint": self.config.checkpoint,
            "baseline": self.config.baseline,
            "created": self.created,
            "config": self.config.describe(),
            "sections": {
                section.name: {
                    "status": section.status,
                    "reason": section.reason,
                    "seconds": round(section.seconds, 3),
                    "results": section.results,
                }
                for section in self.sections
            },
        }

    @property
    def with_results(self) -> list[SectionOutcome]:
        return [section for section in self.sections if section.status in ("run", "partial")]

    def _header(self) -> str:
        return (f"- baseline: {f'`{self.config.baseline}`' if self.config.baseline else 'none'}\n"
                f"- created: {self.created}")

    def _summary(self) -> tuple[list[str], list[list[str]]]:
        """The header and rows of the table of sections."""
        rows = [
            [section.name, section.status, f"{section.seconds:.1f} s" if section.status != "skipped" else "",
             section.reason or ""]
            for section in self.sections
        ]
        return ["section", "status", "time", "note"], rows

    def markdown(self) -> str:
        lines = [f"# LaCy evaluation of `{self.config.checkpoint}`", "", self._header(), "",
                 markdown_table(*self._summary())]
        for section in self.with_results:
            lines += ["", f"## {section.name}", "", section.markdown]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        """A standalone page of the same report; plots are the PNG files next to it."""
        parts = [markdown_html(self._header()), html_table(*self._summary())]
        for section in self.with_results:
            parts += [heading(section.name), markdown_html(section.markdown)]
        return html_page(f"LaCy evaluation of {self.config.checkpoint}", *parts)

    def write(self, out_dir: str | Path) -> tuple[Path, Path, Path]:
        """``report.json``, ``report.md`` and ``report.html`` in ``out_dir``; returns their paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = out_dir / REPORT_JSON, out_dir / REPORT_MARKDOWN, out_dir / REPORT_HTML
        paths[0].write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        paths[1].write_text(self.markdown(), encoding="utf-8")
        paths[2].write_text(self.html(), encoding="utf-8")
        return paths


@dataclass
class _Models:
    config: EvalConfig
    lacy: LacyModel
    baseline: LacyModel | None

    @cached_property
    def generator(self) -> CascadeGenerator:
        """The model with its cascade partner, loaded on first use (once for all sections)."""
        config = self.config
        return CascadeGenerator(
            lacy=self.lacy,
            partner=partner_from_spec(config.cascade, device=config.device) if config.cascade else None,
            partner_spec=config.cascade,
            policy_name=config.policy,
            call_rate=config.call_rate,
            max_new_tokens=config.max_new_tokens,
            background_dir=config.background_dir,
            call_pieces=config.call_pieces,
        )


def evaluate(config: EvalConfig) -> EvalReport:
    """Run the requested sections of ``config`` and write the report to ``config.out_dir``."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    models = _Models(
        config=config,
        lacy=load_lacy(config.checkpoint, device=config.device),
        baseline=load_lacy(config.baseline, device=config.device) if config.baseline else None,
    )
    runners: dict[str, Callable[[], SectionResult]] = {
        "validation": lambda: _validation(config, models),
        "nlu": lambda: evaluate_nlu(
            models.lacy, config.inputs.nlu_tasks, limit=config.limit, batch_size=config.batch_size
        ),
        "lm_eval": lambda: _lm_eval(config, models),
        "acceptability": lambda: _acceptability(config, models),
        "fact_leakage": lambda: _fact_leakage(config, models),
        "factscore": lambda: _factscore(config, models),
        "generation_throughput": lambda: measure_throughput(
            models.generator, read_entities(config.inputs.factscore_entities, limit=config.limit)
        ),
    }
    outcomes = [_run_section(name, runners[name], config) for name in SECTIONS]
    report = EvalReport(
        config=config, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), sections=outcomes
    )
    report.write(config.out_dir)
    return report


def _run_section(name: str, runner: Callable[[], SectionResult], config: EvalConfig) -> SectionOutcome:
    if name not in config.sections:
        return SectionOutcome(name, "skipped", reason="not requested (--sections)")
    log.info("eval: %s", name)
    started = time.perf_counter()
    try:
        result = runner()
    except SectionSkipped as skipped:
        return SectionOutcome(name, "skipped", reason=str(skipped))
    except Exception as error:  # one broken section must not cost the others their results
        # One line each; the traceback only for -v (INFO), as the summary repeats the reason anyway.
        log.error("eval: section %s failed: %s: %s", name, type(error).__name__, error, exc_info=log.isEnabledFor(logging.INFO))
        return SectionOutcome(
            name, "failed", reason=f"{type(error).__name__}: {error}", seconds=time.perf_counter() - started
        )
    not_run = getattr(result, "not_run", None)
    return SectionOutcome(
        name, "partial" if not_run else "run", reason=not_run, seconds=time.perf_counter() - started,
        results=result.to_dict(), markdown=result.markdown(),
    )


def _validation(config: EvalConfig, models: _Models) -> SectionResult:
    return evaluate_validation(
        models.lacy,
        read_heldout_texts(config.inputs.heldout, limit=config.limit),
        baseline=models.baseline,
        batch_size=config.batch_size,
        call_ratio=config.call_ratio,
    )


def _lm_eval(config: EvalConfig, models: _Models) -> SectionResult:
    try:
        from .lm_eval_model import evaluate_with_lm_eval
    except ImportError as error:
        raise SectionSkipped(f"lm-eval is not installed ({error}); pip install 'lacy-stream[eval]'") from error
    return evaluate_with_lm_eval(
        models.lacy,
        config.inputs.lm_eval_tasks,
        config.out_dir / "lm_eval_tasks",
        limit=config.limit,
        batch_size=config.batch_size,
    )


def _acceptability(config: EvalConfig, models: _Models) -> SectionResult:
    documents = min(config.acceptability_documents, config.limit or config.acceptability_documents)
    return evaluate_acceptability(
        models.lacy,
        read_heldout_texts(config.inputs.heldout, limit=documents),
        out_dir=config.out_dir,
        endpoint=config.judge,
        spacy_model=config.spacy_model,
        buckets=config.loss_buckets,
        judged_tokens=config.judged_tokens,
        batch_size=config.batch_size,
    )


def _fact_leakage(config: EvalConfig, models: _Models) -> SectionResult:
    return evaluate_fact_leakage(
        {"popqa": read_popqa(config.inputs.popqa), "bigbench": read_bigbench(config.inputs.bigbench)},
        answer_without_calls(models.lacy),
        config.out_dir,
        limit=config.limit,
    )


def _factscore(config: EvalConfig, models: _Models) -> SectionResult:
    return evaluate_cascade_factscore(
        models.generator,
        read_entities(config.inputs.factscore_entities, limit=config.limit),
        config.out_dir,
        endpoint=config.judge,
        knowledge=KnowledgeSource.from_jsonl(config.knowledge) if config.knowledge else None,
    )


def run_eval(config: EvalConfig) -> int:
    """``lacy-stream eval``: 0 when every requested section ran (in whole or in part) or was skipped, 1 when one
    failed."""
    report = evaluate(config)
    for section in report.sections:
        print(f"{section.name:>22}: {section.status}" + (f" ({section.reason})" if section.reason else ""))
    print(f"report: {config.out_dir / REPORT_HTML} (and {REPORT_MARKDOWN}, {REPORT_JSON})")
    return 1 if report.failed else 0
