"""`drivekd eval score`: every score of one model's predictions in one JSON-ready report.

MCQ accuracy in both extraction modes and yes/no accuracy always; with a judge config, N judge runs aggregated
per task / rubric / capability (mean and sample std, eq. 29), the reasoning-planning correlation (eq. 24) and the
per-sample scores, with the provenance of every grade: judge protocol, rubric source (ours, or DriveBench's prompts
file and the SHA-256 of its prompt text), judge model, endpoint, temperature and, per sample, the prompt hash.
Questions left out of the judged set (prediction yes/no, as upstream) are counted under ``not_judged``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import openai

from drivekd.data.schema import Sample
from drivekd.evaluation.aggregate import aggregate_judge, mean_scores, score_table
from drivekd.evaluation.cache import prompt_hash
from drivekd.evaluation.choices import CHOICE_MODES
from drivekd.evaluation.correlation import reasoning_planning_correlation
from drivekd.evaluation.judge import JudgeConfig, public_config, run_judge
from drivekd.evaluation.prompts import DriveBenchPrompts, DriveLMPrompt
from drivekd.evaluation.rubrics import NOT_JUDGED_REASON, RUBRICS, SYSTEM_PROMPT, rubric_text
from drivekd.evaluation.scoring import choice_accuracy, join, judge_tasks, yes_no_accuracy


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def provenance(
    config: JudgeConfig, prompts: DriveBenchPrompts | DriveLMPrompt | None = None
) -> dict[str, Any]:
    """What produced the judge's numbers: protocol, rubric source and prompt hashes, model, endpoint, sampling.

    ``temperature`` null means none was sent (the endpoint's default sampling, the drivekd protocol's default).
    """
    if prompts is None:
        templates = {name: _sha256(rubric_text(r)) for name, r in RUBRICS.items()}
        source: dict[str, Any] = {"source": "drivekd", "path": None, "sha256": _sha256(SYSTEM_PROMPT)}
    else:
        templates = prompts.template_sha256() if isinstance(prompts, DriveBenchPrompts) else {}
        kind = "drivebench" if isinstance(prompts, DriveBenchPrompts) else "drivelm"
        source = {"source": kind, "path": prompts.path, "sha256": prompts.sha256}
    return {
        "protocol": config.protocol,
        "rubrics": {**source, "templates": templates},
        "judge_model": config.model,
        "endpoint": config.base_url,
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
        "runs": config.runs,
    }


def score(
    samples: Sequence[Sample],
    predictions: Mapping[str, str],
    *,
    model: str,
    judge: JudgeConfig | None = None,
    client: openai.AsyncOpenAI | None = None,
    prompts: DriveBenchPrompts | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The score report of ``predictions`` (by sample id) on ``samples``; ``prompts`` (with the drivebench judge
    protocol) judges with DriveBench's own rubric prompts instead of ours."""
    items, unknown = join(samples, predictions)
    not_judged = [i.sample.id for i in items if i.rubric is None]
    report: dict[str, Any] = {
        "model": model,
        "samples": len(items),
        "predictions": len(predictions),
        "missing_predictions": [i.sample.id for i in items if i.prediction is None],
        "unknown_predictions": unknown,
        "mcq": {mode: choice_accuracy(items, mode) for mode in CHOICE_MODES},
        "yes_no": yes_no_accuracy(items),
        "not_judged": {"count": len(not_judged), "reason": NOT_JUDGED_REASON, "ids": not_judged},
    }
    if judge is not None:
        tasks = judge_tasks(items, prompts)
        hashes = {t.sample_id: prompt_hash(t.messages, judge.settings(), t.sample_id) for t in tasks}
        results = run_judge(tasks, judge, client=client, progress=progress)
        table = score_table(items, results, judge.runs)
        report["judge"] = {
            "config": public_config(judge),
            "provenance": provenance(judge, prompts),
            **aggregate_judge(items, results, judge.runs),
        }
        report["correlation"] = reasoning_planning_correlation(items, mean_scores(table))
        report["per_sample"] = [
            {
                "id": i.sample.id,
                "task": i.sample.task,
                "rubric": i.rubric,
                "image": i.image_key,
                "scores": table[i.sample.id],
                "prompt_hash": hashes.get(i.sample.id),
            }
            for i in items
            if i.rubric is not None
        ]
    return report
