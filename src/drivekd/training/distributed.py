"""Collectives for data-parallel Drive-KD, no-ops in a single process.

Loss terms are normalised over the global window (counts summed over ranks), so each rank's terms are partial sums
and the global gradient is the SUM of the ranks' gradients. The Gramian engine all-reduces each parameter's batched
gradient before forming its block, so every rank holds the same global Gramian and takes the same projection.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on a device the process group's backend can communicate (NCCL alone cannot send CPU tensors)."""
    backend = str(dist.get_backend())
    if tensor.device.type == "cpu" and "nccl" in backend and "gloo" not in backend:
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a new tensor on the input's device; the input is left as is)."""
    if not active():
        return tensor
    total = _wire(tensor.detach()).clone().contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(tensor.device)


def all_gather_cat(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along ``dim`` (sizes along ``dim`` may differ between ranks)."""
    if not active():
        return tensor
    device = tensor.device
    tensor = _wire(tensor.detach()).contiguous()
    size = torch.tensor([tensor.shape[dim]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [0, longest - tensor.shape[dim]]
    padded = torch.nn.functional.pad(tensor, pad)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    gathered = [p.narrow(dim, 0, int(s.item())) for p, s in zip(parts, sizes, strict=True)]
    return torch.cat(gathered, dim=dim).to(device)


def sum_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Replace every ``.grad`` by its sum over ranks (one flat all-reduce)."""
    if not active():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier() -> None:
    if active():
        dist.barrier()
