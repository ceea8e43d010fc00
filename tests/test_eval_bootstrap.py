"""Bootstrap intervals over questions and seeds (Table 1's Avg.) and the paired comparison, against exact references."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivekd.evaluation.bootstrap import (
    BootstrapError,
    _resampled,
    bootstrap_average,
    paired_bootstrap,
    score_matrices,
    table_average,
)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _matrix(seed: int, seeds: int, questions: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = np.arange(questions) % 3
    return rng.uniform(0, 100, (seeds, questions)), groups


def test_table_average_is_the_mean_of_capability_means_over_seeds() -> None:
    scores = np.array([[10.0, 20.0, 30.0, 90.0], [30.0, 40.0, 50.0, 70.0]])
    groups = np.array([0, 0, 0, 1])  # three questions of one capability, one of another
    # seed means per question: 20, 30, 40, 80 -> capability means 30 and 80 -> 55 (not the question mean 42.5)
    assert table_average(scores, groups) == pytest.approx(55.0)


def test_resampling_matches_the_exact_bootstrap_distribution() -> None:
    """Two seeds x two questions of one capability: 4 seed draws x 4 question draws, all equally likely."""
    scores = np.array([[0.0, 10.0], [100.0, 40.0]])
    exact: Counter[float] = Counter()
    for s in itertools.product(range(2), repeat=2):
        for q in itertools.product(range(2), repeat=2):
            exact[round(float(scores[list(s)][:, list(q)].mean()), 6)] += 1 / 16
    draws = _resampled([scores], np.zeros(2, dtype=int), 40_000, seed=3)[0]
    seen = Counter(round(float(d), 6) for d in draws)
    assert set(seen) <= set(exact)
    for value, probability in exact.items():
        assert seen[value] / draws.size == pytest.approx(probability, abs=0.01)


def test_one_seed_interval_width_matches_the_standard_error_of_stratified_means() -> None:
    rng = np.random.default_rng(0)
    sizes = (300, 150, 450)
    groups = np.repeat(np.arange(3), sizes)
    scores = rng.uniform(0, 100, (1, groups.size))
    se = np.sqrt(sum(scores[0, groups == g].var() / n for g, n in enumerate(sizes))) / 3
    interval = bootstrap_average(scores, groups, resamples=8000, seed=1)
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * se, rel=0.08)
    assert interval.low < interval.estimate < interval.high


def test_seed_spread_adds_its_variance_to_the_question_variance() -> None:
    """Scores = question effect + seed offset: a resample's Avg. is a question mean plus a seed mean, independent,
    so its variance is the sum of the two bootstrap variances (population variances over n)."""
    rng = np.random.default_rng(0)
    groups = np.zeros(400, dtype=int)
    questions = rng.uniform(0, 100, (1, 400))
    offsets = np.array([[-6.0], [0.0], [6.0], [-3.0], [3.0]])
    se = np.sqrt(questions.var() / 400 + offsets.var() / 5)
    interval = bootstrap_average(questions + offsets, groups, resamples=8000, seed=2)
    alone = bootstrap_average(questions, groups, resamples=8000, seed=2)
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert interval.high - interval.low > 1.3 * (alone.high - alone.low)


@SETTINGS
@given(
    seed=st.integers(0, 10_000), seeds=st.integers(1, 4), shift=st.floats(-50, 50), scale=st.floats(0.1, 10)
)
def test_interval_is_equivariant_under_affine_changes_of_the_scores(
    seed: int, seeds: int, shift: float, scale: float
) -> None:
    scores, groups = _matrix(seed, seeds, 30)
    base = bootstrap_average(scores, groups, resamples=300, seed=seed)
    moved = bootstrap_average(scores * scale + shift, groups, resamples=300, seed=seed)
    for field in ("estimate", "low", "high"):
        assert getattr(moved, field) == pytest.approx(getattr(base, field) * scale + shift, abs=1e-7)
    assert base.low <= base.high


@SETTINGS
@given(seed=st.integers(0, 10_000), seeds=st.integers(1, 4))
def test_paired_comparison_of_a_method_with_itself_is_zero_with_p_one(seed: int, seeds: int) -> None:
    scores, groups = _matrix(seed, seeds, 24)
    result = paired_bootstrap(scores, scores, groups, resamples=200, seed=seed)
    assert (result.difference.estimate, result.difference.low, result.difference.high) == (0.0, 0.0, 0.0)
    assert result.p_value == 1.0


@SETTINGS
@given(seed=st.integers(0, 10_000), delta=st.floats(0.5, 20))
def test_a_constant_improvement_is_recovered_exactly_and_is_significant(seed: int, delta: float) -> None:
    b, groups = _matrix(seed, 3, 24)
    result = paired_bootstrap(b + delta, b, groups, resamples=999, seed=seed)
    assert result.difference.low == pytest.approx(delta) and result.difference.high == pytest.approx(delta)
    assert result.p_value == pytest.approx(2 / 1000)  # the smallest p-value of 999 resamples


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_paired_comparison_is_antisymmetric(seed: int) -> None:
    a, groups = _matrix(seed, 3, 30)
    b, _ = _matrix(seed + 1, 3, 30)
    ab = paired_bootstrap(a, b, groups, resamples=400, seed=seed)
    ba = paired_bootstrap(b, a, groups, resamples=400, seed=seed)
    assert ab.difference.estimate == pytest.approx(-ba.difference.estimate)
    assert ab.difference.low == pytest.approx(-ba.difference.high)
    assert ab.p_value == pytest.approx(ba.p_value)


def test_pairing_removes_shared_question_difficulty() -> None:
    """Questions differ a lot in difficulty; b is a plus noise: paired, the small edge of a is found."""
    rng = np.random.default_rng(4)
    groups = np.arange(600) % 3
    difficulty = rng.uniform(0, 100, (1, 600))
    a = difficulty + 2.0 + rng.normal(0, 1, (3, 600))
    b = difficulty + rng.normal(0, 1, (3, 600))
    paired = paired_bootstrap(a, b, groups, resamples=2000)
    alone_a, alone_b = (
        bootstrap_average(a, groups, resamples=2000),
        bootstrap_average(b, groups, resamples=2000),
    )
    assert paired.difference.low > 0 and paired.p_value < 0.01
    assert alone_a.low < alone_b.high  # the unpaired intervals overlap


def test_score_matrices_keep_questions_scored_everywhere() -> None:
    capability = {"q1": "perception", "q2": "planning", "q3": "perception", "q4": "reasoning"}
    a = [{"q1": 50.0, "q2": 20.0, "q3": None, "q4": 10.0}, {"q1": 60.0, "q2": 30.0, "q3": 5.0, "q4": 20.0}]
    b = [{"q1": 1.0, "q2": 2.0, "q3": 3.0}]  # q4 never scored for b
    (ma, mb), groups, ids = score_matrices([a, b], capability)
    assert ids == ["q1", "q2"]
    assert ma.tolist() == [[50.0, 20.0], [60.0, 30.0]] and mb.tolist() == [[1.0, 2.0]]
    assert groups.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (np.array([[1.0, np.nan]]), np.array([[1.0, 2.0]]), "non-finite"),
        (np.ones((2, 2)), np.ones((3, 2)), "same seeds and questions"),
        (np.ones((1, 3)), np.ones((1, 3)), "3 questions"),
    ],
)
def test_bad_matrices_are_refused_with_the_reason(a: np.ndarray, b: np.ndarray, message: str) -> None:
    with pytest.raises(BootstrapError, match=message):
        paired_bootstrap(a, b, np.zeros(2, dtype=int), resamples=10)


def test_score_matrices_refuse_when_nothing_is_common() -> None:
    with pytest.raises(BootstrapError, match="no question"):
        score_matrices([[{"q1": None}]], {"q1": "planning"})
