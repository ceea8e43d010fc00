"""The demo report: per-method scores aggregated over seeds, the Table-1 and Table-4 views, the plain statement
about multi-teacher vs SFT, the CSV and the summary JSON.

Numbers come only from the score reports on disk. Per run: the judge score of each capability and their mean
(Table 1's Avg.), each the mean of the judge's N runs, with the run-to-run sample std of eq. 29 kept; and the
strict MCQ accuracy per capability (reasoning pools prediction and behavior) and their mean. Across seeds: the
mean and the sample standard deviation (the same eq. 29 formula, :func:`drivekd.evaluation.aggregate.sample_std`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from drivekd.data.schema import CAPABILITIES, TASK_TO_CAPABILITY
from drivekd.evaluation.aggregate import sample_std
from drivekd.evaluation.report import COLUMNS, HEADINGS, format_score

AVG = COLUMNS[-1]  # "avg"
METRICS = ("judge", "mcq")
METRIC_TITLES = {"judge": "judge score (0-100)", "mcq": "MCQ accuracy, strict (%)"}


def capability_accuracy(per_task: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Strict MCQ accuracy (%) per capability from a score report's per-task counts, and their mean."""
    correct = dict.fromkeys(CAPABILITIES, 0)
    total = dict.fromkeys(CAPABILITIES, 0)
    for task, counts in per_task.items():
        if task in TASK_TO_CAPABILITY:
            correct[TASK_TO_CAPABILITY[task]] += counts["correct"]
            total[TASK_TO_CAPABILITY[task]] += counts["total"]
    out: dict[str, float | None] = {
        c: 100.0 * correct[c] / total[c] if total[c] else None for c in CAPABILITIES
    }
    present = [v for v in out.values() if v is not None]
    out[AVG] = sum(present) / len(present) if present else None
    return out


def by_capability(
    parts: Mapping[str, Sequence[Mapping[str, float | None]]],
) -> list[dict[str, float | None]]:
    """Per seed, one run's numbers assembled from ``parts`` (capability -> that method's per-seed numbers): each
    ``<metric>_<capability>`` from its capability's method, and the Avg. as their mean (Table 1's single-teacher
    row, each recipe scored on its own capability)."""
    seeds = {len(runs) for runs in parts.values()}
    if len(seeds) != 1:
        raise ValueError(f"the parts have different numbers of seeds: {sorted(seeds)}")
    out = []
    for i in range(seeds.pop()):
        run: dict[str, float | None] = {}
        for metric in METRICS:
            values = [parts[c][i].get(f"{metric}_{c}") for c in CAPABILITIES]
            run.update({f"{metric}_{c}": v for c, v in zip(CAPABILITIES, values, strict=True)})
            run[f"{metric}_{AVG}"] = None if None in values else sum(values) / len(values)  # type: ignore[arg-type]
        out.append(run)
    return out


def run_scores(report: Mapping[str, Any]) -> dict[str, float | None]:
    """One model's numbers from its score report: ``judge_<column>``, ``mcq_<column>`` and ``judge_run_std`` (the
    eq. 29 std of the average over the judge's runs)."""
    judge = report["judge"]
    per = judge["per_capability"]
    scores: dict[str, float | None] = {
        f"judge_{c}": per[c]["mean"] if c in per else None for c in CAPABILITIES
    }
    scores[f"judge_{AVG}"] = judge["overall"]["mean"]
    scores["judge_run_std"] = judge["overall"]["std"]
    scores.update({f"mcq_{k}": v for k, v in capability_accuracy(report["mcq"]["strict"]).items()})
    return scores


@dataclass(frozen=True)
class Stat:
    """A value over seeds: mean, sample std (None for fewer than two) and the number of seeds."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        present = [v for v in values if v is not None]
        if not present:
            return cls(None, None, 0)
        return cls(sum(present) / len(present), sample_std(present), len(present))

    def text(self) -> str:
        return format_score(self.mean, self.std)


def aggregate(runs: Sequence[Mapping[str, float | None]]) -> dict[str, Stat]:
    """Each key of the per-seed ``runs`` as a :class:`Stat` over the seeds."""
    keys = list(dict.fromkeys(k for run in runs for k in run))
    return {k: Stat.of([run.get(k) for run in runs]) for k in keys}


def verdict(multi: Stat, sft: Stat, *, what: str, label: str = "Multi-teacher (AGP)") -> str:
    """The plain statement: did ``multi`` beat ``sft`` on ``what``? Means are compared as printed (2 decimals)."""
    if multi.mean is None or sft.mean is None:
        return f"{label} vs SFT on {what}: not measured."
    head = f"{label} {what} {multi.text()} vs SFT {sft.text()} ({multi.n} seed{'s' * (multi.n != 1)})"
    a, b = round(multi.mean, 2), round(sft.mean, 2)
    outcome = "beat SFT" if a > b else "tied with SFT (did not beat it)" if a == b else "did not beat SFT"
    text = f"{head}: multi-teacher {outcome} on the average."
    if a == b:
        return text
    spread = max((s.std for s in (multi, sft) if s.std is not None), default=None)
    if spread is None:
        return text + " One seed gives no standard deviation, so this says nothing about noise."
    if abs(a - b) < spread:
        return text + f" The difference ({a - b:+.2f}) is smaller than the spread across seeds: within noise."
    return text + f" The difference ({a - b:+.2f}) exceeds the spread across seeds."


def method_rows(results: Mapping[str, Sequence[Mapping[str, float | None]]]) -> list[dict[str, Any]]:
    """One CSV-ready row per method: ``<metric>_<column>_mean`` / ``_std``, the mean judge-run std, seeds."""
    rows = []
    for method, runs in results.items():
        stats = aggregate(runs)
        row: dict[str, Any] = {"method": method, "seeds": len(runs)}
        for metric in METRICS:
            for column in COLUMNS:
                stat = stats.get(f"{metric}_{column}", Stat(None, None, 0))
                row[f"{metric}_{column}_mean"] = stat.mean
                row[f"{metric}_{column}_std"] = stat.std
        row["judge_run_std_mean"] = stats["judge_run_std"].mean if "judge_run_std" in stats else None
        rows.append(row)
    return rows


def row_stat(row: Mapping[str, Any], metric: str, column: str) -> Stat:
    return Stat(row[f"{metric}_{column}_mean"], row[f"{metric}_{column}_std"], row["seeds"])


def markdown_table(rows: Sequence[Mapping[str, Any]], metric: str, *, extra: Sequence[str] = ()) -> str:
    """Per-capability and average of ``metric`` as mean ± std over seeds; ``extra`` adds the other metric's Avg."""
    head = ["Method", "Seeds", *(HEADINGS[c] for c in COLUMNS), *(f"{METRIC_TITLES[m]}, Avg." for m in extra)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"], str(row["seeds"]), *(row_stat(row, metric, c).text() for c in COLUMNS)]
        cells += [row_stat(row, m, AVG).text() for m in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
