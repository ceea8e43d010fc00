"""Image-level reasoning-planning correlation (section 4.3, eq. 24, Table 2).

For each image k, R_k is the mean judge score of its reasoning questions (prediction + behavior) and P_k that of
its planning questions; Pearson and Spearman correlations are taken over the images that have both. An "image" is
the visual input of a question: its set of camera images (one nuScenes frame; for synthetic data, one scene in
one camera setting).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from scipy import stats

from drivekd.evaluation.scoring import EvalItem


def image_scores(items: Iterable[EvalItem], scores: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """Eq. 24: (R_k, P_k) per image that has at least one scored reasoning and one scored planning question."""
    groups: dict[str, dict[str, list[float]]] = {}
    for item in items:
        capability = item.sample.capability
        if item.sample.id not in scores or capability not in ("reasoning", "planning"):
            continue
        groups.setdefault(item.image_key, {"reasoning": [], "planning": []})[capability].append(
            scores[item.sample.id]
        )
    return {
        key: (sum(g["reasoning"]) / len(g["reasoning"]), sum(g["planning"]) / len(g["planning"]))
        for key, g in groups.items()
        if g["reasoning"] and g["planning"]
    }


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def correlate(pairs: Iterable[tuple[float, float]]) -> dict[str, Any]:
    """Pearson and Spearman (with p-values) of (R_k, P_k) pairs; ``None`` where undefined (fewer than three
    images, or a constant series)."""
    pairs = list(pairs)
    result: dict[str, Any] = {"images": len(pairs), "pearson": None, "pearson_p": None}
    result |= {"spearman": None, "spearman_p": None}
    if len(pairs) < 3:
        return result
    r, p = zip(*pairs, strict=True)
    if len(set(r)) < 2 or len(set(p)) < 2:
        return result
    pearson = stats.pearsonr(r, p)
    spearman = stats.spearmanr(r, p)
    result.update(
        pearson=_finite(pearson.statistic),
        pearson_p=_finite(pearson.pvalue),
        spearman=_finite(spearman.statistic),
        spearman_p=_finite(spearman.pvalue),
    )
    return result


def reasoning_planning_correlation(items: Iterable[EvalItem], scores: Mapping[str, float]) -> dict[str, Any]:
    """Table 2 entry for one model: correlation of R_k and P_k over images with both question types."""
    return correlate(image_scores(items, scores).values())
