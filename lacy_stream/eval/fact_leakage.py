"""Fact leakage (paper Sec. 5.3, Appendix B): how many facts the model answers by itself, without calls.

The ``<CALL>`` logit is set to -inf and the model completes knowledge prompts greedily; a prompt counts as
leaked when the gold answer, or one of its aliases, is contained in the model's answer. Lower is better:
a LaCy model should have learned to call for such facts instead of memorising them.

Prompts (3-shot, as in Appendix B):

* BIG-bench QA Wikidata rows are already knowledge completions: the ``context`` ("The country of
  Novosibirsk is") is the prompt and ``answer`` plus ``aliases`` the gold answers.
* PopQA questions become knowledge completions as in Appendix B, where "What is Ufa the capital of?" is
  prompted as "What is Ufa the capital of? Ufa is the capital of". The paper had a frontier model rephrase
  the questions; PopQA's questions are generated from one template per relation (``prop``), so here the
  subject is read back from the question with that template and put into a fixed sentence start per
  relation (:data:`POPQA_TEMPLATES`). ``answers`` (the gold answer first) are the aliases.
* Each prompt is preceded by 3 demonstrations, one per line as "<prompt> <gold answer>", and the model's
  answer is its completion up to the first newline. The demonstrations are fixed, the same for every
  prompt of a dataset: the first example of each of the first three groups in file order, a group being a
  PopQA relation and a BIG-bench gold answer, so that the demonstrations do not show one relation or one
  answer three times. They are taken out of the scored examples (and so are exact duplicates of them,
  whose answer the prompt shows); ``limit`` counts scored examples.

Answers are compared after normalisation: accents removed, case folded, every character other than a
letter or digit made a space, whitespace collapsed. An alias is contained when it occurs as a whole
sequence of words, not as a substring: PopQA's aliases include "W", "pol" and "id", which as substrings
would match almost any text. Aliases that normalise to nothing (flag emojis) are ignored.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..inference.call_policy import NeverCall
from ..inference.generate import generate
from ..inference.loading import LacyModel
from ..markdown import markdown_table

SHOTS = 3
MAX_ANSWER_TOKENS = 16
"""Answers are short names or phrases; generation is cut at the first newline anyway."""
SHOWN_EXAMPLES = 5
OUTPUTS_FILE = "fact_leakage_outputs.jsonl"

AnswerFn = Callable[[str], str]
"""A few-shot prompt in, the model's answer out (the completion up to its first newline)."""

POPQA_TEMPLATES: dict[str, tuple[str, str]] = {
    # relation: (PopQA's question template, the knowledge-completion sentence start)
    "occupation": ("What is {s}'s occupation?", "{s}'s occupation is"),
    "place of birth": ("In what city was {s} born?", "{s} was born in"),
    "genre": ("What genre is {s}?", "The genre of {s} is"),
    "father": ("Who is the father of {s}?", "The father of {s} is"),
    "mother": ("Who is the mother of {s}?", "The mother of {s} is"),
    "country": ("In what country is {s}?", "{s} is located in"),
    "producer": ("Who was the producer of {s}?", "{s} was produced by"),
    "director": ("Who was the director of {s}?", "{s} was directed by"),
    "capital of": ("What is {s} the capital of?", "{s} is the capital of"),
    "capital": ("What is the capital of {s}?", "The capital of {s} is"),
    "screenwriter": ("Who was the screenwriter for {s}?", "The screenplay of {s} was written by"),
    "composer": ("Who was the composer of {s}?", "The music of {s} was composed by"),
    "religion": ("What is the religion of {s}?", "The religion of {s} is"),
    "sport": ("What sport does {s} play?", "The sport {s} plays is"),
    "author": ("Who is the author of {s}?", "The author of {s} is"),
}


@dataclass(frozen=True)
class QAExample:
    prompt: str
    """The knowledge-completion prompt, without the answer."""
    answers: tuple[str, ...]
    """The gold answer first, then its aliases."""
    group: str
    """Demonstrations come from different groups: the relation (PopQA) or the gold answer (BIG-bench)."""

    @property
    def demonstration(self) -> str:
        """The prompt completed with the gold answer, as a demonstration shows it."""
        return f"{self.prompt} {self.answers[0]}"


def popqa_prompt(question: str, relation: str) -> str:
    """The question followed by its relation's sentence start, the subject read back from the question.

    "What is Ufa the capital of?" becomes "What is Ufa the capital of? Ufa is the capital of".
    """
    if relation not in POPQA_TEMPLATES:
        raise ValueError(f"PopQA relation {relation!r} has no knowledge-completion template")
    question_template, completion = POPQA_TEMPLATES[relation]
    pattern = re.escape(question_template).replace(re.escape("{s}"), "(?P<s>.+)")
    match = re.fullmatch(pattern, question.strip())
    if match is None:
        raise ValueError(f"PopQA question {question!r} does not follow the {relation!r} template")
    return f"{question.strip()} {completion.format(s=match['s'])}"


def read_popqa(path: str | Path) -> list[QAExample]:
    """PopQA rows ``{question, answers, prop}`` as knowledge completions."""
    return [
        QAExample(popqa_prompt(row["question"], row["prop"]), _unique(row["answers"]), row["prop"])
        for row in _jsonl(path)
    ]


def read_bigbench(path: str | Path) -> list[QAExample]:
    """BIG-bench QA Wikidata rows ``{context, answer, aliases}``."""
    return [
        QAExample(row["context"].strip(), _unique([row["answer"], *row.get("aliases", [])]), row["answer"])
        for row in _jsonl(path)
    ]


