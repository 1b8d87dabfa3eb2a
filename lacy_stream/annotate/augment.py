"""More training text for the student labeler (:mod:`.distill`), made of its training documents.

The student learns spaCy's labeling as a function of the text, and any English text spaCy labels is an example of
it; what the student lacks is examples (more training pieces is the one lever left: see docs/benchmarks.md). Each
training document yields copies in which words of the open classes (nouns, proper nouns, adjectives, verbs other
than auxiliaries, adverbs, numbers) are swapped for words spaCy tagged the same way elsewhere in the training
documents: each distinct word with probability ``share``, consistently within the copy (so a name swapped in its
first mention is swapped in its repeats too, and first mentions stay first mentions). The copies keep the
document's function words, punctuation and whitespace, so their grammar is mostly the original's, with new
combinations of words; spaCy labels them like any document. Only training documents are copied: agreement is
still measured on natural, held-out text.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from spacy.tokens import Token

from .spacy_pipeline import load_pipeline

log = logging.getLogger(__name__)

SWAPPED_TAGS = ("NN", "NNS", "NNP", "NNPS", "JJ", "JJR", "JJS", "CD", "RB", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ")
"""The fine-grained tags whose words are swapped (for words of the same tag)."""
PROPER_TAGS = frozenset({"NNP", "NNPS"})
SHARE = 0.3
"""The probability that a distinct word of a swapped tag is swapped in a copy."""
KEPT = -1


@dataclass
class TaggedDocument:
    """A document as spaCy's words: their text, the whitespace after each, and the place of each word's tag in
    :data:`SWAPPED_TAGS` (:data:`KEPT` for words never swapped)."""

    words: list[str]
    spaces: list[str]
    tags: np.ndarray


def _swap_tag(token: Token) -> int:
    """The place of ``token``'s tag in :data:`SWAPPED_TAGS`, or :data:`KEPT`: auxiliaries, and words that are
    not plain words of their tag (a "CD" that is no number, a proper noun that is not capitalized, one letter)."""
    tag = token.tag_
    if tag not in SWAPPED_TAGS or token.pos_ == "AUX":
        return KEPT
    if tag == "CD":
        plain = token.like_num and all(c.isalnum() or c in ",." for c in token.text)
    elif tag in PROPER_TAGS:
        plain = token.is_alpha and token.is_title and len(token) > 1
    else:
        plain = token.is_alpha and len(token) > 1
    return SWAPPED_TAGS.index(tag) if plain else KEPT


def tag_documents(texts: list[str], *, spacy_model: str, workers: int) -> list[TaggedDocument]:
    """spaCy's words and tags of each text (tagger only, in ``workers`` processes)."""
    nlp = load_pipeline(spacy_model)
    disabled = [name for name in ("parser", "ner") if name in nlp.pipe_names]
    documents, words, started = [], 0, time.monotonic()
    for doc in nlp.pipe(texts, disable=disabled, batch_size=32, n_process=workers):
        documents.append(TaggedDocument(
            [token.text for token in doc],
            [token.whitespace_ for token in doc],
            np.array([_swap_tag(token) for token in doc], dtype=np.int8),
        ))
        words += len(doc)
        if len(documents) % 1000 == 0 or len(documents) == len(texts):
            log.info("tagged %d/%d documents to augment, %d words, %.0f words/s", len(documents), len(texts), words,
                     words / (time.monotonic() - started))
    return documents


def _form(word: str, tag: int) -> str:
    """How a word is counted among its tag's words: proper nouns as written, the others in lower case."""
    return word if SWAPPED_TAGS[tag] in PROPER_TAGS else word.lower()


def _cased_like(form: str, original: str) -> str:
    if len(original) > 1 and original.isupper():
        return form.upper()
    if original[:1].isupper():
        return form[:1].upper() + form[1:]
    return form


def swap_words(documents: list[TaggedDocument], *, copies: int, share: float = SHARE, seed: int = 0) -> list[str]:
    """``copies`` texts of each document with words swapped (see the module); a copy in which no word was swapped
    is left out. The same documents, copies, share and seed give the same texts.

    A word's replacement is drawn among the words of its tag with probability proportional to the square root of
    their count: frequent words stay frequent, and rare ones come up more often than in the text."""
    counts = [Counter() for _ in SWAPPED_TAGS]
    for document in documents:
        for word, tag in zip(document.words, document.tags.tolist()):
            if tag != KEPT:
                counts[tag][_form(word, tag)] += 1
    choices = []
    for counter in counts:
        forms = list(counter)
        weights = np.sqrt(np.fromiter(counter.values(), dtype=np.float64, count=len(forms)))
        choices.append((forms, np.cumsum(weights) / weights.sum() if forms else weights))
    texts = []
    for copy in range(copies):
        for number, document in enumerate(documents):
            random = np.random.default_rng([seed, copy, number])
            replacement: dict[tuple[int, str], str | None] = {}
            parts, swapped = [], False
            for word, space, tag in zip(document.words, document.spaces, document.tags.tolist()):
                if tag != KEPT:
                    key = (tag, _form(word, tag))
                    if key not in replacement:
                        forms, cumulative = choices[tag]
                        drawn = forms[min(int(np.searchsorted(cumulative, random.random())), len(forms) - 1)]
                        replacement[key] = drawn if random.random() < share and drawn != key[1] else None
                    if replacement[key] is not None:
                        form = replacement[key]
                        word = form if SWAPPED_TAGS[tag] in PROPER_TAGS else _cased_like(form, word)
                        swapped = True
                parts.append(word + space)
            if swapped:
                texts.append("".join(parts))
    return texts


def augmented_texts(texts: list[str], *, copies: int, spacy_model: str, workers: int, seed: int = 0) -> list[str]:
    """``copies`` augmented texts of each of ``texts`` (:func:`swap_words` over :func:`tag_documents`)."""
    if copies == 0 or not texts:
        return []
    augmented = swap_words(tag_documents(texts, spacy_model=spacy_model, workers=workers), copies=copies, seed=seed)
    log.info("%d augmented documents from %d training documents", len(augmented), len(texts))
    return augmented
