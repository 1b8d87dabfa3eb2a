"""Per-token label vocabulary shared by the annotator (which writes it) and the loss (which reads it).

Appendix A.2.1 of the paper sorts words into three classes; SentencePiece pieces inherit their word's class.
``IGNORE`` marks positions that are no target at all (the EOS between documents).

The LLM-judge label of a token (the paper's "LLM judge" baseline) is ``JUDGE_CALL`` when the judge
delegates it, ``JUDGE_KEEP`` when it does not, and ``JUDGE_UNKNOWN`` for documents without judge markup
and for EOS.
"""

from enum import IntEnum


class TokenClass(IntEnum):
    IGNORE = -1
    OTHER = 0
    FACT = 1
    GRAMMAR = 2


JUDGE_UNKNOWN = -1
JUDGE_KEEP = 0
JUDGE_CALL = 1