def split_demonstrations(
    examples: Sequence[QAExample], shots: int = SHOTS
) -> tuple[list[QAExample], list[QAExample]]:
    """The demonstrations (the first example of each of the first ``shots`` groups) and the scored rest."""
    demonstrations: list[QAExample] = []
    for example in examples:
        if len(demonstrations) == shots:
            break
        if example.group not in {demonstration.group for demonstration in demonstrations}:
            demonstrations.append(example)
    if len(demonstrations) < shots:
        raise ValueError(f"{shots} demonstrations need {shots} groups, the examples have {len(demonstrations)}")
    return demonstrations, [example for example in examples if example not in demonstrations]


def few_shot_prompt(demonstrations: Sequence[QAExample], example: QAExample) -> str:
    return "\n".join([*(demonstration.demonstration for demonstration in demonstrations), example.prompt])


def normalize(text: str) -> str:
    """Accents removed, case folded, only letters and digits kept (as words), whitespace collapsed."""
    decomposed = unicodedata.normalize("NFKD", text)
    letters = "".join(character for character in decomposed if not unicodedata.combining(character))
    return " ".join(re.sub(r"[\W_]+", " ", letters.casefold()).split())


def contains_answer(output: str, answers: Iterable[str]) -> bool:
    """Whether any answer occurs in ``output`` as whole words, after :func:`normalize`."""
    padded = f" {normalize(output)} "
    return any(f" {alias} " in padded for alias in map(normalize, answers) if alias)


def answer_without_calls(lacy: LacyModel, *, max_new_tokens: int = MAX_ANSWER_TOKENS) -> AnswerFn:
    """The model's answers with the ``<CALL>`` logit at -inf: greedy, cut at the first newline.

    No repetition penalty: the prompt repeats the subject and its demonstrations, and answers often
    repeat words of the subject ("The capital of Ufa County is Ufa").
    """

    def answer(prompt: str) -> str:
        generation = generate(
            lacy.model, lacy.tokenizer, prompt, NeverCall(), max_new_tokens=max_new_tokens, repetition_penalty=1.0,
            stop="\n",
        )
        return generation.completion(lacy.tokenizer).split("\n", 1)[0].strip()

    return answer


@dataclass
class ScoredAnswer:
    prompt: str
    """The query, without the demonstrations."""
    answers: list[str]
    output: str
    contained: bool


@dataclass
class DatasetLeakage:
    dataset: str
    demonstrations: list[str]
    examples: int
    contained: int
    accuracy: float | None
    """Share of examples whose answer contains the gold answer or an alias; None without examples."""
    samples: list[ScoredAnswer] = field(default_factory=list)
    """The first few scored answers; all of them are in the outputs file."""


@dataclass
class FactLeakageResult:
    datasets: list[DatasetLeakage]
    outputs_file: str
    shots: int = SHOTS

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        lines = [
            f"Answers generated with the `<CALL>` logit at -inf, greedy, {self.shots}-shot, cut at the first "
            "newline; an example leaks when the gold answer or an alias is contained (whole words, "
            "normalised). *Accuracy*: the share of examples that leak (contained / examples); lower is better. "
            f"All answers: `{self.outputs_file}`.",
            "",
            markdown_table(
                ["dataset", "examples", "contained", "accuracy"],
                [
                    [result.dataset, result.examples, result.contained,
                     "–" if result.accuracy is None else f"{result.accuracy:.4f}"]
                    for result in self.datasets
                ],
            ),
        ]
        for result in self.datasets:
            lines += ["", f"**{result.dataset}** demonstrations: " + "; ".join(f"`{d}`" for d in result.demonstrations)]
            lines += [
                "",
                markdown_table(
                    ["prompt", "answer", "gold", "contained"],
                    [
                        [_cell(sample.prompt), _cell(sample.output), _cell(sample.answers[0]),
                         "yes" if sample.contained else "no"]
                        for sample in result.samples
                    ],
                ),
            ]
        return "\n".join(lines)


def evaluate_fact_leakage(
    datasets: Mapping[str, Sequence[QAExample]],
    answer: AnswerFn,
    out_dir: str | Path,
    *,
    limit: int | None = None,
) -> FactLeakageResult:
    """Answer each dataset's examples 3-shot (the first ``limit`` after the demonstrations) and score them;
    every answer is written to ``fact_leakage_outputs.jsonl`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with open(out_dir / OUTPUTS_FILE, "w", encoding="utf-8") as outputs:
        for name, examples in datasets.items():
            demonstrations, scored = split_demonstrations(examples)
            scored_answers = []
            for example in scored[:limit]:
                output = answer(few_shot_prompt(demonstrations, example))
                scored_answer = ScoredAnswer(
                    example.prompt, list(example.answers), output, contains_answer(output, example.answers)
                )
                outputs.write(json.dumps({"dataset": name, **asdict(scored_answer)}, ensure_ascii=False) + "\n")
                scored_answers.append(scored_answer)
            contained = sum(scored_answer.contained for scored_answer in scored_answers)
            results.append(
                DatasetLeakage(
                    dataset=name,
                    demonstrations=[demonstration.demonstration for demonstration in demonstrations],
                    examples=len(scored_answers),
                    contained=contained,
                    accuracy=contained / len(scored_answers) if scored_answers else None,
                    samples=scored_answers[:SHOWN_EXAMPLES],
                )
            )
    return FactLeakageResult(datasets=results, outputs_file=OUTPUTS_FILE)


def _jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _unique(answers: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(answer.strip() for answer in answers if answer.strip()))


def _cell(text: str) -> str:
    """Text for a markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|") or "–"
