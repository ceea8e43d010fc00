"""FSDP for the student: parameter sharding across processes (PyTorch FSDP2, ``fully_shard``).

Each decoder layer and the whole model become FSDP units; gradients are reduce-scattered as SUMS (divide factor 1),
matching the data-parallel convention of :mod:`drivekd.training.distributed` (terms are partial sums of global window
means). The vmapped Gramian engine taps whole parameters, which FSDP never materialises outside a unit's forward, so
under FSDP the Gramian comes from :class:`ShardedGramian`: one backward per row, each rank keeping the K row
gradients of its own shard only (K x P / world numbers), and the global Gramian as the all-reduced sum of the shard
Gramians. Checkpoints gather full state dicts, so a checkpoint written under FSDP is an ordinary HF folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from drivekd.errors import DriveKDError
from drivekd.models.families import FamilyAdapter
from drivekd.training import distributed as dist

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_student(student: nn.Module, family: FamilyAdapter) -> nn.Module:
    """Shard ``student`` in place: one FSDP unit per decoder layer, then the root; gradients reduced as sums."""
    if not torch.distributed.is_initialized():
        raise DriveKDError(
            "run.fsdp=true shards the student over processes: launch with torchrun or accelerate launch "
            "(for example `torchrun --nproc_per_node 8 -m drivekd.cli train ...`), or set run.fsdp=false"
        )
    _, world = dist.rank_and_world()
    device = next(student.parameters()).device
    mesh = init_device_mesh(device.type, (world,))
    for layer in family.decoder_layers(student):
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    for module in student.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    return student


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ShardedGramian:
    """The exact global Gramian of row combinations of losses, for a sharded student.

    ``gramian(losses, rows)`` backpropagates each row sum_m R[k, m] L_m separately (graph retained), flattens this
    rank's gradient shard of ``params``, and returns all_reduce(S S^T) in float64. The ``.grad`` of ``params`` and of
    ``restore`` (other trainable tensors the losses reach) is left as it was before the call.
    """

    def __init__(self, params: Sequence[nn.Parameter], restore: Sequence[nn.Parameter] = ()) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.restore = [*self.params, *restore]

    def gramian(self, losses: Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        saved = [p.grad for p in self.restore]
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        shards = []
        try:
            for row in rows.to(device=stacked.device, dtype=stacked.dtype):
                for p in self.restore:
                    p.grad = None
                torch.autograd.backward(stacked @ row, retain_graph=True)
                shards.append(torch.cat([_flat_grad(p) for p in self.params]).to(torch.float64))
        finally:
            for p, grad in zip(self.restore, saved, strict=True):
                p.grad = grad
        matrix = torch.stack(shards)
        return dist.all_reduce_sum(matrix @ matrix.T)


def _flat_grad(param: nn.Parameter) -> torch.Tensor:
    """This rank's shard of ``param.grad`` as a flat vector (zeros when the row did not reach it)."""
    if param.grad is None:
        return local(param).new_zeros(local(param).numel())
    return local(param.grad).reshape(-1)


def full_model_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU (a collective: every rank must call it)."""
    return get_model_state_dict(student, options=FULL)


def full_optimizer_state(student: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimizer state, keyed by parameter name (a collective)."""
    return get_optimizer_state_dict(student, optimizer, options=FULL)


def load_full_state(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> None:
    """Scatter full weights and optimizer state (from a checkpoint) into the sharded student and optimizer."""
    set_model_state_dict(student, weights, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(student, optimizer, state, options=StateDictOptions(full_state_dict=True))
