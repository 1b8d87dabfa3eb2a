"""Per-token label vocabulary shared by the annotator (which writes it) and the loss (which reads it).

Appendix A.2.1 of the paper sorts words into three classes; SentencePiece pieces inherit their word's class.
"""

from enum import IntEnum


class TokenClass(IntEnum):
    OTHER = 0
    FACT = 1
    GRAMMAR = 2
