"""The optimizer and its schedule: AdamW (fused) with weight decay on matrices, linear warmup, then constant (the
paper) or cosine."""

from __future__ import annotations

import math

import torch

from ..config.job_config import OptimizerConfig


def build_optimizer(module: torch.nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on biases and LayerNorm weights).

    Fused (one kernel for all parameters, step counts on the device), on CUDA and on the CPU alike: the
    foreach implementation reads every step count back to the host.
    """
    parameters = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=True)


def lr_factor(step: int, config: OptimizerConfig, total_steps: int) -> float:
    """Multiplier of the peak learning rate for the optimizer step after ``step`` completed steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
