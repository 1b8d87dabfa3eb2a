"""One log format for the command line and the dataloader workers it starts."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: int) -> None:
    logging.basicConfig(level=level, format=FORMAT)
