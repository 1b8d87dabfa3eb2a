"""``lacy-stream compare``: finished runs of different methods, evaluated side by side on the same held-out windows.

Every run is scored on the same windows of ``--val-shards`` (read, annotated and packed as training reads
them, so each target has its fact class and judge label). Per run:

* **validation losses at the paper's evaluation masks** (Appendix A.4.3, Figure 5): the call mask C_M of a
  calling run is its own top-15% ``<CALL>`` logits per batch; its call loss (full softmax, Eq. A.5) and
  non-call loss (``<CALL>`` excluded, Eq. A.6) are taken on C_M and on the rest. A baseline run among the
  runs (method ``baseline``) is scored on every calling run's C_M too, as Figure 5's light bars: how hard the
  tokens a method delegates are a priori. A baseline run itself has no C_M; its non-call loss is over all
  tokens;
* **where it calls**: the share of C_M on fact targets and on judge-delegated targets, next to the shares of
  facts and judge tokens among all targets (a method that calls where it should is well above them);
* **call separation**: the AUC of the ``<CALL>`` log-odds for fact targets against all other targets
  (0.5: no separation);
* **what is left to the small model** (the paper's claim: a model that calls where it would err leaves fewer
  factual errors once a partner answers its calls): with a perfect partner answering every position of C_M,
  the fact targets outside C_M that the model gets wrong (its top token, ``<CALL>`` excluded, is not the
  target), as a share of all fact targets, and their mean loss; the same for all targets; the share of C_M on
  fact pieces that begin a word (calling the rest of a word the model has begun prevents no factual error);
  and, as a sensitivity check, the fact errors left by C_M ranked by the ``<CALL>`` log-odds instead of the
  raw logit. Every calling run spends the same budget, so these compare methods at equal cost;
* with ``--cascade``, the realized call rate and tokens/s of calibrated cascade generation on a few
  FactScore prompts;
* for runs that recorded probe windows (``train.probe_windows``), the loss trajectories: the mean loss of the
  probe windows' fact and other targets (``<CALL>`` excluded) at every validation, and the share of their
  fact targets among the model's calls (``trajectories.png``).

Runs trained on other data, another tokenizer or another number of steps than the first run are flagged
in the table, not silently compared; runs with another tokenizer are scored on windows of their own
tokenizer (the same documents, other token ids).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..annotate.label_cache import file_digest
from ..config.job_config import AnnotationConfig, DataConfig
from ..data.loader import TokenLoader
from ..html_page import html_page, html_table, markdown_html, paragraph, png_image
from ..inference.loading import LacyModel, load_lacy
from ..labels import JUDGE_CALL, JUDGE_UNKNOWN, TokenClass
from ..markdown import markdown_table
from ..tokenizer import Tokenizer
from ..trainer.probes import Trajectories, read_trajectories
from .plotting import new_figure
from .scoring import TokenStatistics, token_statistics
from .validation import call_mask

COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"
COMPARISON_HTML = "comparison.html"
TRAJECTORIES_PNG = "trajectories.png"
COLUMNS_NOTE = (
    "Call loss: the true token's loss under the full softmax, <CALL> included, on the run's C_M (Eq. A.5: high "
    "when the model leaves those tokens to <CALL>); non-call loss: the cross-entropy with "
    "<CALL> excluded on the other targets (Eq. A.6). The baseline columns score the baseline run on this run's "
    "C_M. Facts / judge in C_M: the share of C_M on fact / judge-delegated targets. Fact/other AUC: how well "
    "the <CALL> log-odds separate fact targets from the others (0.5: not at all)."
)
LEFT_NOTE = (
    "With a perfect partner answering C_M: fact errors left, the fact targets outside C_M whose top token "
    "(<CALL> excluded) is wrong, as a share of all fact targets; fact loss left, their mean non-call loss over the "
    "fact targets outside C_M; errors left, the same share over all targets; word-initial facts in C_M, the share "
    "of C_M on fact pieces that begin a word; log-odds C_M, the same budget ranked by <CALL> log-odds. A baseline "
    "run calls nowhere: what it leaves is all its errors."
)
"""What the columns of the second table mean."""
TRAJECTORIES_NOTE = (
    "Loss trajectories of the probe windows (train.probe_windows, recorded at every validation): the mean loss "
    "(<CALL> excluded) of their fact and other targets, and the share of their fact targets among the model's calls."
)
"""What the columns of the comparison table mean (under the table of the HTML page)."""


@dataclass
class RunInfo:
    """What a run directory says about how it was trained."""

    path: str
    name: str
    method: str
    steps: int
    """The last optimizer step logged in ``metrics.jsonl`` (the configured steps when nothing was logged)."""
    data: str
    tokenizer: str
    """A digest of the SentencePiece model's bytes."""
    flags: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, run_dir: Path) -> "RunInfo":
        config_path = run_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} missing: compare reads finished training runs (lacy-stream train)")
        config = json.loads(config_path.read_text())
        records = _metrics(run_dir)
        return cls(
            path=str(run_dir),
            name=run_dir.name,
            method=config["loss"]["method"],
            steps=records[-1]["step"] if records else config["train"]["steps"],
            data=config["data"]["shards"],
            tokenizer=file_digest(config["tokenizer"]["path"]),
        )


