"""Multiple-choice NLU tasks (paper Appendix B): ARC-Easy and PIQA by log-likelihood of each choice.

Each example is ``{query, choices, gold}`` (the llm-foundry local files in ``shared/eval``; queries already
start with "Question: "). Scoring follows lm-evaluation-harness' ``arc_easy`` and ``piqa`` tasks: the
context is the question followed by "\\nAnswer:", each choice is scored as the continuation " <choice>",
and the prediction is the choice with the highest summed log-likelihood (``acc``) or with the highest
log-likelihood per character of the choice (``acc_norm``, which removes the advantage of short answers).
``<CALL>`` is excluded from the softmax: a calling model answers the way it would without a cascade.
The task configs of :mod:`.lm_eval_model` use the same template, so both paths give the same numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

from ..inference.loading import LacyModel
from ..markdown import markdown_table
from .scoring import encode_pair, score_continuations

ANSWER_CUE = "\nAnswer:"
CHOICE_DELIMITER = " "


@dataclass(frozen=True)
class MultipleChoiceExample:
    query: str
    choices: list[str]
    gold: int

    @property
    def context(self) -> str:
        return self.query.strip() + ANSWER_CUE


def read_multiple_choice(path: str | Path, *, limit: int | None = None) -> list[MultipleChoiceExample]:
    """The first ``limit`` (all when None) examples of a ``{query, choices, gold}`` jsonl file."""
    examples = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(islice((line for line in lines if line.strip()), limit), start=1):
            record = json.loads(line)
            example = MultipleChoiceExample(
                query=record["query"], choices=list(record["choices"]), gold=int(record["gold"])
            )
            if not 0 <= example.gold < len(example.choices):
                raise ValueError(f"{path}: example {number} has gold {example.gold} for {len(example.choices)} choices")
            examples.append(example)
    return examples


@dataclass
class TaskResult:
    task: str
    examples: int
    acc: float
    acc_stderr: float | None
    acc_norm: float
    acc_norm_stderr: float | None
    """Standard errors of the means (sample standard deviation / sqrt(n)); None for fewer than 2 examples."""


@dataclass
class NluResult:
    tasks: list[TaskResult]

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        table = markdown_table(
            ["task", "examples", "acc", "acc_norm"],
            [
                [task.task, task.examples, _with_stderr(task.acc, task.acc_stderr),
                 _with_stderr(task.acc_norm, task.acc_norm_stderr)]
                for task in self.tasks
            ],
        )
        return table + "\n\n" + ACCURACY_DEFINITIONS


ACCURACY_DEFINITIONS = (
    "*acc*: the share of examples whose gold choice has the highest summed log-likelihood (`<CALL>` excluded); "
    "*acc_norm*: the same per character of the choice; ± one standard error."
)


def choice_loglikelihoods(
    lacy: LacyModel, examples: Sequence[MultipleChoiceExample], *, batch_size: int = 16
) -> list[list[float]]:
    """Per example, the summed log-likelihood (``<CALL>`` excluded) of each choice after its context."""
    pairs = [
        encode_pair(lacy.tokenizer, example.context, CHOICE_DELIMITER + choice)
        for example in examples
        for choice in example.choices
    ]
    scores = iter(score_continuations(lacy, pairs, batch_size=batch_size))
    return [[next(scores).logprob for _ in example.choices] for example in examples]


def evaluate_task(
    lacy: LacyModel, name: str, examples: Sequence[MultipleChoiceExample], *, batch_size: int = 16
) -> TaskResult:
    if not examples:
        raise ValueError(f"task {name} has no examples")
    correct, correct_norm = [], []
    for example, loglikelihoods in zip(examples, choice_loglikelihoods(lacy, examples, batch_size=batch_size)):
        per_char = [ll / len(choice) for ll, choice in zip(loglikelihoods, example.choices)]
        correct.append(float(_argmax(loglikelihoods) == example.gold))
        correct_norm.append(float(_argmax(per_char) == example.gold))
    return TaskResult(
        task=name,
        examples=len(examples),
        acc=sum(correct) / len(correct),
        acc_stderr=_stderr(correct),
        acc_norm=sum(correct_norm) / len(correct_norm),
        acc_norm_stderr=_stderr(correct_norm),
    )


def evaluate_nlu(
    lacy: LacyModel, task_files: Mapping[str, str | Path], *, limit: int | None = None, batch_size: int = 16
) -> NluResult:
    """Every task of ``task_files`` (name -> jsonl), on its first ``limit`` examples."""
    return NluResult(
        tasks=[
            evaluate_task(lacy, name, read_multiple_choice(path, limit=limit), batch_size=batch_size)
            for name, path in task_files.items()
        ]
    )


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _stderr(outcomes: Sequence[float]) -> float | None:
    n = len(outcomes)
    if n < 2:
        return None
    mean = sum(outcomes) / n
    return math.sqrt(sum((x - mean) ** 2 for x in outcomes) / (n - 1) / n)


def _with_stderr(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" if stderr is None else f"{value:.4f} ± {stderr:.4f}"
