"""Aggregation over judge runs (eq. 29), missing predictions scored 0, failed gradings listed and left out, and the MCQ / yes/no accuracy counts."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivekd.data.schema import Sample
from drivekd.evaluation.aggregate import aggregate_judge, sample_std
from drivekd.evaluation.judge import JudgeResult
from drivekd.evaluation.scoring import EvalItem, choice_accuracy, embedded_predictions, join, yes_no_accuracy

CAPABILITY = {
    "perception": "perception",
    "prediction": "reasoning",
    "behavior": "reasoning",
    "planning": "planning",
}


def _sample(sample_id: str, task: str, kind: str, answer: str, image: str = "f.png", **meta) -> Sample:
    return Sample(
        id=sample_id,
        images=[{"camera": "CAM_FRONT", "path": image}],
        question="Q?",
        capability=CAPABILITY[task],
        task=task,
        kind=kind,
        options={"A": "x", "B": "y", "C": "z"} if kind == "mcq" else None,
        answer=answer,
        meta=meta,
    )


@settings(deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=2, max_size=8))
def test_sample_std_is_eq_29(values):
    mean = sum(values) / len(values)
    naive = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    assert sample_std(values) == pytest.approx(naive, abs=1e-9)
    assert sample_std(values) == pytest.approx(statistics.stdev(values), abs=1e-9)


def test_sample_std_needs_two_runs():
    assert sample_std([42.0]) is None


def test_aggregation_pools_capabilities_scores_missing_zero_and_leaves_failures_out():
    rng = random.Random(0)
    runs = 3
    tasks = ["perception", "prediction", "behavior", "planning"]
    items = [
        EvalItem(_sample(f"s{k}", tasks[k % 4], "open", "go"), None if k == 5 else f"p{k}", f"rubric{k % 4}")
        for k in range(14)
    ]
    items.append(EvalItem(_sample("yn", "prediction", "yes/no", "Yes."), "Yes.", None))  # not judged
    results, truth = [], {}
    for item in items:
        if item.rubric is None or item.prediction is None:
            continue
        for run in range(runs):
            status = rng.choice(["ok", "ok", "ok", "unparsed", "failed"])
            value = rng.uniform(0, 100) if status == "ok" else None
            results.append(
                JudgeResult(item.sample.id, run, status, value, None if value else "boom", 10, 5, 1)
            )
            if status == "ok":
                truth[item.sample.id, run] = value
    out = aggregate_judge(items, results, runs)

    judged = [i for i in items if i.rubric is not None]
    missing = {i.sample.id for i in judged if i.prediction is None}

    def naive_mean(ids, run):
        # a missing prediction scores 0; an unparsed or failed grading is no grade and is left out
        graded = [0.0 if i in missing else truth[i, run] for i in ids if i in missing or (i, run) in truth]
        return sum(graded) / len(graded) if graded else None  # a run that graded none of them has no score

    for capability in ("perception", "reasoning", "planning"):
        ids = [i.sample.id for i in judged if CAPABILITY[i.sample.task] == capability]
        per_run = [naive_mean(ids, r) for r in range(runs)]
        present = [v for v in per_run if v is not None]
        got = out["per_capability"][capability]
        assert got["runs"] == pytest.approx(per_run)
        assert got["mean"] == pytest.approx(sum(present) / len(present))
        assert got["std"] == pytest.approx(statistics.stdev(present))
    for task in tasks:
        ids = [i.sample.id for i in judged if i.sample.task == task]
        assert out["per_task"][task]["runs"] == pytest.approx([naive_mean(ids, r) for r in range(runs)])
    caps = out["per_capability"]
    per_run_caps = [[caps[c]["runs"][r] for c in caps] for r in range(runs)]
    overall = [None if None in v else sum(v) / 3 for v in per_run_caps]
    assert out["overall"]["runs"] == pytest.approx(overall)
    assert any(r.status != "ok" for r in results)  # the seed exercises the left-out case
    listed = {(f["id"], f["run"], f["status"]) for f in out["failures"]}
    expected = {(r.sample_id, r.run, r.status) for r in results if r.status != "ok"} | {
        ("s5", None, "missing")
    }
    assert listed == expected
    assert out["counts"]["missing_predictions"] == 1 and out["counts"]["judged_samples"] == 14
    assert out["accounting"] == {
        "calls": len(results),
        "cache_hits": 0,
        "prompt_tokens": 10 * len(results),
        "completion_tokens": 5 * len(results),
    }


def test_mcq_and_yes_no_accuracy_count_unparsed_and_missing_as_wrong():
    samples = [
        _sample("m1", "perception", "mcq", "B"),
        _sample("m2", "perception", "mcq", "A"),
        _sample("m3", "behavior", "mcq", "C"),
        _sample("m4", "behavior", "mcq", "B"),
        _sample("y1", "prediction", "yes/no", "No."),
        _sample("y2", "prediction", "yes/no", "Yes."),
    ]
    predictions = {
        "m1": "B. It is a car.",  # strict B (right); DriveBench rule A (wrong)
        "m2": "The answer is a car.",  # strict unparsed; DriveBench rule A (right)
        "m3": "Option C",
        "y1": "No, it is not.",
        "y2": "Maybe.",
        "ghost": "A",
    }
    items, unknown = join(samples, predictions)
    assert unknown == ["ghost"]
    strict = choice_accuracy(items, "strict")
    assert strict["perception"] == {"correct": 1, "total": 2, "unparsed": 1, "missing": 0, "accuracy": 50.0}
    assert strict["behavior"] == {"correct": 1, "total": 2, "unparsed": 0, "missing": 1, "accuracy": 50.0}
    assert strict["overall"]["correct"] == 2 and strict["overall"]["total"] == 4
    upstream = choice_accuracy(items, "drivebench")
    assert upstream["perception"]["correct"] == 1 and upstream["overall"]["accuracy"] == 50.0
    assert yes_no_accuracy(items)["prediction"] == {
        "correct": 1,
        "total": 2,
        "unparsed": 1,
        "missing": 0,
        "accuracy": 50.0,
    }


def test_predictions_can_come_from_a_drivebench_file():
    samples = [_sample("a", "perception", "mcq", "B", pred="B"), _sample("b", "perception", "mcq", "A")]
    assert embedded_predictions(samples) == {"a": "B"}
