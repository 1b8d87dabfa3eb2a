"""``lacy-stream bench stream``: batches per second through the dataloader, spaCy included."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from ..config.job_config import JobConfig
from ..data.loader import TokenLoader
from ..labels import TokenClass


def bench_stream(config: JobConfig, *, batches: int) -> dict:
    """Pull ``batches`` batches through the loader; tokens/s excludes the first batch (worker start-up)."""
    loader = TokenLoader.from_config(config.data, config.tokenizer.path, config.annotation)
    tokens = facts = targets = 0
    started = None
    progress = tqdm(total=batches, desc="streaming", unit="batch", disable=not sys.stderr.isatty())
    for count, batch in enumerate(loader, start=1):
        if started is None:
            started = time.perf_counter()
        else:
            tokens += batch["tokens"].numel()
        classes = batch["token_class"][:, 1:]
        facts += int((classes == TokenClass.FACT).sum())
        targets += int((classes != TokenClass.IGNORE).sum())
        progress.update()
        if count == batches:
            break
    progress.close()
    seconds = time.perf_counter() - started if started is not None else 0.0
    return {
        "batches": batches,
        "num_workers": config.data.num_workers,
        "tokens_per_s": round(tokens / seconds) if seconds > 0 else None,
        "fact_fraction": round(facts / targets, 4) if targets else None,
        "read": loader.read_stats(),
    }
