"""The evaluation commands as a user runs them: generate -> judge serve -> score -> report, and named errors."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from drivekd.data.schema import read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.evaluation.cli import bench_inference_cmd, eval_app, judge_app
from drivekd.evaluation.predictions import read_predictions
from drivekd.evaluation.server import JudgeServer, offline_responder
from drivekd.models.pair import build_tiny_pair

runner = CliRunner()


def _app() -> typer.Typer:
    """The commands mounted as the drivekd CLI mounts them."""
    app = typer.Typer()
    app.add_typer(eval_app, name="eval")
    app.add_typer(judge_app, name="judge")
    bench = typer.Typer()
    bench.command("inference")(bench_inference_cmd)
    app.add_typer(bench, name="bench")
    return app


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_generate_score_report(tmp_path):
    app = _app()
    split = generate_split(tmp_path / "synth", n_scenes=1, seed=11, split="test")
    build_tiny_pair("internvl").save(tmp_path / "pair")
    preds = tmp_path / "preds.jsonl"
    args = [
        "eval",
        "generate",
        str(split.path),
        "--model",
        str(tmp_path / "pair" / "student"),
        "--out",
        str(preds),
    ]
    args += ["--max-new-tokens", "5", "--limit", "6", "--model-name", "tiny-student", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 6 predictions" in result.output
    assert len(read_predictions(preds)) == 6

    samples = list(read_jsonl(split.path))
    out = tmp_path / "scores.json"
    with JudgeServer(offline_responder(samples)) as server:
        args = ["eval", "score", str(split.path), "--predictions", str(preds), "--out", str(out)]
        args += ["--judge-base-url", server.base_url, "--judge-model", "grader", "--runs", "2"]
        args += ["--cache", str(tmp_path / "cache.sqlite"), "--no-progress"]
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["model"] == "tiny-student" and report["samples"] == len(samples)
    assert len(report["missing_predictions"]) == len(samples) - 6  # listed and scored 0
    assert report["judge"]["runs"] == 2 and report["judge"]["counts"]["missing_predictions"] > 0
    assert {"strict", "drivebench"} == set(report["mcq"])
    assert report["judge"]["provenance"]["rubrics"]["source"] == "drivekd"
    assert f"{len(samples) - 6} samples have no prediction" in result.output

    result = runner.invoke(app, ["eval", "report", str(out), "--out-dir", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "| tiny-student |" in result.output
    assert (tmp_path / "report" / "scores.png").is_file()


def test_errors_are_named(tmp_path):
    app = _app()
    bench_file = tmp_path / "drivebench.json"
    bench_file.write_text("[]")
    result = runner.invoke(app, ["eval", "score", str(bench_file), "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and "--image-root" in result.output
    result = runner.invoke(app, ["bench", "inference"])
    assert result.exit_code == 2 and "--quick" in result.output
    result = runner.invoke(app, ["bench", "inference", "--preset-pair", "llama"])
    assert result.exit_code == 2 and "internvl3" in result.output
