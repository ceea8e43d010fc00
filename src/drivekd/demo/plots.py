"""The demo's PNG figures: scores per method (the evaluation report's grouped bars, seed std as error bars) and
training curves read from the runs' ``log.jsonl``.

Training curves have one panel per capability, so methods are compared on the same term: the top row is the
cross-entropy on that capability's answers (``loss/ce/<capability>``), the bottom row that capability's total
(CE plus its unweighted distillation terms, ``loss/*/<capability>``). A method appears in the panels of the
capabilities it trains on. Each line is a centred moving average over :data:`SMOOTH_WINDOW` optimizer steps
(:func:`smooth`), drawn over the raw values in a faint line of the same colour and style; every panel has its
own legend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from drivekd.data.schema import CAPABILITIES
from drivekd.demo.report import COLUMNS, METRIC_TITLES
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
    title = f"{METRIC_TITLES[metric].split(' (')[0].capitalize()} per method (error bars: std across seeds)"
    return bar_chart(bars, path, ylabel=METRIC_TITLES[metric], title=title)


SMOOTH_WINDOW = 10  # optimizer steps in the centred moving average of a training curve
LINE_STYLES = ("-", "--", ":", "-.")  # cycled per method, so lines that coincide stay visible


def smooth(steps: Sequence[int], values: Sequence[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """Centred moving average over optimizer steps: point i is the mean of the values logged at steps within
    ``window / 2`` of ``steps[i]``. Windows count steps, not points, because a run that trains several
    capabilities logs each one only at the steps that drew it, and a window of points would then lag by far
    more than ``window`` steps."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    half = window / 2
    out = []
    for centre in steps:
        near = [v for s, v in zip(steps, values, strict=True) if abs(s - centre) <= half]
        out.append(sum(near) / len(near))
    return out


def capability_curves(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per capability a run logged: ``ce`` and ``total`` as (step, value) points, from the log's
    ``loss/<term>/<capability>`` keys (total: the sum over terms)."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for record in records:
        totals: dict[str, float] = {}
        for key, value in record.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "loss":
                totals[parts[2]] = totals.get(parts[2], 0.0) + value
        for capability, total in totals.items():
            curve = curves.setdefault(capability, {"ce": [], "total": []})
            curve["total"].append((record["step"], total))
            if f"loss/ce/{capability}" in record:
                curve["ce"].append((record["step"], record[f"loss/ce/{capability}"]))
    return curves


def training_figure(logs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, *, seed: int) -> Path:
    """Draw :func:`training_curves` of the runs' logs (by method) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    training_curves(logs, seed=seed).savefig(path, dpi=80)
    return path


def training_curves(logs: Mapping[str, Sequence[Mapping[str, Any]]], *, seed: int) -> Figure:
    """Two rows (CE, total) by one column per capability, one smoothed line per method that trains on it."""
    curves = {method: capability_curves(records) for method, records in logs.items()}
    colours = {method: f"C{k % 10}" for k, method in enumerate(logs)}
    styles = {method: LINE_STYLES[k % len(LINE_STYLES)] for k, method in enumerate(logs)}
    fig = Figure(figsize=(5.0 * len(CAPABILITIES), 7.5), layout="constrained")
    axes = fig.subplots(2, len(CAPABILITIES), squeeze=False)
    rows = (("ce", "cross-entropy on the answer"), ("total", "CE + distillation terms (unweighted)"))
    for row, (kind, title) in zip(axes, rows, strict=True):
        for ax, capability in zip(row, CAPABILITIES, strict=True):
            for method, by_capability in curves.items():
                points = by_capability.get(capability, {}).get(kind)
                if not points:
                    continue
                steps, values = zip(*points, strict=True)
                style = dict(color=colours[method], linestyle=styles[method])
                ax.plot(steps, values, alpha=0.15, linewidth=0.8, **style)
                ax.plot(steps, smooth(steps, values), linewidth=1.4, label=method, **style)
            ax.set_title(f"{capability}: {title}", fontsize="medium")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("loss")
            if ax.has_data():
                ax.legend(fontsize="x-small")
            else:
                ax.text(0.5, 0.5, "no run trains on this capability", ha="center", va="center")
    fig.suptitle(
        f"Training curves, seed {seed}: lines are centred moving averages over {SMOOTH_WINDOW} optimizer steps, "
        "faint lines the logged values"
    )
    return fig
