"""AGP, G2 and G1 in Gramian form: the combined update as coefficients over the K loss gradients (eqs. 18-23).

Every step of these methods adds, scales, takes dot products and branches on their signs. So every intermediate
vector is a combination v = sum_k a_k g_k of the K loss gradients, carried as its coefficient vector a, and every dot
product is v . w = a^T G b with G_kl = g_k . g_l. The update sum_k c_k g_k equals grad(sum_k c_k L_k): one ordinary
backward of the weighted loss applies it, with no flattened copy of any gradient. The K x K arithmetic runs in
float64 on the CPU (the branches need host values anyway); coefficients come back in float64 on the Gramian's device.

Stage-2 and G1 orders come from ``stage2_order``, drawn from a ``torch.Generator`` that the caller seeds identically
on every rank and advances identically (one draw per optimizer step), so that all ranks project in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from drivekd.gradients.mixing import DISTILL, PROJECTION_EPS, SUP, check_order, row_name

METHODS = ("none", "g1", "g2", "agp")


@dataclass
class ProjectionStats:
    """Which conflict checks fired in one step, keyed ``(projected, against)``.

    ``stage1``: AGP/G2 per-capability checks keyed by row names (``perception:distill`` against
    ``perception:sup``), or G1's single stage keyed by row names; ``stage2``: AGP/G2 checks between capabilities.
    ``amplification`` = sum_k |c_k| ||g_k|| / ||sum_k c_k g_k|| (1: no cancellation): the factor by which the
    round-off of summing c_k g_k, in the backward of sum c_k L_k or anywhere else, grows relative to the update.
    """

    method: str
    order: tuple[Any, ...] = ()
    stage1: dict[tuple[str, str], bool] = field(default_factory=dict)
    stage2: dict[tuple[str, str], bool] = field(default_factory=dict)
    amplification: float = 1.0

    @property
    def stage1_fired(self) -> int:
        return sum(self.stage1.values())

    @property
    def stage2_fired(self) -> int:
        return sum(self.stage2.values())

    def as_log(self, prefix: str = "proj") -> dict[str, float]:
        """Flat scalars for a per-step logger: fired and checked counts per stage, and 0/1 per checked pair."""
        log = {
            f"{prefix}/stage1_fired": float(self.stage1_fired),
            f"{prefix}/stage1_checked": float(len(self.stage1)),
            f"{prefix}/stage2_fired": float(self.stage2_fired),
            f"{prefix}/stage2_checked": float(len(self.stage2)),
            f"{prefix}/amplification": self.amplification,
        }
        for stage, pairs in (("stage1", self.stage1), ("stage2", self.stage2)):
            for (projected, against), fired in pairs.items():
                log[f"{prefix}/{stage}/{projected}<-{against}"] = float(fired)
        return log


def _host(gramian: torch.Tensor) -> torch.Tensor:
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"the Gramian must be a square matrix, got shape {tuple(gramian.shape)}")
    g = gramian.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(g).all():
        raise ValueError(
            "the gradient Gramian has non-finite entries: a loss or its gradient is NaN or inf; "
            "check the losses of this step before combining them"
        )
    return g


def _amplification(gram: torch.Tensor, coefficients: torch.Tensor) -> float:
    terms = float(coefficients.abs() @ torch.diagonal(gram).clamp_min(0.0).sqrt())
    if terms == 0:
        return 1.0
    update = max(float(coefficients @ gram @ coefficients), 0.0) ** 0.5
    return terms / update if update > 0 else math.inf


def _project(
    gram: torch.Tensor, v: torch.Tensor, onto: torch.Tensor, eps: float
) -> tuple[torch.Tensor, bool]:
    """Coefficient form of eqs. 19/22: v - (v.u / (||u||^2 + eps)) u when v.u < 0."""
    dot = float(v @ gram @ onto)
    if dot < 0:
        return v - (dot / (float(onto @ gram @ onto) + eps)) * onto, True
    return v, False


def _pairwise(
    gram: torch.Tensor,
    vectors: Mapping[Any, torch.Tensor],
    order: Sequence[Any],
    eps: float,
    fired: dict[tuple[str, str], bool],
    names: Mapping[Any, str],
) -> torch.Tensor:
    """Eqs. 21-23 on coefficient vectors: each projected against every other ORIGINAL in ``order``; the sum."""
    total = torch.zeros(gram.shape[0], dtype=torch.float64)
    for i in order:
        current = vectors[i]
        for j in order:
            if j != i:
                current, fired[names[i], names[j]] = _project(gram, current, vectors[j], eps)
        total = total + current
    return total


def _unit(size: int, k: int) -> torch.Tensor:
    e = torch.zeros(size, dtype=torch.float64)
    e[k] = 1.0
    return e


def _check_rows(size: int, sup_index: Mapping[str, int], distill_index: Mapping[str, int]) -> None:
    extra = sorted(set(distill_index) - set(sup_index))
    if extra:
        raise ValueError(
            f"distill_index has capabilities {extra} without a sup row; every capability needs its anchor"
        )
    rows = [*sup_index.values(), *distill_index.values()]
    if len(set(rows)) != len(rows) or any(not 0 <= r < size for r in rows):
        raise ValueError(
            f"rows must be distinct indices of the {size}x{size} Gramian, got sup {dict(sup_index)}, "
            f"distill {dict(distill_index)}"
        )


def _two_stage(
    gramian: torch.Tensor,
    sup_index: Mapping[str, int],
    distill_index: Mapping[str, int],
    order: Sequence[str],
    eps: float,
    method: str,
) -> tuple[torch.Tensor, ProjectionStats]:
    gram = _host(gramian)
    size = gram.shape[0]
    _check_rows(size, sup_index, distill_index)
    order = check_order(order, list(sup_index), "order")
    stats = ProjectionStats(method, tuple(order))
    merged = {}
    for c in order:
        sup = _unit(size, sup_index[c])
        if c not in distill_index:
            merged[c] = sup
            continue
        distill = _unit(size, distill_index[c])
        sup_name, distill_name = row_name(c, SUP), row_name(c, DISTILL)
        follower, stats.stage1[distill_name, sup_name] = _project(gram, distill, sup, eps)
        if method == "g2":
            sup, stats.stage1[sup_name, distill_name] = _project(gram, sup, distill, eps)
        merged[c] = sup + follower
    total = _pairwise(gram, merged, order, eps, stats.stage2, {c: c for c in order})
    stats.amplification = _amplification(gram, total)
    return total.to(gramian.device), stats


def agp_weights(
    gramian: torch.Tensor,
    sup_index: Mapping[str, int],
    distill_index: Mapping[str, int],
    order: Sequence[str],
    eps: float = PROJECTION_EPS,
) -> tuple[torch.Tensor, ProjectionStats]:
    """AGP (eqs. 18-23) coefficients over the Gramian's rows.

    Stage 1: anchor = sup row of c (unchanged), follower = distill row of c projected onto the anchor's normal
    plane only when their dot is negative; merged = anchor + follower (a capability with no distill row merges to
    its sup row). Stage 2: each merged vector projected, on conflict, against every other ORIGINAL merged vector
    in ``order`` (a permutation of the capabilities); the coefficients of the sum.
    """
    return _two_stage(gramian, sup_index, distill_index, order, eps, "agp")


def g2_weights(
    gramian: torch.Tensor,
    sup_index: Mapping[str, int],
    distill_index: Mapping[str, int],
    order: Sequence[str],
    eps: float = PROJECTION_EPS,
) -> tuple[torch.Tensor, ProjectionStats]:
    """G2 coefficients: stage 1 projects sup and distill of c each against the other's original on conflict
    (symmetric) and merges them; stage 2 as ``agp_weights``."""
    return _two_stage(gramian, sup_index, distill_index, order, eps, "g2")


def pcgrad_weights(
    gramian: torch.Tensor,
    order: Sequence[int],
    eps: float = PROJECTION_EPS,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, ProjectionStats]:
    """G1 coefficients: symmetric PCGrad over all K rows, ``order`` a permutation of range(K).

    Each row, starting from its original, is projected against every other ORIGINAL row in ``order`` when their dot
    is negative; the coefficients of the sum. ``names`` label the rows in the statistics (default: positions).
    """
    gram = _host(gramian)
    size = gram.shape[0]
    order = check_order(order, range(size), "order")
    labels = [str(k) for k in range(size)] if names is None else list(names)
    if len(labels) != size:
        raise ValueError(f"names has {len(labels)} entries for {size} Gramian rows")
    stats = ProjectionStats("g1", tuple(labels[k] for k in order))
    vectors = {k: _unit(size, k) for k in range(size)}
    total = _pairwise(gram, vectors, order, eps, stats.stage1, dict(enumerate(labels)))
    stats.amplification = _amplification(gram, total)
    return total.to(gramian.device), stats


def none_weights(
    gramian: torch.Tensor, sup_index: Mapping[str, int], distill_index: Mapping[str, int]
) -> tuple[torch.Tensor, ProjectionStats]:
    """No projection: coefficient 1 on every sup and distill row, 0 on rows that neither names."""
    gram = _host(gramian)
    _check_rows(gram.shape[0], sup_index, distill_index)
    coefficients = torch.zeros(gram.shape[0], dtype=torch.float64)
    coefficients[[*sup_index.values(), *distill_index.values()]] = 1.0
    return coefficients.to(gramian.device), ProjectionStats(
        "none", amplification=_amplification(gram, coefficients)
    )


AnchorShare = Literal["per_follower", "once"]
ANCHOR_SHARES = ("per_follower", "once")


def teacher_grouped_weights(
    gramian: torch.Tensor,
    sup_index: int,
    follower_index: Mapping[str, int],
    order: Sequence[str],
    eps: float = PROJECTION_EPS,
    *,
    symmetric: bool = False,
    anchor_share: AnchorShare = "per_follower",
) -> tuple[torch.Tensor, ProjectionStats]:
    """AGP (or G2 with ``symmetric``) of the teacher grouping, as coefficients over the Gramian's rows.

    Stage 1: each follower f_k (one per teacher term) is projected onto the normal plane of the anchor g_sup on
    conflict (G2: the anchor is projected against f_k too) and merged: m_k = a + f_k', with a = g_sup
    (``per_follower``: the anchor enters the sum once per follower, as the released code does) or g_sup / K
    (``once``: without conflicts the update is g_sup + sum_k f_k, the same as no projection). Stage 2: each m_k
    projected, on conflict, against every other ORIGINAL m_j in ``order`` (a permutation of the teachers); the
    coefficients of the sum.
    """
    gram = _host(gramian)
    size = gram.shape[0]
    _check_rows(size, {SUP: sup_index, **follower_index}, {})
    if anchor_share not in ANCHOR_SHARES:
        raise ValueError(f"anchor_share must be one of {ANCHOR_SHARES}, got {anchor_share!r}")
    order = check_order(order, list(follower_index), "order")
    stats = ProjectionStats("g2" if symmetric else "agp", tuple(order))
    sup = _unit(size, sup_index)
    merged = {}
    for k in order:
        follower = _unit(size, follower_index[k])
        follower, stats.stage1[k, SUP] = _project(gram, follower, sup, eps)
        anchor = sup
        if symmetric:
            anchor, stats.stage1[SUP, k] = _project(gram, sup, _unit(size, follower_index[k]), eps)
        merged[k] = (anchor / len(order) if anchor_share == "once" else anchor) + follower
    total = _pairwise(gram, merged, order, eps, stats.stage2, {k: k for k in order})
    stats.amplification = _amplification(gram, total)
    return total.to(gramian.device), stats


def combine_teacher_weights(
    method: str,
    gramian: torch.Tensor,
    sup_index: int,
    follower_index: Mapping[str, int],
    generator: torch.Generator,
    eps: float = PROJECTION_EPS,
    anchor_share: AnchorShare = "per_follower",
) -> tuple[torch.Tensor, ProjectionStats]:
    """Coefficients of ``method`` in the teacher grouping, its order drawn by ``stage2_order``.

    ``none``: 1 on the anchor and every follower (g_sup + sum_k f_k); G1: PCGrad over the anchor and the
    followers; AGP / G2: :func:`teacher_grouped_weights` over a random order of the teachers.
    """
    if method not in METHODS:
        raise ValueError(f"unknown gradient method {method!r}; choose one of {METHODS}")
    rows = [sup_index, *follower_index.values()]
    if method == "none":
        return none_weights(gramian, {SUP: sup_index, **follower_index}, {})
    if method == "g1":
        sub = gramian[rows][:, rows]
        names = [SUP, *follower_index]
        partial, stats = pcgrad_weights(sub, stage2_order(generator, range(len(rows))), eps, names)
        coefficients = torch.zeros(gramian.shape[0], dtype=torch.float64, device=gramian.device)
        coefficients[rows] = partial
        return coefficients, stats
    order = stage2_order(generator, list(follower_index))
    return teacher_grouped_weights(
        gramian, sup_index, follower_index, order, eps, symmetric=method == "g2", anchor_share=anchor_share
    )


def stage2_order(generator: torch.Generator, items: Sequence[Any]) -> list[Any]:
    """A random permutation of ``items`` from ``torch.randperm(..., generator=generator)``.

    Seed ``generator`` (a CPU generator) identically on every rank and draw once per optimizer step on every rank,
    so all ranks use the same order; save ``generator.get_state()`` with checkpoints for an exact resume.
    """
    items = list(items)
    return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]


def combine_weights(
    method: str,
    gramian: torch.Tensor,
    sup_index: Mapping[str, int],
    distill_index: Mapping[str, int],
    generator: torch.Generator,
    eps: float = PROJECTION_EPS,
) -> tuple[torch.Tensor, ProjectionStats]:
    """Coefficients of ``method`` (``none``, ``g1``, ``g2``, ``agp``) with its order drawn by ``stage2_order``.

    AGP and G2 permute the capabilities (taken in row order); G1 permutes the sup and distill rows and leaves any
    other row of the Gramian at coefficient 0. ``none`` draws nothing.
    """
    if method not in METHODS:
        raise ValueError(f"unknown gradient method {method!r}; choose one of {METHODS}")
    if method == "none":
        return none_weights(gramian, sup_index, distill_index)
    _check_rows(gramian.shape[0], sup_index, distill_index)
    if method == "g1":
        labelled = {r: row_name(c, SUP) for c, r in sup_index.items()}
        labelled.update({r: row_name(c, DISTILL) for c, r in distill_index.items()})
        rows = sorted(labelled)
        sub = gramian[rows][:, rows]
        partial, stats = pcgrad_weights(
            sub, stage2_order(generator, range(len(rows))), eps, [labelled[r] for r in rows]
        )
        coefficients = torch.zeros(gramian.shape[0], dtype=torch.float64, device=gramian.device)
        coefficients[rows] = partial
        return coefficients, stats
    capabilities = sorted(sup_index, key=sup_index.__getitem__)
    weights = agp_weights if method == "agp" else g2_weights
    return weights(gramian, sup_index, distill_index, stage2_order(generator, capabilities), eps)
