"""Identity "taps" that hand the stacked gradients of a vmapped backward to a Gramian record.

``torch.func.vmap`` over ``torch.autograd.grad`` backpropagates K cotangent rows at once. A custom function's vmap
rule receives the physical batched tensor (K rows stacked), so a tap placed on a parameter or a module output sees all
K gradients together, turns them into Gram entries, and lets them go (the device torchjd's autogram engine uses for
module outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Consumer = Callable[[torch.Tensor], None]


@dataclass
class TapState:
    """Shared by every tap of one engine: whether a Gramian is being accumulated, and the running sum.

    ``groups``: owner groups the records split their gradients into in this backward (1: no split).
    ``recomputing``: set while a record re-runs a module's forward, so that hooks do not record again.
    """

    active: bool = False
    gramian: torch.Tensor | None = None
    groups: int = 1
    recomputing: bool = False
    # Data parallelism: the sum over ranks of a tensor, and the concatenation over ranks along a dim.
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    gather: Callable[[torch.Tensor, int], torch.Tensor] = lambda t, dim: t

    def add(self, block: torch.Tensor) -> None:
        block = block.to(torch.float64)
        self.gramian = block if self.gramian is None else self.gramian + block

    def add_rows(self, flat: torch.Tensor) -> None:
        """Gram block of K gradient rows (K, P) of one parameter set, summed over ranks first."""
        flat = self.reduce(flat)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        self.add(flat @ flat.T)


class _Consume(torch.autograd.Function):
    """Receives the K stacked gradients of one tap in its vmap rule and feeds them to the consumer."""

    @staticmethod
    def forward(consume: Consumer, grad: torch.Tensor) -> torch.Tensor:
        consume(grad.unsqueeze(0))  # not under vmap: a single cotangent row
        return grad.new_zeros(())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple, consume: Consumer, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        grad_dim = in_dims[1]
        batched = (
            grad.movedim(grad_dim, 0) if grad_dim is not None else grad.expand(info.batch_size, *grad.shape)
        )
        consume(batched)
        return grad.new_zeros(info.batch_size), 0


class Tap(torch.autograd.Function):
    """Identity on ``tensor``. While the state is active its backward hands the gradient to ``consume``.

    ``absorb``: return zeros (a broadcast scalar, no memory) instead of the gradient, for parameter taps whose
    leaf must not accumulate the Gramian phase's gradients. ``sink``: an optional scalar leaf the tap also feeds
    (zeros), so that asking for the sink's gradient makes the backward run through every tap and nothing below
    the earliest one.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        state: TapState, consume: Consumer, absorb: bool, tensor: torch.Tensor, sink: torch.Tensor | None
    ) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.state, ctx.consume, ctx.absorb = inputs[:3]
        ctx.sink = inputs[4] is not None

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        sink = grad.new_zeros(()) if ctx.sink else None
        if not ctx.state.active:
            return None, None, None, grad, sink
        _Consume.apply(ctx.consume, grad)
        out = grad.new_zeros(()).expand_as(grad) if ctx.absorb else grad
        return None, None, None, out, sink


def tap(
    state: TapState,
    consume: Consumer,
    tensor: torch.Tensor,
    *,
    absorb: bool = False,
    sink: torch.Tensor | None = None,
) -> torch.Tensor:
    return Tap.apply(state, consume, absorb, tensor, sink)
