"""Teacher confidence on answer tokens (section 3.2.3, eqs. 6-8), binned by relative position along the answer.

For the logits z_t that predict answer token t and a temperature tau, p = softmax(z_t / tau):

* m = max_k p(k) (eq. 6), the top-1 probability;
* S = the sum of the 10 largest p(k) (eq. 7), the top-10 mass;
* Delta = m - (S - m) / (10 - 1) (eq. 8), the generalised margin of the top-1 token over the other top-10.

Token t of an answer of T tokens falls in bin floor((t + 0.5) / T * n_bins), so answers of any length share the
same position-normalised axis (figures 2d, 7, 8). Bins pool the tokens of all answers of a domain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from drivekd.losses.attention import at_least_float32

TEMPERATURES = (0.7, 1.0, 2.0)
TOP_K = 10
METRICS = ("top1", "top10", "margin")


def confidence_metrics(logits: torch.Tensor, temperature: float, k: int = TOP_K) -> torch.Tensor:
    """(3, T) rows m (eq. 6), S (eq. 7) and Delta (eq. 8) for logits (T, V) at ``temperature``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if k < 2 or logits.shape[-1] < k:
        raise ValueError(f"need 2 <= k <= vocabulary size, got k = {k} and {logits.shape[-1]} logits")
    probs = torch.softmax(at_least_float32(logits) / temperature, dim=-1)
    top = probs.topk(k, dim=-1).values
    top1, mass = top[:, 0], top.sum(-1)
    return torch.stack([top1, mass, top1 - (mass - top1) / (k - 1)])


def position_bins(length: int, n_bins: int) -> torch.Tensor:
    """(length,) bin of each answer position: floor((t + 0.5) / length * n_bins)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    centres = (torch.arange(length, dtype=torch.float64) + 0.5) / max(length, 1)
    return (centres * n_bins).floor().long().clamp(max=n_bins - 1)


class Confidence:
    """Per domain and temperature: float64 sums of m, S and Delta per position bin and over all tokens."""

    def __init__(
        self, temperatures: Sequence[float] = TEMPERATURES, n_bins: int = 10, k: int = TOP_K
    ) -> None:
        if not temperatures or not all(math.isfinite(t) and t > 0 for t in temperatures):
            raise ValueError(f"temperatures must be one or more positive numbers, got {list(temperatures)}")
        self.temperatures = tuple(float(t) for t in temperatures)
        self.n_bins = n_bins
        self.k = k
        position_bins(1, n_bins)  # validates n_bins
        self._sums: dict[str, torch.Tensor] = {}  # domain -> (temperatures, metrics, bins) sums
        self._counts: dict[str, torch.Tensor] = {}  # domain -> (bins,) token counts
        self._answers: dict[str, int] = {}

    def update(self, logits: torch.Tensor, domain: str) -> None:
        """Add one answer: ``logits`` (T, V) are those that predict its T tokens, in order."""
        if logits.shape[0] == 0:
            return
        bins = position_bins(logits.shape[0], self.n_bins)
        if domain not in self._sums:
            self._sums[domain] = torch.zeros(
                len(self.temperatures), len(METRICS), self.n_bins, dtype=torch.float64
            )
            self._counts[domain] = torch.zeros(self.n_bins, dtype=torch.float64)
            self._answers[domain] = 0
        for i, temperature in enumerate(self.temperatures):
            values = confidence_metrics(logits.detach(), temperature, self.k).double().cpu()
            self._sums[domain][i].index_add_(1, bins, values)
        self._counts[domain].index_add_(0, bins, torch.ones(bins.shape[0], dtype=torch.float64))
        self._answers[domain] += 1

    def result(self) -> dict:
        """JSON-ready: bin centres, then per domain the token and answer counts and, per temperature and
        metric, the mean per bin (None for an empty bin) and over all tokens."""
        domains = {}
        for domain, sums in sorted(self._sums.items()):
            counts = self._counts[domain]
            by_temperature = {}
            for i, temperature in enumerate(self.temperatures):
                by_temperature[f"{temperature:g}"] = {
                    metric: {
                        "bins": [
                            float(s / c) if c > 0 else None for s, c in zip(sums[i, j], counts, strict=True)
                        ],
                        "mean": float(sums[i, j].sum() / counts.sum()),
                    }
                    for j, metric in enumerate(METRICS)
                }
            domains[domain] = {
                "answers": self._answers[domain],
                "tokens": int(counts.sum()),
                "by_temperature": by_temperature,
            }
        return {
            "temperatures": list(self.temperatures),
            "top_k": self.k,
            "bins": self.n_bins,
            "bin_centres": [(b + 0.5) / self.n_bins for b in range(self.n_bins)],
            "domains": domains,
        }
