"""Validation samples: a few held-out windows as markdown for TensorBoard's text tab, so that a user sees, while
the model trains, which tokens are facts and which ones the model would hand to ``<CALL>``.

The model's calls in a window are the ``call_ratio`` share of the window's targets with the highest
``p(<CALL>)`` (per window; ``compare``'s log-odds C_M ranks the same way, per batch). A ``baseline`` run never
learns ``<CALL>``, so its samples mark facts only.
"""

from __future__ import annotations

import html
import itertools

import torch
from torch import Tensor

from ..labels import TokenClass
from ..tokenizer import Tokenizer

SAMPLE_WINDOWS = 2
"""Windows of the first validation micro-batch shown at every validation."""

_MARKDOWN_SPECIALS = str.maketrans({char: "\\" + char for char in "\\`*_[]#|~"})


def top_calls(call_logprob: Tensor, valid: Tensor, call_ratio: float) -> Tensor:
    """The ``call_ratio`` share of the valid positions with the highest ``log p(<CALL>)`` (a bool mask)."""
    wanted = round(call_ratio * int(valid.sum()))
    called = torch.zeros_like(valid)
    if wanted:
        scores = torch.where(valid, call_logprob, torch.full_like(call_logprob, -torch.inf))
        called[scores.topk(wanted).indices] = True
    return called


def window_markdown(tokenizer: Tokenizer, tokens: Tensor, token_class: Tensor, called: Tensor | None) -> str:
    """One window (``tokens`` [T + 1]; ``token_class`` and ``called`` [T], of the targets ``tokens[1:]``) as
    markdown: a line of counts and the legend, then the text, facts in **bold** and calls as ``code``; a
    document boundary (EOS) starts a new paragraph."""
    facts = token_class == TokenClass.FACT
    calls = called if called is not None else torch.zeros_like(facts)
    legend = f"**bold**: fact targets ({int(facts.sum())} of {int((token_class != TokenClass.IGNORE).sum())})"
    if called is not None:
        legend += (f"; `code`: the model's calls, the targets of highest p(&lt;CALL&gt;) ({int(calls.sum())}, "
                   f"{int((calls & facts).sum())} of them facts)")
    parts = [legend + ".", "\n\n---\n\n", _escape(tokenizer.decode(tokens[:1].tolist()))]
    context = tokens[:1].tolist()
    labeled = zip(tokens[1:].tolist(), (token_class == TokenClass.IGNORE).tolist(), facts.tolist(), calls.tolist())
    for (is_eos, fact), run in itertools.groupby(labeled, key=lambda item: item[1:3]):
        if is_eos:
            parts.append("\n\n")
            context = []
            continue
        written = []
        for call, pieces in itertools.groupby(run, key=lambda item: item[3]):
            before = tokenizer.decode(context)
            context += [token for token, *_ in pieces]
            text = tokenizer.decode(context)[len(before) :]
            written.append(_wrap_lines(text, _code) if call else _escape(text))
        parts.append(_wrap_lines("".join(written), lambda core: f"**{core}**") if fact else "".join(written))
    return "".join(parts)


def _wrap_lines(text: str, wrap) -> str:
    """``wrap`` applied to each line of ``text`` without its surrounding whitespace, which stays outside."""
    lines = []
    for line in text.split("\n"):
        core = line.strip()
        start = line.find(core) if core else len(line)
        lines.append(line[:start] + (wrap(core) if core else "") + line[start + len(core) :])
    return "\n".join(lines)


def _escape(text: str) -> str:
    return html.escape(text, quote=False).translate(_MARKDOWN_SPECIALS)


def _code(text: str) -> str:
    """A code span of ``text`` (no escapes inside one: a backtick in it takes a longer fence)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"
