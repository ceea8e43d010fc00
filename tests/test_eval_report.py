"""Table-1/2 outputs (markdown, CSV, JSON) and the bar chart."""

from __future__ import annotations

import csv
import io
import json

import pytest
import typer
from matplotlib.axes import Axes
from PIL import Image
from typer.testing import CliRunner

from drivekd.errors import DataError
from drivekd.evaluation import inference
from drivekd.evaluation.cli import bench_inference_cmd, report_cmd
from drivekd.evaluation.report import (
    axis_top,
    bar_chart,
    chart_series,
    deployment_notes,
    read_bench_report,
    table1_rows,
    write_report,
)


def _report(model: str, base: float, correlation: float | None) -> dict:
    def stats(k: int) -> dict:
        runs = [base + k, base + k + 2.0, base + k + 4.0]
        return {"mean": sum(runs) / 3, "std": 2.0, "runs": runs}

    acc = {"overall": {"accuracy": base}}
    return {
        "model": model,
        "mcq": {"strict": acc, "drivebench": {"overall": {"accuracy": base + 9}}},
        "judge": {
            "per_capability": {"perception": stats(0), "reasoning": stats(1), "planning": stats(2)},
            "overall": stats(1),
        },
        "correlation": {"images": 12, "pearson": correlation, "spearman": correlation},
    }


BENCH = {
    "results": {
        "teacher": {
            "name": "teacher-8b",
            "peak_memory_gb": 18.3,
            "throughput_tok_s": 32.6,
            "ttft_s_median": 1.58,
        },
        "student": {
            "name": "student-1b",
            "peak_memory_gb": 4.1,
            "throughput_tok_s": 45.7,
            "ttft_s_median": 0.45,
        },
    }
}


def test_write_report(tmp_path):
    reports = [_report("student-1b", 40.0, 0.3384), _report("gpt", 45.0, None)]
    files = write_report(reports, tmp_path, BENCH)
    table1 = files["table1_md"].read_text()
    assert (
        "| student-1b | 42.00 ± 2.00 | 43.00 ± 2.00 | 44.00 ± 2.00 | 43.00 ± 2.00 | 40.00 | 49.00 | 4.1 | 45.7 | 0.45 |"
        in table1
    )
    gpt_row = next(line for line in table1.splitlines() if line.startswith("| gpt |"))
    assert gpt_row.startswith("| gpt | 47.00 ± 2.00 |") and gpt_row.endswith("| – | – | – |")
    rows = list(csv.DictReader(io.StringIO(files["table1_csv"].read_text())))
    assert [r["model"] for r in rows] == ["student-1b", "gpt"]
    assert float(rows[0]["reasoning_mean"]) == pytest.approx(43.0) and rows[1]["memory_gb"] == ""
    table2 = files["table2_md"].read_text()
    assert "| student-1b | +0.3384 | +0.3384 | 12 |" in table2 and "| gpt | – | – | 12 |" in table2
    assert json.loads(files["json"].read_text())["table1"] == table1_rows(reports, BENCH)
    with Image.open(files["chart"]) as chart:
        assert chart.format == "PNG" and chart.size[0] > 300


def _unjudged(model: str) -> dict:
    report = _report(model, 30.0, None)
    del report["judge"]
    return report


def test_unjudged_model_gets_no_bars_and_is_named(tmp_path):
    rows = table1_rows([_report("student-1b", 40.0, None), _unjudged("api-model")])
    drawn, unjudged = chart_series(rows)
    assert [r["model"] for r in drawn] == ["student-1b"] and unjudged == ["api-model"]
    path = bar_chart(rows, tmp_path / "scores.png")
    assert path.is_file()


def test_axis_top_adapts_to_the_highest_bar():
    # hand-worked: 1.15 x peak, rounded up to 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k, at most 100
    assert axis_top(2.3) == pytest.approx(3.0)  # 2.645 -> 3
    assert axis_top(40.0) == pytest.approx(50.0)  # 46 -> 50
    assert axis_top(6.0) == pytest.approx(8.0)  # 6.9 -> 8
    assert axis_top(0.5) == pytest.approx(0.6)  # 0.575 -> 0.6
    assert axis_top(92.0) == 100.0 and axis_top(0.0) == 100.0


