"""Reference AGP, G2 and G1 (PCGrad) on explicit flat gradient vectors, straight from eqs. 18-23.

For tests and outside checks only: training uses the Gramian form (``drivekd.gradients.gramian``), which never
materialises a flattened gradient. Nothing here calls that code.

``record``, when given, is filled with ``(projected, against) -> fired`` for every conflict check: stage 1 keys
are row names (``perception:distill`` against ``perception:sup``), stage 2 keys are capabilities, G1 keys are
the string positions of ``grads``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from drivekd.gradients.mixing import DISTILL, PROJECTION_EPS, SUP, check_order, row_name

Record = dict[tuple[str, str], bool]


def project_out(
    v: torch.Tensor, onto: torch.Tensor, eps: float = PROJECTION_EPS
) -> tuple[torch.Tensor, bool]:
    """v - (v.u / (||u||^2 + eps)) u if v.u < 0, else v unchanged (eqs. 19, 22); also whether it fired."""
    dot = torch.dot(v, onto)
    if dot < 0:
        return v - dot / (torch.dot(onto, onto) + eps) * onto, True
    return v, False


def agp_merge(
    sup: torch.Tensor, distill: torch.Tensor, eps: float = PROJECTION_EPS
) -> tuple[torch.Tensor, bool]:
    """AGP stage 1 (eqs. 18-20): anchor = sup (never changed), follower = distill projected on conflict; their sum."""
    follower, fired = project_out(distill, sup, eps)
    return sup + follower, fired


def g2_merge(
    sup: torch.Tensor, distill: torch.Tensor, eps: float = PROJECTION_EPS
) -> tuple[torch.Tensor, bool]:
    """G2 stage 1: each of sup and distill projected against the other's original on conflict; their sum."""
    new_sup, fired = project_out(sup, distill, eps)
    new_distill, _ = project_out(distill, sup, eps)  # same dot product, so the same decision
    return new_sup + new_distill, fired


def _pairwise(
    vectors: Mapping[str, torch.Tensor], order: Sequence[str], eps: float, record: Record | None
) -> torch.Tensor:
    """Eqs. 21-23: each vector projected in turn against every other ORIGINAL vector in ``order``; the sum."""
    total = torch.zeros_like(next(iter(vectors.values())))
    for i in order:
        current = vectors[i]
        for j in order:
            if j != i:
                current, fired = project_out(current, vectors[j], eps)
                if record is not None:
                    record[i, j] = fired
        total = total + current
    return total


def _check_vectors(vectors: Sequence[torch.Tensor], what: str) -> None:
    if not vectors:
        raise ValueError(f"{what} is empty")
    size = vectors[0].shape
    for v in vectors:
        if v.dim() != 1 or v.shape != size:
            raise ValueError(
                f"{what} must be 1-D tensors of one length, got shapes {[tuple(u.shape) for u in vectors]}"
            )


def pcgrad(
    grads: Sequence[torch.Tensor],
    order: Sequence[int],
    eps: float = PROJECTION_EPS,
    record: Record | None = None,
) -> torch.Tensor:
    """G1: symmetric PCGrad over ``grads`` with projection order ``order`` (a permutation of their positions)."""
    _check_vectors(list(grads), "grads")
    order = check_order(order, range(len(grads)), "order")
    return _pairwise({str(k): g for k, g in enumerate(grads)}, [str(k) for k in order], eps, record)


def _two_stage(
    sup: Mapping[str, torch.Tensor],
    distill: Mapping[str, torch.Tensor],
    order: Sequence[str],
    symmetric: bool,
    eps: float,
    record: Record | None,
) -> torch.Tensor:
    merge = g2_merge if symmetric else agp_merge
    order = check_order(order, list(sup), "order")
    extra = sorted(set(distill) - set(sup))
    if extra:
        raise ValueError(
            f"distill has capabilities {extra} that sup lacks; every capability needs its CE anchor"
        )
    _check_vectors([*sup.values(), *distill.values()], "sup and distill")
    merged = {}
    for c in order:
        if c in distill:
            merged[c], fired = merge(sup[c], distill[c], eps)
            if record is not None:
                record[row_name(c, DISTILL), row_name(c, SUP)] = fired
                if symmetric:
                    record[row_name(c, SUP), row_name(c, DISTILL)] = fired
        else:
            merged[c] = sup[c]
    return _pairwise(merged, order, eps, record)


