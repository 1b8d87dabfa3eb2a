"""The lm-evaluation-harness model class on local task files: the harness agrees with lacy_stream.eval.nlu."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import SHARED_DIR, tiny_lacy
from lacy_stream.eval.lm_eval_model import LacyLM, evaluate_with_lm_eval, shared_task_files
from lacy_stream.eval.nlu import evaluate_nlu

# A context of 256 tokens: the tiny test tokenizer spells the shared tasks' words in many pieces.
CONTEXT = 256


@pytest.fixture(scope="module")
def model_dir(tokenizer_path, tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm-eval-model")
    tiny_lacy(tokenizer_path, directory, seed=9, call_scale=4.0, max_seq_len=CONTEXT)
    return directory


@pytest.fixture(scope="module")
def lacy(model_dir):
    return LacyLM(path=str(model_dir)).lacy


class _Request:
    """The one attribute of lm-eval's ``Instance`` that a model reads."""

    def __init__(self, *args) -> None:
        self.args = args


@pytest.mark.needs_shared
@pytest.mark.slow
def test_simple_evaluate_on_local_tasks_matches_our_scoring(lacy, tmp_path):
    tasks = shared_task_files(SHARED_DIR)
    harness = evaluate_with_lm_eval(lacy, tasks, tmp_path / "tasks", limit=4, batch_size=4)
    ours = evaluate_nlu(lacy, tasks, limit=4, batch_size=4)

    assert sorted(path.name for path in (tmp_path / "tasks").glob("*.yaml")) == ["lacy_arc_easy.yaml", "lacy_piqa.yaml"]
    assert [task.task for task in harness.tasks] == ["lacy_arc_easy", "lacy_piqa"]
    for from_harness, from_us in zip(harness.tasks, ours.tasks):
        assert from_harness.examples == from_us.examples == 4
        assert from_harness.acc == pytest.approx(from_us.acc)
        assert from_harness.acc_norm == pytest.approx(from_us.acc_norm)


def test_loglikelihood_rolling_predicts_every_token_once_in_full_windows(tokenizer_path, tmp_path):
    lm = LacyLM(lacy=tiny_lacy(tokenizer_path, tmp_path, seed=9))  # context 64
    tokenizer, model, call_id = lm.tokenizer, lm.lacy.model, lm.lacy.call_id
    text = " ".join(["the painter met the composer in Paris"] * 6)
    ids = tokenizer.encode(text)
    assert 64 < len(ids) < 128
    full = [tokenizer.eos_id, *ids]

    def logprobs(window: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model.logits(model(torch.tensor([window[:-1]])))[0]
        logits[:, call_id] = float("-inf")
        return F.log_softmax(logits, dim=-1).gather(1, torch.tensor(window[1:])[:, None]).squeeze(1)

    first = logprobs(full[:65]).sum()  # EOS + 64 tokens: predicts ids[0:64]
    last = logprobs(full[-65:])[-(len(ids) - 64) :].sum()  # a full window, scoring only ids[64:]
    (rolling,) = lm.loglikelihood_rolling([_Request(text)])
    assert rolling == pytest.approx(float(first + last), abs=1e-3)
    assert lm.loglikelihood_rolling([_Request("")]) == [0.0]


def test_generate_until_is_greedy_without_call_and_stops(lacy):
    lm = LacyLM(lacy=lacy, max_gen_toks=6)
    tokenizer, model = lm.tokenizer, lacy.model
    context = "The painter was born in"
    ids = [tokenizer.eos_id, *tokenizer.encode(context)]
    for _ in range(6):
        with torch.no_grad():
            logits = model.logits(model(torch.tensor([ids])))[0, -1]
        logits[lacy.call_id] = float("-inf")
        ids.append(int(logits.argmax()))
    expected = tokenizer.decode(ids[1:])[len(context) :]

    (generated,) = lm.generate_until([_Request(context, {"until": []})])
    assert generated == expected
    stop = expected.strip()[:2]
    (stopped,) = lm.generate_until([_Request(context, {"until": [stop], "max_gen_toks": 6})])
    assert stopped == expected[: expected.find(stop)]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([_Request(context, {"do_sample": True})])


@pytest.mark.needs_shared
@pytest.mark.slow
def test_lm_eval_command_line_runs_the_lacy_model_offline(model_dir, tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    command = [
        sys.executable, "-m", "lacy_stream.eval.lm_eval_model", "--model", "lacy", "--model_args", f"path={model_dir}",
        "--tasks", "lacy_piqa", "--limit", "2", "--shared", str(SHARED_DIR), "--tasks-dir", str(tmp_path / "tasks"),
    ]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "lacy_piqa" in finished.stdout and "acc_norm" in finished.stdout
