"""The one HTML page skeleton of the views: labeled texts, generations, the comparison of runs and the eval report.

A page is standalone: styles inline, plots embedded as base64 PNG, no script and nothing fetched from the
network. Labeled text goes through spaCy's displaCy span renderer, tables are written from their rows, and
markdown written for a report section goes through Python-Markdown (a dependency of tensorboard).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; }
img { max-width: 100%; }
figure { margin: 0.5em 0 1.5em; padding: 0.5em 1em; border: 1px solid #e3e3e3; border-radius: 6px; }
.legend-label { display: inline-block; padding: 0.1em 0.5em; border-radius: 3px; font-weight: bold;
                font-size: 0.85em; }
.note { color: #555; }
"""


def html_page(title: str, *parts: str) -> str:
    """A standalone page: ``title`` as its heading, then ``parts`` (HTML) in order."""
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def heading(text: str, level: int = 2) -> str:
    return f"<h{level}>{html.escape(text)}</h{level}>"


def paragraph(text: str, *, note: bool = False) -> str:
    return f'<p{" class=note" if note else ""}>{html.escape(text)}</p>'


def html_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A table of ``header`` and ``rows``, each cell as ``str`` writes it, escaped."""
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def png_image(path: str | Path, alt: str) -> str:
    """The PNG at ``path`` embedded in the page."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def markdown_html(text: str) -> str:
    """Markdown (tables included) as HTML."""
    import markdown

    return markdown.markdown(text, extensions=["tables"])


def legend(entries: Sequence[tuple[str, str | None, str]]) -> str:
    """A table of ``(label, colour, meaning)``: each label on its colour (None: unmarked text), then its meaning."""
    rows = []
    for label, color, meaning in entries:
        style = f' style="background: {color}"' if color else ""
        rows.append(f'<tr><td><span class="legend-label"{style}>{html.escape(label)}</span></td>'
                    f"<td>{html.escape(meaning)}</td></tr>")
    rows_html = "\n".join(rows)
    return f"<table>\n<thead><tr><th>label</th><th>meaning</th></tr></thead>\n<tbody>\n{rows_html}\n</tbody>\n</table>"


def labeled_spans(tokens: Sequence[str], spans: Sequence[dict], colors: dict[str, str]) -> str:
    """``tokens`` with labeled ``spans`` (``{"start_token", "end_token", "label"}``, end exclusive) under them, drawn
    by displaCy's span renderer in a ``<figure>``; overlapping spans stack. displaCy puts a space between tokens."""
    from spacy import displacy

    document = {"text": " ".join(tokens), "tokens": list(tokens), "spans": [dict(span) for span in spans]}
    rendered = displacy.render(document, style="span", manual=True, jupyter=False, options={"colors": colors})
    return f"<figure>{rendered}</figure>"
