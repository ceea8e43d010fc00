"""Table-1/2 outputs (markdown, CSV, JSON), the bar chart, and the DriveLM metrics."""

from __future__ import annotations

import csv
import io
import json

import pytest
from PIL import Image

from drivekd.data.schema import Sample
from drivekd.evaluation.drivelm_metrics import accuracy, bleu, drivelm_metrics, rouge_l
from drivekd.evaluation.report import table1_rows, write_report
from drivekd.evaluation.scoring import EvalItem


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


def _item(kind: str, answer: str, prediction: str | None) -> EvalItem:
    sample = Sample(
        id=f"{kind}-{answer}",
        images=[{"camera": "CAM_FRONT", "path": "x.jpg"}],
        question="Q?",
        capability="planning",
        task="planning",
        kind=kind,
        options={"A": "x", "B": "y"} if kind == "mcq" else None,
        answer=answer,
    )
    return EvalItem(sample, prediction, None)


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_drivelm_metrics():
    assert accuracy([("B", "B"), ("B ", "B"), ("b", "B"), ("Yes.", "Yes.")]) == 50.0  # raw equality
    pairs = [
        ("keep going at the same speed", "keep going at the same speed"),
        ("stop now", "brake to a stop"),
    ]
    lcs = _lcs(["stop", "now"], ["brake", "to", "a", "stop"])
    precision, recall = lcs / 2, lcs / 4
    naive = (1.0 + 2 * precision * recall / (precision + recall)) / 2
    assert rouge_l(pairs) == pytest.approx(100 * naive)
    assert bleu([("keep going at the same speed", "keep going at the same speed")]) == pytest.approx(100.0)
    out = drivelm_metrics([_item("mcq", "A", "A"), _item("mcq", "B", None), _item("open", "stop", "stop")])
    assert (out["accuracy"], out["accuracy_questions"], out["open_questions"]) == (50.0, 2, 1)
    assert out["rouge_l"] == pytest.approx(100.0)
