"""`analyze-figures`: figure 2 shows every run given, one row each (the other figures already did)."""

from __future__ import annotations

import json

import typer
from PIL import Image
from typer.testing import CliRunner

from drivekd.analysis.cli import figures_cmd
from drivekd.analysis.figures import FIGURES, summary_figure

LAYERS = [1, 2, 3, 4]


def _metrics(name: str, offset: float) -> dict:
    curve = [0.5 + offset, 0.6 + offset, 0.7 + offset, 0.8 + offset]
    bins = {"bins": [0.2 + offset, 0.4 + offset, 0.6 + offset]}
    return {
        "model": {"name": name},
        "adjacent_cosine": {"layers": LAYERS, "values": curve},
        "vision_text_cosine": {"layers": LAYERS, "values": curve[::-1]},
        "intra_consistency": {
            "layers": LAYERS,
            "by_capability": {"perception": curve, "reasoning": curve, "planning": None},
        },
        "dispersion": {
            "layers": LAYERS,
            "hidden": {"question": {"all": curve}, "rewording": None},
            "attention": {"question": {"all": curve[::-1]}, "rewording": None},
        },
        "confidence": {
            "bin_centres": [0.17, 0.5, 0.83],
            "domains": {"driving": {"by_temperature": {"1": {"top1": bins, "top10": bins, "margin": bins}}}},
        },
    }


def test_summary_figure_has_a_row_per_run():
    fig = summary_figure([("1B", _metrics("a", 0.0)), ("8B", _metrics("b", 0.1))])
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 8
    assert [t.split("\n")[0] for t in titles] == ["1B"] * 4 + ["8B"] * 4
    assert all(ax.get_legend() is not None for ax in fig.axes if ax.has_data())


def test_analyze_figures_draws_every_run_in_figure_2(tmp_path):
    files = []
    for name, offset in (("small", 0.0), ("large", 0.1)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(_metrics(name, offset)))
        files.append(str(path))
    app = typer.Typer()
    app.command()(figures_cmd)
    runner = CliRunner()
    sizes = {}
    for count in (1, 2):
        out = tmp_path / f"out{count}"
        result = runner.invoke(app, [*files[:count], "--out", str(out)])
        assert result.exit_code == 0, result.output
        with Image.open(out / FIGURES["summary"]) as image:
            sizes[count] = image.size
    assert sizes[2][1] == 2 * sizes[1][1]  # a second row of four panels, for the second run
