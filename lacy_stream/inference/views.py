"""An HTML page of generations (``generate --html``): who wrote each word, drawn with displaCy's span renderer.

The prompt, the cascade partner's pieces at each ``<CALL>`` and the model's own tokens at calls no partner
answered are marked; the model's own writing is not. Words are split where the writer changes, so a number
the model began and the partner finished shows as two words.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from ..html_page import heading, html_page, labeled_spans, legend, paragraph
from ..tokenizer import Tokenizer
from .generate import Generation, TokenSource

PROMPT = "prompt"
LABELS = {TokenSource.PARTNER: "CALL → partner", TokenSource.MODEL_AT_CALL: "CALL, unanswered"}
COLORS = {PROMPT: "#cfd8dc", LABELS[TokenSource.PARTNER]: "#4dd0e1", LABELS[TokenSource.MODEL_AT_CALL]: "#f48fb1"}
MEANINGS = {
    PROMPT: "the prompt",
    LABELS[TokenSource.PARTNER]: ("written by the cascade partner at a <CALL> (every piece of its token, or "
                                  "--call-pieces of them)"),
    LABELS[TokenSource.MODEL_AT_CALL]: "a <CALL> that no partner answered: the model's own best token stands in",
}


def writers(generation: Generation, tokenizer: Tokenizer) -> list[tuple[str, str | None]]:
    """The prompt and the generation as ``(text, label)`` runs; ``None``: the model's own tokens."""
    context = list(generation.prompt_ids)
    text = tokenizer.decode(context)
    runs: list[tuple[str, str | None]] = [(text, PROMPT)]
    for source, run in itertools.groupby(zip(generation.ids, generation.sources), key=lambda pair: pair[1]):
        context += [token for token, _ in run]
        extended = tokenizer.decode(context)
        runs.append((extended[len(text) :], LABELS.get(source)))
        text = extended
    return runs


def generation_figure(generation: Generation, tokenizer: Tokenizer) -> str:
    """The words of the prompt and the generation, each run of one writer marked with its label."""
    tokens: list[str] = []
    spans = []
    for text, label in writers(generation, tokenizer):
        words = re.findall(r"\S+", text)
        if label is not None and words:
            spans.append({"start_token": len(tokens), "end_token": len(tokens) + len(words), "label": label})
        tokens += words
    return labeled_spans(tokens, spans, COLORS)


def generations_page(generations: Sequence[Generation], tokenizer: Tokenizer) -> str:
    """A standalone page: each generation with its counts, then the legend."""
    parts = []
    for number, generation in enumerate(generations, start=1):
        partner_pieces = generation.sources.count(TokenSource.PARTNER)
        counts = (f"{generation.calls} calls in {generation.steps} steps ({generation.call_rate:.1%}); "
                  f"{partner_pieces} of {len(generation.ids)} new pieces from the partner; "
                  f"{generation.tokens_per_second:.1f} tokens/s"
                  + ("; stopped at EOS" if generation.stopped_at_eos else "") + ".")
        parts += [heading(f"Generation {number}"), paragraph(counts), generation_figure(generation, tokenizer)]
    entries = [(label, COLORS[label], meaning) for label, meaning in MEANINGS.items()]
    entries.append(("model", None, "written by the model itself (unmarked)"))
    return html_page(
        "Generations with their calls",
        *parts,
        heading("Legend"),
        legend(entries),
        paragraph("A word is split where its writer changes (the model began it, the partner finished it).", note=True),
    )
