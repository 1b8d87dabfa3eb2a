"""Per-token loss trajectories: a fixed set of held-out probe windows, recorded at every validation.

With ``train.probe_windows`` > 0, the first windows of the first validation micro-batch (rank 0's, the same at
every validation) are the probe set. ``run_dir/probes/windows.npz`` holds their tokens and fact classes; at every
validation ``run_dir/probes/step-NNNNNNNN.npz`` holds, per target: the loss with ``<CALL>`` excluded (how well the
model has learned the token), ``log p(<CALL>)``, whether the token is among the model's calls (the window's
``loss.call_ratio`` share of highest ``p(<CALL>)``, as the validation samples mark them) and whether the training loss made
it a ``<CALL>`` target. A resumed run drops the steps recorded past its checkpoint and records them again.

:func:`read_trajectories` loads them back for ``compare``, which plots how the loss of fact and other tokens
moves over training (Rho-1's Figure 2 view: which tokens are learned, which stay hard).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .samples import top_calls

PROBES_DIRECTORY = "probes"
WINDOWS_FILE = "windows.npz"
_STEP_FILE = re.compile(r"step-(\d{8})\.npz")


def step_file(step: int) -> str:
    return f"step-{step:08d}.npz"


class ProbeRecorder:
    """Writes the probe windows once and their per-token statistics at each validation (rank 0 only)."""

    def __init__(self, run_dir: str | Path, windows: int, call_ratio: float) -> None:
        self.directory = Path(run_dir) / PROBES_DIRECTORY
        self.windows = windows
        self.call_ratio = call_ratio

    def drop_after(self, step: int) -> None:
        """Forget what an interrupted run recorded past ``step``, the step it resumes from."""
        for recorded, path in _step_files(self.directory):
            if recorded > step:
                path.unlink()

    def record(
        self, step: int, tokens: Tensor, token_class: Tensor, valid: Tensor, learned_loss: Tensor, call_loss: Tensor,
        call_target: Tensor,
    ) -> None:
        """``tokens`` [B, T + 1]; the others [B, T], of the targets ``tokens[:, 1:]``; the first ``windows`` rows."""
        rows = slice(0, min(self.windows, tokens.shape[0]))
        self.directory.mkdir(parents=True, exist_ok=True)
        windows = self.directory / WINDOWS_FILE
        if not windows.exists():
            _save(windows, tokens=tokens[rows], token_class=token_class[rows], valid=valid[rows])
        call_logprob = -call_loss[rows].float()
        called = torch.stack([top_calls(row_logprob, row_valid, self.call_ratio)
                              for row_logprob, row_valid in zip(call_logprob, valid[rows])])
        _save(self.directory / step_file(step), learned_loss=learned_loss[rows].float(), call_logprob=call_logprob,
              called=called, call_target=call_target[rows])


@dataclass
class Trajectories:
    """The probe windows of one run and their statistics at each recorded step."""

    steps: list[int]
    tokens: np.ndarray
    """[W, T + 1]"""
    token_class: np.ndarray
    """[W, T]"""
    valid: np.ndarray
    """[W, T]"""
    learned_loss: np.ndarray
    """[S, W, T]: the loss with ``<CALL>`` excluded at each step."""
    call_logprob: np.ndarray
    """[S, W, T]"""
    called: np.ndarray
    """[S, W, T]: among the model's calls."""
    call_target: np.ndarray
    """[S, W, T]: a ``<CALL>`` target of the training loss."""


def read_trajectories(run_dir: str | Path) -> Trajectories | None:
    """The run's recorded trajectories, in step order; None when it recorded none."""
    directory = Path(run_dir) / PROBES_DIRECTORY
    steps = _step_files(directory)
    if not steps or not (directory / WINDOWS_FILE).is_file():
        return None
    with np.load(directory / WINDOWS_FILE) as windows:
        fixed = {name: windows[name] for name in ("tokens", "token_class", "valid")}
    recorded: dict[str, list[np.ndarray]] = {name: [] for name in ("learned_loss", "call_logprob", "called",
                                                                   "call_target")}
    for _, path in steps:
        with np.load(path) as values:
            for name, arrays in recorded.items():
                arrays.append(values[name])
    return Trajectories(steps=[step for step, _ in steps], **fixed,
                        **{name: np.stack(arrays) for name, arrays in recorded.items()})


def _step_files(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = ((_STEP_FILE.fullmatch(path.name), path) for path in directory.iterdir())
    return sorted((int(match.group(1)), path) for match, path in found if match)


def _save(path: Path, **arrays: Tensor) -> None:
    """The arrays, written under a temporary name and renamed: a killed run leaves no half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as file:
        np.savez(file, **{name: array.cpu().numpy() for name, array in arrays.items()})
    partial.replace(path)
