"""The distilled student labeler: the document pass over pieces, distillation, the loader with a student,
exact resume, and refusal of a student made for another tokenizer or rules version."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_corpus, synthetic_text

from lacy_stream.annotate import annotation, student_labeler
from lacy_stream.annotate import distill as distill_module
from lacy_stream.annotate.alignment import encode_with_offsets
from lacy_stream.annotate.annotate_shards import annotate_shards
from lacy_stream.annotate.distill import distill
from lacy_stream.annotate.labeling import Audit, DocumentLabeler, audit_figures, build_annotator
from lacy_stream.annotate.student_labeler import (
    BEGIN,
    BEGIN_PERSON,
    INSIDE,
    OUTSIDE,
    StudentError,
    resolve_pieces,
)
from lacy_stream.cli import main
from lacy_stream.config.job_config import AnnotationConfig
from lacy_stream.data.loader import TokenLoader, check_annotation_config
from lacy_stream.labels import TokenClass
from lacy_stream.bench import annotation as bench_annotation
from lacy_stream.bench.annotation import cores_to_keep_up
from lacy_stream.shards.documents import Document, ReadStats
from lacy_stream.shards.shard_reader import read_shard
from lacy_stream.shards.specs import expand_shard_spec
from lacy_stream.tokenizer import Tokenizer, train_tokenizer

FACT, OTHER, GRAMMAR = TokenClass.FACT, TokenClass.OTHER, TokenClass.GRAMMAR


def test_the_document_pass_keeps_first_mentions_and_person_name_parts():
    text = "Ada Lovelace met Babbage. Lovelace met Babbage."
    words = [(0, 3), (3, 12), (12, 16), (16, 24), (24, 25), (25, 34), (34, 38), (38, 46), (46, 47)]
    begin, end = (np.array(column) for column in zip(*words))
    tags = np.array([BEGIN_PERSON, INSIDE, OUTSIDE, BEGIN, OUTSIDE, BEGIN_PERSON, OUTSIDE, BEGIN, OUTSIDE])
    base = np.array([OTHER, OTHER, OTHER, OTHER, GRAMMAR, OTHER, OTHER, OTHER, GRAMMAR])
    fact_if_first = tags != OUTSIDE
    classes = resolve_pieces(text, begin, end, tags, base, fact_if_first)
    # "Lovelace" repeats a part of "Ada Lovelace"; the second "Babbage" repeats the first.
    assert classes.tolist() == [FACT, FACT, OTHER, FACT, GRAMMAR, OTHER, OTHER, OTHER, GRAMMAR]


def test_mention_text_is_sliced_from_the_text_as_utf8_byte_offsets_say():
    # Offsets are bytes: "Zürich" is 7. A slice that ends inside "é" (where byte-fallback pieces can split a
    # character) decodes its bytes, with a replacement character, as before the text was sliced directly.
    text = "Zürich met José. Zürich"
    data = text.encode()
    begin, end = np.array([0, 8, 12, 15, 18]), np.array([7, 11, 15, len(data) - 8, len(data)])
    zurich_again = data.rindex("Zürich".encode())
    begin[4], end[3] = zurich_again, zurich_again - 1
    tags = np.array([BEGIN, OUTSIDE, BEGIN, OUTSIDE, BEGIN])
    base = np.full(5, OTHER)
    classes = resolve_pieces(text, begin, end, tags, base, tags != OUTSIDE)
    # The second "Zürich" repeats the first.
    assert classes.tolist() == [FACT, OTHER, FACT, OTHER, OTHER]
    assert student_labeler._byte_slices(text, np.array([0, 12]), np.array([7, 16])) == ["Zürich", "Jos\ufffd"]


@pytest.mark.parametrize("length, dilation", [(11, 4), (3, 4), (1, 1)])  # shifts within, past and at the length
def test_the_convolution_as_one_matrix_product_equals_conv1d_and_so_do_its_gradients(length, dilation):
    torch.manual_seed(0)
    convolution = student_labeler.DilatedConvolution(width=8, kernel=3, dilation=dilation)
    hidden = torch.randn(2, length, 8, requires_grad=True)
    weight = convolution.mix.weight.reshape(8, 3, 8).permute(0, 2, 1)  # [out, in, taps]
    expected = torch.nn.functional.conv1d(hidden.transpose(1, 2), weight, convolution.mix.bias, padding="same",
                                          dilation=dilation).transpose(1, 2)
    output = convolution(hidden)
    torch.testing.assert_close(output, expected)
    with torch.no_grad():  # labeling writes the shifted inputs in place, training concatenates them
        torch.testing.assert_close(convolution(hidden), expected.detach())
    upstream = torch.randn_like(output)
    gradients = torch.autograd.grad(output, [hidden, convolution.mix.weight], upstream)
    expected_gradients = torch.autograd.grad(expected, [hidden, convolution.mix.weight], upstream)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, expected_gradient)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_documents_labeled_together_are_labeled_as_if_alone(tokenizer_path, student, monkeypatch, dtype):
    annotator = student_labeler.StudentAnnotator.load(student[0], Tokenizer(tokenizer_path), dtype)
    rng = random.Random(3)
    texts = ["", *(synthetic_text(rng, rng.randint(1, 6)) for _ in range(12)), "", "Ada."]
    alone = [annotator.label_text(text) for text in texts]
    monkeypatch.setattr(student_labeler, "BATCH_PIECES", 300)  # several batches, several documents in each
    together = list(annotator.annotate(texts))
    assert len(together) == len(texts)
    for one, batched in zip(alone, together):
        np.testing.assert_array_equal(one.ids, batched.ids)
        np.testing.assert_array_equal(one.classes, batched.classes)
    tags_alone = [annotator.predict([labels.ids])[0][0] for labels in alone]
    tags_together = [tags for tags, _, _ in annotator.predict([labels.ids for labels in alone])]
    for one, batched in zip(tags_alone, tags_together):
        np.testing.assert_array_equal(one, batched)


def test_a_student_labels_in_the_dtype_asked_under_an_identity_that_names_it(tokenizer_path, student):
    tokenizer = Tokenizer(tokenizer_path)
    students = {dtype: student_labeler.StudentAnnotator.load(student[0], tokenizer, dtype) for dtype in ("fp32", "bf16")}
    assert {parameter.dtype for parameter in students["bf16"].network.parameters()} == {torch.bfloat16}
    assert students["bf16"].identity == students["fp32"].identity + "+bf16"
    assert not students["fp32"].identity.endswith("fp32")  # labels of students made before dtypes keep their cache
    text = synthetic_text(random.Random(8), 6)
    labeled = {dtype: annotator.label_text(text) for dtype, annotator in students.items()}
    np.testing.assert_array_equal(labeled["fp32"].ids, labeled["bf16"].ids)
    assert set(labeled["bf16"].classes.tolist()) <= {FACT, OTHER, GRAMMAR}
    with pytest.raises(ValueError, match="not 'fp16'"):
        student_labeler.StudentAnnotator.load(student[0], tokenizer, "fp16")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_labels_in_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    assert student_labeler.labeling_dtype("auto") == expected
    assert student_labeler.labeling_dtype("fp32") == "fp32" and student_labeler.labeling_dtype("bf16") == "bf16"


def test_auto_labels_in_fp32_with_a_torch_that_cannot_say_what_the_cpu_multiplies(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert student_labeler.labeling_dtype("auto") == "fp32"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_annotate_times_a_bf16_student_beside_the_same_student_in_fp32(tmp_path, tokenizer_path, student,
                                                                             monkeypatch):
    monkeypatch.setattr(bench_annotation, "labeling_dtype", lambda: "bf16")
    rng = random.Random(5)  # the student's own documents: its held-out tenth is what the bench labels
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": synthetic_text(rng, 8)}) + "\n" for i in range(40)))
    report = bench_annotation.bench_annotate(str(source), tokenizer_path, workers=1, max_docs=40, repeats=1,
                                             seq_len=64, labeler=f"student:{student[0]}")["student"]
    assert (report["dtype"], report["fp32"]["dtype"]) == ("bf16", "fp32")
    assert report["identity"] == report["fp32"]["identity"] + "+bf16"
    assert report["vs_fp32"] > 0 and report["fp32"]["vs_spacy_path"] > 0
    assert report["agreement"]["pieces"] == report["fp32"]["agreement"]["pieces"] > 0


def test_a_student_file_of_an_earlier_format_is_refused_with_what_to_do(tmp_path, tokenizer_path, student):
    saved = torch.load(student[0], weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({**saved, "format": "lacy-student-2"}, old)
    with pytest.raises(StudentError, match="lacy-student-2 file.*distill the student again"):
        student_labeler.StudentAnnotator.load(old, Tokenizer(tokenizer_path))


@pytest.mark.slow
def test_a_student_file_of_the_previous_format_still_labels(tmp_path, tokenizer_path):
    rng = random.Random(8)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": synthetic_text(rng, 4)}) + "\n" for i in range(12)))
    path = tmp_path / "student.pt"
    report = distill([str(source)], tokenizer_path, path, max_docs=12, max_pieces=None, cache_dir=None, augment=0,
                     epochs=1, known_words=0)
    assert report["held_out"]["pieces"] > 0 or report["held_out"]["agreement"] is None  # none held out: no figure
    saved = torch.load(path, weights_only=True)
    config = {name: value for name, value in saved["config"].items() if name not in ("known_words", "dropout")}
    previous = tmp_path / "previous.pt"
    torch.save({**saved, "format": "lacy-student-3", "config": config}, previous)
    text = synthetic_text(rng, 3)
    labels = [student_labeler.StudentAnnotator.load(file, Tokenizer(tokenizer_path)).label_text(text).classes
              for file in (path, previous)]
    np.testing.assert_array_equal(*labels)


class _Pieces:
    """A tokenizer's piece table over a hand-written vocabulary (id 0 is the unknown piece)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = ["<unk>", *pieces]
        self.num_pieces = len(self.pieces)

    def is_special_piece(self, piece: int) -> bool:
        return piece == 0

    def is_byte_piece(self, piece: int) -> bool:
        return False

    def id_to_piece(self, piece: int) -> str:
        return self.pieces[piece]

    def ids(self, *pieces: str) -> np.ndarray:
        return np.array([self.pieces.index(piece) for piece in pieces])


