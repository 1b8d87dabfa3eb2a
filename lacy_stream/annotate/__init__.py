"""Annotation, the second stage: documents -> token ids with per-token labels.

spaCy and the paper's fact rules (``spacy_pipeline``, ``annotation``) or a distilled student
(``student_labeler``, ``distill``), alignment to SentencePiece pieces (``alignment``), LLM-judge labels
(``judge``), all put together per document by ``labeling`` with its label cache (``label_cache``) and
offline shards (``annotate_shards``).
"""
