"""Bootstrap intervals for Table 1's average, over questions and training seeds, and paired comparisons.

A method's score is a matrix ``scores[seed, question]`` (the judge's mean over its runs, or 1/0 for a correct MCQ,
as a percentage) with each question assigned to a capability. The statistic is Table 1's Avg.: the mean over
capabilities of the per-capability mean over questions, averaged over seeds. One bootstrap resample draws the seeds
with replacement and, within every capability, the questions with replacement (so each capability keeps its size
and the average keeps its definition); the 95% interval is the 2.5th-97.5th percentile of the resampled statistic.

Two methods evaluated on the same questions with the same seeds are compared on the same resamples (a paired
bootstrap): seed ``s`` of one is paired with seed ``s`` of the other (the same initialisation and data order), so
the question-to-question and seed-to-seed variation they share cancels. The two-sided p-value of "no difference" is
``min(1, 2 * min(P(d* <= 0), P(d* >= 0)))`` over the resampled differences ``d*``, each share counted with the +1 of
an exact Monte-Carlo test so that it is never 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from drivekd.errors import DriveKDError

RESAMPLES = 10_000
LEVEL = 0.95
_CHUNK = 500  # resamples drawn at once (bounds memory at chunk x questions)


class BootstrapError(DriveKDError):
    """The score matrices cannot be bootstrapped (shapes, missing values, empty capabilities)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL

    def text(self, digits: int = 2) -> str:
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass(frozen=True)
class Comparison:
    """``a - b`` on the average, its paired bootstrap interval and two-sided p-value, and the data behind it."""

    difference: Interval
    p_value: float
    questions: int
    seeds: int
    resamples: int


def table_average(scores: np.ndarray, groups: np.ndarray) -> float:
    """Table 1's Avg. of a ``(seeds, questions)`` matrix: mean over groups of the group's mean, over seeds."""
    per_question = np.asarray(scores, dtype=np.float64).mean(axis=0)
    return float(np.mean([per_question[groups == g].mean() for g in np.unique(groups)]))


def _check(scores: np.ndarray, groups: np.ndarray) -> None:
    if scores.ndim != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise BootstrapError(
            f"scores must be a (seeds, questions) matrix with both >= 1, got shape {scores.shape}"
        )
    if groups.shape != (scores.shape[1],):
        raise BootstrapError(f"{groups.shape[0]} capability labels for {scores.shape[1]} questions")
    if not np.isfinite(scores).all():
        raise BootstrapError(
            "scores hold missing or non-finite values: keep only questions scored in every seed"
        )


def _resampled(matrices: Sequence[np.ndarray], groups: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The statistic of each matrix on the same ``resamples`` resamples: shape ``(len(matrices), resamples)``."""
    rng = np.random.default_rng(seed)
    seeds = matrices[0].shape[0]
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    out = np.empty((len(matrices), resamples))
    for start in range(0, resamples, _CHUNK):
        n = min(_CHUNK, resamples - start)
        # seed weights: how often each seed was drawn, over the number of seeds
        seed_weights = np.stack(
            [np.bincount(rng.integers(0, seeds, seeds), minlength=seeds) for _ in range(n)]
        )
        seed_weights = seed_weights / seeds
        picks = [idx[rng.integers(0, idx.size, (n, idx.size))] for idx in members]
        for m, matrix in enumerate(matrices):
            per_question = seed_weights @ matrix  # (n, questions): each resample's seed mean per question
            capability_means = [np.take_along_axis(per_question, pick, axis=1).mean(axis=1) for pick in picks]
            out[m, start : start + n] = np.mean(capability_means, axis=0)
    return out


def _interval(estimate: float, draws: np.ndarray, level: float) -> Interval:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return Interval(estimate, float(low), float(high), level)


def bootstrap_average(
    scores: np.ndarray, groups: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> Interval:
    """Table 1's Avg. of ``scores`` with its bootstrap interval over questions (within capability) and seeds."""
    scores, groups = np.asarray(scores, dtype=np.float64), np.asarray(groups)
    _check(scores, groups)
    draws = _resampled([scores], groups, resamples, seed)[0]
    return _interval(table_average(scores, groups), draws, level)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    groups: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Comparison:
    """``avg(a) - avg(b)`` on the same questions and seeds, with its paired interval and p-value."""
    a, b, groups = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), np.asarray(groups)
    _check(a, groups)
    _check(b, groups)
    if a.shape != b.shape:
        raise BootstrapError(
            f"paired methods need the same seeds and questions: shapes {a.shape} vs {b.shape}"
        )
    draws = _resampled([a, b], groups, resamples, seed)
    diff = draws[0] - draws[1]
    below = (np.count_nonzero(diff <= 0) + 1) / (resamples + 1)
    above = (np.count_nonzero(diff >= 0) + 1) / (resamples + 1)
    estimate = table_average(a, groups) - table_average(b, groups)
    return Comparison(
        difference=_interval(estimate, diff, level),
        p_value=min(1.0, 2.0 * min(below, above)),
        questions=a.shape[1],
        seeds=a.shape[0],
        resamples=resamples,
    )


def score_matrices(
    methods: Sequence[Sequence[Mapping[str, float | None]]], capability: Mapping[str, str]
) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """One ``(seeds, questions)`` matrix per method from its ``{question id: score}`` mapping per seed, over the
    questions every method scored in every seed (a failed grading is not a zero), with ``groups`` (capability
    indices in ``capability``'s order of first appearance) and the question ids kept."""
    if not methods or any(not runs for runs in methods):
        raise BootstrapError("every method needs at least one seed to bootstrap")
    ids = [q for q in capability if all(run.get(q) is not None for runs in methods for run in runs)]
    if not ids:
        raise BootstrapError("no question has a score in every seed of every method")
    names = list(dict.fromkeys(capability[q] for q in ids))
    groups = np.array([names.index(capability[q]) for q in ids])
    matrices = [np.array([[float(run[q]) for q in ids] for run in runs]) for runs in methods]  # type: ignore[arg-type]
    return matrices, groups, ids
