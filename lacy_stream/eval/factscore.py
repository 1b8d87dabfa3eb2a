"""FactScore (Min et al., 2023; paper Appendix B): biography prompts, FactScore's input format, scoring.

The paper generates a biography for each of FactScore's 183 labeled entities with the prompt
"Tell me a bio of <name>. <name> is" (LMLM's template for models that are not instruction-tuned); FactScore
then splits every biography into atomic facts and checks each one against Wikipedia with retrieval-augmented
prompting of an LLM. The score is the mean, over the biographies that state any fact, of the share of their
facts that are supported.

* Generation is not done here: :func:`generate_bios` takes a ``generate(prompt) -> continuation`` callable,
  so the cascade generator (or any other) plugs in.
* :func:`write_factscore_input` writes FactScore's ``--input_path`` format (``factscore.factscorer``): one
  JSON object per line with ``topic`` (the entity exactly as in the entity list, which FactScore also uses
  as the Wikipedia title to retrieve from) and ``output`` (the generation). The output is the prompt's
  sentence start plus the continuation ("<name> is an American ..."), so that its first sentence names
  its subject, as an instruction-tuned model's biography would.
* :class:`FactScorer` scores the same way against an OpenAI-compatible judge endpoint and a local knowledge
  source (FactScore's custom source format: a jsonl of ``{title, text}``, ``text`` a string or a list of
  sections): the judge lists the atomic facts of a biography; for each fact, the passages of the topic's
  page (all pages when the topic has none) are ranked by BM25 against the fact and the topic, and the judge
  says whether the best ones support it. The prompts are this module's own, not FactScore's, so numbers are
  FactScore-style rather than comparable to published FactScores digit for digit.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..markdown import markdown_table
from .chat_endpoint import ChatEndpoint

GenerateFn = Callable[[str], str]
"""A prompt in, the generated continuation out (without the prompt)."""

PROMPT_TEMPLATE = "Tell me a bio of {name}. {name} is"
INPUT_FILE = "factscore_input.jsonl"
DECISIONS_FILE = "factscore_decisions.jsonl"

EXTRACTION_PROMPT = """Break the following text about {topic} into atomic facts: short, independent statements \
that each carry exactly one piece of information and can be checked on their own. Name {topic} in each fact \
instead of using a pronoun. Write one fact per line, each line starting with "- ", and nothing else. If the \
text states no facts, write nothing.

Text: {text}"""

SUPPORT_PROMPT = """Below are passages about {topic} from a trusted knowledge source.

{passages}

Is the following statement supported by these passages? Answer with True or False only.
Statement: {fact}"""

_WORD = re.compile(r"\w+")
_VERDICT = re.compile(r"\b(true|false)\b", re.IGNORECASE)
_BM25_K1 = 1.5
_BM25_B = 0.75


def read_entities(path: str | Path, *, limit: int | None = None) -> list[str]:
    """The entity names of a one-name-a-line file (``factscore_prompt_entities_183.txt``)."""
    names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return names[:limit]


def bio_prompt(name: str) -> str:
    return PROMPT_TEMPLATE.format(name=name)


@dataclass(frozen=True)
class Bio:
    topic: str
    continuation: str

    @property
    def output(self) -> str:
        """The biography FactScore scores: the prompt's sentence start ("<name> is") and the continuation."""
        return f"{self.topic} is{self.continuation}"


def generate_bios(entities: Sequence[str], generate: GenerateFn) -> list[Bio]:
    return [Bio(topic=name, continuation=generate(bio_prompt(name))) for name in entities]


