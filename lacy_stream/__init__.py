"""lacy-stream: online LaCy pretraining (arXiv 2602.12005)."""

__version__ = "0.1.0"
