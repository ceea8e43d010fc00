"""What a teacher contributes to a batch, independent of where it comes from.

Layers are 0-based teacher decoder indices (paper layer l is index l - 1). ``tv`` blocks are laid out by the
batch's :class:`~drivekd.data.roles.TVIndex`; ``full`` maps are (B, L, L) in the batch's token positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from drivekd.data.collate import Batch
from drivekd.data.roles import TVIndex


@dataclass(frozen=True)
class SignalNeeds:
    """Which teacher signals a recipe needs for one batch."""

    tv_layers: frozenset[int] = frozenset()
    full_layers: frozenset[int] = frozenset()
    hidden_layers: frozenset[int] = frozenset()  # paper numbering: hidden_states[l]
    logits: bool = False
    # The most full maps one target reads (the largest teacher-layer group): how many a cache keeps read at once.
    full_group: int = 1

    def __or__(self, other: SignalNeeds) -> SignalNeeds:
        return SignalNeeds(
            self.tv_layers | other.tv_layers,
            self.full_layers | other.full_layers,
            self.hidden_layers | other.hidden_layers,
            self.logits or other.logits,
            max(self.full_group, other.full_group),
        )

    @property
    def attention_layers(self) -> frozenset[int]:
        return self.tv_layers | self.full_layers


@dataclass
class TeacherSignals:
    """Teacher tensors for one batch (no gradients)."""

    index: TVIndex
    tv: dict[int, torch.Tensor] = field(default_factory=dict)
    full: Mapping[int, torch.Tensor] = field(default_factory=dict)  # a cache reads each map when asked
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None

    def check(self, needs: SignalNeeds) -> None:
        """Raise if a needed signal is missing (a cache written with fewer layers, say)."""
        missing = [f"tv layer {k}" for k in sorted(needs.tv_layers - self.tv.keys())]
        missing += [f"full layer {k}" for k in sorted(needs.full_layers - self.full.keys())]
        missing += [f"hidden layer {k}" for k in sorted(needs.hidden_layers - self.hidden.keys())]
        if needs.logits and self.logits is None:
            missing.append("logits")
        if missing:
            raise KeyError(f"teacher signals lack {', '.join(missing)}")


class TeacherSource(Protocol):
    """Anything that yields teacher signals for a collated batch."""

    def signals(self, batch: Batch, index: TVIndex, needs: SignalNeeds) -> TeacherSignals: ...
