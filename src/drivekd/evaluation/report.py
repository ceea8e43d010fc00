"""`drivekd eval report`: Table-1-style tables (markdown, CSV), the Table-2 correlation table and a bar chart.

Inputs are score reports written by ``drivekd eval score`` (one per model) and, optionally, deployment figures
written by ``drivekd bench inference``, matched to a model by name: when no benchmark row has a model's name that
is an error, and a partial match is written as a note under Table 1 (and in ``report.json``), never a silently
empty column. The chart draws judged scores only: a model without any judge score is named in a note on the chart
instead of being drawn as zero bars, and the y axis ends just above the highest bar (at most 100).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from drivekd.data.schema import CAPABILITIES
from drivekd.errors import DataError

COLUMNS = ("perception", "reasoning", "planning", "avg")
HEADINGS = {"perception": "Perception", "reasoning": "Reasoning", "planning": "Planning", "avg": "Avg."}


# What the tables read from each input: (dotted key path, what it is); checked before anything is written.
_SCORE_KEYS = ("model", "mcq", "mcq.strict", "mcq.strict.overall", "mcq.drivebench", "mcq.drivebench.overall")
_BENCH_ROW_KEYS = ("name", "peak_memory_gb", "throughput_tok_s", "ttft_s_median")


def _read_json(path: Path, kind: str, command: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            str(path), None, None, "no such file", hint=f"pass {kind} written by `{command}`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(
            str(path),
            None,
            None,
            f"cannot read it as JSON ({err})",
            hint=f"pass {kind} written by `{command}`",
        ) from None


def _missing_key(data: dict[str, Any], keys: Sequence[str]) -> str | None:
    for dotted in keys:
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return dotted
            node = node[part]
    return None


def read_score_report(path: str | Path) -> dict[str, Any]:
    """A score report of ``drivekd eval score``, checked for every key the tables read."""
    path = Path(path)
    hint = "pass a score report written by `drivekd eval score`"
    data = _read_json(path, "a score report", "drivekd eval score")
    if not isinstance(data, dict):
        raise DataError(
            str(path), None, None, f"not a score report (a JSON {type(data).__name__})", hint=hint
        )
    missing = _missing_key(data, _SCORE_KEYS)
    if missing is not None:
        raise DataError(str(path), None, missing, "missing: not a score report", hint=hint)
    judge = data.get("judge")
    if judge is not None and not isinstance(judge, dict):
        raise DataError(str(path), None, "judge", "must be an object", hint=hint)
    return data


def read_bench_report(path: str | Path) -> dict[str, Any]:
    """Deployment figures of ``drivekd bench inference``, checked for every key the tables read."""
    path = Path(path)
    hint = "pass the --json file written by `drivekd bench inference`"
    data = _read_json(path, "the --json file", "drivekd bench inference")
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise DataError(str(path), None, "results", "missing or not an object", hint=hint)
    for name, row in results.items():
        missing = _missing_key(row, _BENCH_ROW_KEYS) if isinstance(row, dict) else "results"
        if missing is not None:
            raise DataError(str(path), None, f"results.{name}.{missing}", "missing", hint=hint)
    return data


def _capability_stats(report: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    judge = report.get("judge") or {}
    per = judge.get("per_capability", {})
    stats: dict[str, dict[str, Any] | None] = {c: per.get(c) for c in CAPABILITIES}
    stats["avg"] = judge.get("overall")
    return stats


def _deployment(bench: dict[str, Any] | None, model: str) -> dict[str, Any] | None:
    if not bench:
        return None
    return next((r for r in bench.get("results", {}).values() if r.get("name") == model), None)


def deployment_notes(
    reports: Sequence[dict[str, Any]], bench: dict[str, Any] | None, source: str = "--bench"
) -> list[str]:
    """What the deployment columns lack: models without a benchmark row of their name, and benchmark rows that
    name no model. Raises :class:`DataError` when a benchmark is given and no row matches any model."""
    if not bench:
        return []
    models = [r["model"] for r in reports]
    bench_names = [r["name"] for r in bench.get("results", {}).values()]
    unmatched = [m for m in models if m not in bench_names]
    unused = [n for n in bench_names if n not in models]
    if len(unmatched) == len(models):
        raise DataError(
            source,
            None,
            "results.*.name",
            f"no benchmark row names a model of the score reports (benchmark: {_names(bench_names)}; "
            f"score reports: {_names(models)})",
            hint="rerun `drivekd bench inference` with --student-name/--teacher-name set to the models' names "
            "(the `model` of each score report, set by `eval generate --model-name`)",
        )
    notes = []
    if unmatched:
        notes.append(
            f"no deployment figures (no `bench inference` row of that name) for: {_names(unmatched)}"
        )
    if unused:
        notes.append(f"benchmark rows that name no model here, not shown: {_names(unused)}")
    return notes


def _names(names: Sequence[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def table1_rows(
    reports: Sequence[dict[str, Any]], bench: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per model: capability scores (mean, std over judge runs), MCQ accuracy in both extraction modes
    and, where a benchmark entry has the model's name, peak memory, throughput and median time to first token
    (:func:`deployment_notes` says which models have none)."""
    rows = []
    for report in reports:
        row: dict[str, Any] = {"model": report["model"]}
        for column, stats in _capability_stats(report).items():
            row[f"{column}_mean"] = stats["mean"] if stats else None
            row[f"{column}_std"] = stats["std"] if stats else None
        for mode in ("strict", "drivebench"):
            row[f"mcq_{mode}"] = report["mcq"][mode]["overall"]["accuracy"]
        deployment = _deployment(bench, report["model"])
        row["memory_gb"] = deployment["peak_memory_gb"] if deployment else None
        row["speed_tok_s"] = deployment["throughput_tok_s"] if deployment else None
        row["ttft_s"] = deployment["ttft_s_median"] if deployment else None
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_score(mean: float | None, std: float | None) -> str:
    """``mean ± std`` with two decimals, the mean alone without a std, a dash when not measured."""
    if mean is None:
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def table1_markdown(rows: Sequence[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    """Table 1 as markdown; each of ``notes`` follows as a "Note:" line."""
    head = ["Model", *(HEADINGS[c] for c in COLUMNS), "MCQ strict (%)", "MCQ DriveBench rule (%)"]
    head += ["Memory (GB)", "Speed (tok/s)", "1st-token (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], *(format_score(row[f"{c}_mean"], row[f"{c}_std"]) for c in COLUMNS)]
        cells += [_fmt(row["mcq_strict"]), _fmt(row["mcq_drivebench"])]
        cells += [_fmt(row["memory_gb"], 1), _fmt(row["speed_tok_s"], 1), _fmt(row["ttft_s"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"Note: {note}." for note in notes)] if notes else []
    return "\n".join(lines) + "\n"


def rows_csv(rows: Sequence[Mapping[str, Any]], empty_header: str = "model") -> str:
    """CSV text of dict rows, the columns in the first row's order (``empty_header`` alone when there are none)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [empty_header], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def table2_markdown(reports: Sequence[dict[str, Any]]) -> str:
    """Table 2: image-level Pearson and Spearman correlation of reasoning and planning scores."""
    lines = ["| Model | Pearson(R_k, P_k) | Spearman(R_k, P_k) | images |", "|---|---|---|---|"]
    for report in reports:
        corr = report.get("correlation") or {}
        signed = ["–" if corr.get(k) is None else f"{corr[k]:+.4f}" for k in ("pearson", "spearman")]
        lines.append(f"| {report['model']} | {signed[0]} | {signed[1]} | {corr.get('images', 0)} |")
    return "\n".join(lines) + "\n"


# Upper ends of the score axis: 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 times a power of ten, capped at 100.
_NICE = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
HEADROOM = 1.15  # the axis ends at least 15% above the highest bar (with its error bar)


def axis_top(peak: float) -> float:
    """The score axis' upper end for a highest bar (mean + std) of ``peak``: the next nice value above
    ``HEADROOM * peak``, at most 100 (scores are 0-100); 100 when nothing is drawn."""
    if not peak > 0:
        return 100.0
    target = peak * HEADROOM
    scale = 10.0 ** math.floor(math.log10(target))
    return min(100.0, next(n * scale for n in _NICE if n * scale >= target * (1 - 1e-12)))


def chart_series(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows the chart draws (those with at least one judge score) and the names of the unjudged ones, which
    get no bars (a zero bar would read as a score of 0)."""
    judged = [r for r in rows if any(r[f"{c}_mean"] is not None for c in COLUMNS)]
    return judged, [r["model"] for r in rows if r not in judged]


def bar_chart(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    ylabel: str = "judge score (0-100)",
    title: str = "Judge score per capability (error bars: std over the judge runs)",
) -> Path:
    """Grouped bars of the capability scores per model, with a standard deviation as error bars.

    Each bar carries its value (so a score of 0 reads as 0); unjudged models and missing capability scores are
    named on the chart, never drawn as zero; the y axis adapts to the highest bar (:func:`axis_top`).
    """
    path = Path(path)
    drawn, unjudged = chart_series(rows)
    fig, ax = plt.subplots(figsize=(2.6 + 1.5 * len(COLUMNS), 4.2))
    width = 0.8 / max(len(drawn), 1)
    peak = 0.0
    for k, row in enumerate(drawn):
        xs = [c + (k - (len(drawn) - 1) / 2) * width for c in range(len(COLUMNS))]
        means = [row[f"{c}_mean"] for c in COLUMNS]
        errs = [row[f"{c}_std"] or 0.0 for c in COLUMNS]
        bars = ax.bar(xs, [math.nan if m is None else m for m in means], width, yerr=errs, capsize=2)
        bars.set_label(row["model"])
        peak = max([peak, *(m + e for m, e in zip(means, errs, strict=True) if m is not None)])
        labels = ["" if m is None else f"{m:.1f}" for m in means]
        ax.bar_label(bars, labels, fontsize=6, padding=2, rotation=90 if len(drawn) > 3 else 0)
        for x, mean in zip(xs, means, strict=True):
            if mean is None:
                ax.text(x, 0, "not judged", ha="center", va="bottom", fontsize=6, color="grey", rotation=90)
    ax.set_xticks(range(len(COLUMNS)), [HEADINGS[c] for c in COLUMNS])
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, axis_top(peak))
    ax.grid(axis="y", alpha=0.3)
    if drawn:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if unjudged or not drawn:
        title += "\n" + ("not judged, so no bars: " + ", ".join(unjudged) if unjudged else "no judge scores")
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(
    reports: Sequence[dict[str, Any]],
    out_dir: str | Path,
    bench: dict[str, Any] | None = None,
    *,
    bench_source: str = "--bench",
) -> dict[str, Path]:
    """Write ``table1.md``, ``table1.csv``, ``table2.md``, ``scores.png`` and ``report.json`` under ``out_dir``;
    a benchmark none of whose rows names a model raises :class:`DataError` (naming ``bench_source``) first."""
    notes = deployment_notes(reports, bench, bench_source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table1_rows(reports, bench)
    files = {
        "table1_md": out / "table1.md",
        "table1_csv": out / "table1.csv",
        "table2_md": out / "table2.md",
        "json": out / "report.json",
    }
    files["table1_md"].write_text(table1_markdown(rows, notes), encoding="utf-8")
    files["table1_csv"].write_text(rows_csv(rows), encoding="utf-8")
    files["table2_md"].write_text(table2_markdown(reports), encoding="utf-8")
    summary = {"table1": rows, "table2": {r["model"]: r.get("correlation") for r in reports}, "notes": notes}
    files["json"].write_text(json.dumps(summary, indent=2), encoding="utf-8")
    files["chart"] = bar_chart(rows, out / "scores.png")
    return files
