"""The demo's training curves: smoothed with the documented window, one panel per capability, a legend on each."""

from __future__ import annotations

import pytest
from PIL import Image

from drivekd.data.schema import CAPABILITIES
from drivekd.demo.plots import SMOOTH_WINDOW, capability_curves, smooth, training_curves, training_figure


def test_smooth_is_a_centred_moving_average_over_steps():
    steps, values = [1, 2, 3, 4, 5], [1.0, 2.0, 3.0, 4.0, 5.0]
    # window 2: steps within 1 of the centre
    assert smooth(steps, values, window=2) == pytest.approx([1.5, 2.0, 3.0, 4.0, 4.5])
    assert smooth(steps, values, window=1) == values  # nothing else within 0.5 steps
    # sparse steps (one capability of a multi-capability run): step 24 has no neighbour within 5 steps
    # 1: steps 1, 4 -> (6+5)/2; 4: 1, 4, 7 -> 15/3; 7: 4, 7, 12 -> 12/3; 12: 7, 12 -> 7/2; 24: alone
    assert smooth([1, 4, 7, 12, 24], [6.0, 5.0, 4.0, 3.0, 1.0], window=10) == pytest.approx(
        [5.5, 5.0, 4.0, 3.5, 1.0]
    )
    with pytest.raises(ValueError, match="window"):
        smooth([1], [1.0], window=0)


def _log(capabilities: tuple[str, ...], steps: int, distill: bool) -> list[dict]:
    records = []
    for step in range(1, steps + 1):
        record: dict = {"step": step, "lr": 1e-3}
        for k, capability in enumerate(capabilities):
            record[f"loss/ce/{capability}"] = 5.0 - 0.1 * step + k + (0.5 if step % 2 else -0.5)  # zigzag
            if distill:
                record[f"loss/{capability}/{capability}"] = 1.0
        record["loss"] = sum(v for key, v in record.items() if key.startswith("loss/"))
        records.append(record)
    return records


def test_capability_curves_split_the_log_by_capability():
    records = [{"step": 3, "loss/ce/planning": 2.0, "loss/planning/planning": 0.5, "loss": 2.5, "lr": 0.1}]
    assert capability_curves(records) == {"planning": {"ce": [(3, 2.0)], "total": [(3, 2.5)]}}


def test_training_curves_one_panel_per_capability_with_legends_and_smoothing(tmp_path):
    logs = {
        "SFT": _log(CAPABILITIES, 30, distill=False),
        "multi-teacher": _log(CAPABILITIES, 30, distill=True),
        "planning only": _log(("planning",), 30, distill=True),
    }
    fig = training_curves(logs, seed=0)
    axes = fig.axes
    assert len(axes) == 2 * len(CAPABILITIES)
    for ax, capability in zip(axes, [*CAPABILITIES, *CAPABILITIES], strict=True):
        assert ax.get_title().startswith(capability)
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        expected = ["SFT", "multi-teacher"] + (["planning only"] if capability == "planning" else [])
        assert labels == expected
    planning_ce = axes[CAPABILITIES.index("planning")]
    raw, smoothed = planning_ce.get_lines()[:2]  # SFT: the faint raw line, then its moving average
    expected = smooth(list(raw.get_xdata()), list(raw.get_ydata()), SMOOTH_WINDOW)
    assert list(smoothed.get_ydata()) == pytest.approx(expected)
    assert smoothed.get_label() == "SFT" and raw.get_alpha() == pytest.approx(0.15)
    assert (
        max(abs(a - b) for a, b in zip(raw.get_ydata(), smoothed.get_ydata(), strict=True)) > 0.4
    )  # zigzag gone
    assert f"moving averages over {SMOOTH_WINDOW} optimizer steps" in fig.get_suptitle()
    path = training_figure(logs, tmp_path / "curves.png", seed=0)
    with Image.open(path) as image:
        assert image.format == "PNG"