@dataclass
class RunScores:
    tokens: int
    """Valid targets scored."""
    calls: int
    """Positions in C_M (0 for a baseline run)."""
    call_loss: float | None
    non_call_loss: float
    baseline_call_loss: float | None
    """The baseline run scored on this run's C_M (None without a baseline run, or for the baseline itself)."""
    baseline_non_call_loss: float | None
    fact_share_of_calls: float | None
    judge_share_of_calls: float | None
    """Among C_M positions whose document has judge markup; None when none has."""
    fact_share: float
    """Fact targets among all valid targets."""
    judge_share: float | None
    fact_call_auc: float | None
    """AUC of the ``<CALL>`` log-odds, fact targets vs all other valid targets."""
    fact_errors_left: float | None = None
    """Fact targets outside C_M whose top token (``<CALL>`` excluded) is not the target, over all fact targets."""
    fact_loss_left: float | None = None
    """Mean ``<CALL>``-excluded loss of the fact targets outside C_M."""
    errors_left: float | None = None
    """Targets outside C_M whose top token is not the target, over all valid targets."""
    word_initial_share_of_calls: float | None = None
    """The share of C_M on fact targets that begin a word (their piece starts with SentencePiece's ``▁``)."""
    word_initial_fact_share: float | None = None
    """Word-initial fact targets among all fact targets."""
    fact_errors_left_log_odds: float | None = None
    """``fact_errors_left`` with C_M ranked by the ``<CALL>`` log-odds instead of the raw logit."""
    fact_share_of_calls_log_odds: float | None = None
    cascade_call_rate: float | None = None
    cascade_tokens_per_s: float | None = None


@dataclass
class TrajectorySummary:
    """A run's probe windows over training (:mod:`lacy_stream.trainer.probes`), reduced to what is plotted."""

    steps: list[int]
    fact_loss: list[float]
    """Mean loss (``<CALL>`` excluded) of the probe windows' fact targets at each step."""
    other_loss: list[float]
    """The same over their other valid targets."""
    facts_called: list[float]
    """The share of the fact targets among the model's calls."""

    @classmethod
    def of(cls, trajectories: Trajectories) -> "TrajectorySummary":
        fact = trajectories.valid & (trajectories.token_class == TokenClass.FACT)
        other = trajectories.valid & ~fact
        return cls(
            steps=trajectories.steps,
            fact_loss=[_mean(loss[fact]) for loss in trajectories.learned_loss],
            other_loss=[_mean(loss[other]) for loss in trajectories.learned_loss],
            facts_called=[_mean(called[fact]) for called in trajectories.called],
        )


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


