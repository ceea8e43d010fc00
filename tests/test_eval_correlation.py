"""Reasoning-planning correlation (eq. 24) against naive Pearson and Spearman written from their definitions."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from drivekd.data.schema import Sample
from drivekd.evaluation.correlation import correlate, image_scores, reasoning_planning_correlation
from drivekd.evaluation.scoring import EvalItem

CAPABILITY = {
    "perception": "perception",
    "prediction": "reasoning",
    "behavior": "reasoning",
    "planning": "planning",
}


def _item(sample_id: str, task: str, frame: str) -> EvalItem:
    sample = Sample(
        id=sample_id,
        images=[
            {"camera": "CAM_FRONT", "path": f"{frame}/front.jpg"},
            {"camera": "CAM_BACK", "path": f"{frame}/b.jpg"},
        ],
        question="Q?",
        capability=CAPABILITY[task],
        task=task,
        kind="open",
        answer="go",
    )
    return EvalItem(sample, "p", "planning_vqa")


def _pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def _ranks(values):
    """Average ranks (1-based), ties sharing the mean of their positions."""
    order = sorted(range(len(values)), key=lambda k: values[k])
    ranks = [0.0] * len(values)
    k = 0
    while k < len(order):
        j = k
        while j + 1 < len(order) and values[order[j + 1]] == values[order[k]]:
            j += 1
        for m in range(k, j + 1):
            ranks[order[m]] = (k + j) / 2 + 1
        k = j + 1
    return ranks


def test_image_scores_follow_eq_24():
    items = [
        _item("r1", "prediction", "f1"),
        _item("r2", "behavior", "f1"),
        _item("p1", "planning", "f1"),
        _item("p2", "planning", "f1"),
        _item("x", "perception", "f1"),
        _item("r3", "behavior", "f2"),  # no planning question: left out
        _item("p3", "planning", "f3"),  # no reasoning question: left out
    ]
    scores = {"r1": 10.0, "r2": 30.0, "p1": 50.0, "p2": 70.0, "x": 99.0, "r3": 5.0, "p3": 1.0}
    assert image_scores(items, scores) == {"f1/b.jpg|f1/front.jpg": (20.0, 60.0)}


values = st.floats(0, 100, allow_nan=False).map(lambda v: round(v, 1))


@settings(deadline=None)
@given(st.lists(st.tuples(values, values), min_size=3, max_size=25))
def test_correlate_matches_the_definitions(pairs):
    r, p = zip(*pairs, strict=True)
    assume(len(set(r)) > 1 and len(set(p)) > 1)
    out = correlate(pairs)
    assert out["images"] == len(pairs)
    assert out["pearson"] == pytest.approx(_pearson(r, p), abs=1e-7)
    assert out["spearman"] == pytest.approx(_pearson(_ranks(r), _ranks(p)), abs=1e-7)
    assert 0.0 <= out["pearson_p"] <= 1.0


def test_undefined_correlations_are_none():
    assert correlate([(1.0, 2.0), (2.0, 3.0)])["pearson"] is None
    assert correlate([(1.0, 2.0), (1.0, 3.0), (1.0, 5.0)])["spearman"] is None


def test_reasoning_planning_correlation_end_to_end():
    items, scores = [], {}
    for frame, (r, p) in enumerate([(10, 20), (40, 35), (60, 70), (80, 65)]):
        items += [_item(f"r{frame}", "prediction", f"f{frame}"), _item(f"p{frame}", "planning", f"f{frame}")]
        scores |= {f"r{frame}": float(r), f"p{frame}": float(p)}
    out = reasoning_planning_correlation(items, scores)
    assert out["images"] == 4
    assert out["pearson"] == pytest.approx(_pearson([10, 40, 60, 80], [20, 35, 70, 65]))
    assert out["spearman"] == pytest.approx(0.8)
