"""The report's cascade sections: FactScore biographies written in the cascade, and generation throughput.

Both generate with :func:`lacy_stream.inference.generate.generate` as ``lacy-stream generate`` does:
greedy, repetition penalty 1.2, a call policy deciding the calls and, when a partner is configured, the
partner answering them through :class:`~lacy_stream.inference.partners.Cascade` (Appendix A.5).

* FactScore: one policy object writes all biographies, so a calibrated policy keeps one call budget over
  all of them, as the paper compares models at an equal overall call rate. With a background directory,
  the partner reads each person's ``<name>.txt`` in the paper's RAG prompt. Without a partner, calls are
  still decided and counted but the model writes the token itself; the section says so.
* Throughput: the same prompts generated without calls (:class:`NeverCall`, no partner) and in the
  cascade, alternating prompt by prompt so that both see the same machine load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..inference.call_policy import CallPolicy, NeverCall, policy_from_name
from ..inference.generate import Generation, TokenSource, generate
from ..inference.loading import LacyModel
from ..inference.partners import Cascade, Partner, RagPartner, RagPrompt, person_from_prompt
from ..markdown import markdown_table
from .chat_endpoint import ChatEndpoint
from .factscore import FactScoreResult, KnowledgeSource, bio_prompt, evaluate_factscore

GENERATIONS_FILE = "factscore_generations.jsonl"
THROUGHPUT_PROMPTS = 4
WARMUP_TOKENS = 4


@dataclass(frozen=True)
class CascadeGenerator:
    """The model, its partner (None: no cascade) and how they generate."""

    lacy: LacyModel
    partner: Partner | None
    partner_spec: str | None
    """The partner as configured (``hf:DIR``, ``openai:URL#MODEL``, ``lacy:PATH``), for the report."""
    policy_name: str
    """A name of :data:`~lacy_stream.inference.call_policy.POLICY_NAMES`."""
    call_rate: float
    max_new_tokens: int
    background_dir: Path | None = None
    """Background texts ``<name>.txt`` for the partner's RAG prompt; None: the partner sees only the text."""
    call_pieces: int | None = None
    """Pieces one call appends at most; None: all the pieces of the partner's token (Appendix A.5)."""

    def new_policy(self) -> CallPolicy:
        return policy_from_name(self.policy_name, self.lacy.tokenizer, self.call_rate)

    def generate(self, prompt: str, policy: CallPolicy, *, max_new_tokens: int | None = None) -> Generation:
        """Continue ``prompt``, the partner (if any) answering ``policy``'s calls."""
        return generate(
            self.lacy.model,
            self.lacy.tokenizer,
            prompt,
            policy,
            delegate=self._delegate(prompt),
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
        )

    def _delegate(self, prompt: str) -> Cascade | None:
        if self.partner is None:
            return None
        partner = self.partner
        if self.background_dir is not None:
            person = person_from_prompt(prompt)
            if person is None:
                raise ValueError(f"background texts need FactScore prompts, got {prompt!r}")
            background = (self.background_dir / f"{person}.txt").read_text(encoding="utf-8")
            partner = RagPartner(partner, RagPrompt(person, background))
        return Cascade(partner, self.lacy.tokenizer, self.call_pieces)


@dataclass(frozen=True)
class GenerationStats:
    """Totals over a set of generations."""

    generations: int
    tokens: int
    steps: int
    calls: int
    partner_tokens: int
    seconds: float
    call_rate: float
    """Calls per generation step."""
    partner_token_share: float
    """Share of the generated tokens that the partner wrote."""
    tokens_per_second: float

    @classmethod
    def of(cls, generations: Sequence[Generation]) -> "GenerationStats":
        tokens = sum(len(generation.ids) for generation in generations)
        steps = sum(generation.steps for generation in generations)
        calls = sum(generation.calls for generation in generations)
        partner_tokens = sum(generation.sources.count(TokenSource.PARTNER) for generation in generations)
        seconds = sum(generation.seconds for generation in generations)
        return cls(
            generations=len(generations),
            tokens=tokens,
            steps=steps,
            calls=calls,
            partner_tokens=partner_tokens,
            seconds=seconds,
            call_rate=calls / steps if steps else 0.0,
            partner_token_share=partner_tokens / tokens if tokens else 0.0,
            tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        )


@dataclass
class CascadeFactScoreResult:
    """FactScore of the cascade's biographies, with what the cascade did while writing them."""

    partner: str | None
    background: bool
    policy: dict
    """The policy's settings and counters after all biographies (one budget over all of them)."""
    generation: GenerationStats
    generations_file: str
    factscore: FactScoreResult

    @property
    def not_run(self) -> str | None:
        return self.factscore.not_run

    def to_dict(self) -> dict:
        cascade = {name: value for name, value in asdict(self).items() if name != "factscore"}
        return self.factscore.to_dict() | {"cascade": cascade}

    def markdown(self) -> str:
        stats = self.generation
        if self.partner is None:
            writer = "No cascade partner (--cascade): the model answered its own calls, which are only counted."
        else:
            writer = f"Cascade partner `{self.partner}`" + (" with background texts (RAG)." if self.background else ".")
        return "\n".join(
            [
                writer,
                "",
                markdown_table(
                    ["policy", "call rate", "partner token share", "tokens", "tokens/s"],
                    [[self.policy["policy"], f"{stats.call_rate:.3f}", f"{stats.partner_token_share:.3f}",
                      stats.tokens, f"{stats.tokens_per_second:.1f}"]],
                ),
                "",
                f"Generations with their token sources: `{self.generations_file}`.",
                "",
                self.factscore.markdown(),
            ]
        )


def evaluate_cascade_factscore(
    generator: CascadeGenerator,
    entities: Sequence[str],
    out_dir: str | Path,
    *,
    endpoint: ChatEndpoint | None = None,
    knowledge: KnowledgeSource | None = None,
) -> CascadeFactScoreResult:
    """Write a biography of each entity in the cascade and pass them to :func:`evaluate_factscore`.

    Each generation (text, ids and who wrote each token) goes to ``factscore_generations.jsonl`` as soon as
    it is written, so a failing judge does not cost the generations.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = generator.new_policy()
    tokenizer = generator.lacy.tokenizer
    generations: list[Generation] = []
    with open(out_dir / GENERATIONS_FILE, "w", encoding="utf-8") as records:

        def write_bio(prompt: str) -> str:
            generation = generator.generate(prompt, policy)
            records.write(json.dumps(generation.report(tokenizer), ensure_ascii=False) + "\n")
            generations.append(generation)
            return generation.completion(tokenizer)

        factscore = evaluate_factscore(entities, write_bio, out_dir, endpoint=endpoint, knowledge=knowledge)
    return CascadeFactScoreResult(
        partner=generator.partner_spec,
        background=generator.background_dir is not None and generator.partner is not None,
        policy=policy.state_dict(),
        generation=GenerationStats.of(generations),
        generations_file=GENERATIONS_FILE,
        factscore=factscore,
    )


@dataclass
class ThroughputResult:
    prompts: int
    max_new_tokens: int
    without_calls: GenerationStats
    cascade: GenerationStats | None
    """None without a partner."""
    partner: str | None
    policy: str

    @property
    def cascade_vs_without_calls(self) -> float | None:
        """Cascade tokens/s over tokens/s without calls."""
        if self.cascade is None or not self.without_calls.tokens_per_second:
            return None
        return self.cascade.tokens_per_second / self.without_calls.tokens_per_second

    def to_dict(self) -> dict:
        return asdict(self) | {"cascade_vs_without_calls": self.cascade_vs_without_calls}

    def markdown(self) -> str:
        rows = [_stats_cells("without calls (`<CALL>` at -inf)", self.without_calls)]
        if self.cascade is None:
            conclusion = "No cascade partner (--cascade): the cascade was not measured."
        else:
            rows.append(_stats_cells(f"cascade with `{self.partner}`, {self.policy} policy", self.cascade))
            ratio = self.cascade_vs_without_calls
            shown = "– (nothing generated without calls)" if ratio is None else f"{ratio:.3f}"
            conclusion = f"Cascade speed relative to generation without calls: {shown}."
        return "\n".join([
            f"The first {self.prompts} FactScore prompts, up to {self.max_new_tokens} new tokens each, generated "
            "without calls and, with a partner, in the cascade, alternating prompt by prompt.",
            "",
            markdown_table(["generation", "tokens", "seconds", "tokens/s", "call rate", "partner token share"], rows),
            "",
            conclusion,
        ])


def measure_throughput(generator: CascadeGenerator, entities: Sequence[str]) -> ThroughputResult:
    """Tokens per second without calls and, with a partner, in the cascade, on FactScore prompts.

    The first forward passes pay one-time costs (kernel selection, memory allocation), so a few tokens of
    the first prompt are generated untimed first, in both modes.
    """
    prompts = [bio_prompt(name) for name in entities[:THROUGHPUT_PROMPTS]]
    if not prompts:
        raise ValueError("throughput needs at least one FactScore entity")
    with_cascade = generator.partner is not None
    policy = generator.new_policy()
    generator.generate(prompts[0], NeverCall(), max_new_tokens=WARMUP_TOKENS)
    if with_cascade:
        generator.generate(prompts[0], generator.new_policy(), max_new_tokens=WARMUP_TOKENS)
    without_calls, cascade = [], []
    for prompt in prompts:
        without_calls.append(generator.generate(prompt, NeverCall()))
        if with_cascade:
            cascade.append(generator.generate(prompt, policy))
    return ThroughputResult(
        prompts=len(prompts),
        max_new_tokens=generator.max_new_tokens,
        without_calls=GenerationStats.of(without_calls),
        cascade=GenerationStats.of(cascade) if with_cascade else None,
        partner=generator.partner_spec,
        policy=generator.policy_name,
    )


def _stats_cells(name: str, stats: GenerationStats) -> list[object]:
    return [name, stats.tokens, f"{stats.seconds:.2f}", f"{stats.tokens_per_second:.1f}", f"{stats.call_rate:.3f}",
            f"{stats.partner_token_share:.3f}"]