def write_factscore_input(bios: Sequence[Bio], path: str | Path) -> Path:
    """FactScore's ``--input_path`` file: ``{"topic", "output"}`` per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for bio in bios:
            out.write(json.dumps({"topic": bio.topic, "output": bio.output}, ensure_ascii=False) + "\n")
    return path


@dataclass(frozen=True)
class Passage:
    title: str
    text: str


class KnowledgeSource:
    """Passages of a local knowledge source, retrieved by page title and BM25."""

    def __init__(self, passages: Sequence[Passage]) -> None:
        if not passages:
            raise ValueError("the knowledge source has no passages")
        self.passages = list(passages)
        self._terms = [Counter(_words(passage.text)) for passage in self.passages]
        self._by_title: dict[str, list[int]] = {}
        for index, passage in enumerate(self.passages):
            self._by_title.setdefault(_title_key(passage.title), []).append(index)

    @classmethod
    def from_jsonl(cls, path: str | Path, *, passage_words: int = 256) -> "KnowledgeSource":
        """Pages ``{title, text}`` (``text`` a string or a list of sections), cut into passages of at most
        ``passage_words`` words within each section, as FactScore cuts its pages into short passages."""
        passages = []
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                page = json.loads(line)
                sections = page["text"] if isinstance(page["text"], list) else [page["text"]]
                for section in sections:
                    words = section.split()
                    for start in range(0, len(words), passage_words):
                        passages.append(Passage(page["title"], " ".join(words[start : start + passage_words])))
        return cls(passages)

    def retrieve(self, topic: str, query: str, *, k: int = 5) -> list[Passage]:
        """The ``k`` passages of ``topic``'s page (of all pages when it has none) that best match ``query``."""
        candidates = self._by_title.get(_title_key(topic)) or list(range(len(self.passages)))
        scores = _bm25(_words(f"{topic} {query}"), [self._terms[index] for index in candidates])
        best = sorted(range(len(candidates)), key=lambda rank: (-scores[rank], rank))[:k]
        return [self.passages[candidates[rank]] for rank in best]


@dataclass
class FactDecision:
    fact: str
    supported: bool


@dataclass
class BioScore:
    topic: str
    output: str
    facts: list[FactDecision]

    @property
    def supported_share(self) -> float | None:
        return sum(fact.supported for fact in self.facts) / len(self.facts) if self.facts else None


@dataclass
class FactScoreResult:
    entities: int
    input_file: str
    """The FactScore ``--input_path`` file written for these generations."""
    note: str
    judge: str | None = None
    score: float | None = None
    """Mean supported share over the biographies with at least one fact; None when not scored or none has one."""
    respond_ratio: float | None = None
    facts_per_response: float | None = None
    unclear_verdicts: int = 0
    """Support replies with neither True nor False; their facts count as not supported."""
    bios: list[BioScore] = field(default_factory=list)

    @property
    def not_run(self) -> str | None:
        """Why the biographies were not scored; None when they were."""
        return None if self.judge is not None else self.note

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        lines = [f"{self.entities} biographies written to `{self.input_file}` (FactScore input format).", "", self.note]
        if self.judge is not None:
            lines += [
                "",
                markdown_table(
                    ["FactScore", "respond ratio", "facts per response", "unclear verdicts"],
                    [[_number(self.score, ".4f"), _number(self.respond_ratio, ".3f"),
                      _number(self.facts_per_response, ".1f"), self.unclear_verdicts]],
                ),
            ]
        return "\n".join(lines)


class FactScorer:
    """FactScore-style scoring: atomic facts and their support, both asked of ``endpoint``."""

    def __init__(self, endpoint: ChatEndpoint, knowledge: KnowledgeSource, *, passages_per_fact: int = 5) -> None:
        self.endpoint = endpoint
        self.knowledge = knowledge
        self.passages_per_fact = passages_per_fact
        self.unclear_verdicts = 0

    def atomic_facts(self, bios: Sequence[Bio]) -> list[list[str]]:
        replies = self.endpoint.complete_all(
            [EXTRACTION_PROMPT.format(topic=bio.topic, text=bio.output) for bio in bios]
        )
        return [parse_fact_list(reply) for reply in replies]

    def support(self, topics: Sequence[str], facts: Sequence[str]) -> list[bool]:
        """Whether the knowledge source supports each fact about its topic."""
        prompts = []
        for topic, fact in zip(topics, facts):
            passages = self.knowledge.retrieve(topic, fact, k=self.passages_per_fact)
            context = "\n\n".join(f"Title: {passage.title}\nText: {passage.text}" for passage in passages)
            prompts.append(SUPPORT_PROMPT.format(topic=topic, passages=context, fact=fact))
        decisions = []
        for reply in self.endpoint.complete_all(prompts):
            verdict = _VERDICT.search(reply)
            self.unclear_verdicts += verdict is None
            decisions.append(verdict is not None and verdict.group(1).lower() == "true")
        return decisions

    def score(self, bios: Sequence[Bio]) -> list[BioScore]:
        facts_per_bio = self.atomic_facts(bios)
        flat = [(bio.topic, fact) for bio, facts in zip(bios, facts_per_bio) for fact in facts]
        decisions = iter(self.support([topic for topic, _ in flat], [fact for _, fact in flat]))
        return [
            BioScore(bio.topic, bio.output, [FactDecision(fact, next(decisions)) for fact in facts])
            for bio, facts in zip(bios, facts_per_bio)
        ]


