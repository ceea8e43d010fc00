"""Teacher mixing (eqs. 17, 26) and the combination rows that AGP, G1 and G2 act on.

The engine computes a Gramian over *atomic* loss terms ``(capability, loss)``: ``(c, "ce")`` is L_sup on the batch
of capability c and ``(c, t)`` is teacher t's attention loss L_t on that batch, teachers being named by the
capability they specialise in (``"perception"`` = p, ``"reasoning"`` = r, ``"planning"`` = pl). The projections act
on linear combinations of those terms (eq. 17, section 3.4.2), one or two rows per capability c:

    sup row      ``c:sup``      w_ce * L_sup(c)
    distill row  ``c:distill``  sum_t pi_{c,t} w_t L_t(c)

stacked as a matrix A (rows x atomic terms). The Gramian of the rows is A G A^T (``combination_gramian``) and row
coefficients c become atomic coefficients A^T c (``atomic_coefficients``), so one backward of
sum_m (A^T c)_m L_m applies the combined update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from drivekd.data.schema import CAPABILITIES

CE = "ce"
SUP = "sup"
DISTILL = "distill"
PROJECTION_EPS = 1e-20  # appendix D.1: added to every ||g||^2 denominator
# Eq. 26: rows are the batch capability, columns the teacher (p, r, pl), both in CAPABILITIES order.
DEFAULT_PI: tuple[tuple[float, ...], ...] = ((0.8, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.1, 0.8))

Term = tuple[str, str]


@dataclass(frozen=True)
class Combination:
    """The rows the projections act on: ``matrix`` (R, M) float64 over the atomic ``terms``, row names ``rows``
    and, per capability, the row of its anchor (``sup_index``) and of its mixed distillation (``distill_index``;
    absent when the capability has no distillation term)."""

    matrix: torch.Tensor
    rows: tuple[str, ...]
    sup_index: dict[str, int]
    distill_index: dict[str, int]


def row_name(capability: str, part: str) -> str:
    """Name of a combination row, e.g. ``perception:sup``; also the key of stage-1 projection statistics."""
    return f"{capability}:{part}"


def check_order(order: Sequence[Any], names: Sequence[Any], what: str) -> list[Any]:
    """``order`` as a list after checking that it is a permutation of ``names``."""
    order = list(order)
    if len(order) != len(names) or set(order) != set(names) or len(set(order)) != len(order):
        raise ValueError(f"{what} must be a permutation of {sorted(names, key=str)}, got {order}")
    return order


def pi_matrix(pi: Sequence[Sequence[float]] | torch.Tensor = DEFAULT_PI) -> torch.Tensor:
    """Pi as a checked (3, 3) float64 tensor: finite, non-negative, rows = batch capability, columns = teacher."""
    matrix = torch.as_tensor(pi, dtype=torch.float64).detach().cpu()
    n = len(CAPABILITIES)
    if matrix.shape != (n, n):
        raise ValueError(
            f"Pi must be {n}x{n} (rows {CAPABILITIES} = batch, columns = teacher), got {tuple(matrix.shape)}"
        )
    if not torch.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError(f"Pi entries must be finite and non-negative, got {matrix.tolist()}")
    return matrix


def _check_terms(terms: Sequence[Term]) -> list[Term]:
    terms = [tuple(term) for term in terms]
    allowed = (CE, *CAPABILITIES)
    for i, term in enumerate(terms):
        if len(term) != 2 or term[0] not in CAPABILITIES or term[1] not in allowed:
            raise ValueError(
                f"atomic term {i} is {term!r}: expected (capability, loss) with capability in {CAPABILITIES} "
                f"and loss in {allowed} (a teacher is named by the capability it specialises in)"
            )
    duplicates = sorted({t for t in terms if terms.count(t) > 1})
    if duplicates:
        raise ValueError(f"atomic terms must be distinct; repeated: {duplicates}")
    return terms


def combination_matrix(
    terms: Sequence[Term],
    weights: Mapping[str, float | torch.Tensor],
    pi: Sequence[Sequence[float]] | torch.Tensor = DEFAULT_PI,
) -> Combination:
    """Rows ``c:sup`` = w_ce L_sup(c) and ``c:distill`` = sum_t pi_{c,t} w_t L_t(c) over the atomic ``terms`` (eq. 17).

    ``weights`` maps ``"ce"`` and each teacher present to its current weight (floats or tensors, read as
    constants). Capabilities come in ``CAPABILITIES`` order, each as its sup row then its distill row; a capability
    without distillation terms gets no distill row, one without a ``"ce"`` term is refused (it is AGP's anchor).
    """
    terms = _check_terms(terms)
    pi = pi_matrix(pi)
    needed = sorted({loss for _, loss in terms}, key=str)
    missing = [name for name in needed if name not in weights]
    if missing:
        raise ValueError(f"weights lack {missing}; give a weight for 'ce' and every teacher in the terms")
    w = {name: float(weights[name]) for name in needed}
    column = {term: m for m, term in enumerate(terms)}
    rows: list[torch.Tensor] = []
    names: list[str] = []
    sup_index: dict[str, int] = {}
    distill_index: dict[str, int] = {}
    for ci, capability in enumerate(CAPABILITIES):
        teachers = [t for t in CAPABILITIES if (capability, t) in column]
        if (capability, CE) not in column:
            if teachers:
                raise ValueError(
                    f"capability {capability!r} has distillation terms but no ({capability!r}, 'ce') term: the CE "
                    "gradient is the anchor of AGP (eq. 18); add the term"
                )
            continue
        sup = torch.zeros(len(terms), dtype=torch.float64)
        sup[column[capability, CE]] = w[CE]
        sup_index[capability] = len(rows)
        rows.append(sup)
        names.append(row_name(capability, SUP))
        if teachers:
            distill = torch.zeros(len(terms), dtype=torch.float64)
            for t in teachers:
                distill[column[capability, t]] = pi[ci, CAPABILITIES.index(t)] * w[t]
            distill_index[capability] = len(rows)
            rows.append(distill)
            names.append(row_name(capability, DISTILL))
    if not rows:
        raise ValueError("no capability has a 'ce' term; nothing to combine")
    return Combination(torch.stack(rows), tuple(names), sup_index, distill_index)


@dataclass(frozen=True)
class TeacherCombination:
    """The rows of the teacher grouping: ``matrix`` (1 + K, M) float64 over the atomic ``terms``; row
    ``sup_index`` is the anchor w_ce sum_c L_sup(c), ``follower_index[t]`` teacher t's follower
    sum_c pi_{c,t} w_t L_t(c) (each sample's own Pi row, eq. 17)."""

    matrix: torch.Tensor
    rows: tuple[str, ...]
    sup_index: int
    follower_index: dict[str, int]


def teacher_matrix(
    terms: Sequence[Term],
    weights: Mapping[str, float | torch.Tensor],
    pi: Sequence[Sequence[float]] | torch.Tensor = DEFAULT_PI,
) -> TeacherCombination:
    """The anchor row (``"sup"``) and one follower row per teacher present in ``terms``, teachers in
    ``CAPABILITIES`` order. ``weights`` as in ``combination_matrix``."""
    terms = _check_terms(terms)
    pi = pi_matrix(pi)
    if not any(loss == CE for _, loss in terms):
        raise ValueError("no 'ce' term: the CE gradient is the anchor of AGP (eq. 18)")
    missing = sorted({loss for _, loss in terms} - set(weights), key=str)
    if missing:
        raise ValueError(f"weights lack {missing}; give a weight for 'ce' and every teacher in the terms")
    rows = [torch.zeros(len(terms), dtype=torch.float64)]
    names = [SUP]
    followers: dict[str, int] = {}
    for teacher in CAPABILITIES:
        if not any(loss == teacher for _, loss in terms):
            continue
        followers[teacher] = len(rows)
        rows.append(torch.zeros(len(terms), dtype=torch.float64))
        names.append(teacher)
    for m, (capability, loss) in enumerate(terms):
        if loss == CE:
            rows[0][m] = float(weights[CE])
        else:
            c, t = CAPABILITIES.index(capability), CAPABILITIES.index(loss)
            rows[followers[loss]][m] = pi[c, t] * float(weights[loss])
    return TeacherCombination(torch.stack(rows), tuple(names), 0, followers)


def group_matrix(
    terms: Sequence[Term], pi: Sequence[Sequence[float]] | torch.Tensor = DEFAULT_PI, *, mixed: bool = True
) -> tuple[tuple[str, ...], torch.Tensor]:
    """The unweighted loss each reweighting weight multiplies (eq. 17), as rows over the atomic ``terms``.

    ``"ce"``: sum_c L_sup(c), the CE that w_ce scales; teacher t: sum_c pi_{c,t} L_t(c), the loss w_t scales
    (``mixed=False``: sum_c L_t(c), the unmixed loss the released code's reweighting measures).
    Names follow ``weights`` of ``combination_matrix``; groups with no term are left out.
    """
    terms = _check_terms(terms)
    pi = pi_matrix(pi)
    names: list[str] = []
    rows: list[torch.Tensor] = []
    for name in (CE, *CAPABILITIES):
        row = torch.zeros(len(terms), dtype=torch.float64)
        for m, (capability, loss) in enumerate(terms):
            if loss == name:
                mixing = name != CE and mixed
                row[m] = pi[CAPABILITIES.index(capability), CAPABILITIES.index(name)] if mixing else 1.0
        if any(loss == name for _, loss in terms):
            names.append(name)
            rows.append(row)
    return tuple(names), torch.stack(rows)


def combination_gramian(gramian: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Gramian A G A^T of the combinations ``matrix`` (R, M) of M terms whose gradient Gramian is ``gramian`` (M, M).

    Row r of A is the loss sum_m A_rm L_m, whose gradient is sum_m A_rm g_m, so (A G A^T)_rs is the dot product of
    the gradients of rows r and s.
    """
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or matrix.dim() != 2:
        raise ValueError(
            f"need a square Gramian and a 2-D matrix, got {tuple(gramian.shape)}, {tuple(matrix.shape)}"
        )
    if matrix.shape[1] != gramian.shape[0]:
        raise ValueError(
            f"matrix has {matrix.shape[1]} columns but the Gramian covers {gramian.shape[0]} terms"
        )
    a = matrix.to(device=gramian.device, dtype=torch.float64)
    return a @ gramian.to(torch.float64) @ a.T


def atomic_coefficients(matrix: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Atomic-term coefficients A^T c: sum_r c_r (row r) = sum_m (A^T c)_m L_m."""
    if matrix.dim() != 2 or coefficients.shape != (matrix.shape[0],):
        raise ValueError(f"need c of shape ({matrix.shape[0]},) for a {tuple(matrix.shape)} matrix")
    return matrix.to(device=coefficients.device, dtype=torch.float64).T @ coefficients.to(torch.float64)


def row_norms(gramian: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """||grad L_r|| of every row from the rows' own Gramian: sqrt of its diagonal, by row name."""
    squared = torch.diagonal(gramian).detach().to(torch.float64).clamp_min(0.0)
    return {name: float(value) for name, value in zip(names, squared.sqrt().tolist(), strict=True)}


def group_norms(
    gramian: torch.Tensor,
    terms: Sequence[Term],
    pi: Sequence[Sequence[float]] | torch.Tensor = DEFAULT_PI,
    *,
    mixed: bool = True,
) -> dict[str, float]:
    """G_i = ||grad L_i|| for every reweighting group (appendix B.1), from the Gramian of the atomic ``terms``.

    ``row_norms`` of B G B^T with B from ``group_matrix``: no extra backward.
    """
    names, matrix = group_matrix(terms, pi, mixed=mixed)
    return row_norms(combination_gramian(gramian, matrix), names)