def _decode_word_features(codes: np.ndarray) -> list[tuple[int, int, bool]]:
    """(case, place in the word, starts a sentence) of each code."""
    places = student_labeler.WORD_POSITIONS
    return [(code // 2 // places, code // 2 % places, bool(code % 2)) for code in codes.tolist()]


def test_word_features_find_words_their_pieces_and_sentence_starts():
    vocabulary = _Pieces(["\u2581Ada", "\u2581met", "\u2581Bab", "b", "age", ".", "\u2581Then", "\u2581U", "S", "\u2581",
                          "1", "\u2581he", "!\"", "\u2581NASA"])
    table = student_labeler.piece_table(vocabulary)
    ids = vocabulary.ids("\u2581Ada", "\u2581met", "\u2581Bab", "b", "age", ".", "\u2581Then", "\u2581U", ".", "S", ".",
                         "\u2581he", "!\"", "\u2581", "1", "\u2581NASA")
    features = student_labeler.word_features(ids, table)
    assert features.max() < student_labeler.WORD_FEATURES
    upper, title, lower, digits, punctuation = 3, 4, 5, 1, 2
    alone, first_of_many, inner, last_of_many, first_of_two, last_of_two = 0, 3, 4, 5, 1, 2
    assert _decode_word_features(features) == [
        (title, alone, True),  # the document's first word
        (lower, alone, False),
        (title, first_of_many, False), (title, inner, False), (title, last_of_many, False),
        (punctuation, alone, False),
        (title, alone, True),  # after "." and a space
        (title, alone, False), (punctuation, alone, False),
        (title, alone, False),  # "S" after "U.": no space, so no new sentence
        (punctuation, alone, False),
        (lower, alone, True),
        (punctuation, alone, False),  # '!"' ends the sentence with its quote
        (digits, first_of_two, True), (digits, last_of_two, True),  # a bare "▁" takes the case of what follows
        (upper, alone, False),
    ]
    assert student_labeler.word_features(np.array([], dtype=np.int64), table).shape == (0,)


def test_word_hashes_name_a_word_by_its_pieces_wherever_it_stands():
    vocabulary = _Pieces(["\u2581inter", "nation", "al", "\u2581of", "\u2581nation", ",", "\u2581al"])
    table = student_labeler.piece_table(vocabulary)
    ids = vocabulary.ids("\u2581inter", "nation", "al", "\u2581of", "\u2581inter", "nation", "al", ",",
                         "\u2581nation", "\u2581al", "\u2581inter", "nation")
    hashes = student_labeler.word_hashes(ids, table).tolist()
    international, of, comma, nation, al, inter_nation = hashes[0], hashes[3], hashes[7], hashes[8], hashes[9], hashes[10]
    assert hashes[:3] == [international] * 3 and hashes[4:7] == [international] * 3  # all its pieces, both times
    assert hashes[11] == inter_nation
    # Other words, the same pieces in other words or places included, hash otherwise.
    assert len({international, of, comma, nation, al, inter_nation}) == 6
    assert student_labeler.word_hashes(np.array([], dtype=np.int64), table).shape == (0,)


def test_the_known_words_are_the_most_frequent_seen_often_enough():
    vocabulary = _Pieces(["\u2581the", "\u2581cat", "\u2581dog", "\u2581emu"])
    table = student_labeler.piece_table(vocabulary)
    times = {"\u2581the": 30, "\u2581cat": 20, "\u2581dog": distill_module.KNOWN_WORD_MIN_COUNT,
             "\u2581emu": distill_module.KNOWN_WORD_MIN_COUNT - 1}
    documents = [vocabulary.ids(*[piece for piece, count in times.items() if count > i]) for i in range(30)]
    hash_of = {piece: student_labeler.word_hashes(vocabulary.ids(piece), table)[0] for piece in times}
    assert distill_module.frequent_words(documents, table, 2).tolist() == sorted([hash_of["\u2581the"], hash_of["\u2581cat"]])
    assert set(distill_module.frequent_words(documents, table, 10).tolist()) == {
        hash_of[piece] for piece in ["\u2581the", "\u2581cat", "\u2581dog"]}


def test_training_batches_hold_each_window_once_within_the_piece_budget():
    random_lengths = np.random.default_rng(1)
    lengths = np.concatenate([np.full(300, distill_module.WINDOW), random_lengths.integers(1, distill_module.WINDOW, 3000)])
    batches = distill_module._length_batches(lengths, 4096, np.random.default_rng(0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert all(len(batch) * lengths[batch].max() <= 4096 for batch in batches)
    assert sum(len(batch) * lengths[batch].max() for batch in batches) < 1.05 * lengths.sum()  # little padding
    again = distill_module._length_batches(lengths, 4096, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_a_window_longer_than_the_piece_budget_is_a_batch_of_its_own():
    batches = distill_module._length_batches(np.array([600, 10, 10]), 512, np.random.default_rng(0))
    assert sorted(len(batch) for batch in batches) == [1, 2]


@pytest.mark.slow
def test_a_student_knowing_words_by_identity_trains_loads_and_labels_documents_as_if_alone(tmp_path, tokenizer_path):
    rng = random.Random(7)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": synthetic_text(rng, 4)}) + "\n" for i in range(12)))
    path = tmp_path / "student.pt"
    distill([str(source)], tokenizer_path, path, max_docs=12, max_pieces=None, cache_dir=None, augment=0, epochs=1,
            known_words=50)
    annotator = student_labeler.StudentAnnotator.load(path, Tokenizer(tokenizer_path))
    network = annotator.network
    assert 0 < network.config.known_words <= 50 and network.word_identities.num_embeddings == network.config.known_words + 1
    known = network.known_word_hashes.numpy()
    assert network.identities_of(known).tolist() == list(range(1, len(known) + 1))
    assert network.identities_of(np.setdiff1d(np.arange(-5, 5), known)).tolist() == [0] * 10  # unknown words
    texts = [synthetic_text(rng, 3) for _ in range(3)]
    for text, labels in zip(texts, annotator.annotate(texts)):
        assert np.array_equal(labels.classes, annotator.label_text(text).classes)


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer_path) -> tuple[str, dict]:
    """A student distilled from spaCy on 40 synthetic documents, without swapped copies (those have their own test
    in test_student_augmentation.py): seconds."""
    directory = tmp_path_factory.mktemp("student")
    rng = random.Random(5)
    source = directory / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": synthetic_text(rng, 8)}) + "\n" for i in range(40)))
    path = directory / "student.pt"
    report = distill([str(source)], tokenizer_path, path, max_docs=40, max_pieces=None, cache_dir=None, epochs=3,
                     augment=0)
    return str(path), report


@pytest.mark.slow
def test_a_student_without_word_features_trains_loads_and_labels(tmp_path, tokenizer_path, monkeypatch):
    rng = random.Random(6)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": synthetic_text(rng, 4)}) + "\n" for i in range(12)))
    path = tmp_path / "student.pt"
    distill([str(source)], tokenizer_path, path, max_docs=12, max_pieces=None, cache_dir=None, augment=0, epochs=1,
            word_dim=0)

    def unused(*args):
        raise AssertionError("word features computed for a network without them")

    monkeypatch.setattr(student_labeler, "word_features", unused)
    annotator = student_labeler.StudentAnnotator.load(path, Tokenizer(tokenizer_path))
    assert annotator.network.words is None
    text = synthetic_text(rng, 3)
    assert len(annotator.label_text(text).classes) == len(Tokenizer(tokenizer_path).encode(text))


def test_auxiliary_targets_give_each_piece_the_spacy_labels_of_the_word_it_ends_in(tokenizer_path):
    annotator = annotation.FactAnnotator()
    codes = distill_module.AuxiliaryCodes(annotator.nlp)
    text = "Marie Curie was born in Warsaw in 1867.\n\nShe studied  physics."
    (words, mentions, auxiliary), = annotator.annotate([text], rules=lambda doc: (*annotation.local_labels(doc), codes(doc)))
    tokenizer = Tokenizer(tokenizer_path)
    targets = distill_module.piece_targets(tokenizer, text, words, mentions, auxiliary)
    labels = {name: ["", *annotator.nlp.get_pipe(component).labels]
              for name, (component, _) in distill_module.AUXILIARY_LABELS.items()}
    doc = annotator.nlp(text)  # ASCII: characters are bytes
    _, begins, ends = encode_with_offsets(tokenizer, text)
    between_words = 0
    for piece, (begin, end) in enumerate(zip(begins.tolist(), ends.tolist())):
        got = tuple(labels[name][targets[name][piece]] for name in labels)
        word = next((token for token in doc if token.idx <= end - 1 < token.idx + len(token)), None)
        if end == begin:  # a lone "▁" SentencePiece puts before the text
            assert got == ("", "", "")
        elif word is None:
            assert text[end - 1] == " " and got == ("", "", "")
            between_words += 1
        else:
            assert got == (word.tag_, word.dep_, word.ent_type_), word.text
    assert between_words > 0
    assert {labels["entity"][code] for code in targets["entity"]} == {"", "PERSON", "GPE", "DATE"}


def test_the_student_file_holds_the_network_alone_not_the_auxiliary_head(student):
    saved = torch.load(student[0], weights_only=True)
    network = student_labeler.StudentNetwork(student_labeler.StudentConfig(**saved["config"]))
    assert saved["state"].keys() == network.state_dict().keys()


@pytest.mark.slow
@pytest.mark.parametrize("weight", [0.0, 0.3])
def test_the_auxiliary_targets_are_learned_only_with_a_weight(tmp_path, tokenizer_path, monkeypatch, weight):
    rng = random.Random(8)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": synthetic_text(rng, 4)}) + "\n" for i in range(12)))
    learned = set()
    loss = distill_module._loss
    monkeypatch.setattr(distill_module, "_loss",
                        lambda logits, batch, targets: learned.update(targets) or loss(logits, batch, targets))
    distill([str(source)], tokenizer_path, tmp_path / "student.pt", max_docs=12, max_pieces=None, cache_dir=None,
            augment=0, epochs=1, auxiliary_weight=weight)
    auxiliary = set(distill_module.AUXILIARY_LABELS)
    assert learned == {"span_tag", "base_class", "fact_if_first"} | (auxiliary if weight else set())


def test_distillation_reports_agreement_with_the_teacher(student):
    _, report = student
    assert report["documents"] == 40 and report["training_pieces"] > 1000
    # The rules over perfect targets reproduce the teacher: the split loses (almost) nothing.
    assert report["perfect_student"]["agreement"] >= 0.98
    assert report["held_out"]["pieces"] > 0 and report["held_out"]["agreement"] > 0.4


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_distill_labeler_command_writes_a_student_the_loader_labels_with(tmp_path, tokenizer_path, capsys):
    make_corpus(tmp_path / "corpus", shards=2, docs_per_shard=6)
    out = tmp_path / "student.pt"
    with pytest.raises(SystemExit) as exit_info:
        main(["distill-labeler", "--shards", str(tmp_path / "corpus"), "--tokenizer", tokenizer_path, "--out", str(out),
              "--epochs", "1", "--workers", "1", "--no-cache"])
    output = capsys.readouterr()
    assert exit_info.value.code == 0, output.err
    report = json.loads(output.out)
    assert report["documents"] == 12 and report["training_pieces"] > 0 and report["held_out"]["pieces"] > 0
    assert f"wrote {out}; use it with --annotation.labeler=student:{out}" in output.err
    batch = next(iter(student_loader(tmp_path / "corpus", tokenizer_path, str(out), workers=0)))
    assert set(batch["token_class"].unique().tolist()) <= {-1, FACT, OTHER, GRAMMAR}


def student_loader(directory: Path, tokenizer_path: str, student_path: str, workers: int,
                   audit_ratio: float = 0.0) -> TokenLoader:
    return TokenLoader(
        expand_shard_spec(str(directory)),
        tokenizer_path,
        seq_len=32,
        batch_size=2,
        num_workers=workers,
        seed=1,
        annotation=AnnotationConfig(labeler=f"student:{student_path}", audit_ratio=audit_ratio),
    )


def test_a_student_labels_batches_through_the_loader_and_its_own_cache_namespace(tmp_path, tokenizer_path, student):
    make_corpus(tmp_path / "shards", shards=2, docs_per_shard=3)
    batches = []
    for batch in student_loader(tmp_path / "shards", tokenizer_path, student[0], workers=1):
        batches.append(batch)
        if len(batches) == 6:
            break
    classes = torch.cat([batch["token_class"] for batch in batches])
    assert set(classes.unique().tolist()) <= {-1, 0, 1, 2} and (classes == FACT).any()
    identities = [path.read_text() for path in (tmp_path / "lacy-cache" / "labels").glob("*/identity.txt")]
    assert len(identities) == 1 and identities[0].startswith("student:")


def test_exact_resume_with_a_student(tmp_path, tokenizer_path, student):
    make_corpus(tmp_path / "shards", shards=2, docs_per_shard=[4, 3])
    loader = student_loader(tmp_path / "shards", tokenizer_path, student[0], workers=1)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    expected = [next(iterator) for _ in range(8)]
    resumed = student_loader(tmp_path / "shards", tokenizer_path, student[0], workers=1)
    resumed.load_state_dict(state)
    for want, got in zip(expected, resumed):
        for name in want:
            torch.testing.assert_close(want[name], got[name], rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.slow
def test_the_audit_counts_the_students_agreement_with_spacy_and_resume_stays_exact(tmp_path, tokenizer_path, student):
    """Every document audited: the counts describe all the pieces the student labeled, the figures follow from
    them, and the batches are those of a run without an audit, before and after a resume."""
    make_corpus(tmp_path / "shards", shards=2, docs_per_shard=[4, 3])
    audited = student_loader(tmp_path / "shards", tokenizer_path, student[0], workers=1, audit_ratio=1.0)
    plain = student_loader(tmp_path / "shards", tokenizer_path, student[0], workers=1)
    iterator = iter(audited)
    first = [next(iterator) for _ in range(3)]
    state = audited.state_dict()
    expected = [next(iterator) for _ in range(6)]
    for want, got in zip(first + expected, plain):
        torch.testing.assert_close(want["token_class"], got["token_class"], rtol=0, atol=0)
    counts = audited.label_counts()
    assert counts["audit_documents"] == counts["annotated"] > 0 and counts["audit_pieces"] > 0
    figures = audit_figures(counts)
    assert figures["student_agreement"] == counts["audit_agree"] / counts["audit_pieces"]
    assert 0 <= figures["student_fact_precision"] <= 1 and 0 <= figures["student_fact_recall"] <= 1
    resumed = student_loader(tmp_path / "shards", tokenizer_path, student[0], workers=1, audit_ratio=1.0)
    resumed.load_state_dict(state)
    for want, got in zip(expected, resumed):
        for name in want:
            torch.testing.assert_close(want[name], got[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_the_audit_samples_the_same_share_of_documents_wherever_it_runs():
    documents = [Document(synthetic_text(random.Random(seed), 2), str(seed), "mem://", 0, seed) for seed in range(2000)]
    audit = Audit(annotator=None, ratio=0.1)
    sampled = [doc.key for doc in documents if audit.samples(doc)]
    assert 150 < len(sampled) < 250
    assert sampled == [doc.key for doc in documents if Audit(annotator=None, ratio=0.1).samples(doc)]


def test_the_trainer_logs_the_audit_and_warns_below_the_minimum(tmp_path, tokenizer_path, student, monkeypatch, caplog):
    from helpers import logged, overrides

    from lacy_stream.config.job_config import load_job_config
    from lacy_stream.trainer import train as train_module

    monkeypatch.setattr(train_module, "MIN_AUDITED_PIECES", 1)
    make_corpus(tmp_path / "corpus", shards=1, docs_per_shard=4)
    args = overrides(tmp_path / "corpus", tokenizer_path, tmp_path / "run", "--train.steps=2",
                     "--checkpoint.export_hf=false", f"--annotation.labeler=student:{student[0]}",
                     "--annotation.audit_ratio=1.0", "--annotation.audit_min_agreement=1.0")
    args.remove("--annotation.enabled=false")
    train_module.train(load_job_config(None, args))
    record = logged(tmp_path / "run")[-1]
    assert 0 < record["annotation/student_agreement"] <= 1 and record["annotation/audited_pieces"] > 0
    warnings = [r.message for r in caplog.records if "agrees with spaCy" in r.message]
    assert len(warnings) == 1 and "below annotation.audit_min_agreement = 100%" in warnings[0]


def test_the_planner_rounds_up_to_whole_cores():
    plan = cores_to_keep_up({"spacy": 9_000, "student": 130_000}, {"334m": 68_647, "1.3b": 31_443})
    assert plan == [{"consumer": "334m", "gpu_tokens_per_s": 68_647, "spacy_cores": 8, "student_cores": 1},
                    {"consumer": "1.3b", "gpu_tokens_per_s": 31_443, "spacy_cores": 4, "student_cores": 1}]


def test_offline_shards_annotated_by_a_student_serve_a_student_run(tmp_path, tokenizer_path, student):
    make_corpus(tmp_path / "shards", shards=1, docs_per_shard=4)
    manifest = annotate_shards(expand_shard_spec(str(tmp_path / "shards")), tmp_path / "annotated", tokenizer_path,
                               labeler=f"student:{student[0]}")
    assert manifest["labeler"].startswith("student:")
    online = [labels for _, _, labels in _student_labeler(tokenizer_path, student[0]).label(
        (None, doc) for doc in read_shard(expand_shard_spec(str(tmp_path / "shards"))[0], 0, ReadStats()))]
    offline_labeler = _student_labeler(tokenizer_path, student[0])
    offline = [labels for _, _, labels in offline_labeler.label(
        (None, doc) for doc in read_shard(expand_shard_spec(str(tmp_path / "annotated"))[0], 0, ReadStats()))]
    assert offline_labeler.counts["stored"] == 4 and offline_labeler.counts["annotated"] == 0
    for want, got in zip(online, offline):
        np.testing.assert_array_equal(want["token_class"], got["token_class"])


def _student_labeler(tokenizer_path: str, path: str) -> DocumentLabeler:
    tokenizer = Tokenizer(tokenizer_path)
    annotator = build_annotator(f"student:{path}", tokenizer, spacy_model="", batch_size=8, max_doc_chars=10**6)
    return DocumentLabeler(tokenizer, annotator)


def test_a_student_for_another_tokenizer_is_refused(tmp_path, student):
    rng = random.Random(2)
    other = tmp_path / "other.model"
    train_tokenizer([synthetic_text(rng, 10) for _ in range(100)], other, vocab_size=360)
    with pytest.raises(StudentError, match="trained for tokenizer .* distill a student for this tokenizer"):
        check_annotation_config(AnnotationConfig(labeler=f"student:{student[0]}"), Tokenizer(other))


def test_a_student_of_other_rules_is_refused(tokenizer_path, student, monkeypatch):
    monkeypatch.setattr(student_labeler, "RULES_VERSION", "lacy-rules-99")
    with pytest.raises(StudentError, match=f"distilled from rules {annotation.RULES_VERSION}, this code runs lacy-rules-99"):
        check_annotation_config(AnnotationConfig(labeler=f"student:{student[0]}"), Tokenizer(tokenizer_path))


def test_an_unknown_labeler_is_refused(tokenizer_path):
    with pytest.raises(ValueError, match="'spacy' or 'student:PATH'"):
        check_annotation_config(AnnotationConfig(labeler="bert"), Tokenizer(tokenizer_path))


def test_distill_labeler_help_states_the_defaults_it_uses(capsys):
    from lacy_stream.annotate.distill import AUGMENT, AUXILIARY_WEIGHT, EPOCHS, KNOWN_WORDS
    from lacy_stream.annotate.student_labeler import StudentConfig

    with pytest.raises(SystemExit):
        main(["distill-labeler", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default {EPOCHS} / (1 + --augment)" in help_text
    for option, default in [("augment", AUGMENT), ("width", StudentConfig.width), ("layers", StudentConfig.layers),
                            ("word-dim", StudentConfig.word_dim), ("known-words", KNOWN_WORDS),
                            ("auxiliary-weight", f"{AUXILIARY_WEIGHT:g}"),
                            ("dropout", f"{StudentConfig.dropout:g}")]:
        assert re.search(rf"--{option} \S+ .*?\(default {default}\b", help_text), option


@pytest.mark.parametrize("option, value", [("--known-words", "-1"), ("--epochs", "0"), ("--width", "wide")])
def test_distill_labeler_refuses_counts_out_of_range(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill-labeler", "--shards", "x.jsonl", "--tokenizer", "t.model", "--out", "s.pt", option, value])
    assert exit_info.value.code == 2
    assert f"{value} is not a whole number of at least" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-0.5", "inf", "heavy"])
def test_distill_labeler_refuses_an_auxiliary_weight_out_of_range(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill-labeler", "--shards", "x.jsonl", "--tokenizer", "t.model", "--out", "s.pt",
              "--auxiliary-weight", value])
    assert exit_info.value.code == 2
    assert f"{value} is not a number of at least 0" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1", "-0.1", "nan"])
def test_distill_labeler_refuses_a_dropout_out_of_range(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill-labeler", "--shards", "x.jsonl", "--tokenizer", "t.model", "--out", "s.pt", "--dropout", value])
    assert exit_info.value.code == 2
    assert f"{value} is not a share of at least 0 and below 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dropout is a share of channels"):
        student_labeler.StudentConfig(num_pieces=10, dropout=1.0)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    dropping = student_labeler.StudentNetwork(student_labeler.StudentConfig(num_pieces=50, dropout=0.5))
    plain = student_labeler.StudentNetwork(student_labeler.StudentConfig(num_pieces=50, dropout=0.0))
    plain.load_state_dict(dropping.state_dict())
    pieces = torch.randint(0, 50, (2, 40))
    shapes, words = torch.zeros_like(pieces), torch.zeros_like(pieces)
    assert not torch.equal(dropping.encode(pieces, shapes, words), dropping.encode(pieces, shapes, words))
    dropping.eval()
    plain.eval()
    torch.testing.assert_close(dropping.encode(pieces, shapes, words), plain.encode(pieces, shapes, words),
                               rtol=0, atol=0)


def test_dropout_zeroes_its_share_of_elements_and_scales_the_rest():
    torch.manual_seed(0)
    dropout = student_labeler.BitDropout(0.25)
    ones = torch.ones(64, 1001)  # not a multiple of the four masks one 64-bit draw makes
    dropped = dropout(ones)
    assert dropped.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert (dropped == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert not torch.equal(dropout(ones), dropped)
    ones.requires_grad_(True)
    dropout(ones).sum().backward()
    assert ones.grad.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    torch.manual_seed(0)
    again = student_labeler.BitDropout(0.25)
    assert torch.equal(again(torch.ones(64, 1001)), dropped)  # seeded by torch's generator
    assert torch.equal(dropout.eval()(ones), ones)


def test_a_width_without_channels_for_the_pieces_is_refused():
    with pytest.raises(ValueError, match="width 32 has no channels left for its pieces"):
        student_labeler.StudentConfig(num_pieces=10, width=32)


def test_a_document_longer_than_spacy_takes_is_distilled_in_parts(tmp_path, tokenizer_path, monkeypatch):
    rng = random.Random(10)
    texts = [synthetic_text(rng, 6) for _ in range(6)]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(texts)))
    limit = min(len(text) for text in texts) // 2
    monkeypatch.setattr(distill_module, "MAX_DOC_CHARS", limit)
    parsed = []
    monkeypatch.setattr(distill_module, "gather_targets",
                        lambda given, *args, **options: parsed.extend(given) or [
                            {name: np.zeros(1, dtype=dtype) for name, dtype in distill_module.TARGET_COLUMNS.items()}
                            for _ in given])
    report = distill([str(source)], tokenizer_path, tmp_path / "student.pt", max_docs=6, max_pieces=None,
                     cache_dir=None, epochs=1, known_words=0, augment=0)
    assert report["documents"] == len(parsed) > len(texts) and max(len(part) for part in parsed) <= limit
    assert "".join(parsed) == "".join(texts)
