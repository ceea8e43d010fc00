"""Micro-batches with a fixed number of samples of every capability, resumable and identical across world sizes.

Each capability walks its own permutation, reshuffled per pass with a generator seeded by (seed, capability,
pass), so the order depends on nothing but those numbers. A micro-step takes ``per_capability x world`` samples of
each capability; rank r keeps every world-th one, so one process with micro-batch m x W sees exactly the samples
that W processes with micro-batch m see together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from drivekd.data.schema import Sample


class CapabilitySampler:
    def __init__(
        self,
        samples: Sequence[Sample],
        capabilities: Sequence[str],
        *,
        per_capability: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.pools = {c: [s for s in samples if s.capability == c] for c in capabilities}
        empty = [c for c, pool in self.pools.items() if not pool]
        if empty:
            raise ValueError(f"the training data has no samples of capability {', '.join(empty)}")
        self.capabilities = list(capabilities)
        self.per_capability, self.seed, self.rank, self.world = per_capability, seed, rank, world
        self.cursor = {c: (0, 0) for c in capabilities}  # (pass, position)

    def micro_steps_per_epoch(self) -> int:
        """Micro-steps that show every sample of the largest capability once."""
        return math.ceil(max(len(p) for p in self.pools.values()) / (self.per_capability * self.world))

    def next(self) -> list[Sample]:
        """This rank's samples of the next micro-step, capability by capability."""
        picked = []
        for capability in self.capabilities:
            drawn = [self._draw(capability) for _ in range(self.per_capability * self.world)]
            picked.extend(drawn[self.rank :: self.world])
        return picked

    def _draw(self, capability: str) -> Sample:
        pool = self.pools[capability]
        epoch, position = self.cursor[capability]
        order = self._order(capability, epoch, len(pool))
        sample = pool[int(order[position])]
        position += 1
        self.cursor[capability] = (epoch + 1, 0) if position == len(pool) else (epoch, position)
        return sample

    def _order(self, capability: str, epoch: int, size: int) -> torch.Tensor:
        key = (self.seed * 1_000_003 + self.capabilities.index(capability) * 7919 + epoch) % (2**63)
        return torch.randperm(size, generator=torch.Generator().manual_seed(key))

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": {c: list(v) for c, v in self.cursor.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = {c: tuple(v) for c, v in state["cursor"].items()}
