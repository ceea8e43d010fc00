"""The exact Gramian of per-loss parameter gradients, from one vmapped backward, without K gradient copies.

For losses L_1..L_M and cotangent rows R (K x M), the engine returns G = (R J)(R J)^T where J is the M x P Jacobian
of the losses w.r.t. the trainable parameters. How:

* The forward runs through :func:`torch.func.functional_call` with every trainable parameter replaced by an identity
  "tap" of it. A tied parameter is one tensor, so its tap sees the sum of all its uses.
* ``torch.func.vmap`` over ``torch.autograd.grad`` backpropagates all K cotangent rows at once. When the batched
  gradient of a parameter reaches its tap, the tap adds that parameter's K x K block to G and hands zeros (a
  broadcast scalar, no memory) to the leaf, so no parameter's K gradients outlive their use.
* Vocabulary-sized matrices would cost K x V x D: the input embedding and the LM head are not tapped. The embedding's
  block comes from its output gradient summed per used token, the LM head's from the Gram identity
  <D_i^T X, D_j^T X> = <D_i, (X X^T) D_j> over the kept logit positions, and their cross terms when tied.

The vmap rule of the consuming function receives the physical batched tensors, which is what lets a tap see all K
rows together (the same device torchjd's autogram engine uses for module outputs). Parameters are then updated by one
ordinary backward of sum_k c_k L_k, during which the taps pass gradients through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class _State:
    """Shared by every tap of one engine: whether a Gramian is being accumulated, and the running sum."""

    active: bool = False
    gramian: torch.Tensor | None = None
    # Data parallelism: the sum over ranks of a tensor, and the concatenation over ranks along a dim.
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    gather: Callable[[torch.Tensor, int], torch.Tensor] = lambda t, dim: t

    def add(self, block: torch.Tensor) -> None:
        block = block.to(torch.float64)
        self.gramian = block if self.gramian is None else self.gramian + block


@dataclass
class _ParamRecord:
    state: _State

    def consume(self, grad: torch.Tensor) -> None:
        flat = self.state.reduce(grad).reshape(grad.shape[0], -1)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        self.state.add(flat @ flat.T)


@dataclass
class _VocabRecord:
    """Gram blocks of the embedding and LM-head weights, which may be one tied tensor."""

    state: _State
    tied: bool
    token_ids: torch.Tensor | None = None  # (N_e,) ids fed to the embedding in this forward
    head_inputs: torch.Tensor | None = None  # (N_h, D) hidden states fed to the LM head
    head_used: torch.Tensor | None = (
        None  # (K, N_h, U) LM-head output gradient at the embedding's used tokens
    )
    used: torch.Tensor | None = None  # (U,) unique used token ids

    def consume_head(self, grad: torch.Tensor) -> None:
        """grad: (K, N_h, V). The block <D_i^T X, D_j^T X> = <D_i, (X X^T) D_j> over every rank's positions."""
        d = grad.reshape(grad.shape[0], -1, grad.shape[-1]).to(torch.promote_types(grad.dtype, torch.float32))
        d = self.state.gather(d, 1)
        x = self.state.gather(self.head_inputs, 0).to(d.dtype)
        self.head_inputs = x
        self.state.add(torch.einsum("knv,lnv->kl", d, torch.matmul(x @ x.T, d)))
        if self.tied:
            self.head_used = d[..., self.used]

    def consume_embedding(self, grad: torch.Tensor) -> None:
        """grad: (K, N_e, D). Rows of the embedding gradient are the output gradients summed per token."""
        k = grad.shape[0]
        d = grad.reshape(k, -1, grad.shape[-1]).to(torch.promote_types(grad.dtype, torch.float32))
        d = self.state.gather(d, 1)
        _, inverse = torch.unique(self.state.gather(self.token_ids, 0), return_inverse=True)
        rows = d.new_zeros(k, int(inverse.max()) + 1, d.shape[-1]).index_add_(1, inverse, d)
        self.state.add(torch.einsum("kud,lud->kl", rows, rows))
        if self.tied and self.head_used is not None:
            # <D_h,i^T X, E_j> summed over used rows u: sum_{t,u} D_h,i[t,u] (x_t . E_j[u]).
            cross = torch.einsum(
                "ktu,lut->kl", self.head_used, torch.matmul(rows, self.head_inputs.to(d.dtype).T)
            )
            self.state.add(cross + cross.T)
        self.head_used = None


class _Consume(torch.autograd.Function):
    """Receives the K stacked gradients of one tap in its vmap rule and feeds them to the tap's record."""

    @staticmethod
    def forward(record: Any, kind: str, grad: torch.Tensor) -> torch.Tensor:
        _dispatch(record, kind, grad.unsqueeze(0))  # not under vmap: a single cotangent row
        return grad.new_zeros(())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        pass

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple, record: Any, kind: str, grad: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        grad_dim = in_dims[2]
        batched = (
            grad.movedim(grad_dim, 0) if grad_dim is not None else grad.expand(info.batch_size, *grad.shape)
        )
        _dispatch(record, kind, batched)
        return grad.new_zeros(info.batch_size), 0