def agp(
    sup: Mapping[str, torch.Tensor],
    distill: Mapping[str, torch.Tensor],
    order: Sequence[str],
    eps: float = PROJECTION_EPS,
    record: Record | None = None,
) -> torch.Tensor:
    """AGP (eqs. 18-23): stage-1 anchor/follower merge per capability, then stage 2 in ``order``; the update.

    ``sup`` and ``distill`` map capability -> gradient; a capability missing from ``distill`` merges to its sup.
    """
    return _two_stage(sup, distill, order, False, eps, record)


def g2(
    sup: Mapping[str, torch.Tensor],
    distill: Mapping[str, torch.Tensor],
    order: Sequence[str],
    eps: float = PROJECTION_EPS,
    record: Record | None = None,
) -> torch.Tensor:
    """G2: symmetric CE-vs-distillation projection per capability, then stage 2 as AGP's; the update."""
    return _two_stage(sup, distill, order, True, eps, record)


def _teacher_two_stage(
    sup: torch.Tensor,
    followers: Mapping[str, torch.Tensor],
    order: Sequence[str],
    symmetric: bool,
    eps: float,
    anchor_share: str,
    record: Record | None,
) -> torch.Tensor:
    if anchor_share not in ("per_follower", "once"):
        raise ValueError(f"anchor_share must be 'per_follower' or 'once', got {anchor_share!r}")
    order = check_order(order, list(followers), "order")
    _check_vectors([sup, *followers.values()], "sup and followers")
    merged = {}
    for k in order:
        follower, fired = project_out(followers[k], sup, eps)
        anchor = project_out(sup, followers[k], eps)[0] if symmetric else sup
        if anchor_share == "once":
            anchor = anchor / len(order)
        merged[k] = anchor + follower
        if record is not None:
            record[k, SUP] = fired
    return _pairwise(merged, order, eps, record)


def agp_teacher_grouped(
    sup: torch.Tensor,
    followers: Mapping[str, torch.Tensor],
    order: Sequence[str],
    eps: float = PROJECTION_EPS,
    anchor_share: str = "per_follower",
    record: Record | None = None,
) -> torch.Tensor:
    """AGP in the teacher grouping (the released code's reading of eqs. 18-23); the combined 1-D update.

    ``sup`` is the CE gradient (the anchor); ``followers`` maps each teacher name to its already weighted follower
    gradient (pi_{c,t} w_t grad L_t); ``order`` is the stage-2 order of those names. Stage 1: f_k' = f_k
    projected onto the normal plane of ``sup`` on conflict, merged m_k = sup + f_k' (``per_follower``: the anchor
    enters once per follower) or sup / K + f_k' (``once``). Stage 2: each m_k projected on conflict against every
    other ORIGINAL m_j in ``order``; their sum.
    """
    return _teacher_two_stage(sup, followers, order, False, eps, anchor_share, record)


def g2_teacher_grouped(
    sup: torch.Tensor,
    followers: Mapping[str, torch.Tensor],
    order: Sequence[str],
    eps: float = PROJECTION_EPS,
    anchor_share: str = "per_follower",
    record: Record | None = None,
) -> torch.Tensor:
    """G2 in the teacher grouping: stage 1 projects sup and each follower against the other's original on
    conflict; stage 2 as :func:`agp_teacher_grouped`."""
    return _teacher_two_stage(sup, followers, order, True, eps, anchor_share, record)