@dataclass
class Comparison:
    val_shards: str
    windows: int
    seq_len: int
    call_ratio: float
    runs: list[RunInfo]
    scores: list[RunScores]
    trajectories: list[TrajectorySummary | None] = field(default_factory=list)
    """Per run, its probe windows' trajectories; None for a run that recorded none."""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{len(self.runs)} runs on {self.windows} held-out windows of {self.seq_len} tokens from "
                f"`{self.val_shards}`; call masks C_M = the top {self.call_ratio:.0%} `<CALL>` logits per batch "
                "(Appendix A.4.3).")

    def table(self) -> tuple[list[str], list[list[object]]]:
        """The header and rows of the comparison table, one row a run."""
        header = ["run", "method", "steps", "call loss", "non-call loss", "baseline call loss on C_M",
                  "baseline non-call loss on C_M", "facts in C_M", "judge in C_M", "fact/other AUC",
                  "cascade call rate", "cascade tokens/s", "flags"]
        rows = [
            [run.name, run.method, run.steps, _number(score.call_loss), _number(score.non_call_loss),
             _number(score.baseline_call_loss), _number(score.baseline_non_call_loss),
             _share(score.fact_share_of_calls), _share(score.judge_share_of_calls),
             _number(score.fact_call_auc, 3), _share(score.cascade_call_rate),
             _number(score.cascade_tokens_per_s, 1), "; ".join(run.flags)]
            for run, score in zip(self.runs, self.scores)
        ]
        return header, rows

    def left_table(self) -> tuple[list[str], list[list[object]]]:
        """The header and rows of the table of what each run leaves to itself once its calls are answered."""
        header = ["run", "method", "fact errors left", "fact loss left", "errors left", "word-initial facts in C_M",
                  "fact errors left (log-odds C_M)", "facts in C_M (log-odds C_M)"]
        rows = [
            [run.name, run.method, _share(score.fact_errors_left), _number(score.fact_loss_left),
             _share(score.errors_left), _share(score.word_initial_share_of_calls),
             _share(score.fact_errors_left_log_odds), _share(score.fact_share_of_calls_log_odds)]
            for run, score in zip(self.runs, self.scores)
        ]
        return header, rows

    def markdown(self) -> str:
        losses, left = (markdown_table(header, [[row[0], f"`{row[1]}`", *row[2:]] for row in rows])
                        for header, rows in (self.table(), self.left_table()))
        return "\n\n".join([self.summary(), losses, self.base_rates(),
                            "What each run leaves to itself with a perfect partner answering its calls:", left,
                            LEFT_NOTE])

    def base_rates(self) -> str:
        first = self.scores[0]
        judge = "no judge markup" if first.judge_share is None else f"{first.judge_share:.1%} judge-delegated"
        initial = ("" if first.word_initial_fact_share is None
                   else f"; {first.word_initial_fact_share:.1%} of the fact targets begin a word")
        return (f"Targets: {first.fact_share:.1%} facts, {judge} (the shares a random call mask would have)"
                f"{initial}.")

    def html(self, plot: Path | None, trajectories_plot: Path | None = None) -> str:
        """A standalone page: the tables, the base rates and the plots (PNGs, embedded) that were drawn."""
        parts = [markdown_html(self.summary()), html_table(*self.table()), paragraph(self.base_rates())]
        if plot is not None:
            parts.append(png_image(plot, "losses at the evaluation call masks, and training curves"))
        parts.append(paragraph(COLUMNS_NOTE, note=True))
        parts += [paragraph("What each run leaves to itself with a perfect partner answering its calls:"),
                  html_table(*self.left_table()), paragraph(LEFT_NOTE, note=True)]
        if trajectories_plot is not None:
            parts += [paragraph(TRAJECTORIES_NOTE), png_image(trajectories_plot, "loss trajectories of the probes")]
        return html_page("Methods compared", *parts)


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def flag_differences(runs: Sequence[RunInfo]) -> None:
    """Mark each run that differs from the first in data, tokenizer or steps."""
    first = runs[0]
    for run in runs[1:]:
        if run.data != first.data:
            run.flags.append(f"other data ({run.data})")
        if run.tokenizer != first.tokenizer:
            run.flags.append("other tokenizer")
        if run.steps != first.steps:
            run.flags.append(f"{run.steps} steps, not {first.steps}")