def _dispatch(record: Any, kind: str, grad: torch.Tensor) -> None:
    if kind == "param":
        record.consume(grad)
    elif kind == "head":
        record.consume_head(grad)
    else:
        record.consume_embedding(grad)


class _Tap(torch.autograd.Function):
    """Identity. In the Gramian phase its backward hands the gradient to :class:`_Consume`.

    A parameter tap then returns zeros to its leaf (``absorb``); an output tap passes the gradient on.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(state: _State, record: Any, kind: str, absorb: bool, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.state, ctx.record, ctx.kind, ctx.absorb = inputs[:4]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        if not ctx.state.active:
            return None, None, None, None, grad
        _Consume.apply(ctx.record, ctx.kind, grad)
        out = grad.new_zeros(()).expand_as(grad) if ctx.absorb else grad
        return None, None, None, None, out


@dataclass
class TappedForward:
    """What :meth:`GramianEngine.tap` hands to the caller for one forward."""

    params: dict[str, torch.Tensor]
    leaves: list[torch.Tensor]
    edges: list[torch.Tensor] = field(default_factory=list)  # pre-tap module outputs the backward must reach


class GramianEngine:
    """Compute the Gramian of per-loss gradients of ``model``'s trainable parameters exactly.

    Usage::

        engine = GramianEngine(model)
        with engine.tap() as tapped:
            out = torch.func.functional_call(model, tapped.params, (), batch_inputs)
            losses = [...]                       # scalars built from ``out``
            gramian = engine.gramian(losses, tapped)      # (K, K) float64; graph retained
        torch.autograd.backward(sum(c * l for c, l in zip(coefficients, losses)))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        gather: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> None:
        """``reduce``/``gather`` make the Gramian global under data parallelism (sum / concatenation over ranks)."""
        self.model = model
        self.embedding = model.get_input_embeddings()
        head = model.get_output_embeddings()
        self.head = head if isinstance(head, nn.Linear) and head.bias is None else None
        vocab_params = {id(m.weight) for m in (self.embedding, self.head) if m is not None}
        self._params = {
            name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in vocab_params
        }
        self._vocab_trainable = any(
            m is not None and m.weight.requires_grad for m in (self.embedding, self.head)
        )
        self.state = _State()
        if reduce is not None:
            self.state.reduce = reduce
        if gather is not None:
            self.state.gather = gather

    @contextmanager
    def tap(self) -> Iterator[TappedForward]:
        """Tapped parameters for one forward, with hooks on the vocabulary modules while the block is open."""
        record = _ParamRecord(self.state)
        params = {name: _Tap.apply(self.state, record, "param", True, p) for name, p in self._params.items()}
        tapped = TappedForward(params, list(self._params.values()))
        handles = self._hook_vocab(tapped) if self._vocab_trainable else []
        try:
            yield tapped
        finally:
            for handle in handles:
                handle.remove()

    def gramian(
        self, losses: Sequence[torch.Tensor], tapped: TappedForward, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """G = (R J)(R J)^T for the stacked ``losses`` (R defaults to the identity); the graph is kept."""
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        cotangents = (
            torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device) if rows is None else rows
        )
        inputs = [*tapped.leaves, *tapped.edges]

        def backward(cotangent: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            return torch.autograd.grad(stacked, inputs, cotangent, retain_graph=True, allow_unused=True)

        self.state.active, self.state.gramian = True, None
        try:
            torch.func.vmap(backward)(cotangents.to(stacked.dtype))
        finally:
            self.state.active = False
        if self.state.gramian is None:
            raise RuntimeError("no trainable parameter received a gradient from these losses")
        gramian, self.state.gramian = self.state.gramian, None
        return gramian

    def _hook_vocab(self, tapped: TappedForward) -> list[Any]:
        tied = self.head is not None and self.head.weight is self.embedding.weight
        record = _VocabRecord(self.state, tied)
        handles = []
        if self.embedding is not None and self.embedding.weight.requires_grad:

            def on_embedding(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                record.token_ids = args[0].reshape(-1)
                record.used = torch.unique(self.state.gather(record.token_ids, 0))
                tapped.edges.append(output)
                return _Tap.apply(self.state, record, "embedding", False, output)

            handles.append(self.embedding.register_forward_hook(on_embedding))
        if self.head is not None and self.head.weight.requires_grad:

            def on_head(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                record.head_inputs = args[0].reshape(-1, args[0].shape[-1]).detach()
                return _Tap.apply(self.state, record, "head", False, output)

            handles.append(self.head.register_forward_hook(on_head))
        return handles


def functional_forward(model: nn.Module, tapped: TappedForward, inputs: Mapping[str, Any]) -> Any:
    """``model(**inputs)`` with the tapped parameters in place of the real ones."""
    return torch.func.functional_call(model, tapped.params, (), dict(inputs), strict=False)