def test_chart_axis_follows_small_scores(tmp_path, monkeypatch):
    limits = []
    monkeypatch.setattr(Axes, "set_ylim", lambda self, *a, **k: limits.append(a))
    rows = table1_rows([_report("small", 1.0, None)])  # highest bar: planning 1 + 2 + 2 (mean) + 2 (std) = 7
    bar_chart(rows, tmp_path / "scores.png")
    assert limits[-1] == (
        0,
        10.0,
    )  # the chart's own call, last: 7 x 1.15 = 8.05 -> 10, not the 0-100 of a fixed axis


def test_deployment_names_that_match_no_model_are_an_error(tmp_path):
    reports = [_report("my-student", 40.0, None)]
    with pytest.raises(
        DataError, match=r'no benchmark row names a model.*"teacher-8b", "student-1b".*"my-student"'
    ):
        write_report(reports, tmp_path, BENCH, bench_source="bench.json")
    assert not (tmp_path / "table1.md").exists()


def test_partial_deployment_match_is_a_visible_note(tmp_path):
    reports = [_report("student-1b", 40.0, None), _report("gpt", 45.0, None)]
    files = write_report(reports, tmp_path, BENCH)
    table1 = files["table1_md"].read_text()
    assert 'Note: no deployment figures (no `bench inference` row of that name) for: "gpt".' in table1
    assert 'Note: benchmark rows that name no model here, not shown: "teacher-8b".' in table1
    assert json.loads(files["json"].read_text())["notes"] == deployment_notes(reports, BENCH)


def test_report_command_names_the_bench_file_on_a_mismatch(tmp_path):
    score = tmp_path / "scores.json"
    score.write_text(json.dumps(_report("my-student", 40.0, None)))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH))
    app = typer.Typer()
    app.command()(report_cmd)
    result = CliRunner().invoke(app, [str(score), "--out-dir", str(tmp_path / "out"), "--bench", str(bench)])
    assert result.exit_code == 2
    assert "bench.json" in result.output and "--student-name" in result.output


def test_bench_inference_names_its_rows_for_the_report(tmp_path, monkeypatch):
    """--teacher-name/--student-name name the rows; `eval report --bench` then fills that model's columns."""
    seen = []

    def fake_run(teacher, student, cfg):  # the measurement itself is tested in test_eval_inference.py
        seen.append((teacher, student))
        row = {"peak_memory_gb": 1.5, "throughput_tok_s": 20.0, "ttft_s_median": 0.25}
        results = {"teacher": {"name": teacher.name, **row}, "student": {"name": student.name, **row}}
        ratios = dict.fromkeys(
            ("memory_teacher_over_student", "throughput_student_over_teacher", "ttft_teacher_over_student"),
            1.0,
        )
        return {"results": results, "ratios": ratios, "device": "cpu"}

    monkeypatch.setattr(inference, "run", fake_run)
    app = typer.Typer()
    app.command()(bench_inference_cmd)
    bench = tmp_path / "bench.json"
    args = ["--teacher", "ckpt/teacher", "--student", "ckpt/student", "--json", str(bench)]
    result = CliRunner().invoke(app, [*args, "--student-name", "student-1b", "--teacher-name", "teacher-8b"])
    assert result.exit_code == 0, result.output
    assert "| metric | teacher (teacher-8b) | student (student-1b) | ratio |" in result.output
    assert (seen[0][0].path, seen[0][1].path) == ("ckpt/teacher", "ckpt/student")  # only the names change
    rows = table1_rows([_report("student-1b", 40.0, None)], read_bench_report(bench))
    assert (rows[0]["memory_gb"], rows[0]["speed_tok_s"], rows[0]["ttft_s"]) == (1.5, 20.0, 0.25)
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0  # without names: the checkpoints
    assert json.loads(bench.read_text())["results"]["student"]["name"] == "ckpt/student"
