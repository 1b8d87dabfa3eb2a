"""Batching, the third stage: labeled documents packed into windows (``packing``) and streamed to the trainer
by resumable multi-worker loaders (``loader``)."""
