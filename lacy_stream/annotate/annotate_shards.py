"""Offline annotation, the paper's workflow: shards in, shards with stored labels out.

Each input shard becomes one output shard whose samples keep their text and metadata and gain a
``labels.npz`` member (token ids, fact classes and judge labels of every part of the document, plus the
labeler identity). The loader reads these labels instead of running spaCy when they were made by the same
labeler and split; otherwise it annotates online. Samples the reader skips are counted in the manifest. As
``make-shards`` does, the shards are written into a staging directory and published when all are done.

With a reference model, the member also holds each token's reference loss and the reference's identity
(Rho-1 and spaCy + RefLoss; the paper's offline cost of Table 2), so training skips the reference forward.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from ..shards.documents import MAX_SKIP_RATIO, Document, ReadStats
from ..shards.make_shards import ShardFile, publish_shards, shard_name, shard_staging
from ..shards.shard_reader import read_shard
from ..shards.specs import MANIFEST_FORMAT, MANIFEST_VERSION
from ..shards.streams import StreamOptions
from ..tokenizer import Tokenizer
from .labeling import (
    DocumentLabeler,
    Labels,
    TokenScorer,
    build_annotator,
    stored_labels_bytes,
)


def annotate_shards(
    urls: list[str],
    out_dir: str | Path,
    tokenizer_path: str,
    *,
    spacy_model: str = "en_core_web_sm",
    labeler: str = "spacy",
    batch_size: int = 64,
    max_doc_chars: int = 1_000_000,
    options: StreamOptions = StreamOptions(),
    compress: str | None = None,
    prefix: str = "annotated",
    reference: TokenScorer | None = None,
    max_skip_ratio: float = MAX_SKIP_RATIO,
) -> dict:
    """Write one annotated shard per input shard plus ``manifest.json``; returns the manifest.

    ``labeler`` is ``spacy`` or ``student:PATH`` (a distilled student); the stored labels carry its identity.

    Raises ``TooManySkipsError`` (and publishes nothing) when no document was read or more than
    ``max_skip_ratio`` of the shards or documents were skipped.
    """
    out_dir = Path(out_dir)
    compression = compress or "none"
    tokenizer = Tokenizer(tokenizer_path)
    annotator = build_annotator(
        labeler, tokenizer, spacy_model=spacy_model, batch_size=batch_size, max_doc_chars=max_doc_chars
    )
    labeler = DocumentLabeler(tokenizer, annotator, batch_size=batch_size)
    labeler.reference = reference
    reference_identity = reference.identity if reference is not None else None
    stats = ReadStats()
    shards = []
    with shard_staging(out_dir) as staging:
        for number, url in enumerate(urls):
            shard = ShardFile(staging / shard_name(prefix, number, compression), compression)
            try:
                documents = read_shard(url, number, stats, options=options, max_doc_chars=max_doc_chars)
                for ordinal, (doc, parts) in enumerate(_whole_documents(labeler.label((None, d) for d in documents))):
                    record = {
                        "id": doc.meta.get("id", doc.key),
                        "title": doc.meta.get("title"),
                        "text": "".join(part_text for part_text, _ in parts),
                        "labels": stored_labels_bytes(
                            labeler.identity, [labels for _, labels in parts], reference_identity
                        ),
                    }
                    if "annotated_text" in doc.meta:
                        record["annotated_text"] = doc.meta["annotated_text"]
                    shard.write(ordinal, record)
                shards.append(shard.finish())
            except BaseException:
                shard.abort()
                raise
            logging.getLogger(__name__).info("annotated %s -> %s", url, shards[-1]["name"])
        stats.check_skips(max_skip_ratio, "the input shards")
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "documents": sum(shard["documents"] for shard in shards),
            "skipped": dict(sorted(stats.skipped.items())),
            "sources": list(urls),
            "labeler": labeler.identity,
            "reference": reference_identity,
            "shards": shards,
        }
        publish_shards(staging, out_dir, prefix, manifest)
    return manifest


def _whole_documents(labeled: Iterator[tuple[None, Document, Labels]]) -> Iterator[tuple[Document, list]]:
    """Regroup the parts of split documents: ``(document, [(part text, part labels), ...])``."""
    parts: list[tuple[str, Labels]] = []
    for _, doc, labels in labeled:
        parts.append((doc.text, labels))
        if doc.is_last_part:
            yield doc, parts
            parts = []
