"""Per-token labels shared by the data pipeline (which writes them) and the loss (which reads them).

Appendix A.2.1 of the paper sorts words into three classes; SentencePiece pieces inherit their word's class.
``IGNORE`` marks positions that are no target at all (the EOS between documents).

The LLM-judge label of a token (the paper's "LLM judge" baseline) is ``JUDGE_CALL`` when the judge
delegates it, ``JUDGE_KEEP`` when it does not, and ``JUDGE_UNKNOWN`` for documents without judge markup
and for EOS.

The reference loss of a token is a frozen reference model's loss of it (cross-entropy with ``<CALL>``
excluded), used by Rho-1 and spaCy + RefLoss; ``NaN`` where there is none (EOS, runs without a reference).

``LABEL_COLUMNS`` is the one declaration of these per-token columns: the labeler, the label cache, offline
shards and the packer store them with these dtypes, and :class:`TokenLabels` carries them, per target, to
the call/ignore selection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


class TokenClass(IntEnum):
    IGNORE = -1
    OTHER = 0
    FACT = 1
    GRAMMAR = 2


JUDGE_UNKNOWN = -1
JUDGE_KEEP = 0
JUDGE_CALL = 1

LABEL_COLUMNS: dict[str, np.dtype] = {
    "token_class": np.dtype(np.int8),
    "judge": np.dtype(np.int8),
    "ref_loss": np.dtype(np.float32),
}
"""Per-token label columns next to the token ids, with their storage dtypes."""

LABEL_FILL: dict[str, float] = {"token_class": TokenClass.IGNORE, "judge": JUDGE_UNKNOWN, "ref_loss": float("nan")}
"""The value of each label column where there is no label (the EOS between documents)."""


@dataclass
class TokenLabels:
    """The per-target labels of one micro-batch, each the shape of the targets (``None``: not available).

    ``judge`` may be the raw column (``JUDGE_*`` values) or a boolean "the judge delegates" mask.
    """

    token_class: Tensor | None = None
    judge: Tensor | None = None
    ref_loss: Tensor | None = None

    def available(self) -> set[str]:
        return {field.name for field in dataclasses.fields(self) if getattr(self, field.name) is not None}

    def flatten(self) -> TokenLabels:
        return TokenLabels(**{name: getattr(self, name).flatten() for name in self.available()})
