"""Figures for the reports, drawn when matplotlib (the ``eval`` extra) is installed."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def new_figure(**options: Any):
    """A matplotlib ``Figure`` (no pyplot: no global backend or figure state), or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'lacy-stream[eval]'): the report has no plot")
        return None
    return Figure(**options)
