"""Gradient-checkpoint replays inside the Gramian's vmapped backward run the way the forward ran: outside vmap.

Non-reentrant checkpointing recomputes a layer's forward when a backward first needs its saved tensors. In
:class:`drivekd.gradients.autogram.GramianEngine` that backward is ``torch.func.vmap`` over the cotangent rows, so
the replay would run under vmap, where composite operations decompose into their parts before autocast sees them:
``scaled_dot_product_attention`` is never cast to the autocast dtype, q and k (fp32 after RoPE) meet a bf16 v and
SDPA fails ("Expected query, key, and value to have the same dtype"); without autocast the replay still takes other
kernels than the forward did. Nothing in a replay is batched (its inputs were saved by the unbatched forward), so it
can run with functorch's transforms set aside: then it is the forward's own computation (checkpoint re-enters the
forward's autocast state itself), with the same dtypes, kernels and values.

The patch covers transformers' gradient checkpointing (``activation_checkpointing_enable``, non-reentrant), which
keeps each layer's checkpoint function in ``module._gradient_checkpointing_func``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext

from torch import nn

# Private, but the one way to leave vmap's interpreter for a computation on unbatched tensors.
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

ContextFn = Callable[[], tuple[AbstractContextManager, AbstractContextManager]]


def _outside_vmap(inner: ContextFn | None) -> ContextFn:
    """A checkpoint ``context_fn``: ``inner``'s contexts, and the recompute also outside every functorch transform."""

    def context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
        forward, recompute = inner() if inner is not None else (nullcontext(), nullcontext())
        return forward, _Unbatched(recompute)

    return context_fn


class _Unbatched:
    """``recompute``, then no functorch transform; re-enterable, since a layer replays in each backward."""

    def __init__(self, recompute: AbstractContextManager) -> None:
        self.recompute = recompute
        self.open: list[ExitStack] = []

    def __enter__(self) -> None:
        with ExitStack() as stack:
            stack.enter_context(self.recompute)
            stack.enter_context(temporarily_clear_interpreter_stack())
            self.open.append(stack.pop_all())

    def __exit__(self, *exc: object) -> bool:
        return self.open.pop().__exit__(*exc)


@contextmanager
def replay_outside_vmap(model: nn.Module) -> Iterator[None]:
    """While open, layers of ``model`` checkpointed in this forward replay outside vmap whenever they replay.

    Reentrant checkpointing (no ``context_fn``) is left alone; the attention recorder refuses it.
    """
    patched = []
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        keywords = getattr(func, "keywords", None) or {}
        if func is None or not getattr(module, "gradient_checkpointing", False):
            continue
        if keywords.get("use_reentrant", False):
            continue
        patched.append((module, func))
        module._gradient_checkpointing_func = functools.partial(
            func, context_fn=_outside_vmap(keywords.get("context_fn"))
        )
    try:
        yield
    finally:
        for module, func in patched:
            module._gradient_checkpointing_func = func
