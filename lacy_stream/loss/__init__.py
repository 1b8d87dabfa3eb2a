"""The LaCy loss: call/ignore masks of the paper's methods and the loss over them (see :mod:`.lacy_loss`)."""

from .lacy_loss import IMPLEMENTATIONS, LossOutput, lacy_loss, logit_stats, logit_stats_of
from .masks import METHODS, MaskInputs, Masks, Method, get_method, methods_table, select_masks

__all__ = [
    "IMPLEMENTATIONS", "LossOutput", "lacy_loss", "logit_stats", "logit_stats_of",
    "METHODS", "MaskInputs", "Masks", "Method", "get_method", "methods_table", "select_masks",
]
