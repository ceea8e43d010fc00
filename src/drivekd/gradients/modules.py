"""Module-output taps: per-group Gram blocks of a module's own parameters from its output gradient.

A tap on the output of a module that owns trainable parameters receives the K stacked output gradients. With the
input the module saw, they give the parameters' gradient restricted to any owner group's tokens:

* ``nn.Linear``: dW = D_g^T X_g and db = sum D_g over the group's positions (no recomputation);
* any other module (norms, convolutions, layer-scale vectors): its forward is re-run on the group's slice and its
  own parameters' vector-Jacobian product taken for each row. That is exact only for a deterministic forward, so a
  module with active dropout below it is not tapped this way (:func:`module_taps_supported`).

Groups split dim 0 of the module's first input: batch rows on the text side, patches, merged patches or tiles (in
row order) on the vision side (:class:`drivekd.gradients.owners.TokenOwners`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from drivekd.gradients.owners import TokenOwners
from drivekd.gradients.taps import TapState, tap

# Values of one column block of a linear module's gradient rows (K x outputs x inputs): 1 MiB in float32.
_BLOCK_ELEMENTS = 1 << 18


def _own_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def _stochastic(module: nn.Module) -> bool:
    return module.training and any(
        isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules()
    )


def tapped_modules(model: nn.Module, skip: set[int]) -> list[tuple[str, nn.Module]]:
    """Modules owning trainable parameters, except those in ``skip`` (the vocabulary modules)."""
    return [(n, m) for n, m in model.named_modules() if id(m) not in skip and _own_trainable(m)]


def module_taps_supported(model: nn.Module, skip: set[int]) -> bool:
    """Whether every parameter-owning module can be tapped at its output (Linear, or a deterministic forward)."""
    return all(isinstance(m, nn.Linear) or not _stochastic(m) for _, m in tapped_modules(model, skip))


@dataclass
class ModuleCall:
    """One call of a parameter-owning module: what its tap needs to turn output gradients into Gram blocks."""

    state: TapState
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    owner: torch.Tensor | None  # (len(args[0]),) owner group along dim 0; None: not splittable
    autocast: tuple[str, bool, torch.dtype]

    def release(self) -> None:
        """Drop the saved inputs once the Gramian is taken: the tap's autograd node keeps this record alive for as
        long as the graph's nodes live (the micro-step's loss values), so holding them would keep every module's
        input of every micro-step of the window in memory."""
        self.args, self.kwargs, self.owner = (), {}, None

    def _slices(self) -> Iterator[torch.Tensor | None]:
        """Dim-0 indices of each group (None: everything, when the backward does not split)."""
        if self.state.groups == 1:
            yield None
            return
        for g in range(self.state.groups):
            yield (self.owner == g).nonzero().flatten().to(self.args[0].device)

    def consume(self, grad: torch.Tensor) -> None:
        """grad: (K, *output.shape). Adds the (G*K, G*K) block of this call's parameters."""
        if isinstance(self.module, nn.Linear) and bool(self.args) and not self.kwargs:
            for block in self._linear_blocks(grad):
                self.state.add_rows(block)
            return
        rows = [self._recompute(grad, idx) for idx in self._slices()]
        self.state.add_rows(rows[0] if len(rows) == 1 else torch.cat(rows))

    def _linear_blocks(self, grad: torch.Tensor) -> Iterator[torch.Tensor]:
        """The rows of dW = D_g^T X_g (and db = sum D_g) for a few output features at a time.

        A Gram block is a sum over parameter columns, so the rows may arrive in column blocks: one block of outputs
        holds K x c x in values instead of K x out x in, and slicing the output gradient before flattening it copies
        only that slice (a vmapped gradient is seldom contiguous).
        """
        k, out = grad.shape[0], grad.shape[-1]
        weight, bias = (
            self.module.weight.requires_grad,
            self.module.bias is not None and self.module.bias.requires_grad,
        )
        groups = []
        for idx in self._slices():
            x = self.args[0] if idx is None else self.args[0][idx]
            d = grad if idx is None else grad[:, idx]
            groups.append((x.reshape(-1, x.shape[-1]).to(d.dtype), d))
        width = max(1, _BLOCK_ELEMENTS // (k * groups[0][0].shape[-1]))
        for start in range(0, out, width):
            rows = []
            for x, d in groups:
                part = d[..., start : start + width].reshape(k, -1, min(width, out - start))
                columns = []
                if weight:
                    columns.append(torch.einsum("kno,ni->koi", part, x).reshape(k, -1))
                if bias:
                    columns.append(part.sum(1))
                rows.append(columns[0] if len(columns) == 1 else torch.cat(columns, dim=1))
            yield rows[0] if len(rows) == 1 else torch.cat(rows)

    def _recompute(self, grad: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        params = _own_trainable(self.module)
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        args = self.args if idx is None else (self.args[0][idx], *self.args[1:])
        device, enabled, dtype = self.autocast
        self.state.recomputing = True
        try:
            with torch.enable_grad(), torch.autocast(device, dtype, enabled=enabled):
                out = torch.func.functional_call(self.module, leaves, args, self.kwargs, strict=False)
        finally:
            self.state.recomputing = False
        out = out if isinstance(out, torch.Tensor) else out[0]
        grad = grad if idx is None else grad[:, idx]
        rows = []
        for row in grad:
            grads = torch.autograd.grad(
                out, list(leaves.values()), row.to(out.dtype), retain_graph=True, materialize_grads=True
            )
            rows.append(torch.cat([g.flatten() for g in grads]))
        return torch.stack(rows)


def _detach(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


@contextmanager
def hook_modules(
    modules: list[tuple[str, nn.Module]],
    state: TapState,
    owners: TokenOwners | None,
    is_vision: Callable[[str], bool],
    sink: torch.Tensor,
    calls: list[ModuleCall],
) -> Iterator[None]:
    """Tap the output of every module in ``modules`` while the block is open; each call lands in ``calls``."""

    def hook_for(name: str) -> Callable[..., Any]:
        vision = is_vision(name)

        def on_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if state.recomputing:
                return None
            first = output if isinstance(output, torch.Tensor) else None
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                first = output[0]
            if first is None:
                raise TypeError(
                    f"cannot tap {name} ({type(module).__name__}): it returns {type(output).__name__}, not a "
                    "tensor or a tuple starting with one; train this model without a Gramian method"
                )
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            owner = None
            if owners is not None and x is not None and not isinstance(module, nn.Embedding):
                owner = owners.packed_vision(x.shape[0]) if vision else owners.text(x.shape[0])
            device = first.device.type
            enabled = torch.is_autocast_enabled(device)
            dtype = torch.get_autocast_dtype(device) if enabled else torch.float32
            call = ModuleCall(
                state,
                module,
                tuple(_detach(a) for a in args),
                {k: _detach(v) for k, v in kwargs.items()},
                owner,
                (device, enabled, dtype),
            )
            calls.append(call)
            tapped = tap(state, call.consume, first, sink=sink)
            return tapped if first is output else (tapped, *output[1:])

        return on_output

    handles = [m.register_forward_hook(hook_for(n), with_kwargs=True) for n, m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