@dataclass
class HeldOutBatch:
    tokens: Tensor
    """[B, T + 1]"""
    token_class: Tensor
    """[B, T]: of the targets."""
    judge: Tensor
    """[B, T]: of the targets."""

    @property
    def valid(self) -> Tensor:
        return self.token_class != TokenClass.IGNORE


def read_heldout_batches(
    val_shards: str, tokenizer_path: str, *, seq_len: int, batch_size: int, batches: int
) -> list[HeldOutBatch]:
    """The first ``batches`` batches of ``val_shards`` as training packs them, annotated."""
    loader = TokenLoader.from_config(
        DataConfig(shards=val_shards, seq_len=seq_len, batch_size=batch_size, num_workers=0),
        tokenizer_path,
        AnnotationConfig(),
    )
    return [
        HeldOutBatch(batch["tokens"], batch["token_class"][:, 1:], batch["judge"][:, 1:])
        for batch in itertools.islice(loader, batches)
    ]


class _Sums:
    """Running sums over batches for one run."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def add(self, name: str, value: float | Tensor) -> None:
        self.values[name] = self.values.get(name, 0.0) + float(value)

    def get(self, name: str) -> float:
        return self.values.get(name, 0.0)

    def ratio(self, numerator: str, denominator: str) -> float | None:
        return self.get(numerator) / self.get(denominator) if self.get(denominator) else None


def score_run(
    lacy: LacyModel,
    batches: Sequence[HeldOutBatch],
    *,
    is_baseline: bool,
    baseline: LacyModel | None,
    call_ratio: float,
) -> RunScores:
    sums = _Sums()
    fact_odds, other_odds = [], []
    begins_word = word_initial_pieces(lacy.tokenizer)
    for batch in batches:
        inputs, targets = batch.tokens[:, :-1], batch.tokens[:, 1:]
        valid = batch.valid
        stats = token_statistics(lacy.model, inputs.to(lacy.device), targets.to(lacy.device), call_id=lacy.call_id)
        stats = _on_cpu(stats)
        fact = valid & (batch.token_class == TokenClass.FACT)
        initial_fact = fact & begins_word[targets]
        judged = valid & (batch.judge != JUDGE_UNKNOWN)
        delegated = judged & (batch.judge == JUDGE_CALL)
        sums.add("valid", valid.sum())
        sums.add("facts", fact.sum())
        sums.add("initial_facts", initial_fact.sum())
        sums.add("judged", judged.sum())
        sums.add("delegated", delegated.sum())
        fact_odds.append(stats.call_log_odds[fact])
        other_odds.append(stats.call_log_odds[valid & ~fact])
        if is_baseline:
            sums.add("non_call_nll", -stats.no_call_logprob[valid].double().sum())
            sums.add("non_calls", valid.sum())
            for name, value in left_counts(stats, targets, valid, fact, torch.zeros_like(valid)).items():
                sums.add(name, value)
            continue
        mask = call_mask(stats.call_logit, stats.call_is_top, valid, call_ratio=call_ratio)
        by_odds = call_mask(stats.call_log_odds, stats.call_is_top, valid, call_ratio=call_ratio)
        _add_masked_losses(sums, "", stats, mask, valid)
        for name, value in left_counts(stats, targets, valid, fact, mask).items():
            sums.add(name, value)
        sums.add("facts_wrong_left_by_odds", left_counts(stats, targets, valid, fact, by_odds)["facts_wrong_left"])
        sums.add("calls_on_facts", (mask & fact).sum())
        sums.add("calls_on_facts_by_odds", (by_odds & fact).sum())
        sums.add("calls_on_initial_facts", (mask & initial_fact).sum())
        sums.add("calls_judged", (mask & judged).sum())
        sums.add("calls_delegated", (mask & delegated).sum())
        if baseline is not None:
            on_baseline = token_statistics(
                baseline.model, inputs.to(baseline.device), targets.to(baseline.device), call_id=baseline.call_id
            )
            _add_masked_losses(sums, "baseline_", _on_cpu(on_baseline), mask, valid)
    with_baseline = baseline is not None and not is_baseline
    return RunScores(
        tokens=int(sums.get("valid")),
        calls=int(sums.get("calls")),
        call_loss=sums.ratio("call_nll", "calls"),
        non_call_loss=sums.ratio("non_call_nll", "non_calls") or 0.0,
        baseline_call_loss=sums.ratio("baseline_call_nll", "calls") if with_baseline else None,
        baseline_non_call_loss=sums.ratio("baseline_non_call_nll", "non_calls") if with_baseline else None,
        fact_share_of_calls=sums.ratio("calls_on_facts", "calls"),
        judge_share_of_calls=sums.ratio("calls_delegated", "calls_judged"),
        fact_share=sums.ratio("facts", "valid") or 0.0,
        judge_share=sums.ratio("delegated", "judged"),
        fact_call_auc=auc(torch.cat(fact_odds), torch.cat(other_odds)),
        fact_errors_left=sums.ratio("facts_wrong_left", "facts"),
        fact_loss_left=sums.ratio("fact_nll_left", "facts_left"),
        errors_left=sums.ratio("wrong_left", "valid"),
        word_initial_share_of_calls=sums.ratio("calls_on_initial_facts", "calls"),
        word_initial_fact_share=sums.ratio("initial_facts", "facts"),
        fact_errors_left_log_odds=None if is_baseline else sums.ratio("facts_wrong_left_by_odds", "facts"),
        fact_share_of_calls_log_odds=sums.ratio("calls_on_facts_by_odds", "calls"),
    )


def word_initial_pieces(tokenizer: Tokenizer) -> Tensor:
    """[vocab] bool: the pieces that begin a word (SentencePiece's ``▁`` prefix). Byte pieces, special pieces and
    ``<CALL>`` do not."""
    begins = [tokenizer.id_to_piece(token).startswith("\u2581") for token in range(tokenizer.num_pieces)]
    return torch.tensor(begins + [False] * (tokenizer.vocab_size - tokenizer.num_pieces), dtype=torch.bool)


def left_counts(stats: TokenStatistics, targets: Tensor, valid: Tensor, fact: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """What a model leaves to itself in one batch when a perfect partner answers the positions of ``mask``: the
    fact targets and all targets outside it whose top token (``<CALL>`` excluded) is wrong, and the loss and
    count of the fact targets outside it."""
    wrong = stats.top_token != targets
    kept = valid & ~mask
    kept_facts = fact & kept
    return {
        "facts_wrong_left": (kept_facts & wrong).sum(),
        "wrong_left": (kept & wrong).sum(),
        "fact_nll_left": -stats.no_call_logprob[kept_facts].double().sum(),
        "facts_left": kept_facts.sum(),
    }


def _on_cpu(stats: TokenStatistics) -> TokenStatistics:
    return TokenStatistics(**{name: value.cpu() for name, value in asdict(stats).items()})


def _add_masked_losses(sums: _Sums, prefix: str, stats: TokenStatistics, mask: Tensor, valid: Tensor) -> None:
    non_call = valid & ~mask
    sums.add(f"{prefix}call_nll", -stats.full_logprob[mask].double().sum())
    sums.add(f"{prefix}non_call_nll", -stats.no_call_logprob[non_call].double().sum())
    if not prefix:
        sums.add("calls", mask.sum())
        sums.add("non_calls", non_call.sum())


def auc(positive: Tensor, negative: Tensor) -> float | None:
    """P(a positive score > a negative score) + P(equal) / 2 (the Mann-Whitney U statistic, normalised)."""
    if positive.numel() == 0 or negative.numel() == 0:
        return None
    scores = torch.cat([positive, negative]).double()
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # ties share the mean of their ranks
    unique, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    rank_sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (rank_sums / counts)[inverse]
    positives = positive.numel()
    u = ranks[:positives].sum().item() - positives * (positives + 1) / 2
    return u / (positives * negative.numel())


def compare_runs(
    run_dirs: Sequence[str | Path],
    val_shards: str,
    *,
    batches: int = 8,
    batch_size: int = 8,
    seq_len: int | None = None,
    call_ratio: float = 0.15,
    cascade: str | None = None,
    entities: Sequence[str] = (),
    max_new_tokens: int = 48,
    device: str = "cpu",
) -> Comparison:
    """Score every run on the same held-out windows (see the module docstring)."""
    if not run_dirs:
        raise ValueError("compare needs at least one run")
    runs = [RunInfo.read(Path(path)) for path in run_dirs]
    flag_differences(runs)
    models = [load_lacy(path, device=device) for path in run_dirs]
    if seq_len is None:
        seq_len = min(json.loads((Path(path) / "config.json").read_text())["data"]["seq_len"] for path in run_dirs)
    too_short = [run.name for run, lacy in zip(runs, models) if lacy.model.args.max_seq_len < seq_len]
    if too_short:
        raise ValueError(f"runs {too_short} have a context shorter than {seq_len} tokens; pass a smaller --seq-len")
    windows: dict[str, list[HeldOutBatch]] = {}
    for run, lacy in zip(runs, models):
        if run.tokenizer not in windows:
            windows[run.tokenizer] = read_heldout_batches(
                val_shards, lacy.tokenizer.model_path, seq_len=seq_len, batch_size=batch_size, batches=batches
            )
    if not windows[runs[0].tokenizer]:
        raise ValueError(f"{val_shards} gave no held-out window of {seq_len} tokens")
    baseline_index = next((index for index, run in enumerate(runs) if run.method == "baseline"), None)
    scores = []
    for index, (run, lacy) in enumerate(zip(runs, models)):
        baseline = None
        if baseline_index is not None and runs[baseline_index].tokenizer == run.tokenizer:
            baseline = models[baseline_index]
        scores.append(
            score_run(lacy, windows[run.tokenizer], is_baseline=index == baseline_index, baseline=baseline,
                      call_ratio=call_ratio)
        )
    if cascade:
        _measure_cascade(runs, models, scores, cascade, entities, call_ratio, max_new_tokens, device)
    recorded = [read_trajectories(run.path) for run in runs]
    return Comparison(
        val_shards=val_shards,
        windows=sum(len(batch.tokens) for batch in windows[runs[0].tokenizer]),
        seq_len=seq_len,
        call_ratio=call_ratio,
        runs=runs,
        scores=scores,
        trajectories=[TrajectorySummary.of(found) if found else None for found in recorded],
    )


def _measure_cascade(runs, models, scores, spec, entities, call_rate, max_new_tokens, device) -> None:
    from ..inference.partners import partner_from_spec
    from .generation import CascadeGenerator, measure_throughput

    if not entities:
        raise ValueError("--cascade needs FactScore entities for its prompts (--factscore-entities)")
    partner = partner_from_spec(spec, device=device)
    for run, lacy, score in zip(runs, models, scores):
        if run.method == "baseline":
            continue
        generator = CascadeGenerator(lacy, partner, spec, "calibrated", call_rate, max_new_tokens)
        cascade = measure_throughput(generator, entities).cascade
        score.cascade_call_rate = cascade.call_rate
        score.cascade_tokens_per_s = cascade.tokens_per_second


def write_comparison(comparison: Comparison, out_dir: str | Path) -> Path:
    """``comparison.json``, ``comparison.md``, ``comparison.png`` and ``comparison.html`` in ``out_dir``; returns the
    directory. The plot is drawn when matplotlib (the eval extra) is installed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPARISON_JSON).write_text(json.dumps(comparison.to_dict(), indent=2) + "\n")
    (out / COMPARISON_MD).write_text("# Methods compared\n\n" + comparison.markdown() + "\n")
    plotted = plot_comparison(comparison, out / COMPARISON_PNG)
    trajectories = any(comparison.trajectories) and plot_trajectories(comparison, out / TRAJECTORIES_PNG)
    (out / COMPARISON_HTML).write_text(
        comparison.html(out / COMPARISON_PNG if plotted else None, out / TRAJECTORIES_PNG if trajectories else None),
        encoding="utf-8",
    )
    return out


