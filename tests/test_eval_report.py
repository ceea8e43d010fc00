"""Table-1/2 outputs (markdown, CSV, JSON) and the bar chart."""

from __future__ import annotations

import csv
import io
import json

import pytest
from PIL import Image

from drivekd.evaluation.report import table1_rows, write_report


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
    assert "| gpt | 47.00 ± 2.00 |" in table1 and table1.rstrip().endswith("| – | – | – |")
    rows = list(csv.DictReader(io.StringIO(files["table1_csv"].read_text())))
    assert [r["model"] for r in rows] == ["student-1b", "gpt"]
    assert float(rows[0]["reasoning_mean"]) == pytest.approx(43.0) and rows[1]["memory_gb"] == ""
    table2 = files["table2_md"].read_text()
    assert "| student-1b | +0.3384 | +0.3384 | 12 |" in table2 and "| gpt | – | – | 12 |" in table2
    assert json.loads(files["json"].read_text())["table1"] == table1_rows(reports, BENCH)
    with Image.open(files["chart"]) as chart:
        assert chart.format == "PNG" and chart.size[0] > 300
