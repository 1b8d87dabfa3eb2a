"""The one writer of markdown tables: evaluation reports, benchmark output, the methods table of docs/loss-and-methods.md."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A table of ``header`` and ``rows``, each cell as ``str`` writes it, one line a row (no trailing newline).

    Cells are written as they are: a cell holding ``|`` must escape it.
    """
    return "\n".join([_table_row(header), "|" + "---|" * len(header), *map(_table_row, rows)])


def _table_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"
