"""The exact Gramian of per-loss parameter gradients, from one vmapped backward, without K gradient copies.

For losses L_1..L_M and cotangent rows R (K x M), the engine returns G = (R J)(R J)^T where J is the M x P Jacobian
of the losses w.r.t. the trainable parameters. How:

* Parameter taps: while the forward runs, every trainable parameter is replaced, at its first use, by an identity
  "tap" of it (:func:`_tap_at_first_use`). A tied parameter is one tensor, so its tap sees the sum of all its uses.
  Made at first use, a tap's autograd node comes right after the ops that read it, so the backward reaches it as
  soon as its gradient is complete and frees that gradient; taps made before the forward would run after every
  other node and hold every parameter's K gradient rows at once (K x the student's size: it doubled the peak of a
  checkpointed step at the large bench size).
* ``torch.func.vmap`` over ``torch.autograd.grad`` backpropagates all K cotangent rows at once. When the batched
  gradient of a parameter reaches its tap, the tap adds that parameter's K x K block to G and hands zeros (a
  broadcast scalar, no memory) to the leaf, so no parameter's K gradients outlive their use.
* Vocabulary-sized matrices would cost K x V x D: the input embedding and the LM head are not tapped. The embedding's
  block comes from its output gradient summed per used token, the LM head's from the Gram identity
  <D_i^T X, D_j^T X> = <D_i, (X X^T) D_j> over the kept logit positions, and their cross terms when tied.

Under gradient checkpointing a layer replays its forward inside that vmapped backward; the replay runs outside vmap
(:mod:`drivekd.gradients.replay`), so it is the forward's own computation, autocast included.

The vmap rule of the consuming function receives the physical batched tensors, which is what lets a tap see all K
rows together (the same device torchjd's autogram engine uses for module outputs). Parameters are then updated by one
ordinary backward of sum_k c_k L_k, during which the taps pass gradients through unchanged.

Split by owner group (``tap(owners)``, ``gramian(..., loss_groups=...)``): when every loss of group g reads only g's
tokens (one capability's batch rows and images), module-output taps (:mod:`drivekd.gradients.modules`) split each
gradient by group, and the backward carries a basis of each group's part of the rows instead of the rows
(:func:`drivekd.gradients.owners.split_rows`): 2 rows instead of 6 for AGP over three capabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from drivekd.gradients.modules import ModuleCall, hook_modules, module_taps_supported, tapped_modules
from drivekd.gradients.owners import TokenOwners, split_rows
from drivekd.gradients.replay import replay_outside_vmap
from drivekd.gradients.taps import TapState, tap
from drivekd.gradients.vocab import VocabRecord


@dataclass
class _ParamRecord:
    state: TapState

    def consume(self, grad: torch.Tensor) -> None:
        self.state.add_rows(grad.reshape(grad.shape[0], -1))


@dataclass
class TappedForward:
    """What :meth:`GramianEngine.tap` hands to the caller for one forward.

    Parameter taps: the backward asks for the gradients of ``leaves`` (the parameters) and ``edges``. Module taps:
    the hooks tap module outputs, and the backward asks for the gradient of ``sink`` only.
    """

    leaves: list[torch.Tensor]
    edges: list[torch.Tensor] = field(default_factory=list)  # pre-tap module outputs the backward must reach
    owners: TokenOwners | None = None
    calls: list[ModuleCall] = field(default_factory=list)
    vocab: VocabRecord | None = None
    sink: torch.Tensor | None = None

    @property
    def splittable(self) -> bool:
        """Module taps whose every call, vocabulary modules included, knows the owner group of its inputs."""
        if self.owners is None or any(call.owner is None for call in self.calls):
            return False
        v = self.vocab
        return v is None or (
            (v.token_ids is None or v.token_owner is not None)
            and (v.head_inputs is None or v.head_owner is not None)
        )


class GramianEngine:
    """Compute the Gramian of per-loss gradients of ``model``'s trainable parameters exactly.

    Usage::

        engine = GramianEngine(model)
        with engine.tap() as tapped:
            out = model(**batch_inputs)
            losses = [...]                       # scalars built from ``out``
            gramian = engine.gramian(losses, tapped)      # (K, K) float64; graph retained
        torch.autograd.backward(sum(c * l for c, l in zip(coefficients, losses)))

    With ``tap(owners)`` (module taps, when the model allows them) and ``gramian(..., loss_groups=...)``, where
    every loss of group g reads only the tokens ``owners`` gives to g, the engine backpropagates only a basis of
    each group's part of the rows (:func:`drivekd.gradients.owners.split_rows`) and splits every gradient by group:
    the same Gramian from S rows instead of R.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        gather: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        is_vision: Callable[[str], bool] = lambda name: False,
    ) -> None:
        """``reduce``/``gather`` make the Gramian global under data parallelism (sum / concatenation over ranks);
        ``is_vision(module_name)`` tells vision-side modules (inputs packed row by row) from text-side ones."""
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
        vocab_modules = {id(m) for m in (self.embedding, self.head) if m is not None}
        self._modules = tapped_modules(model, vocab_modules)
        self.module_taps = module_taps_supported(model, vocab_modules)
        self.is_vision = is_vision
        self.backpropagated_rows = 0  # rows of the last vmapped backward
        self.state = TapState()
        if reduce is not None:
            self.state.reduce = reduce
        if gather is not None:
            self.state.gather = gather

    @contextmanager
    def tap(self, owners: TokenOwners | None = None) -> Iterator[TappedForward]:
        """Taps for one forward: module taps when ``owners`` is given and the model allows them, else parameter taps.

        Checkpointed layers of this forward replay outside the Gramian's vmap (:mod:`drivekd.gradients.replay`).
        """
        with ExitStack() as stack:
            stack.enter_context(replay_outside_vmap(self.model))
            if owners is not None and self.module_taps:
                device = next(self.model.parameters()).device
                sink = torch.zeros((), device=device, requires_grad=True)
                tapped = TappedForward([], owners=owners, sink=sink)
                stack.enter_context(
                    hook_modules(self._modules, self.state, owners, self.is_vision, sink, tapped.calls)
                )
            else:
                record = _ParamRecord(self.state)
                stack.enter_context(
                    _tap_at_first_use(
                        (m for _, m in self._modules), self.state, record.consume, self._params.values()
                    )
                )
                tapped = TappedForward(list(self._params.values()))
            for handle in self._hook_vocab(tapped) if self._vocab_trainable else []:
                stack.callback(handle.remove)
            stack.callback(_release, tapped)
            yield tapped

    def gramian(
        self,
        losses: Sequence[torch.Tensor],
        tapped: TappedForward,
        rows: torch.Tensor | None = None,
        loss_groups: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """G = (R J)(R J)^T for the stacked ``losses`` (R defaults to the identity); the graph is kept.

        ``loss_groups``: the owner group of each loss; with module taps whose owners are all known, the backward
        carries a per-group basis of R instead of R itself.
        """
        stacked = torch.stack([loss.reshape(()) for loss in losses])
        rows = torch.eye(len(losses), dtype=torch.float64) if rows is None else rows
        split = None
        if loss_groups is not None and tapped.splittable:
            groups = torch.as_tensor(list(loss_groups), dtype=torch.int64)
            split = split_rows(rows.detach().cpu(), groups, tapped.owners.groups)
            if (
                split.basis >= rows.shape[0]
            ):  # no fewer rows to carry: splitting would only multiply the blocks
                split = None
        # Under data parallelism every rank must take the same path.
        if tapped.sink is not None and float(self.state.reduce(torch.tensor(float(split is None)))) != 0:
            split = None
        cotangents = rows if split is None else split.cotangents
        inputs = [tapped.sink] if tapped.sink is not None else [*tapped.leaves, *tapped.edges]

        def backward(cotangent: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            return torch.autograd.grad(stacked, inputs, cotangent, retain_graph=True, allow_unused=True)

        self.state.active, self.state.gramian = True, None
        self.backpropagated_rows = cotangents.shape[0]
        self.state.groups = 1 if split is None else tapped.owners.groups
        try:
            torch.func.vmap(backward)(cotangents.to(device=stacked.device, dtype=stacked.dtype))
        finally:
            self.state.active, self.state.groups = False, 1
        if self.state.gramian is None:
            raise RuntimeError("no trainable parameter received a gradient from these losses")
        gramian, self.state.gramian = self.state.gramian, None
        if split is None:
            return gramian
        combine = split.combine.to(gramian.device)
        return combine @ gramian @ combine.T

    def _hook_vocab(self, tapped: TappedForward) -> list[Any]:
        tied = self.head is not None and self.head.weight is self.embedding.weight
        record = VocabRecord(self.state, tied)
        tapped.vocab = record
        owners, sink = tapped.owners, tapped.sink
        handles = []
        if self.embedding is not None and self.embedding.weight.requires_grad:

            def on_embedding(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                ids = args[0]
                record.token_ids = ids.reshape(-1)
                record.used = torch.unique(self.state.gather(record.token_ids, 0))
                if owners is not None:
                    record.token_owner = _row_owner(owners, ids)
                if sink is None:
                    tapped.edges.append(output)
                return tap(self.state, record.consume_embedding, output, sink=sink)

            handles.append(self.embedding.register_forward_hook(on_embedding))
        if self.head is not None and self.head.weight.requires_grad:

            def on_head(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                record.head_inputs = args[0].reshape(-1, args[0].shape[-1]).detach()
                if owners is not None:
                    record.head_owner = _row_owner(owners, args[0][..., 0])
                return tap(self.state, record.consume_head, output, sink=sink)

            handles.append(self.head.register_forward_hook(on_head))
        return handles


def _release(tapped: TappedForward) -> None:
    """After the Gramian: the records' saved tensors go, the graph (for the update's backward) stays."""
    for call in tapped.calls:
        call.release()
    if tapped.vocab is not None:
        tapped.vocab.release()
    tapped.edges.clear()


def _row_owner(owners: TokenOwners, positions: torch.Tensor) -> torch.Tensor | None:
    """Owner of every element of a (B, ...) text-side tensor, flattened; None when dim 0 is not the batch."""
    rows = owners.text(positions.shape[0])
    if rows is None:
        return None
    per_row = positions[0].numel()
    return rows.to(positions.device).repeat_interleave(per_row)


@contextmanager
def _tap_at_first_use(
    modules: Iterable[nn.Module],
    state: TapState,
    consume: Callable[[torch.Tensor], None],
    params: Iterable[nn.Parameter],
) -> Iterator[None]:
    """While open, each of ``modules`` (those owning ``params``) runs with its parameters' taps in their place (one
    tap per parameter, made when a module first uses it; checkpoint replays reuse it). The parameters are put back after
    each call and on exit: a replay that checkpoint stops early never reaches the module's forward hook."""
    wanted = {id(p) for p in params}
    taps: dict[int, torch.Tensor] = {}
    originals: dict[int, tuple[nn.Module, dict[str, nn.Parameter]]] = {}

    def before(module: nn.Module, args: tuple) -> None:
        _, own = originals.setdefault(id(module), (module, {}))
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in wanted:
                if id(p) not in taps:
                    taps[id(p)] = tap(state, consume, p, absorb=True)
                own[name] = p
                module._parameters[name] = taps[id(p)]

    def restore(module: nn.Module, *_: Any) -> None:
        module._parameters.update(originals[id(module)][1])

    handles = [
        h for m in modules for h in (m.register_forward_pre_hook(before), m.register_forward_hook(restore))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, own in originals.values():
            module._parameters.update(own)
