"""The module the trainer optimises, and how it is spread over devices (FSDP2, compile, checkpointing).

``TrainingModule`` runs the transformer *and* the LaCy loss in one ``forward``. Under FSDP2 every
transformer block is its own sharding unit and the root unit holds the rest: the token embedding (tied
to the output projection), the position embeddings and the final norm. FSDP2 gathers a unit's parameters
in its pre-forward hook and frees them after its forward, so the root's parameters are whole exactly
while the root's ``forward`` runs. The loss multiplies the hidden states by ``output_weight``, the tied
embedding, so it has to run inside that forward; calling it from the training loop would see a shard.

``parallelize`` applies, per block and in this order, activation checkpointing, ``torch.compile`` and
``fully_shard``, then ``fully_shard`` on the root (torchtitan's order: the checkpointed region is inside
the compiled one, and both are inside the unit whose parameters FSDP gathers).

One precision policy for any number of processes: FSDP2's mixed precision, which keeps parameters, gradients
and optimizer state in fp32 and gathers each unit's parameters in the compute dtype for its forward and
backward. So the residual stream, the hidden states and the output weight the loss receives are bf16 on one
GPU as on N (one process trains in 16 bits on a one-rank group, see ``distributed.init_distributed``).
Gradients are reduced in fp32. In fp32 without a group the module stays a plain module, which computes what
FSDP would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from ..config.job_config import LossConfig
from ..distributed import is_distributed, world_size
from ..labels import TokenLabels
from ..loss.lacy_loss import LossOutput, lacy_loss
from ..models.gpt2 import Transformer


class TrainingModule(nn.Module):
    """A ``Transformer`` plus its LaCy loss; ``forward`` returns the ``LossOutput`` of one micro-batch."""

    def __init__(self, model: Transformer, loss: LossConfig, *, call_id: int, seed: int) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.call_id = call_id
        self.seed = seed
        self.group: dist.ProcessGroup | None = None
        """Ranks whose micro-batches share one call/ignore selection (set by ``parallelize``)."""

    def forward(self, inputs: Tensor, targets: Tensor, valid: Tensor, labels: TokenLabels, *, step: int) -> LossOutput:
        """All ``[B, T]``: input ids, target ids, which targets count, and the targets' labels."""
        hidden = self.model(inputs)
        return lacy_loss(
            hidden.flatten(0, 1),
            self.model.output_weight,
            targets.flatten(),
            valid.flatten(),
            call_id=self.call_id,
            vocab_size=self.model.args.vocab_size,
            method=self.loss.method,
            labels=labels.flatten(),
            call_ratio=self.loss.call_ratio,
            ignore_ratio=self.loss.ignore_ratio,
            seed=self.seed,
            step=step,
            group=self.group,
            implementation=self.loss.implementation,
        )


def parallelize(
    module: TrainingModule, *, dtype: torch.dtype, compile: bool, activation_checkpointing: bool
) -> TrainingModule:
    """Checkpoint, compile and shard ``module`` in place (see the module docstring); returns it.

    ``dtype`` is the compute dtype; parameters, gradients and optimizer state stay fp32, and gradients are
    reduced in fp32. A compute dtype other than fp32 needs a process group (of one rank or more).
    """
    for block in module.model.layers:
        if activation_checkpointing:
            _checkpoint_activations(block)
        if compile:
            block.compile()  # in place, so that parameter names (and checkpoints) do not change
    if not is_distributed():
        if dtype != torch.float32:
            raise ValueError(f"training in {dtype} needs a process group: init_distributed(even_alone=True) makes one")
        return module

    if world_size() > 1:
        module.group = dist.group.WORLD
    mesh = init_device_mesh(next(module.parameters()).device.type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in module.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root's inputs stay as they come: its float input is the reference losses of rho1 and spacy_refloss,
    # whose ranking a cast to bf16 would coarsen.
    fully_shard(module, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                                                      cast_forward_inputs=False))
    # Each rank's loss is its share of the global mean (the shares add up), so gradients must be summed
    # over ranks, not averaged as FSDP does by default. Plain sums also keep gloo working: it has no
    # pre-multiplied sum, which FSDP would otherwise use to apply the divide factor.
    for unit in [*module.model.layers, module]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return module


def _checkpoint_activations(block: nn.Module) -> None:
    """Recompute ``block``'s activations in backward instead of storing them.

    The block's own ``forward`` is replaced rather than the block wrapped in another module, so that
    parameter names stay those of the model (checkpoints and the Hugging Face export rely on them), and
    module hooks, such as FSDP's, still run around the checkpointed region.
    """
    original_forward: Callable[..., Tensor] = block.forward

    def forward(*args: Tensor) -> Tensor:
        return checkpoint(original_forward, *args, use_reentrant=False)

    block.forward = forward
