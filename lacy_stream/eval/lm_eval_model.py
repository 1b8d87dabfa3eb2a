"""A LaCy model as an lm-evaluation-harness model (``--model lacy``), and task configs for local files.

:class:`LacyLM` answers the harness' three request types with ``<CALL>`` excluded from the softmax, i.e.
as the model would answer without a cascade partner:

* ``loglikelihood``: the summed log-probability of the continuation after the context (see
  :func:`~lacy_stream.eval.scoring.encode_pair` for how the pair is tokenized; the context follows an EOS,
  the document boundary of training);
* ``loglikelihood_rolling``: the log-probability of a whole text after an EOS, in windows of the model's
  context that predict every token once (the last window overlaps the one before, so that it still sees a
  full context; see :func:`~lacy_stream.eval.scoring.score_continuations`);
* ``generate_until``: greedy decoding until a stop string, EOS or ``max_gen_toks`` tokens.

Tasks. The harness' own ``arc_easy`` and ``piqa`` download from the Hugging Face hub; the paper's data is on
disk. :func:`write_task_configs` writes configs that read local ``{query, choices, gold}`` jsonl files with
the ``json`` builder of ``datasets`` (no hub access), as ``lacy_arc_easy`` and ``lacy_piqa``, with the prompt
template of :mod:`.nlu`, so the harness and ``lacy-stream eval`` agree.

Command line. lm-eval (0.4.x) finds model classes only in its own registry and has no plugin entry point,
so the stock ``lm_eval`` command cannot know ``lacy`` unless this module was imported first. Run it through
this module instead, which registers the model, writes the task configs and hands every other argument to
lm-eval's CLI::

    python -m lacy_stream.eval.lm_eval_model --model lacy --model_args path=RUN_DIR \\
        --tasks lacy_arc_easy,lacy_piqa [--shared ../shared] [--tasks-dir DIR]

The task configs go to ``--tasks-dir`` (a temporary directory by default), which is passed to lm-eval as
``--include_path``; put task YAMLs of your own there too rather than passing ``--include_path``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..inference.loading import LacyModel, load_lacy
from ..tokenizer import Tokenizer
from .nlu import ANSWER_CUE, CHOICE_DELIMITER, NluResult, TaskResult
from .scoring import encode_pair, score_continuations

log = logging.getLogger(__name__)

MODEL_NAME = "lacy"
TASK_PREFIX = "lacy_"
SHARED_TASK_FILES = {"arc_easy": Path("eval/arc_easy.jsonl"), "piqa": Path("eval/piqa.jsonl")}
"""Task name -> its jsonl under the shared directory."""
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256


@register_model(MODEL_NAME)
class LacyLM(LM):
    """lm-eval model over a LaCy checkpoint (``path``: anything :func:`load_lacy` accepts) or a loaded model.

    Without ``device``, the model goes to CUDA when there is one, else to the CPU.

    ``batch_size`` may be lm-eval's "auto"; no batch size search is made, "auto" means ``max_batch_size``
    (or the default of 16 windows).
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        lacy: LacyModel | None = None,
        device: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
    ) -> None:
        super().__init__()
        if (path is None) == (lacy is None):
            raise ValueError("LacyLM needs exactly one of path= (a checkpoint) and lacy= (a loaded model)")
        self.lacy = lacy if lacy is not None else load_lacy(path, device=_available_device(device))
        self._device = self.lacy.device
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.lacy.tokenizer

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        pairs = [
            encode_pair(self.tokenizer, context, continuation) for context, continuation in (r.args for r in requests)
        ]
        results = []
        for request, score in zip(requests, score_continuations(self.lacy, pairs, batch_size=self.batch_size)):
            result = (score.logprob, score.is_greedy)
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        results = []
        for request in requests:
            (text,) = request.args
            ids = self.tokenizer.encode(text)
            total = 0.0
            if ids:  # the whole text as a continuation of EOS: score_continuations rolls over long texts
                (score,) = score_continuations(self.lacy, [([self.tokenizer.eos_id], ids)], batch_size=self.batch_size)
                total = score.logprob
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            results.append(total)
        return results

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results = []
        for request in requests:
            context, options = request.args
            if options.get("do_sample"):
                raise ValueError(
                    "the lacy model generates greedily only; drop do_sample from the task's generation_kwargs"
                )
            until = options.get("until") or []
            stops = [until] if isinstance(until, str) else list(until)
            generation = self._greedy(context, stops, int(options.get("max_gen_toks", self.max_gen_toks)))
            self.cache_hook.add_partial("generate_until", request.args, generation)
            results.append(generation)
        return results

    def _greedy(self, context: str, stops: list[str], max_tokens: int) -> str:
        """Greedy continuation of ``context`` (``<CALL>`` excluded), cut before the first stop string."""
        model, eos_id = self.lacy.model, self.tokenizer.eos_id
        context_ids = self.tokenizer.encode(context)
        generated: list[int] = []
        text = ""
        for _ in range(max_tokens):
            window = ([eos_id] + context_ids + generated)[-model.args.max_seq_len :]
            with torch.inference_mode():
                logits = model.logits(model(torch.tensor([window], device=self.lacy.device))[0, -1]).float()
                logits[self.lacy.call_id] = float("-inf")
                next_id = int(logits.argmax())
            if next_id == eos_id:
                break
            generated.append(next_id)
            text = _decode_continuation(self.tokenizer, context_ids, generated)
            cut = min((index for index in (text.find(stop) for stop in stops if stop) if index >= 0), default=-1)
            if cut >= 0:
                return text[:cut]
        return text


