"""What the labels of a text look like: for a terminal (``annotate --text``) and as an HTML page (``--html``).

The terminal view brackets facts (in colour on a terminal, grammar dimmed too) and prints a one-line legend.
The page draws every label with displaCy's span renderer: facts, grammar and the values the LLM judge
delegates (its ``[dblookup('E', 'R') -> V]`` markup). Grammar is a bar without a tag, and other words have no
mark: tags on every short word would cover their neighbours' (the legend says what each colour is).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..html_page import heading, html_page, labeled_spans, legend, paragraph

FACT, GRAMMAR, OTHER, JUDGE = "fact", "grammar", "other", "judge"
COLORS = {FACT: "#ffc107", GRAMMAR: "#b0bec5", JUDGE: "#ce93d8"}
_TAGS = {FACT: FACT, GRAMMAR: "", JUDGE: JUDGE}
"""The tag each mark carries: grammar's bar has none."""
MEANINGS = {
    FACT: "a first mention of a named entity, date, number or key noun (the paper's rules, Appendix A.2.1): "
          "what LaCy learns to delegate with <CALL>",
    GRAMMAR: "determiners, prepositions, conjunctions, auxiliaries, punctuation: learned normally",
    OTHER: "every other word: learned normally (unmarked)",
    JUDGE: "a value the LLM judge delegates (its [dblookup('E', 'R') -> V] markup): the llm_judge method's calls",
}

FACT_STYLE = "\033[1;33m"
GRAMMAR_STYLE = "\033[2m"
RESET = "\033[0m"


def terminal_view(text: str, word_spans: Sequence[Sequence], *, color: bool) -> str:
    """``text`` with its facts marked: runs of fact words in [brackets], or on a terminal (``color``) facts in bold
    yellow and grammar dimmed. ``word_spans``: ``[begin, end, class name]`` per word (``WordLabels.spans``)."""
    if color:
        styles = {FACT: FACT_STYLE, GRAMMAR: GRAMMAR_STYLE}
        out, position = [], 0
        for begin, end, name in word_spans:
            out.append(text[position:begin])
            out += [styles[name], text[begin:end], RESET] if name in styles else [text[begin:end]]
            position = end
        out.append(text[position:])
        return "".join(out)
    out, position, run_start, run_end = [], 0, 0, None
    for begin, end, name in word_spans:
        if name != FACT:
            continue
        if run_end is not None and not text[run_end:begin].strip():
            run_end = end
            continue
        if run_end is not None:
            out += [text[position:run_start], "[", text[run_start:run_end], "]"]
            position = run_end
        run_start, run_end = begin, end
    if run_end is not None:
        out += [text[position:run_start], "[", text[run_start:run_end], "]"]
        position = run_end
    out.append(text[position:])
    return "".join(out)


def terminal_legend(*, color: bool, judge_values: int = 0) -> str:
    """The one line that says what :func:`terminal_view` marks."""
    if color:
        line = (f"{FACT_STYLE}fact{RESET} (first mentions of entities, dates, numbers, key nouns: what LaCy "
                f"delegates), {GRAMMAR_STYLE}grammar{RESET}, other (plain)")
    else:
        line = ("[brackets]: facts (first mentions of entities, dates, numbers, key nouns: what LaCy delegates); "
                "grammar and other words unmarked")
    if judge_values:
        line += f"; {judge_values} LLM-judge values in the markup"
    return line + "; --html FILE draws every label"


def labels_figure(text: str, word_spans: Sequence[Sequence], judge_spans: Sequence[tuple[int, int]] = ()) -> str:
    """The words of ``text`` with facts, grammar and judge values marked (displaCy).

    Adjacent words of one class share a mark; a judge value marks every word it overlaps.
    """
    tokens = [text[begin:end] for begin, end, _ in word_spans]
    spans = []
    for name, run in itertools.groupby(enumerate(word_spans), key=lambda item: item[1][2]):
        if name == OTHER:
            continue
        indices = [index for index, _ in run]
        spans.append({"start_token": indices[0], "end_token": indices[-1] + 1, "label": _TAGS[name]})
    for begin, end in judge_spans:
        covered = [index for index, (first, last, _) in enumerate(word_spans) if first < end and last > begin]
        if covered:
            spans.append({"start_token": covered[0], "end_token": covered[-1] + 1, "label": JUDGE})
    return labeled_spans(tokens, spans, {_TAGS[name]: color for name, color in COLORS.items()})


def labels_page(text: str, word_spans: Sequence[Sequence], judge_spans: Sequence[tuple[int, int]] = ()) -> str:
    """A standalone page: the labeled text, its counts and the legend."""
    counts = {name: sum(span[2] == name for span in word_spans) for name in (FACT, GRAMMAR, OTHER)}
    summary = (f"{len(word_spans)} words: {counts[FACT]} fact, {counts[GRAMMAR]} grammar, {counts[OTHER]} other"
               + (f"; {len(judge_spans)} LLM-judge value spans" if judge_spans else "; no LLM-judge markup") + ".")
    entries = [(name, COLORS.get(name), MEANINGS[name]) for name in (FACT, GRAMMAR, JUDGE, OTHER)]
    return html_page(
        "Labels of a text",
        paragraph(summary),
        labels_figure(text, word_spans, judge_spans),
        heading("Legend"),
        legend(entries),
        paragraph("Words are spaCy's tokens; SentencePiece pieces inherit the class of their word.", note=True),
    )
