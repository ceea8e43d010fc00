"""PNG figures of the pre-study in the style of the paper's figures 2 and 4-8.

Each figure takes one or more ``(label, metrics)`` runs (``metrics`` as written to ``metrics.json``), so the
figures of several models (a family at several scales, figures 4-8) can be drawn side by side. Figures are drawn
on matplotlib ``Figure`` objects rendered by the Agg canvas: no pyplot, no global backend state. Recommended
layers, when present, are marked with dotted vertical lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from drivekd.data.schema import CAPABILITIES
from drivekd.fileio import write_atomically

Run = tuple[str, dict[str, Any]]
COLOURS = {"perception": "tab:blue", "reasoning": "tab:orange", "planning": "tab:green", "all": "black"}
DOMAIN_COLOURS = {"driving": "tab:red", "general": "tab:blue"}
TEMPERATURE_STYLES = ("-", "--", ":", "-.")
FIGURES = {
    "summary": "fig2_summary.png",
    "similarity": "fig4_similarity.png",
    "intra": "fig5_intra_consistency.png",
    "dispersion": "fig6_dispersion.png",
    "confidence": "fig7_confidence.png",
}


def write_figures(runs: Sequence[Run], out_dir: str | Path) -> dict[str, Path]:
    """Draw every figure into ``out_dir``, each showing every run (figure 2: one row per run)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers = {
        "summary": lambda: summary_figure(runs),
        "similarity": lambda: similarity_figure(runs),
        "intra": lambda: intra_figure(runs),
        "dispersion": lambda: dispersion_figure(runs),
        "confidence": lambda: confidence_figure(runs),
    }
    paths = {}
    for name, draw in drawers.items():
        paths[name] = out_dir / FIGURES[name]
        _save(draw(), paths[name])
    return paths


def summary_figure(runs: Sequence[Run]) -> Figure:
    """Figure 2, one row per run: (a) adjacent and vision-text cosine, (b) intra per capability, (c) hidden vs
    attention dispersion across questions, (d) generalised margin along the answer, driving vs general, tau = 1."""
    fig, axes = _grid(len(runs), 4, width=4.0, height=3.6)
    for row, (label, metrics) in zip(axes, runs, strict=True):
        _similarity(row[0], metrics)
        row[0].set_title(f"{label}\n(a) layer-wise cosine")
        _intra(row[1], metrics, CAPABILITIES)
        row[1].set_title(f"{label}\n(b) capability intra-consistency")
        _dispersion(row[2], metrics, "question")
        row[2].set_title(f"{label}\n(c) dispersion across questions")
        _confidence(row[3], metrics, "margin", temperatures=["1"])
        row[3].set_title(f"{label}\n(d) generalised margin, tau = 1.0")
    fig.suptitle("Pre-study summary" + (f": {runs[0][0]}" if len(runs) == 1 else ", one row per model"))
    return fig


def similarity_figure(runs: Sequence[Run]) -> Figure:
    """Figure 4: adjacent-layer and vision-text cosine per model."""
    fig, axes = _grid(1, len(runs), width=4.2, height=3.4)
    for ax, (label, metrics) in zip(axes[0], runs, strict=True):
        _similarity(ax, metrics)
        ax.set_title(label)
    return fig


def intra_figure(runs: Sequence[Run]) -> Figure:
    """Figure 5: intra-consistency across layers, one row per model, one column per capability."""
    fig, axes = _grid(len(runs), len(CAPABILITIES), width=4.0, height=3.0)
    for row, (label, metrics) in zip(axes, runs, strict=True):
        for ax, capability in zip(row, CAPABILITIES, strict=True):
            _intra(ax, metrics, [capability])
            ax.set_title(f"{label}: {capability}")
    return fig


def dispersion_figure(runs: Sequence[Run]) -> Figure:
    """Figure 6: hidden vs attention dispersion under rewording (all capabilities), one panel per model.

    A run without paraphrase groups says so in its panel instead of drawing anything (nothing is made up).
    """
    fig, axes = _grid(1, len(runs), width=4.2, height=3.4)
    for ax, (label, metrics) in zip(axes[0], runs, strict=True):
        ax.set_title(f"{label}: rewording")
        if not _dispersion(ax, metrics, "rewording"):
            ax.text(
                0.5,
                0.5,
                'no paraphrase groups in the data\n(meta["paraphrase_of"])',
                ha="center",
                va="center",
            )
            ax.set_axis_off()
    return fig