def _available_device(requested: str | None) -> str:
    """lm-eval's CLI asks for "cuda" by default; without CUDA the model runs on the CPU instead."""
    cuda = torch.cuda.is_available()
    if requested is None or (requested.startswith("cuda") and not cuda):
        if requested is not None:
            log.warning("device %s requested but CUDA is not available; running on the CPU", requested)
        return "cuda" if cuda else "cpu"
    return requested


def _batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return max_batch_size or DEFAULT_BATCH_SIZE
    return int(batch_size)


def _decode_continuation(tokenizer: Tokenizer, context_ids: list[int], continuation_ids: list[int]) -> str:
    """The text the continuation adds to the context (decoding it alone would drop its leading space)."""
    head = tokenizer.decode(context_ids)
    whole = tokenizer.decode(context_ids + continuation_ids)
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(continuation_ids)


def task_config(name: str, data_file: Path, cache_dir: Path) -> dict:
    """An lm-eval multiple-choice task over a local ``{query, choices, gold}`` jsonl file."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{query | trim}}" + ANSWER_CUE,
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": CHOICE_DELIMITER,
        "metric_list": [
            {"metric": metric, "aggregation": "mean", "higher_is_better": True} for metric in ("acc", "acc_norm")
        ],
        "metadata": {"version": 1.0},
    }


def write_task_configs(directory: str | Path, task_files: Mapping[str, str | Path]) -> list[str]:
    """Write one task config per ``name -> jsonl`` into ``directory``; returns the task names (``lacy_<name>``).

    ``datasets`` caches the parsed files under ``directory/datasets-cache``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for name, data_file in task_files.items():
        task = TASK_PREFIX + name
        config = task_config(task, Path(data_file).resolve(), (directory / "datasets-cache").resolve())
        (directory / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        names.append(task)
    return names


def shared_task_files(shared_dir: str | Path) -> dict[str, Path]:
    return {name: Path(shared_dir) / relative for name, relative in SHARED_TASK_FILES.items()}


def evaluate_with_lm_eval(
    lacy: LacyModel,
    task_files: Mapping[str, str | Path],
    tasks_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> NluResult:
    """The tasks of ``task_files`` run by lm-evaluation-harness on ``lacy`` (configs written to ``tasks_dir``)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = write_task_configs(tasks_dir, task_files)
    evaluation = simple_evaluate(
        model=LacyLM(lacy=lacy, batch_size=batch_size),
        tasks=names,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        limit=limit,
        log_samples=False,
    )
    tasks = []
    for name in names:
        metrics = evaluation["results"][name]
        tasks.append(
            TaskResult(
                task=name,
                examples=int(evaluation["n-samples"][name]["effective"]),
                acc=float(metrics["acc,none"]),
                acc_stderr=_stderr_value(metrics.get("acc_stderr,none")),
                acc_norm=float(metrics["acc_norm,none"]),
                acc_norm_stderr=_stderr_value(metrics.get("acc_norm_stderr,none")),
            )
        )
    return NluResult(tasks=tasks)


def _stderr_value(value: object) -> float | None:
    """lm-eval reports a standard error it could not compute as the string "N/A"."""
    return float(value) if isinstance(value, (int, float)) else None


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the ``lacy`` model registered and the local task configs included."""
    from lm_eval.__main__ import cli_evaluate

    parser = argparse.ArgumentParser(
        description="lm-eval with the lacy model and the lacy_arc_easy / lacy_piqa tasks; other arguments go to lm-eval",
        allow_abbrev=False,  # lm-eval's --tasks must not be taken for an abbreviation of --tasks-dir
    )
    parser.add_argument(
        "--shared", default=os.environ.get("LACY_SHARED_DIR", "../shared"), help="the shared data directory"
    )
    parser.add_argument("--tasks-dir", help="where to write the task configs (default: a temporary directory)")
    ours, rest = parser.parse_known_args(argv)
    if any(argument.split("=")[0] == "--include_path" for argument in rest):
        parser.error("--include_path is set to --tasks-dir; put your own task configs there")
    with tempfile.TemporaryDirectory(prefix="lacy-lm-eval-tasks-") as temporary:
        tasks_dir = ours.tasks_dir or temporary
        write_task_configs(tasks_dir, shared_task_files(ours.shared))
        sys.argv = ["lm-eval", *rest, "--include_path", str(tasks_dir)]
        cli_evaluate()


if __name__ == "__main__":
    main()
