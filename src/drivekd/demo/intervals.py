"""The demo's confidence intervals: every method's Avg. and its paired difference from SFT, from the files on disk.

Per question and seed, a method's judge score is the mean of the judge's runs that graded it (a failed grading is
left out, not a zero), and its MCQ score is 100 for a correct strict letter and 0 otherwise. The intervals and
p-values are :mod:`drivekd.evaluation.bootstrap`'s (95%, over questions within capability and over seeds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from drivekd.data.schema import Sample
from drivekd.evaluation.aggregate import mean_scores
from drivekd.evaluation.bootstrap import (
    RESAMPLES,
    Comparison,
    Interval,
    bootstrap_average,
    paired_bootstrap,
    score_matrices,
)
from drivekd.evaluation.choices import extract_choice

Scores = Mapping[str, float | None]  # question id -> score, one seed of one method


def judge_per_question(report: Mapping[str, Any]) -> dict[str, float]:
    """Each judged question's score from a score report: its mean over the judge's runs that graded it."""
    return mean_scores({row["id"]: row["scores"] for row in report.get("per_sample", [])})


def mcq_per_question(samples: Sequence[Sample], predictions: Mapping[str, str]) -> dict[str, float]:
    """100 for an MCQ answered with the right letter (strict extraction), 0 otherwise, by question id."""
    return {
        s.id: 100.0 * (extract_choice(predictions.get(s.id), "strict") == s.answer)
        for s in samples
        if s.kind == "mcq"
    }


def by_capability(
    parts: Mapping[str, Sequence[Scores]], capability: Mapping[str, str]
) -> list[dict[str, float | None]]:
    """Per seed, each question's score from the method of its capability (``parts``: capability -> per-seed
    scores), as :func:`drivekd.demo.report.by_capability` assembles the table row."""
    seeds = len(next(iter(parts.values())))
    return [{q: parts[c][i].get(q) for q, c in capability.items() if c in parts} for i in range(seeds)]


def _interval_json(interval: Interval) -> dict[str, float]:
    return {
        "estimate": interval.estimate,
        "low": interval.low,
        "high": interval.high,
        "level": interval.level,
    }


def compare_with(
    per_method: Mapping[str, Sequence[Scores]],
    capability: Mapping[str, str],
    reference: str,
    *,
    unpaired: tuple[str, ...] = (),
    resamples: int = RESAMPLES,
) -> dict[str, dict[str, Any]]:
    """Per method: its Avg. with a 95% interval, and (for methods with as many seeds as ``reference``, except
    ``unpaired`` ones such as a teacher that has no seeds) the paired difference from ``reference`` with its
    interval and p-value, each on the questions both scored in every seed."""
    out: dict[str, dict[str, Any]] = {}
    base = per_method[reference]
    for name, runs in per_method.items():
        (matrix,), groups, ids = score_matrices([runs], capability)
        entry: dict[str, Any] = {
            "average": _interval_json(bootstrap_average(matrix, groups, resamples=resamples)),
            "questions": len(ids),
            "seeds": len(runs),
        }
        if name != reference and name not in unpaired and len(runs) == len(base):
            (a, b), groups, ids = score_matrices([runs, base], capability)
            entry["vs_reference"] = _comparison_json(paired_bootstrap(a, b, groups, resamples=resamples))
        out[name] = entry
    return out


def _comparison_json(result: Comparison) -> dict[str, Any]:
    return {
        "difference": _interval_json(result.difference),
        "p_value": result.p_value,
        "questions": result.questions,
        "seeds": result.seeds,
        "resamples": result.resamples,
    }


def headline(entry: Mapping[str, Any], *, label: str, reference: str, what: str, unit: str) -> str:
    """One sentence: did ``label`` beat ``reference`` on ``what``, by how much, with its interval and p-value."""
    paired = entry.get("vs_reference")
    if paired is None:
        return f"{label} vs {reference} on {what}: no paired comparison (different seeds)."
    d = paired["difference"]
    outcome = (
        "beat" if d["estimate"] > 0 else "tied with (did not beat)" if d["estimate"] == 0 else "did not beat"
    )
    clear = d["low"] > 0 or d["high"] < 0
    return (
        f"{label} {outcome} {reference} on {what}: {d['estimate']:+.2f} {unit} (95% CI [{d['low']:+.2f}, "
        f"{d['high']:+.2f}], p = {paired['p_value']:.3g}; paired bootstrap over {paired['questions']} questions and "
        f"{paired['seeds']} seed{'s' * (paired['seeds'] != 1)}), "
        + (
            "an interval that excludes 0."
            if clear
            else "an interval that includes 0: not a clear difference."
        )
    )


def markdown(intervals: Mapping[str, Mapping[str, Any]], reference: str, unit: str) -> str:
    """A table: Avg. [95% CI], difference from ``reference`` [95% CI], p-value, questions, seeds."""
    lines = [
        f"| Method | Avg. [95% CI] | vs {reference} ({unit}) [95% CI] | p | questions | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in intervals.items():
        avg = entry["average"]
        cells = [name, f"{avg['estimate']:.2f} [{avg['low']:.2f}, {avg['high']:.2f}]"]
        paired = entry.get("vs_reference")
        if paired is None:
            cells += ["–", "–"]
        else:
            d = paired["difference"]
            cells += [f"{d['estimate']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]", f"{paired['p_value']:.3g}"]
        cells += [str(entry["questions"]), str(entry["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
