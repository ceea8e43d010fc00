"""Adaptive layer selection from the pre-study curves (section 3.2.1; the paper leaves it as future work).

A pure function of the curves. Paper numbering: N decoder layers, l_pen = N - 1; the candidates are layers
1..l_pen (layer 0 is the embeddings, and layer N is left out as in the paper, whose selections stop at l_pen).

**Representation view** (capability-agnostic anchors):

* early anchor e = argmax over l in 1..l_pen of S^(l) - S^(l-1), the layer after which the representation
  settles (the paper's "S^(0) is low while S^(1) rises sharply" puts it at 1); layer 1 when S never rises;
* late anchor g = argmax over l in 1..l_pen of z(S^(l-1) - S^(l)) + z(C^(l)): the last layer before a late
  representation change (the paper's drop of S^(N-1) relative to S^(N-2)) that is also a vision-text fusion
  peak (the paper's C^(l) peak near l_pen). z standardises over the candidates; without C its term is left out.

**Capability view** (decides; the representation view breaks the ties that noise leaves open, and is the
fallback). The noise scale sigma of the intra curves is the median of their standard errors over layers 1..N
when known (the analysis estimates them from disjoint image folds), else 1.4826 * median |second difference| /
sqrt(6) over the three curves together (the robust scale of white noise on a smooth curve); at least
``min_noise``.

* perception p: the layer of highest perception intra in 1..l_pen-1 (room is left for a later planning layer).
  The contiguous run of layers around it whose intra is within ``tie_z * sigma`` of that maximum are ties; the
  one closest to e wins (then the earlier). Without a perception curve, p = e.
* planning q: local maxima of the planning intra over layers 0..N that lie in p+1..l_pen and whose topographic
  prominence is at least ``peak_z * sigma`` are significant late peaks; the most prominent wins, and its
  contiguous run of layers within ``tie_z * sigma`` of its height are ties, resolved toward g. Without a
  significant peak (or curve), q = g when g > p, else l_pen.
* reasoning [p, q]: from the perception layer to the planning layer, both included. Section 3.3.2 and appendix E
  show that the broad range, boundaries included, beats the non-overlapping 2..l_pen-1 range, and the paper's
  reasoning intra "keeps a high intra across layers". The reasoning curve over the span is reported as evidence;
  it does not move the ends.

On curves with the paper's patterns this returns (1, [1, l_pen], l_pen). Failure modes (docs/analysis.md has
measured rates): a capability peak within noise of a representation anchor loses the tie to the anchor; a
planning curve without a late peak falls back to g; two late planning peaks of similar prominence are split by
prominence alone; with few layers (N <= 9) or without standard errors the curve-based noise scale also counts
sharp features, so ties widen and more choices fall back to the anchors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import yaml
from scipy.signal import find_peaks, peak_prominences

from drivekd.data.schema import CAPABILITIES

Role = Literal["teacher", "student"]
ROLES: tuple[Role, ...] = ("teacher", "student")
TIE_Z = 3.0
PEAK_Z = 4.0
MIN_NOISE = 1e-4


@dataclass(frozen=True)
class Curves:
    """The curves the rule reads, in paper numbering.

    ``adjacent`` is S^(l) for l = 0..N-1 (eq. 1), ``vision_text`` C^(l) for l = 0..N (eq. 3) and ``intra`` maps a
    capability to intra^(l) for l = 0..N (eq. 5); ``intra_stderr`` holds the standard errors of the intra
    curves when known. Missing curves are None.
    """

    adjacent: Sequence[float]
    vision_text: Sequence[float] | None
    intra: Mapping[str, Sequence[float] | None]
    intra_stderr: Mapping[str, Sequence[float] | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.adjacent)
        if n < 2:
            raise ValueError(f"need S^(l) for at least 2 decoder layers, got {n} values")
        if not _finite(self.adjacent):
            raise ValueError("the adjacent-layer cosine S^(l) has missing or non-finite values")
        curves = [("vision_text", self.vision_text), *self.intra.items(), *self.intra_stderr.items()]
        for name, curve in curves:
            if curve is not None and len(curve) != n + 1:
                raise ValueError(
                    f"curve {name!r} must have N + 1 = {n + 1} values (layers 0..N), got {len(curve)}"
                )

    @property
    def num_layers(self) -> int:
        return len(self.adjacent)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> Curves:
        """Read the curves from a ``metrics.json`` object."""
        intra = metrics["intra_consistency"]
        return cls(
            metrics["adjacent_cosine"]["values"],
            metrics["vision_text_cosine"]["values"],
            intra["by_capability"],
            intra.get("stderr") or {},
        )

    def curve(self, name: str) -> np.ndarray | None:
        values = self.vision_text if name == "vision_text" else self.intra.get(name)
        return _array(values)

    def noise(self) -> tuple[float, str]:
        """The noise scale of the intra curves over layers 1..N and where it comes from.

        The median of the known standard errors when there are any; otherwise 1.4826 * median |second
        difference| / sqrt(6) over the curves together (the robust scale of white noise on a smooth curve), which
        also counts sharp features as noise, so it errs towards wider ties.
        """
        stderr = [a[1:] for c in CAPABILITIES if (a := _array(self.intra_stderr.get(c))) is not None]
        if stderr:
            return float(np.median(np.concatenate(stderr))), "standard errors of the intra curves"
        curves = [a[1:] for c in CAPABILITIES if (a := self.curve(c)) is not None]
        diffs = [np.abs(np.diff(c, n=2)) for c in curves if len(c) >= 3]
        if not diffs:
            return 0.0, "none (no intra curve)"
        scale = 1.4826 * float(np.median(np.concatenate(diffs))) / math.sqrt(6)
        return scale, "second differences of the intra curves"


@dataclass(frozen=True)
class LayerChoice:
    """The recommended layers (paper numbering, inclusive reasoning range) and what decided each."""

    num_layers: int
    perception: int
    reasoning: tuple[int, int]
    planning: int
    evidence: dict[str, Any] = field(default_factory=dict)

    def fragment(self, role: Role = "student") -> dict[str, Any]:
        """The ``layers:`` block that ``drivekd train`` accepts in place of its defaults."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        block = {"perception": self.perception, "reasoning": list(self.reasoning), "planning": self.planning}
        return {"layers": {role: block}}


