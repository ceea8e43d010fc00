"""Dynamic loss scaling for fp16 mixed precision.

Small fp16 gradients underflow, so the backward runs on losses multiplied by a scale S and gradients are divided by S
before clipping and the optimizer step. S halves whenever a step overflows (that step is skipped) and doubles after
``growth_interval`` finite steps in a row. Disabled (S = 1) for float32 and bf16, whose range needs no scaling.
"""

from __future__ import annotations

from typing import Any


class LossScale:
    def __init__(
        self,
        enabled: bool,
        *,
        initial: float = 2.0**16,
        growth_interval: int = 200,
        factor: float = 2.0,
        minimum: float = 1.0,
    ) -> None:
        self.enabled = enabled
        self.scale = initial if enabled else 1.0
        self.growth_interval, self.factor, self.minimum = growth_interval, factor, minimum
        self.good_steps = 0

    def update(self, finite: bool) -> bool:
        """Record a step; returns True when a non-finite step is explained by an fp16 overflow (not a real NaN)."""
        if not self.enabled:
            return False
        if not finite:
            self.good_steps = 0
            overflow = self.scale > self.minimum
            self.scale = max(self.scale / self.factor, self.minimum)
            return overflow
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= self.factor
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.good_steps = state["scale"], state["good_steps"]