def plot_trajectories(comparison: Comparison, path: Path) -> bool:
    """Each run's probe trajectories: the mean loss of fact targets (solid) and other targets (dashed), and the
    share of fact targets among its calls. Returns whether it was drawn (matplotlib installed)."""
    figure = new_figure(figsize=(12, 4.6), layout="constrained")
    if figure is None:
        return False
    losses, called = figure.subplots(1, 2)
    for index, (run, trajectory) in enumerate(zip(comparison.runs, comparison.trajectories)):
        if trajectory is None:
            continue
        color = f"C{index}"
        losses.plot(trajectory.steps, trajectory.fact_loss, color=color, label=f"{run.name}: facts")
        losses.plot(trajectory.steps, trajectory.other_loss, color=color, linestyle="--", label=f"{run.name}: others")
        if run.method != "baseline":
            called.plot(trajectory.steps, trajectory.facts_called, color=color, label=run.name)
    losses.set(xlabel="step", ylabel="mean loss, <CALL> excluded (nats)", title="Probe windows: loss of the targets")
    losses.legend(fontsize=8)
    called.set(xlabel="step", ylabel="share of fact targets", ylim=(0, 1), title="Share of the fact targets the model calls")
    if called.lines:
        called.legend(fontsize=8)
    figure.savefig(path, dpi=100)
    return True


