"""`drivekd eval score`: every score of one model's predictions in one JSON-ready report.

MCQ accuracy in both extraction modes and yes/no accuracy always; with a judge config, N judge runs aggregated
per task / rubric / capability (mean and sample std, eq. 29), the reasoning-planning correlation (eq. 24) and the
per-sample scores; optionally the DriveLM metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import openai

from drivekd.data.schema import Sample
from drivekd.evaluation.aggregate import aggregate_judge, mean_scores, score_table
from drivekd.evaluation.choices import CHOICE_MODES
from drivekd.evaluation.correlation import reasoning_planning_correlation
from drivekd.evaluation.drivelm_metrics import drivelm_metrics
from drivekd.evaluation.judge import JudgeConfig, public_config, run_judge
from drivekd.evaluation.scoring import choice_accuracy, join, judge_tasks, yes_no_accuracy


def score(
    samples: Sequence[Sample],
    predictions: Mapping[str, str],
    *,
    model: str,
    judge: JudgeConfig | None = None,
    client: openai.AsyncOpenAI | None = None,
    drivelm: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The score report of ``predictions`` (by sample id) on ``samples``."""
    items, unknown = join(samples, predictions)
    report: dict[str, Any] = {
        "model": model,
        "samples": len(items),
        "predictions": len(predictions),
        "missing_predictions": [i.sample.id for i in items if i.prediction is None],
        "unknown_predictions": unknown,
        "mcq": {mode: choice_accuracy(items, mode) for mode in CHOICE_MODES},
        "yes_no": yes_no_accuracy(items),
    }
    if judge is not None:
        results = run_judge(judge_tasks(items), judge, client=client, progress=progress)
        table = score_table(items, results, judge.runs)
        report["judge"] = {"config": public_config(judge), **aggregate_judge(items, results, judge.runs)}
        report["correlation"] = reasoning_planning_correlation(items, mean_scores(table))
        report["per_sample"] = [
            {
                "id": i.sample.id,
                "task": i.sample.task,
                "rubric": i.rubric,
                "image": i.image_key,
                "scores": table[i.sample.id],
            }
            for i in items
            if i.rubric is not None
        ]
    if drivelm:
        report["drivelm"] = drivelm_metrics(items)
    return report
