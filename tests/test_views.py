"""The views: labels of a text (terminal and HTML), generations with their calls, the comparison page and plot,
the eval report page, and the validation samples for TensorBoard. No browser and no network."""

from __future__ import annotations

import re

import pytest
import torch

from lacy_stream.annotate.views import labels_page, terminal_legend, terminal_view
from lacy_stream.eval.compare import COMPARISON_HTML, Comparison, RunInfo, RunScores, _loss_bars, write_comparison
from lacy_stream.eval.config import EvalConfig, EvalInputs
from lacy_stream.eval.runner import EvalReport, SectionOutcome, _run_section
from lacy_stream.eval.plotting import new_figure
from lacy_stream.html_page import html_table
from lacy_stream.inference.generate import Generation, TokenSource
from lacy_stream.inference.views import generations_page
from lacy_stream.labels import TokenClass
from lacy_stream.tokenizer import Tokenizer
from lacy_stream.trainer.samples import top_calls, window_markdown

TEXT = "Marie Curie was born in Warsaw in 1867."
WORD_SPANS = [[0, 5, "fact"], [6, 11, "fact"], [12, 15, "grammar"], [16, 20, "other"], [21, 23, "grammar"],
              [24, 30, "fact"], [31, 33, "grammar"], [34, 38, "fact"], [38, 39, "grammar"]]
JUDGE_SPANS = [(24, 30)]


def spans_of(page: str) -> list[str]:
    """The tags displaCy drew under the words, in order."""
    return [tag.strip() for tag in re.findall(r"line-height: 1; border-radius: 3px\">\s*([^<]*?)\s*</span>", page)]


def standalone(page: str) -> bool:
    return page.startswith("<!DOCTYPE html>") and "<script" not in page and not re.search(r"(src|href)=\"https?:", page)


def test_terminal_view_brackets_facts_or_colours_every_class():
    assert terminal_view(TEXT, WORD_SPANS, color=False) == "[Marie Curie] was born in [Warsaw] in [1867]."
    colored = terminal_view(TEXT, WORD_SPANS, color=True)
    assert "\033[1;33mWarsaw\033[0m" in colored and "\033[2mwas\033[0m" in colored and " born " in colored
    assert re.sub(r"\033\[[\d;]*m", "", colored) == TEXT
    assert terminal_legend(color=False).startswith("[brackets]: facts")
    assert "grammar and other words unmarked" in terminal_legend(color=False)
    assert "\033[2mgrammar\033[0m" in terminal_legend(color=True)
    assert "2 LLM-judge values" in terminal_legend(color=False, judge_values=2)


def test_labels_page_marks_facts_grammar_and_judge_values_with_a_legend():
    page = labels_page(TEXT, WORD_SPANS, JUDGE_SPANS)
    assert standalone(page)
    assert spans_of(page) == ["fact", "", "", "fact", "judge", "", "fact", ""]  # grammar's bars have no tag
    assert "#ffc107" in page and "#b0bec5" in page and "#ce93d8" in page  # fact, grammar and judge colours
    legend = page.split("<h2>Legend</h2>", 1)[1]
    assert all(f">{name}</span>" in legend for name in ("fact", "grammar", "judge", "other"))
    assert "9 words: 4 fact, 4 grammar, 1 other; 1 LLM-judge value spans." in page
    assert "Marie" in page and "1867" in page


def test_a_text_in_tags_is_escaped():
    page = labels_page("<b>Tom</b>", [[0, 10, "fact"]])
    assert "<b>Tom</b>" not in page and "&lt;b&gt;Tom&lt;/b&gt;" in page


