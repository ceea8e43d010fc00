"""The objective of a micro-batch: the value of every term of the recipe on every capability's rows.

A micro-batch may hold samples of several capabilities in one forward; the value of term t on capability c uses
c's rows (``TermValue(t, c, value)``, the atomic terms the Gramian and the projections act on). Every value is
normalised over the whole gradient-accumulation window, exactly as one large batch would be: a term that is a mean
over N items of the micro-batch (its :data:`~drivekd.training.terms.Unit`) is rescaled by N / N_window, so summing
the window's gradients gives the gradient of the window's mean. The window's totals are kept per (term,
capability) (``pooled=False``: each capability's mean, for the per-capability sampler) or per term over all
capabilities (``pooled=True``: the mean over the window's samples, for the mixed sampler).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from drivekd.capture.recorder import CapturedAttention, CapturePlan
from drivekd.data.collate import Batch
from drivekd.data.roles import TVIndex
from drivekd.signals.types import SignalNeeds, TeacherSignals
from drivekd.training.terms import AttentionTerm, Rows, Term, kept_labels, unit_count

POOLED = "*"  # the capability key of pooled window totals


@dataclass(frozen=True)
class TermValue:
    """One atomic loss: term ``name`` on the rows of ``capability``, window-normalised."""

    name: str
    capability: str
    value: torch.Tensor


def capability_rows(batch: Batch) -> dict[str, torch.Tensor]:
    rows: dict[str, list[int]] = {}
    for k, capability in enumerate(batch.capabilities):
        rows.setdefault(capability, []).append(k)
    return {c: torch.tensor(r, device=batch.labels.device) for c, r in rows.items()}


class Objective:
    """The terms of a recipe, what they need, and their window-normalised values on a micro-batch."""

    def __init__(self, terms: Sequence[Term], *, pooled: bool = False, chunk_size: int = 256) -> None:
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"term names must be distinct, got {names}")
        self.terms = tuple(terms)
        self.pooled = pooled
        self.attention = tuple(t for t in terms if isinstance(t, AttentionTerm))
        tv = {k for t in self.attention if t.kind == "tv" for k in t.student_layers}
        full = {k for t in self.attention if t.kind == "full" for k in t.student_layers}
        self.plan = CapturePlan.of(tv=tv, full=full, chunk_size=chunk_size)
        self.needs = SignalNeeds()
        for term in terms:
            self.needs = self.needs | term.needs()
        self.student_hidden = any(t.student_hidden for t in terms)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    def _key(self, name: str, capability: str) -> tuple[str, str]:
        return (name, POOLED if self.pooled else capability)

    def window(self, batches: Sequence[tuple[Batch, TVIndex]]) -> Counter[tuple[str, str]]:
        """Normalisers of every term over an accumulation window of (micro-batch, its TVIndex)."""
        totals: Counter[tuple[str, str]] = Counter()
        for batch, index in batches:
            for capability, rows in capability_rows(batch).items():
                picked = Rows(capability, rows, batch, index.select(rows))
                for term in self.terms:
                    totals[self._key(term.name, capability)] += unit_count(term.unit, picked)
        return totals

    def stream(self, batch: Batch, index: TVIndex, teacher: Mapping[str, TeacherSignals]) -> LayerStream:
        """A map consumer for :class:`AttentionRecorder` that builds the attention terms as the forward runs."""
        return LayerStream(self.attention, batch, index, teacher)

    def values(
        self,
        batch: Batch,
        index: TVIndex,
        logits: torch.Tensor,
        teacher: Mapping[str, TeacherSignals],
        window: Counter[tuple[str, str]],
        *,
        captured: CapturedAttention | None = None,
        streamed: LayerStream | None = None,
        hidden: Sequence[torch.Tensor] = (),
        logit_positions: torch.Tensor | None = None,
    ) -> list[TermValue]:
        """Every term on every capability's rows, window-normalised.

        ``index`` is the TVIndex the attention was captured with. ``logits`` may cover only ``logit_positions``.
        The attention terms come from ``streamed`` (built during the forward) or, without it, from ``captured``
        through the same code.
        """
        if streamed is None and self.attention:
            if captured is None:
                raise ValueError("attention terms need the captured maps or a stream")
            streamed = self.stream(batch, index, teacher)
            streamed.feed(captured)
        labels = batch.labels if logit_positions is None else kept_labels(batch.labels, logit_positions)
        out = []
        for capability, rows in capability_rows(batch).items():
            picked = Rows(
                capability, rows, batch, index.select(rows), logits[rows], labels[rows], teacher, hidden
            )
            for term in self.terms:
                value = (
                    streamed.value(term.name, capability)
                    if isinstance(term, AttentionTerm)
                    else term.value(picked)
                )
                local = unit_count(term.unit, picked)
                total = window[self._key(term.name, capability)]
                out.append(TermValue(term.name, capability, value * (local / total) if total else value * 0))
        return out


class LayerStream:
    """Attention terms accumulated layer by layer while the student's forward records each map.

    A term built after the forward sits after every layer in the autograd graph, so the backward creates the
    gradients of all captured maps at once when it starts (R-fold in a Gramian's vmapped backward). Built here,
    each layer's loss sits right after that layer and its map's gradient appears just before the layer's backward.
    :meth:`feed` builds the same values from collected maps when the forward could not stream them (gradient
    checkpointing).
    """

    def __init__(
        self,
        terms: Sequence[AttentionTerm],
        batch: Batch,
        index: TVIndex,
        teacher: Mapping[str, TeacherSignals],
    ) -> None:
        self.terms = tuple(terms)
        self.teacher = teacher
        self.rows = {
            c: Rows(c, r, batch, index.select(r), teacher=teacher) for c, r in capability_rows(batch).items()
        }
        self.per_layer: dict[tuple[str, str], dict[int, torch.Tensor]] = {}

    def __call__(self, layer: int, kind: str, maps: torch.Tensor) -> None:
        for term in self.terms:
            if term.kind != kind or layer not in term.student_layers:
                continue
            target = term.target(self.teacher, term.student_layers.index(layer))  # once for every capability
            for c, rows in self.rows.items():
                loss = term.layer_loss(maps[rows.rows], target[rows.rows], rows)
                self.per_layer.setdefault((term.name, c), {})[layer] = loss

    def feed(self, captured: CapturedAttention) -> None:
        """Build the terms from maps collected after the forward, layer by layer as the stream would."""
        for kind, maps in (("full", captured.full), ("tv", captured.tv)):
            for layer in sorted(maps):
                self(layer, kind, maps[layer])

    def value(self, name: str, capability: str) -> torch.Tensor:
        term = next(t for t in self.terms if t.name == name)
        layers = self.per_layer.get((name, capability), {})
        missing = [k for k in term.student_layers if k not in layers]
        if missing:
            raise RuntimeError(f"term {name!r} got no student map for decoder layers {missing}")
        return term.reduce([layers[k] for k in term.student_layers])
