"""A short LaCy run on real Wikipedia text (../shared/data/dwiki-dev.jsonl): the loss falls and the model
learns to put its <CALL> probability on fact tokens.

Non-call tokens are learned with <CALL> left out of the softmax (Eq. A.3), so nothing pushes the <CALL>
logit down: it first rises almost uniformly (p(<CALL>) > 0.95 at every position after a few dozen steps)
and only then separates fact from other positions. On this tiny model the separation shows from about
400 steps on (at 200 steps facts are still slightly lower), hence the length of the run.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DIR

from lacy_stream.config.job_config import AnnotationConfig, DataConfig, load_job_config
from lacy_stream.data.loader import TokenLoader
from lacy_stream.inference.loading import load_lacy
from lacy_stream.labels import TokenClass
from lacy_stream.shards.make_shards import make_shards
from lacy_stream.tokenizer import train_tokenizer
from lacy_stream.train import train

DWIKI = SHARED_DIR / "data" / "dwiki-dev.jsonl"
SEQ_LEN = 64


@pytest.fixture(scope="module")
def dwiki_shards(tmp_path_factory) -> tuple[Path, str]:
    """dwiki as five shards of 150 documents, and a 1,000-piece tokenizer trained on the first 300 texts."""
    if not DWIKI.is_file():
        pytest.skip(f"{DWIKI} not found (set LACY_SHARED_DIR)")
    directory = tmp_path_factory.mktemp("dwiki")
    make_shards([str(DWIKI)], directory / "shards", docs_per_shard=150)
    texts = [json.loads(line)["text"] for line in itertools.islice(DWIKI.open(), 300)]
    tokenizer = directory / "dwiki.model"
    train_tokenizer(texts, tokenizer, vocab_size=1000)
    return directory / "shards", str(tokenizer)


@pytest.mark.timeout(600)
def test_lacy_run_lowers_the_loss_and_calls_on_facts(tmp_path, dwiki_shards):
    shards, tokenizer = dwiki_shards
    held_out = str(shards / "shard-000004.tar")
    run_dir = tmp_path / "run"
    config = load_job_config(None, [
        f"--data.shards={shards}/shard-{{000000..000003}}.tar",
        f"--tokenizer.path={tokenizer}",
        f"--train.run_dir={run_dir}",
        "--model.preset=tiny",
        f"--model.max_seq_len={SEQ_LEN}",
        f"--data.seq_len={SEQ_LEN}",
        "--data.batch_size=8",
        "--data.num_workers=1",
        "--optimizer.lr=4e-3",
        "--optimizer.warmup_steps=5",
        "--train.steps=400",
        "--train.log_every=20",
        f"--train.val_shards={held_out}",
        "--train.val_every=100",
        "--train.val_batches=4",
        "--checkpoint.every=400",
    ])
    train(config)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validation = {record["step"]: record["val/loss"] for record in records if "val/loss" in record}
    losses = list(validation.values())
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), validation
    assert validation[400] < validation[100] - 0.3, validation
    assert all(0.1 < record["call_ratio"] < 0.2 for record in records)

    # <CALL> probability at held-out positions whose next token is a fact vs any other token.
    lacy = load_lacy(run_dir)
    loader = TokenLoader.from_config(
        DataConfig(shards=held_out, seq_len=SEQ_LEN, batch_size=8, num_workers=0), tokenizer, AnnotationConfig()
    )
    logits_on_facts, logits_on_others = [], []
    with torch.inference_mode():
        for batch in itertools.islice(loader, 12):
            tokens = batch["tokens"]
            target_class = batch["token_class"][:, 1:]
            logits = lacy.model.logits(lacy.model(tokens[:, :-1]))
            logits_on_facts.append(logits[target_class == TokenClass.FACT])
            logits_on_others.append(logits[(target_class != TokenClass.FACT) & (target_class != TokenClass.IGNORE)])
    on_facts, on_others = torch.cat(logits_on_facts), torch.cat(logits_on_others)
    call_prob_on_facts = on_facts.softmax(-1)[:, lacy.call_id].mean().item()
    call_prob_on_others = on_others.softmax(-1)[:, lacy.call_id].mean().item()
    assert call_prob_on_facts > call_prob_on_others, (call_prob_on_facts, call_prob_on_others)
    # The same in log-odds, where the saturated probabilities are not squeezed together near 1.
    log_odds = {name: (logits[:, lacy.call_id] - logits[:, : lacy.call_id].logsumexp(-1)).mean().item()
                for name, logits in (("facts", on_facts), ("others", on_others))}
    # The gap is small this early (0.07 nats on this machine's torch build; 0.1 to 0.2 elsewhere): the sign is
    # what 400 steps establish.
    assert log_odds["facts"] > log_odds["others"], log_odds