def test_generations_page_marks_the_prompt_and_who_answered_each_call(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    prompt = tokenizer.encode("The museum was founded in")
    model_part, partner_part, own_part = (tokenizer.encode(text) for text in ("the year", "museum", "city"))
    generation = Generation(
        prompt_ids=prompt,
        ids=[*model_part, *partner_part, *own_part],
        sources=[TokenSource.MODEL] * len(model_part) + [TokenSource.PARTNER] * len(partner_part)
        + [TokenSource.MODEL_AT_CALL] * len(own_part),
        steps=len(model_part) + 2, calls=2, stopped_at_eos=True, seconds=0.5,
    )  # fmt: skip
    page = generations_page([generation], tokenizer)
    assert standalone(page)
    assert spans_of(page) == ["prompt", "CALL → partner", "CALL, unanswered"]
    assert "2 calls in" in page and f"{len(partner_part)} of {len(generation.ids)} new pieces from the partner" in page
    legend = page.split("<h2>Legend</h2>", 1)[1]
    assert all(f">{label}</span>" in legend for label in ("prompt", "CALL → partner", "CALL, unanswered", "model"))


def comparison() -> Comparison:
    runs = [RunInfo(path="/nowhere/baseline", name="baseline", method="baseline", steps=300, data="d", tokenizer="t"),
            RunInfo(path="/nowhere/lacy", name="lacy", method="lacy", steps=300, data="d", tokenizer="t")]
    scores = [
        RunScores(tokens=100, calls=0, call_loss=None, non_call_loss=6.7, baseline_call_loss=None,
                  baseline_non_call_loss=None, fact_share_of_calls=None, judge_share_of_calls=None, fact_share=0.4,
                  judge_share=None, fact_call_auc=0.5),
        RunScores(tokens=100, calls=15, call_loss=14.99, non_call_loss=7.2, baseline_call_loss=6.08,
                  baseline_non_call_loss=6.9, fact_share_of_calls=0.49, judge_share_of_calls=None, fact_share=0.4,
                  judge_share=None, fact_call_auc=0.572),
    ]  # fmt: skip
    return Comparison(val_shards="heldout", windows=8, seq_len=32, call_ratio=0.15, runs=runs, scores=scores)


def test_comparison_page_has_the_table_and_the_plot(tmp_path):
    out = write_comparison(comparison(), tmp_path)
    page = (out / COMPARISON_HTML).read_text()
    assert standalone(page)
    assert "<th>baseline call loss on C_M</th>" in page and "<td>lacy</td>" in page and "<td>14.9900</td>" in page
    assert "<code>&lt;CALL&gt;</code>" in page and "Targets: 40.0% facts" in page
    assert re.search(r'<img alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}">', page)


def test_loss_bars_fit_the_axis_to_the_values():
    axes = new_figure().subplots()
    _loss_bars(axes, ["baseline", "lacy"], [6.7, 7.2], [None, 6.9], "tab:blue", "non-call loss")
    low, high = axes.get_ylim()
    assert 6.0 < low < 6.7 and 7.2 < high < 7.5
    assert "the axis starts at" in axes.get_ylabel()
    assert [text.get_text() for text in axes.texts] == ["6.70", "7.20", "", "6.90"]


def test_report_page_marks_a_section_that_ran_in_part(tmp_path):
    class AccuracyOnly:
        not_run = "accuracy only: acceptability needs a judge endpoint"

        def to_dict(self) -> dict:
            return {"accuracy": 0.25}

        def markdown(self) -> str:
            return "*Accuracy*: the share of targets.\n\n| group | accuracy |\n|---|---|\n| fact | 0.250 |"

    config = EvalConfig(checkpoint="runs/tiny", out_dir=tmp_path, inputs=EvalInputs.from_shared(tmp_path),
                        sections=("acceptability",))
    outcome = _run_section("acceptability", AccuracyOnly, config)
    assert (outcome.status, outcome.reason) == ("partial", AccuracyOnly.not_run)
    report = EvalReport(config=config, created="today", sections=[outcome, SectionOutcome("nlu", "skipped", "not requested")])
    _, markdown_path, html_path = report.write(tmp_path)
    assert "| acceptability | partial |" in markdown_path.read_text() and "## acceptability" in markdown_path.read_text()
    page = html_path.read_text()
    assert standalone(page)
    assert "<td>acceptability</td>\n<td>partial</td>" in page.replace("</td><td>", "</td>\n<td>")
    assert "<h2>acceptability</h2>" in page and "<td>fact</td>" in page and "<h2>nlu</h2>" not in page


def test_html_table_escapes_its_cells():
    assert "<td>a &lt; b</td>" in html_table(["x"], [["a < b"]])


def test_validation_sample_marks_facts_and_calls_and_starts_a_paragraph_at_each_document(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    before, paris = tokenizer.encode("The museum was founded in"), tokenizer.encode("Paris")
    second = tokenizer.encode("The river city")
    tokens = torch.tensor([*before, *paris, tokenizer.eos_id, *second])
    facts = slice(len(before) - 1, len(before) + len(paris) - 1)  # targets are tokens[1:]
    eos = len(before) + len(paris) - 1
    token_class = torch.full((len(tokens) - 1,), int(TokenClass.OTHER))
    token_class[facts] = TokenClass.FACT
    token_class[eos] = TokenClass.IGNORE
    call_logprob = torch.full((len(tokens) - 1,), -9.0)
    call_logprob[facts] = -0.1
    call_logprob[eos] = 0.0  # the EOS is never a call
    valid = token_class != TokenClass.IGNORE
    called = top_calls(call_logprob, valid, call_ratio=len(paris) / int(valid.sum()))
    assert called.nonzero().flatten().tolist() == list(range(facts.start, facts.stop))
    sample = window_markdown(tokenizer, tokens, token_class, called)
    legend, text = sample.split("\n\n---\n\n")
    assert f"fact targets ({len(paris)} of" in legend and f"({len(paris)}, {len(paris)} of them facts)" in legend
    assert text == "The museum was founded in **`Paris`**\n\nThe river city"
    assert "**" not in window_markdown(tokenizer, tokens, torch.full_like(token_class, 0), None).split("---")[1]


@pytest.mark.parametrize("text, escaped", [("a*b_c", r"a\*b\_c"), ("<CALL> & more", "&lt;CALL&gt; &amp; more")])
def test_validation_sample_escapes_markdown(tokenizer_path, text, escaped):
    tokenizer = Tokenizer(tokenizer_path)
    tokens = torch.tensor(tokenizer.encode(text))
    sample = window_markdown(tokenizer, tokens, torch.zeros(len(tokens) - 1, dtype=torch.long), None)
    assert sample.split("\n\n---\n\n")[1] == escaped