def recommend(metrics: Mapping[str, Any], role: Role = "student", **rule: float) -> dict[str, Any]:
    """The ``recommended_layers`` entry of ``metrics.json``: the ``layers:`` block for ``role`` and the evidence."""
    choice = select_layers(Curves.from_metrics(metrics), **rule)
    return {
        "role": role,
        "num_layers": choice.num_layers,
        **choice.fragment(role),
        "evidence": choice.evidence,
    }


def fragment_yaml(recommended: Mapping[str, Any]) -> str:
    """``layers.yaml``: the config fragment ``drivekd train`` accepts in place of its default layers."""
    header = (
        "# Drive-KD layers recommended by `drivekd analyze` (paper numbering: 1..N decoder layers, 0 = embeddings;\n"
        "# reasoning is an inclusive range). Evidence: metrics.json -> recommended_layers.\n"
    )
    return header + yaml.safe_dump(
        {"layers": dict(recommended["layers"])}, sort_keys=False, default_flow_style=None
    )


def train_overrides(recommended: Mapping[str, Any]) -> list[str]:
    """The same layers as ``drivekd train`` dotted overrides (``layers.student.perception=1`` ...)."""
    return [
        f"layers.{role}.{name}={json.dumps(value, separators=(',', ':'))}"
        for role, block in recommended["layers"].items()
        for name, value in block.items()
    ]


def select_layers(
    curves: Curves, *, tie_z: float = TIE_Z, peak_z: float = PEAK_Z, min_noise: float = MIN_NOISE
) -> LayerChoice:
    """Apply the rule of this module's docstring."""
    n = curves.num_layers
    pen = n - 1
    s = np.asarray(curves.adjacent, dtype=np.float64)
    candidates = np.arange(1, pen + 1)
    rise = s[candidates] - s[candidates - 1]
    early = int(candidates[np.argmax(rise)]) if rise.max() > 0 else 1
    vision_text = curves.curve("vision_text")
    late_score = _z(-rise) + (_z(vision_text[candidates]) if vision_text is not None else 0)
    late = int(candidates[np.argmax(late_score)])
    sigma, source = curves.noise()
    sigma = max(sigma, min_noise)
    evidence: dict[str, Any] = {
        "representation": {
            "early_anchor": early,
            "early_rise": float(rise[early - 1]),
            "late_anchor": late,
            "late_drop": float(-rise[late - 1]),
            "fusion_peak": int(candidates[np.argmax(vision_text[candidates])])
            if vision_text is not None
            else None,
        },
        "noise": {
            "sigma": sigma,
            "source": source,
            "tie_tolerance": tie_z * sigma,
            "peak_threshold": peak_z * sigma,
        },
    }
    perception, evidence["perception"] = _perception(
        curves.curve("perception"), range(1, max(1, pen - 1) + 1), early, tie_z * sigma
    )
    planning, evidence["planning"] = _planning(
        curves.curve("planning"), perception, pen, late, tie_z * sigma, peak_z * sigma
    )
    evidence["reasoning"] = _reasoning_evidence(curves.curve("reasoning"), perception, planning)
    return LayerChoice(n, perception, (perception, planning), planning, evidence)


