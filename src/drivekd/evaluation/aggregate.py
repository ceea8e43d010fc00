"""Judge scores aggregated per DriveBench task, per rubric and per Drive-KD capability, over N grading runs.

Three outcomes are kept apart. A sample with no prediction is the model's failure: it scores 0 in every run and is
listed. An unparsed reply and a failed call are not grades: they never enter a mean, are counted per task and
listed, so a judge outage shows as missing grades instead of as low scores. For each run, a group's score is the
mean of the totals (0..100, a percentage) of the samples that run graded (missing predictions included as 0); a
run that graded none of a group's samples has no score for it (``None``). A capability pools its samples
(reasoning = prediction + behavior, section 4.1); the overall average is the mean of the capability scores, as in
Table 1, and has no value in a run where a capability has none. Across runs each score is reported as the mean and
the sample standard deviation (eq. 29) of the runs that have a value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from drivekd.data.schema import CAPABILITIES, TASK_TO_CAPABILITY
from drivekd.evaluation.judge import JudgeResult
from drivekd.evaluation.scoring import OVERALL, EvalItem


def sample_std(values: Sequence[float]) -> float | None:
    """Eq. 29: sqrt(sum (s_i - mean)^2 / (n - 1)); ``None`` for fewer than two runs."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def run_stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (eq. 29) over the runs that have a value, and the per-run values
    (``None`` where a run graded nothing); the mean is ``None`` when no run has a value."""
    present = [v for v in values if v is not None]
    mean = sum(present) / len(present) if present else None
    return {"mean": mean, "std": sample_std(present), "runs": list(values)}


def score_table(
    items: Sequence[EvalItem], results: Iterable[JudgeResult], runs: int
) -> dict[str, list[float | None]]:
    """Per judged sample id, its score in each run: the grade, 0 for a missing prediction, ``None`` where the run
    made no grade (an unparsed reply or a failed call)."""
    table: dict[str, list[float | None]] = {
        i.sample.id: [0.0 if i.prediction is None else None] * runs for i in items if i.rubric is not None
    }
    for r in results:
        if r.sample_id in table and r.status == "ok":
            table[r.sample_id][r.run] = r.score
    return table


def _mean_of_graded(values: Iterable[float | None]) -> float | None:
    graded = [v for v in values if v is not None]
    return sum(graded) / len(graded) if graded else None


def _group_means(
    groups: dict[str, list[str]], table: dict[str, list[float | None]], runs: int
) -> dict[str, Any]:
    return {
        name: {
            **run_stats([_mean_of_graded(table[i][r] for i in ids) for r in range(runs)]),
            "samples": len(ids),
            "graded": [sum(table[i][r] is not None for i in ids) for r in range(runs)],
        }
        for name, ids in groups.items()
        if ids
    }


def _overall_run(capabilities: dict[str, Any], run: int) -> float | None:
    values = [c["runs"][run] for c in capabilities.values()]
    return None if None in values else sum(values) / len(values)


def status_counts(results: Iterable[JudgeResult]) -> dict[str, int]:
    """How many gradings were made (``ok``) and how many were not (``unparsed`` replies, ``failed`` calls)."""
    results = list(results)
    return {s: sum(r.status == s for r in results) for s in ("ok", "unparsed", "failed")}


def accounting(results: Sequence[JudgeResult]) -> dict[str, int]:
    """Calls made (retries included), cache hits and tokens spent by this invocation."""
    return {
        "calls": sum(r.calls for r in results),
        "cache_hits": sum(r.cached for r in results),
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "completion_tokens": sum(r.completion_tokens for r in results),
    }


def aggregate_judge(items: Sequence[EvalItem], results: Sequence[JudgeResult], runs: int) -> dict[str, Any]:
    """Scores per task, rubric, capability and overall, the listed failures and the call/token accounting."""
    judged = [i for i in items if i.rubric is not None]
    table = score_table(items, results, runs)
    by_task: dict[str, list[str]] = {}
    by_rubric: dict[str, list[str]] = {}
    by_capability: dict[str, list[str]] = {c: [] for c in CAPABILITIES}
    for item in judged:
        s = item.sample
        by_task.setdefault(s.task, []).append(s.id)
        by_rubric.setdefault(item.rubric or "", []).append(s.id)
        by_capability[TASK_TO_CAPABILITY[s.task]].append(s.id)
    capabilities = _group_means(by_capability, table, runs)
    task_of = {i.sample.id: i.sample.task for i in judged}
    failures: list[dict[str, Any]] = [
        {"id": i.sample.id, "task": i.sample.task, "run": None, "status": "missing", "error": "no prediction"}
        for i in judged
        if i.prediction is None
    ]
    failures += [
        {
            "id": r.sample_id,
            "task": task_of.get(r.sample_id),
            "run": r.run,
            "status": r.status,
            "error": r.error,
        }
        for r in results
        if r.status != "ok"
    ]
    per_task_counts = {
        task: {
            **status_counts(r for r in results if task_of.get(r.sample_id) == task),
            "missing_predictions": sum(i.prediction is None for i in judged if i.sample.task == task),
        }
        for task in by_task
    }
    return {
        "runs": runs,
        "per_task": _group_means(by_task, table, runs),
        "per_rubric": _group_means(by_rubric, table, runs),
        "per_capability": capabilities,
        OVERALL: run_stats([_overall_run(capabilities, r) for r in range(runs)]) if capabilities else None,
        "counts": {
            "judged_samples": len(judged),
            "gradings": len(results),
            **status_counts(results),
            "missing_predictions": sum(i.prediction is None for i in judged),
            "per_task": per_task_counts,
        },
        "failures": failures,
        "accounting": accounting(results),
    }


def mean_scores(table: dict[str, list[float | None]]) -> dict[str, float]:
    """Each sample's score averaged over the runs that graded it (the s_i of eq. 24); a sample no run graded is
    left out."""
    means = {k: _mean_of_graded(v) for k, v in table.items()}
    return {k: v for k, v in means.items() if v is not None}
