"""The demo's PNG figures: scores per method (the evaluation report's grouped bars, seed std as error bars) and
training curves read from the runs' ``log.jsonl``.

Both curves are per capability, so recipes that train on one capability and on three share a scale: the
cross-entropy averaged over the capabilities a step holds, and the total logged loss (CE plus the unweighted
distillation terms) divided by that number of capabilities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from drivekd.demo.report import COLUMNS
from drivekd.evaluation.report import bar_chart


def scores_figure(rows: Sequence[Mapping[str, Any]], metric: str, path: Path) -> Path:
    """Grouped bars per capability and average, one bar per method; error bars are the std across seeds."""
    bars = [
        {
            "model": row["method"],
            **{f"{c}_mean": row[f"{metric}_{c}_mean"] for c in COLUMNS},
            **{f"{c}_std": row[f"{metric}_{c}_std"] for c in COLUMNS},
        }
        for row in rows
    ]
    return bar_chart(bars, path)


def per_capability(record: Mapping[str, Any]) -> tuple[float, float]:
    """One logged step's mean CE over its capabilities, and its total loss divided by their number."""
    ce = [v for k, v in record.items() if k.startswith("loss/ce/")]
    return sum(ce) / len(ce), record["loss"] / len(ce)


def training_figure(logs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, *, seed: int) -> Path:
    """Two panels (CE, total loss, both per capability) with one line per method."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ce_ax, total_ax = fig.subplots(1, 2)
    for method, records in logs.items():
        steps = [r["step"] for r in records]
        ce, total = zip(*(per_capability(r) for r in records), strict=True)
        ce_ax.plot(steps, ce, label=method, linewidth=1.2)
        total_ax.plot(steps, total, label=method, linewidth=1.2)
    ce_ax.set_title(f"cross-entropy on the answer span, seed {seed}")
    total_ax.set_title(f"CE + distillation terms (unweighted), seed {seed}")
    for ax in (ce_ax, total_ax):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("per capability")
    total_ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