def confidence_figure(runs: Sequence[Run]) -> Figure:
    """Figures 7-8: top-1 probability, top-10 mass and generalised margin along the answer, one row per model;
    colour = domain, line style = temperature."""
    names = {"top1": "top-1 probability m", "top10": "top-10 mass S", "margin": "generalised margin"}
    fig, axes = _grid(len(runs), len(names), width=4.2, height=3.0)
    for row, (label, metrics) in zip(axes, runs, strict=True):
        for ax, (metric, name) in zip(row, names.items(), strict=True):
            _confidence(ax, metrics, metric)
            ax.set_title(f"{label}: {name}")
    return fig


def _similarity(ax: Axes, metrics: dict[str, Any]) -> None:
    drawn = False
    for key, marker, label in (
        ("adjacent_cosine", "o", "adjacent S(l)"),
        ("vision_text_cosine", "s", "vision-text C(l)"),
    ):
        curve = metrics[key]
        if curve["values"] is not None:
            ax.plot(curve["layers"], _nan(curve["values"]), marker=marker, ms=3, label=label)
            drawn = True
    _layer_axis(ax)
    ax.set_ylabel("cosine")
    _finish(ax, metrics, drawn, "no tokens")


def _intra(ax: Axes, metrics: dict[str, Any], capabilities: Sequence[str]) -> None:
    intra = metrics["intra_consistency"]
    drawn = False
    for capability in capabilities:
        values = intra["by_capability"].get(capability)
        if values is None:
            continue
        drawn = True
        ax.plot(intra["layers"], _nan(values), marker="o", ms=3, color=COLOURS[capability], label=capability)
        stderr = (intra.get("stderr") or {}).get(capability)
        if stderr is not None:
            low = [v - s for v, s in zip(_nan(values), _nan(stderr), strict=True)]
            high = [v + s for v, s in zip(_nan(values), _nan(stderr), strict=True)]
            ax.fill_between(intra["layers"], low, high, color=COLOURS[capability], alpha=0.2)
    _layer_axis(ax)
    ax.set_ylabel("mean pairwise cosine")
    _finish(ax, metrics, drawn, "fewer than 2 images with questions\nof this capability")


def _dispersion(ax: Axes, metrics: dict[str, Any], kind: str) -> bool:
    """Draw the all-capabilities hidden and attention curves of ``kind``; False when there is nothing to draw."""
    dispersion = metrics["dispersion"]
    drawn = False
    for signal, marker in (("hidden", "o"), ("attention", "s")):
        curves = dispersion[signal][kind]
        if curves is None or curves.get("all") is None:
            continue
        ax.plot(dispersion["layers"], _nan(curves["all"]), marker=marker, ms=3, label=signal)
        drawn = True
    _layer_axis(ax)
    ax.set_ylabel("1 - cos")
    note = (
        'no paraphrase groups in the data\n(meta["paraphrase_of"])'
        if kind == "rewording"
        else "no image with 2 questions"
    )
    _finish(ax, metrics, drawn, note)
    return drawn


def _confidence(
    ax: Axes, metrics: dict[str, Any], metric: str, temperatures: Sequence[str] | None = None
) -> None:
    confidence = metrics["confidence"]
    centres = confidence["bin_centres"]
    for domain, values in confidence["domains"].items():
        for k, (temperature, by_metric) in enumerate(values["by_temperature"].items()):
            if temperatures is not None and temperature not in temperatures:
                continue
            ax.plot(
                centres,
                _nan(by_metric[metric]["bins"]),
                linestyle=TEMPERATURE_STYLES[k % len(TEMPERATURE_STYLES)],
                color=DOMAIN_COLOURS.get(domain),
                label=f"{domain}, tau={temperature}",
            )
    ax.set_xlabel("relative position in the answer")
    ax.set_ylabel(metric)
    _finish(ax, None, ax.has_data(), "no answer tokens")


def _finish(ax: Axes, metrics: dict[str, Any] | None, drawn: bool, note: str) -> None:
    """A legend and the recommended layers (dotted) on a drawn panel; otherwise ``note`` in its middle."""
    if not drawn:
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
        return
    recommended = (metrics or {}).get("recommended_layers")
    for k, block in enumerate(recommended["layers"].values() if recommended else ()):
        for name in ("perception", "planning"):
            label = f"recommended {name} layer" if k == 0 else None
            ax.axvline(block[name], color=COLOURS[name], linestyle=":", linewidth=1, label=label)
    ax.legend(fontsize=7)


def _layer_axis(ax: Axes) -> None:
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _grid(rows: int, columns: int, *, width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    return fig, fig.subplots(rows, columns, squeeze=False)


def _nan(values: Sequence[float | None]) -> list[float]:
    return [float("nan") if v is None else v for v in values]


def _save(fig: Figure, path: Path) -> None:
    """Render to a temporary file, then rename, so an existing figure is only ever replaced by a whole one."""
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
