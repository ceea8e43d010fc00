"""Online loss reweighting (appendix B.1, eq. 25; implementation details of appendix D.1).

Each loss term i has a learnable weight w_i = softplus(a_i) + 1e-8, kept in [w_min, w_max], trained by its own
AdamW (lr 3e-4) so that the weighted gradient magnitude w_i G_i approaches the target

    Ĝ_i = (sum_j w_j G_j) * p_i r_i^alpha / sum_j p_j r_j^alpha,   r_i = (L_i(s)/L_i(0)) / mean_j (L_j(s)/L_j(0)),

all sums over the terms active in the step. Eq. 25 fixes Ĝ_i only up to a factor; this normalisation keeps the
total weighted magnitude sum_j w_j G_j unchanged, so the weights move relative to each other and do not drift
together. With alpha > 0 a term that decayed LESS than the others (larger r_i) gets a larger target. G_i comes from
the Gramian the projection already needs (``drivekd.gradients.mixing.group_norms``): no extra backward.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ReweightStep:
    """One update: the new ``weights``, and the inputs of its objective for the active terms."""

    weights: dict[str, float]
    targets: dict[str, float]  # Ĝ_i
    weighted_norms: dict[str, float]  # w_i G_i before the step
    relative_decay: dict[str, float]  # r_i
    objective: float  # sum_i |w_i G_i - Ĝ_i| before the step

    def as_log(self, prefix: str = "reweight") -> dict[str, float]:
        """Flat scalars for a per-step logger."""
        log = {f"{prefix}/objective": self.objective}
        for key, values in (
            ("w", self.weights),
            ("target", self.targets),
            ("wG", self.weighted_norms),
            ("r", self.relative_decay),
        ):
            log.update({f"{prefix}/{key}/{name}": value for name, value in values.items()})
        return log


def _softplus_inverse(w: float) -> float:
    """a with softplus(a) = w (> 0), computed stably: a = w + log(1 - exp(-w))."""
    return w + math.log(-math.expm1(-w))


class LossReweighter(nn.Module):
    """Learnable loss weights w_i = softplus(a_i) + eps in [w_min, w_max] (appendix B.1, D.1).

    ``static_ratios`` gives p_i per name (a mapping, or a sequence in ``names`` order); ``initial`` the starting
    weights (one value or one per name). The bound is kept by projecting a_i back into the interval that maps onto
    [w_min, w_max] after each step; clamping w_i itself would zero its gradient at the bound and freeze it there.
    Weight decay defaults to 0 (the paper gives none; decaying a_i would pull every w_i towards softplus(0)).
    ``state_dict`` holds a_i, L_i(0) and the AdamW state, so a reload resumes exactly.
    """

    def __init__(
        self,
        names: Sequence[str],
        static_ratios: Mapping[str, float] | Sequence[float],
        alpha: float,
        lr: float = 3e-4,
        bounds: tuple[float, float] = (1e-3, 1e3),
        eps: float = 1e-8,
        initial: Mapping[str, float] | float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.names = tuple(names)
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"names must be non-empty and distinct, got {list(names)}")
        bad = [n for n in self.names if not n.isidentifier()]
        if bad:
            raise ValueError(f"names must be identifiers (they name parameters), got {bad}")
        ratios = (
            static_ratios
            if isinstance(static_ratios, Mapping)
            else dict(zip(self.names, static_ratios, strict=True))
        )
        self.ratios = {name: float(ratios[name]) for name in self.names}
        if any(not (p > 0 and math.isfinite(p)) for p in self.ratios.values()):
            raise ValueError(f"static ratios p_i must be positive and finite, got {self.ratios}")
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be finite and >= 0 (0 ignores loss decay), got {alpha}")
        w_min, w_max = bounds
        if not eps < w_min < w_max < math.inf:
            raise ValueError(f"bounds must satisfy eps < w_min < w_max < inf, got {bounds} with eps {eps}")
        self.alpha, self.eps, self.bounds = float(alpha), float(eps), (float(w_min), float(w_max))
        self._raw_bounds = (_softplus_inverse(w_min - eps), _softplus_inverse(w_max - eps))
        starts = {name: initial if isinstance(initial, int | float) else initial[name] for name in self.names}
        outside = {n: w for n, w in starts.items() if not w_min <= w <= w_max}
        if outside:
            raise ValueError(f"initial weights {outside} lie outside the bounds {bounds}")
        self.raw = nn.ParameterDict(
            {
                n: nn.Parameter(torch.tensor(_softplus_inverse(w - eps), dtype=torch.float64))
                for n, w in starts.items()
            }
        )
        self._project()
        self.register_buffer("initial_losses", torch.full((len(self.names),), math.nan, dtype=torch.float64))
        self._optimizer = torch.optim.AdamW(self.raw.values(), lr=lr, weight_decay=weight_decay)

    def _weight(self, name: str) -> torch.Tensor:
        return nn.functional.softplus(self.raw[name]) + self.eps

    def _project(self) -> None:
        with torch.no_grad():
            for a in self.raw.values():
                a.clamp_(*self._raw_bounds)

    def weights(self) -> dict[str, float]:
        """Current w_i = clamp(softplus(a_i) + eps, w_min, w_max) as floats (constants for the training loss)."""
        with torch.no_grad():
            return {name: float(self._weight(name).clamp(*self.bounds)) for name in self.names}

    def update(self, losses: Mapping[str, float], grad_norms: Mapping[str, float]) -> ReweightStep:
        """One AdamW step on sum_i |w_i G_i - Ĝ_i| over the active terms (the keys of ``losses``).

        ``losses`` are L_i(s) and ``grad_norms`` G_i = ||grad L_i||, both unweighted. L_i(0) is recorded the first
        time term i is active. G_i and Ĝ_i are constants of the objective; inactive weights do not move.
        """
        active = [name for name in self.names if name in losses]
        unknown = sorted(set(losses) - set(self.names))
        if unknown or not active:
            raise ValueError(f"losses must name some of {self.names}; unknown {unknown}")
        if set(grad_norms) != set(losses):
            raise ValueError(
                f"grad_norms must have the keys of losses: {sorted(losses)}, got {sorted(grad_norms)}"
            )
        loss = {n: float(losses[n]) for n in active}
        norm = {n: float(grad_norms[n]) for n in active}
        bad = {
            n: (loss[n], norm[n])
            for n in active
            if not (loss[n] >= 0 and norm[n] >= 0) or not math.isfinite(loss[n] + norm[n])
        }
        if bad:
            raise ValueError(f"losses and gradient norms must be finite and >= 0, got (loss, norm) {bad}")
        for n in active:
            k = self.names.index(n)
            if math.isnan(self.initial_losses[k]):
                if loss[n] <= 0:
                    raise ValueError(
                        f"the first loss of term {n!r} is {loss[n]}: L_i(0) must be > 0 for the relative "
                        "decay of eq. 25; drop the term or start reweighting once it is positive"
                    )
                self.initial_losses[k] = loss[n]
        ratio = {n: loss[n] / float(self.initial_losses[self.names.index(n)]) for n in active}
        mean = sum(ratio.values()) / len(active)
        decay = {n: ratio[n] / mean if mean > 0 else 1.0 for n in active}
        w = {n: self._weight(n) for n in active}
        weighted = {n: float(w[n].detach()) * norm[n] for n in active}
        shares = {n: self.ratios[n] * decay[n] ** self.alpha for n in active}
        total, share_sum = sum(weighted.values()), sum(shares.values())
        targets = {n: total * shares[n] / share_sum for n in active}
        objective = sum((w[n] * norm[n] - targets[n]).abs() for n in active)
        self._optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self._optimizer.step()
        self._project()
        return ReweightStep(self.weights(), targets, weighted, decay, float(objective.detach()))

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": copy.deepcopy(self._optimizer.state_dict())}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state["optimizer"])


class ReferenceReweighter(nn.Module):
    """Online reweighting as the authors' released training code does it (``reweight.mode: reference``).

    w_i = clamp(softplus(a_i) + eps, w_min, w_max), the CE weight also kept >= ``min_ce_weight``; initial weights
    are the static values. One step over the active terms minimises sum_i |w_i G_i - p_i (sum_j w_j G_j)
    (r_i / mean_j r_j)^alpha| with AdamW (betas 0.9 / 0.99, no weight decay), where p_i are the static values
    normalised to sum 1, r_i = L_i / L_i(0) and the target is NOT detached (its sum depends on the weights).
    Then the weights are rescaled so that the active ones sum to their static values' sum, clamped again (bounds,
    CE floor) and written back as a_i = log(expm1(w_i)). Differences from :class:`LossReweighter`: the target's
    sum is not detached, L1 on raw magnitudes, the rescale and the CE floor; alpha defaults to 0 (the
    loss-rate term off).
    """

    def __init__(
        self,
        names: Sequence[str],
        static_weights: Mapping[str, float],
        *,
        alpha: float = 0.0,
        lr: float = 3e-4,
        bounds: tuple[float, float] = (1e-6, 1e6),
        min_ce_weight: float = 0.6,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.names = tuple(names)
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"names must be non-empty and distinct, got {list(names)}")
        self.static = {n: float(static_weights[n]) for n in self.names}
        if any(not (w >= 0 and math.isfinite(w)) for w in self.static.values()):
            raise ValueError(f"static weights must be finite and >= 0, got {self.static}")
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
        if not 0 < bounds[0] < bounds[1] < math.inf:
            raise ValueError(f"bounds must satisfy 0 < w_min < w_max < inf, got {bounds}")
        self.alpha, self.bounds, self.min_ce, self.eps = (
            float(alpha),
            bounds,
            float(min_ce_weight),
            float(eps),
        )
        start = {n: min(max(w, bounds[0]), bounds[1]) for n, w in self.static.items()}
        self.raw = nn.ParameterDict(
            {
                n: nn.Parameter(_released_softplus_inverse(torch.tensor(w, dtype=torch.float64)))
                for n, w in start.items()
            }
        )
        self.register_buffer("initial_losses", torch.full((len(self.names),), math.nan, dtype=torch.float64))
        self._optimizer = torch.optim.AdamW(self.raw.values(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)

    def _weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.names:
            w = (nn.functional.softplus(self.raw[n]) + self.eps).clamp(*self.bounds)
            out[n] = w.clamp_min(self.min_ce) if n == "ce" else w
        return out

    def weights(self) -> dict[str, float]:
        with torch.no_grad():
            return {n: float(w) for n, w in self._weights().items()}

    def update(self, losses: Mapping[str, float], grad_norms: Mapping[str, float]) -> ReweightStep | None:
        """One step on the window's mean losses L_i and gradient norms G_i (unweighted); None when fewer than two
        terms are active or sum_j w_j G_j is not positive (the released code skips those steps too)."""
        active = [n for n in self.names if n in losses and n in grad_norms]
        if len(active) < 2:
            return None
        for n in active:
            k = self.names.index(n)
            if math.isnan(self.initial_losses[k]):
                self.initial_losses[k] = float(losses[n])
        w = self._weights()
        magnitudes = {n: w[n] * float(grad_norms[n]) for n in active}
        total = torch.stack([magnitudes[n] for n in active]).sum()
        if float(total.detach()) <= 0:
            return None
        static_sum = sum(max(0.0, self.static[n]) for n in active)
        shares = (
            {n: max(0.0, self.static[n]) / static_sum for n in active}
            if static_sum > 0
            else dict.fromkeys(active, 1 / len(active))
        )
        ratio = {
            n: float(losses[n]) / max(1e-12, float(self.initial_losses[self.names.index(n)])) for n in active
        }
        mean = sum(ratio.values()) / len(active)
        decay = {n: ratio[n] / mean if mean > 0 else 1.0 for n in active}
        targets = {n: shares[n] * total * (decay[n] ** self.alpha if self.alpha else 1.0) for n in active}
        objective = sum((magnitudes[n] - targets[n]).abs() for n in active)
        self._optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self._optimizer.step()
        with torch.no_grad():
            new = self._weights()
            scale = (static_sum if static_sum > 0 else len(active)) / float(
                torch.stack([new[n] for n in active]).sum().clamp_min(1e-20)
            )
            for n in active:
                value = (new[n] * scale).clamp(*self.bounds)
                if n == "ce":
                    value = value.clamp_min(self.min_ce)
                self.raw[n].copy_(_released_softplus_inverse(value))
        return ReweightStep(
            self.weights(),
            {n: float(v.detach()) for n, v in targets.items()},
            {n: float(v.detach()) for n, v in magnitudes.items()},
            decay,
            float(objective.detach()),
        )

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": copy.deepcopy(self._optimizer.state_dict())}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state["optimizer"])


def _released_softplus_inverse(w: torch.Tensor) -> torch.Tensor:
    """a = log(expm1(w)) with expm1 floored at 1e-20, the inverse the released code writes weights back with."""
    return torch.log(torch.expm1(w).clamp_min(1e-20))