def _perception(
    intra: np.ndarray | None, allowed: range, anchor: int, tolerance: float
) -> tuple[int, dict[str, Any]]:
    if intra is None:
        layer = min(max(anchor, allowed.start), allowed.stop - 1)
        return layer, {"decided_by": "representation (no perception intra curve)", "layer": layer}
    best = max(allowed, key=lambda layer: intra[layer])
    ties = _ties(intra, best, allowed, tolerance)
    layer = _closest(ties, anchor)
    return layer, {
        "decided_by": "perception intra peak"
        + (" (tie resolved by the early anchor)" if len(ties) > 1 else ""),
        "peak_layer": best,
        "peak_intra": float(intra[best]),
        "ties": ties,
        "intra_at_choice": float(intra[layer]),
    }


def _planning(
    intra: np.ndarray | None, perception: int, pen: int, anchor: int, tolerance: float, threshold: float
) -> tuple[int, dict[str, Any]]:
    allowed = range(perception + 1, pen + 1)
    fallback = anchor if anchor > perception else pen
    if intra is None or len(allowed) == 0:
        reason = "no planning intra curve" if intra is None else "no layer after the perception layer"
        return fallback, {"decided_by": f"representation ({reason})", "layer": fallback}
    peaks, _ = find_peaks(intra)
    prominences = peak_prominences(intra, peaks)[0] if len(peaks) else np.array([])
    late = [(int(p), float(m)) for p, m in zip(peaks, prominences, strict=True) if p in allowed]
    significant = [(p, m) for p, m in late if m >= threshold]
    info: dict[str, Any] = {"late_peaks": [{"layer": p, "prominence": m} for p, m in late]}
    if not significant:
        info["decided_by"] = "representation (no significant late peak in the planning intra)"
        return fallback, info
    best = max(significant, key=lambda peak: peak[1])[0]
    ties = _ties(intra, best, allowed, tolerance)
    layer = _closest(ties, anchor)
    info |= {
        "decided_by": "planning intra late peak"
        + (" (tie resolved by the late anchor)" if len(ties) > 1 else ""),
        "peak_layer": best,
        "ties": ties,
    }
    return layer, info


def _reasoning_evidence(intra: np.ndarray | None, start: int, end: int) -> dict[str, Any]:
    info: dict[str, Any] = {"decided_by": "span from the perception layer to the planning layer"}
    if intra is not None:
        span = intra[start : end + 1]
        info |= {
            "intra_min": float(span.min()),
            "intra_mean": float(span.mean()),
            "intra_max": float(span.max()),
        }
    return info


def _ties(values: np.ndarray, best: int, allowed: range, tolerance: float) -> list[int]:
    """The contiguous run of allowed layers around ``best`` whose value is within ``tolerance`` of it."""
    floor = values[best] - tolerance
    lo = hi = best
    while lo - 1 in allowed and values[lo - 1] >= floor:
        lo -= 1
    while hi + 1 in allowed and values[hi + 1] >= floor:
        hi += 1
    return list(range(lo, hi + 1))


def _closest(layers: Sequence[int], anchor: int) -> int:
    return min(layers, key=lambda layer: (abs(layer - anchor), layer))


def _z(values: np.ndarray) -> np.ndarray:
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def _array(values: Sequence[float | None] | None) -> np.ndarray | None:
    return np.asarray(values, dtype=np.float64) if values is not None and _finite(values) else None


def _finite(values: Sequence[float | None]) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)