def plot_comparison(comparison: Comparison, path: Path) -> bool:
    """The call loss and the non-call loss at each run's C_M, each panel's axis fitted to its values and the
    values on the bars (light bars: the baseline run on the same C_M); then each run's training non-call loss
    from its ``metrics.jsonl``, when a run has one. Returns whether it was drawn (matplotlib installed)."""
    curves = [[r for r in _metrics(Path(run.path)) if r.get("noncall_loss") is not None] for run in comparison.runs]
    with_curves = any(curves)
    figure = new_figure(figsize=(15 if with_curves else 10, 5.2), layout="constrained")
    if figure is None:
        return False
    from matplotlib.patches import Patch

    panels = figure.subplots(1, 3 if with_curves else 2, width_ratios=[1, 1, 1.1] if with_curves else [1, 1])
    names = [run.name if run.name == run.method else f"{run.name}\n({run.method})" for run in comparison.runs]
    scores = comparison.scores
    _loss_bars(panels[0], names, [s.call_loss for s in scores], [s.baseline_call_loss for s in scores], "tab:red",
               "Call loss on C_M (Eq. A.5)")
    _loss_bars(panels[1], names, [s.non_call_loss for s in scores], [s.baseline_non_call_loss for s in scores],
               "tab:blue", "Non-call loss (Eq. A.6)")
    figure.legend(handles=[Patch(color="0.3", label="the run, on its own C_M"),
                           Patch(color="0.3", alpha=0.35, label="the baseline run, on the same C_M")],
                  loc="outside upper center", ncols=2, fontsize=9)
    if with_curves:
        training = panels[2]
        for run, records in zip(comparison.runs, curves):
            training.plot([r["step"] for r in records], [r["noncall_loss"] for r in records], label=run.name)
        training.set(xlabel="step", ylabel="non-call loss of the learned tokens (nats)", title="Training (metrics.jsonl)")
        training.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    figure.savefig(path, dpi=100)
    return True


def _loss_bars(axes, names: list[str], own: list[float | None], baseline: list[float | None], color: str,
               title: str) -> None:
    """One panel: a bar per run (and a light one for the baseline on its C_M) on an axis fitted to the values."""
    positions = range(len(names))
    values = [value for value in own + baseline if value is not None]
    for offset, heights, alpha in ((-0.2, own, 1.0), (0.2, baseline, 0.35)):
        drawn = axes.bar([p + offset for p in positions], [math.nan if h is None else h for h in heights], 0.4,
                         color=color, alpha=alpha)
        axes.bar_label(drawn, labels=["" if h is None else f"{h:.2f}" for h in heights], fontsize=7, padding=2)
    axes.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=8)
    axes.set_title(title)
    if not values:
        axes.text(0.5, 0.5, "no calling run", ha="center", va="center", transform=axes.transAxes)
        return
    low, high = min(values), max(values)
    margin = (high - low) * 0.2 or max(abs(high) * 0.05, 0.1)
    bottom = max(low - margin, 0.0)
    axes.set_ylim(bottom, high + margin)
    axes.set_ylabel(f"nats (the axis starts at {bottom:.2f})" if bottom > 0 else "nats")
