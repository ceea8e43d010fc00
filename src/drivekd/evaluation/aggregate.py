"""Judge scores aggregated per DriveBench task, per rubric and per Drive-KD capability, over N grading runs.

For each run, a group's score is the mean of its samples' totals (0..100, so the mean is a percentage); a sample
with no prediction, an unparsed reply or a failed call counts as 0 and is listed. A capability pools its samples
(reasoning = prediction + behavior, section 4.1); the overall average is the mean of the capability scores, as in
Table 1. Across runs each score is reported as the mean and the sample standard deviation (eq. 29).
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


def run_stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (eq. 29) and the per-run values."""
    return {"mean": sum(values) / len(values), "std": sample_std(values), "runs": list(values)}


def score_table(
    items: Sequence[EvalItem], results: Iterable[JudgeResult], runs: int
) -> dict[str, list[float]]:
    """Per judged sample id, its score in each run (0 where missing, unparsed or failed)."""
    table = {i.sample.id: [0.0] * runs for i in items if i.rubric is not None}
    for r in results:
        if r.sample_id in table and r.score is not None:
            table[r.sample_id][r.run] = r.score
    return table


def _group_means(groups: dict[str, list[str]], table: dict[str, list[float]], runs: int) -> dict[str, Any]:
    return {
        name: {
            **run_stats([sum(table[i][r] for i in ids) / len(ids) for r in range(runs)]),
            "samples": len(ids),
        }
        for name, ids in groups.items()
        if ids
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
    overall_runs = [sum(c["runs"][r] for c in capabilities.values()) / len(capabilities) for r in range(runs)]
    failures: list[dict[str, Any]] = [
        {"id": i.sample.id, "run": None, "status": "missing", "error": "no prediction"}
        for i in judged
        if i.prediction is None
    ]
    failures += [
        {"id": r.sample_id, "run": r.run, "status": r.status, "error": r.error}
        for r in results
        if r.status != "ok"
    ]
    return {
        "runs": runs,
        "per_task": _group_means(by_task, table, runs),
        "per_rubric": _group_means(by_rubric, table, runs),
        "per_capability": capabilities,
        OVERALL: run_stats(overall_runs) if capabilities else None,
        "counts": {
            "judged_samples": len(judged),
            "gradings": len(results),
            "ok": sum(r.status == "ok" for r in results),
            "unparsed": sum(r.status == "unparsed" for r in results),
            "failed": sum(r.status == "failed" for r in results),
            "missing_predictions": sum(i.prediction is None for i in judged),
        },
        "failures": failures,
        "accounting": {
            "calls": sum(r.calls for r in results),
            "cache_hits": sum(r.cached for r in results),
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "completion_tokens": sum(r.completion_tokens for r in results),
        },
    }


def mean_scores(table: dict[str, list[float]]) -> dict[str, float]:
    """Each sample's score averaged over the runs (the s_i of eq. 24)."""
    return {k: sum(v) / len(v) for k, v in table.items()}