def parse_fact_list(reply: str) -> list[str]:
    """The facts of a reply written as a "- " list (other lines are ignored)."""
    facts = []
    for line in reply.splitlines():
        line = line.strip()
        if line.startswith(("- ", "* ")) and line[2:].strip():
            facts.append(line[2:].strip())
    return facts


def evaluate_factscore(
    entities: Sequence[str],
    generate: GenerateFn,
    out_dir: str | Path,
    *,
    endpoint: ChatEndpoint | None = None,
    knowledge: KnowledgeSource | None = None,
) -> FactScoreResult:
    """Generate the biographies, write FactScore's input file, and score them when a judge and a knowledge
    source are both configured (the per-fact decisions go to ``factscore_decisions.jsonl``)."""
    out_dir = Path(out_dir)
    bios = generate_bios(entities, generate)
    input_file = write_factscore_input(bios, out_dir / INPUT_FILE)
    if endpoint is None or knowledge is None:
        missing = " and ".join(
            name
            for name, value in (("a judge endpoint", endpoint), ("a knowledge source (--knowledge)", knowledge))
            if value is None
        )
        note = f"Not scored: needs {missing}; the input file can be scored with FactScore itself."
        return FactScoreResult(entities=len(bios), input_file=input_file.name, note=note)
    scorer = FactScorer(endpoint, knowledge)
    scores = scorer.score(bios)
    with open(out_dir / DECISIONS_FILE, "w", encoding="utf-8") as out:
        for bio in scores:
            out.write(json.dumps(asdict(bio), ensure_ascii=False) + "\n")
    responding = [bio for bio in scores if bio.facts]
    return FactScoreResult(
        entities=len(bios),
        input_file=input_file.name,
        note=f"Scored by {endpoint.describe()}; per-fact decisions in `{DECISIONS_FILE}`.",
        judge=endpoint.describe(),
        score=sum(bio.supported_share for bio in responding) / len(responding) if responding else None,
        respond_ratio=len(responding) / len(scores) if scores else None,
        facts_per_response=sum(len(bio.facts) for bio in responding) / len(responding) if responding else None,
        unclear_verdicts=scorer.unclear_verdicts,
        bios=scores,
    )


def _number(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _title_key(title: str) -> str:
    return " ".join(title.lower().split())


def _bm25(query: Sequence[str], documents: Sequence[Counter]) -> list[float]:
    """Okapi BM25 of ``query`` against term counts, with document frequencies from ``documents`` themselves."""
    lengths = [sum(terms.values()) for terms in documents]
    average_length = sum(lengths) / len(lengths) or 1.0
    query_terms = set(query)
    frequency = Counter(term for terms in documents for term in query_terms if term in terms)
    idf = {
        term: math.log(1 + (len(documents) - frequency[term] + 0.5) / (frequency[term] + 0.5)) for term in query_terms
    }
    scores = []
    for terms, length in zip(documents, lengths):
        norm = _BM25_K1 * (1 - _BM25_B + _BM25_B * length / average_length)
        scores.append(sum(idf[t] * terms[t] * (_BM25_K1 + 1) / (terms[t] + norm) for t in query_terms if terms[t]))
    return scores
