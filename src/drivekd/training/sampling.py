"""Micro-batch samplers, resumable and identical across world sizes.

* :class:`MixedSampler` (``data.sampler: mixed``, appendix D.1's batch): one permutation of the whole training set
  per pass, each sample with its own capability; an epoch is one pass over the set.
* :class:`CapabilitySampler` (``data.sampler: per_capability``): a fixed number of samples of every capability per
  micro-step, each capability walking its own permutation (smaller pools are revisited within an epoch, which is set
  by the largest pool); needed by ``gradients.grouping: capability``.

Orders are drawn from generators seeded by (seed, pass[, capability]), so they depend on nothing but those numbers.
A micro-step takes ``m x world`` samples; rank r keeps every world-th one, so one process with micro-batch m x W sees
exactly the samples that W processes with micro-batch m see together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from drivekd.data.schema import Sample


def _permutation(key: int, size: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(key % (2**63)))


class MixedSampler:
    def __init__(
        self, samples: Sequence[Sample], *, per_step: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        if not samples:
            raise ValueError("the training data has no samples")
        self.samples = list(samples)
        self.per_step, self.seed, self.rank, self.world = per_step, seed, rank, world
        self.cursor = (0, 0)  # (pass, position)
        self._order: tuple[int, torch.Tensor] | None = None  # the current pass's permutation

    def micro_steps_per_epoch(self) -> int:
        """Micro-steps that show every sample once."""
        return math.ceil(len(self.samples) / (self.per_step * self.world))

    def next(self) -> list[Sample]:
        """This rank's samples of the next micro-step."""
        drawn = [self._draw() for _ in range(self.per_step * self.world)]
        return drawn[self.rank :: self.world]

    def _draw(self) -> Sample:
        epoch, position = self.cursor
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, _permutation(self.seed * 1_000_003 + epoch, len(self.samples)))
        sample = self.samples[int(self._order[1][position])]
        position += 1
        self.cursor = (epoch + 1, 0) if position == len(self.samples) else (epoch, position)
        return sample

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": list(self.cursor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = tuple(state["cursor"])


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
        return _permutation(self.seed * 1_000_003 + self.capabilities.index(capability) * 7919 + epoch, size)

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": {c: list(v) for c, v in self.cursor.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = {c: tuple(v) for c, v in state["cursor"].items()}
