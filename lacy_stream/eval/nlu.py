"""Multiple-choice NLU tasks (paper Appendix B): ARC-Easy, PIQA, HellaSwag and SIQA by log-likelihood of each choice.

Each task reads its local file in its own format, and the prompts follow lm-evaluation-harness' task of the
same name:

* ``arc_easy``, ``piqa``: ``{query, choices, gold}`` lines (the llm-foundry files in ``shared/eval``; queries
  already start with "Question: "); the context is the query followed by "\\nAnswer:".
* ``hellaswag``: HellaSwag's own jsonl (``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``, ``label``); the
  context is "<activity label>: <ctx_a> <Ctx_b>" and the endings are the choices, both cleaned of WikiHow's
  bracketed markers as the harness does.
* ``siqa``: Social IQa's own jsonl (``context``, ``question``, ``answerA``-``answerC``) with its labels (1-3)
  in a ``label`` field or, as released, one a line in the ``-labels.lst`` file beside it; the context is
  "Q: <context> <question>\\nA:".

Each choice is scored as the continuation " <choice>", and the prediction is the choice with the highest
summed log-likelihood (``acc``) or with the highest log-likelihood per character of the choice (``acc_norm``,
which removes the advantage of short answers). ``<CALL>`` is excluded from the softmax: a calling model
answers the way it would without a cascade. The task configs of :mod:`.lm_eval_model` use the same template
for ARC-Easy and PIQA, so both paths give the same numbers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

from ..inference.loading import LacyModel
from ..markdown import markdown_table
from .scoring import encode_pair, score_continuations

ANSWER_CUE = "\nAnswer:"
CHOICE_DELIMITER = " "


@dataclass(frozen=True)
class MultipleChoiceExample:
    context: str
    """What precedes each choice, as the task's prompt template writes it."""
    choices: list[str]
    gold: int


def read_multiple_choice(path: str | Path, *, limit: int | None = None) -> list[MultipleChoiceExample]:
    """The first ``limit`` (all when None) examples of a ``{query, choices, gold}`` jsonl file."""
    return _read_examples(path, limit, lambda record, number: MultipleChoiceExample(
        context=record["query"].strip() + ANSWER_CUE, choices=list(record["choices"]), gold=int(record["gold"])))


def read_hellaswag(path: str | Path, *, limit: int | None = None) -> list[MultipleChoiceExample]:
    """The first ``limit`` examples of HellaSwag's own jsonl (its validation file has the labels)."""
    def example(record: dict, number: int) -> MultipleChoiceExample:
        context = record["ctx_a"] + " " + record["ctx_b"].capitalize()
        return MultipleChoiceExample(context=_clean_wikihow(f"{record['activity_label']}: {context}"),
                                     choices=[_clean_wikihow(ending) for ending in record["endings"]],
                                     gold=int(record["label"]))

    return _read_examples(path, limit, example)


def read_siqa(path: str | Path, *, limit: int | None = None) -> list[MultipleChoiceExample]:
    """The first ``limit`` examples of Social IQa's own jsonl; labels (1-3) from a ``label`` field or from the
    ``-labels.lst`` file beside it (``dev.jsonl`` -> ``dev-labels.lst``)."""
    path = Path(path)
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    labels = labels_path.read_text(encoding="utf-8").split() if labels_path.is_file() else None

    def example(record: dict, number: int) -> MultipleChoiceExample:
        if "label" in record:
            label = record["label"]
        elif labels is not None and number <= len(labels):
            label = labels[number - 1]
        else:
            raise ValueError(f"no label field, and no line of {labels_path.name} for it")
        return MultipleChoiceExample(context=f"Q: {record['context']} {record['question']}\nA:",
                                     choices=[record["answerA"], record["answerB"], record["answerC"]],
                                     gold=int(label) - 1)

    return _read_examples(path, limit, example)


TASK_READERS = {
    "arc_easy": read_multiple_choice,
    "piqa": read_multiple_choice,
    "hellaswag": read_hellaswag,
    "siqa": read_siqa,
}
"""The paper's NLU tasks (Appendix B), each with the reader of its file's format."""


def _read_examples(
    path: str | Path, limit: int | None, example: Callable[[dict, int], MultipleChoiceExample]
) -> list[MultipleChoiceExample]:
    examples = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(islice((line for line in lines if line.strip()), limit), start=1):
            try:
                read = example(json.loads(line), number)
            except KeyError as error:
                raise ValueError(f"{path}: example {number} lacks the field {error} of the task's format") from None
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}: example {number}: {error}") from None
            if not 0 <= read.gold < len(read.choices):
                raise ValueError(f"{path}: example {number} has gold {read.gold} for {len(read.choices)} choices")
            examples.append(read)
    return examples


def _clean_wikihow(text: str) -> str:
    """HellaSwag's text as lm-evaluation-harness prepares it: " [title]" becomes ". ", other [markers] go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


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
    skipped: dict[str, str] = field(default_factory=dict)
    """Tasks not run, each with the reason."""

    @property
    def not_run(self) -> str | None:
        """The tasks that did not run and why; None when all ran."""
        return "; ".join(f"{task}: {reason}" for task, reason in self.skipped.items()) or None

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
    lacy: LacyModel, task_files: Mapping[str, str | Path | None], *, limit: int | None = None, batch_size: int = 16
) -> NluResult:
    """Every task of ``task_files`` (a name of :data:`TASK_READERS` -> its file; None: not given), on its first
    ``limit`` examples."""
    result = NluResult(tasks=[])
    for name, path in task_files.items():
        if path is None:
            result.skipped[name] = f"no local file (--{name.replace('_', '-')}); the Hugging Face hub is not read"
            continue
        examples = TASK_READERS[name](path, limit=limit)
        result.tasks.append(evaluate_task(lacy, name, examples, batch_size=batch_size))
    return result


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
