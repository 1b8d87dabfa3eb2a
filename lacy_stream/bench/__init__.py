"""Benchmarks: throughput figures, measured, never asserted in tests (``lacy-stream bench ...``).

``stream`` (the dataloader), ``annotation`` (spaCy and the student per CPU core), ``loss`` (the loss variants
against their matmul floor) and ``gpu_check`` (every GPU figure in one command with a time budget).
"""
