"""`drivekd demo --quick` end to end (real training, generation, HTTP judge, report), and the demo's pure pieces:
aggregation over seeds, the multi-vs-SFT statement, the output-folder rules and the per-method overrides."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from drivekd.cli import app
from drivekd.data.schema import CAPABILITIES, read_jsonl
from drivekd.demo import intervals
from drivekd.demo.config import FULL, QUICK
from drivekd.demo.methods import METHODS, SINGLE_TEACHER, SINGLE_TEACHER_PARTS, TEACHER, train_overrides
from drivekd.demo.report import Stat, by_capability, capability_accuracy, run_scores, verdict
from drivekd.demo.teacher import read_manifest, shipped_teacher
from drivekd.demo.workspace import Workspace, WorkspaceError
from drivekd.evaluation import extract_choice
from drivekd.training.config import load_config


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "drivekd.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _csv(out: Path) -> dict[str, dict[str, str]]:
    with (out / "report" / "results.csv").open() as handle:
        return {row["method"]: row for row in csv.DictReader(handle)}


def _recomputed_accuracy(out: Path, predictions: Path) -> dict[str, float | None]:
    """Strict MCQ accuracy per capability and their mean, from the raw files only."""
    samples = {s.id: s for s in read_jsonl(out / "data" / "test.jsonl", check_files=False)}
    answers = {json.loads(line)["id"]: json.loads(line)["prediction"] for line in predictions.open()}
    accuracy: dict[str, float | None] = {}
    for capability in CAPABILITIES:
        mcq = [s for s in samples.values() if s.capability == capability and s.kind == "mcq"]
        right = sum(extract_choice(answers.get(s.id), "strict") == s.answer for s in mcq)
        accuracy[capability] = 100.0 * right / len(mcq) if mcq else None
    present = [v for v in accuracy.values() if v is not None]
    accuracy["avg"] = sum(present) / len(present)
    return accuracy


@pytest.mark.slow
def test_quick_demo_reports_every_method(quick_demo):
    rows = _csv(quick_demo)
    readme = (quick_demo / "report" / "README.md").read_text()
    assert set(rows) == {m.name for m in METHODS} | {SINGLE_TEACHER}
    for name in rows:
        assert f"| {name} |" in readme
        assert rows[name]["seeds"] == "1"
    for metric in ("judge", "mcq"):  # the single-teacher row: each capability from its own recipe
        for capability, method in SINGLE_TEACHER_PARTS.items():
            column = f"{metric}_{capability}_mean"
            assert rows[SINGLE_TEACHER][column] == rows[method][column]
    for name in ("## Table 1", "## Table 4", "## Deployment", "## Pre-study", "## Training curves"):
        assert name in readme


def _markdown_rows(out: Path, heading: str) -> dict[str, list[str]]:
    """The cells of the table under ``heading`` in the report's README, by method."""
    section = (out / "report" / "README.md").read_text().split(heading, 1)[1].split("\n#", 1)[0]
    cells = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {row[0].strip(): [c.strip() for c in row[1:]] for row in cells[1:]}


@pytest.mark.slow
def test_quick_demo_mcq_accuracy_matches_the_prediction_files(quick_demo):
    rows = _csv(quick_demo)
    table = {
        **_markdown_rows(quick_demo, "### MCQ accuracy, strict (%)"),
        **_markdown_rows(quick_demo, "### The other methods: MCQ accuracy, strict (%)"),
    }
    for method in METHODS:
        folder = quick_demo / "eval" / "test" / method.slug
        predictions = (
            folder / "predictions.jsonl" if method is TEACHER else folder / "seed-0" / "predictions.jsonl"
        )
        expected = _recomputed_accuracy(quick_demo, predictions)
        assert table[method.name][1:] == ["–" if v is None else f"{v:.2f}" for v in expected.values()]
        for column, value in expected.items():
            reported = rows[method.name][f"mcq_{column}_mean"]
            if value is None:
                assert reported == ""
            else:
                assert float(reported) == pytest.approx(value, abs=1e-9), (method.name, column)


@pytest.mark.slow
def test_quick_demo_judges_five_runs_with_std(quick_demo):
    for scores in (quick_demo / "eval" / "test").rglob("scores.json"):
        judge = json.loads(scores.read_text())["judge"]
        assert judge["runs"] == 5 and judge["config"]["runs"] == 5
        assert judge["counts"]["gradings"] == 5 * judge["counts"]["judged_samples"] > 0
        assert judge["counts"]["failed"] == 0
        assert all(len(c["runs"]) == 5 and c["std"] is not None for c in judge["per_capability"].values())
    summary = json.loads((quick_demo / "report" / "summary.json").read_text())
    for runs in summary["per_run"].values():
        assert all(run["judge_run_std"] is not None for run in runs.values())
    # every evaluated model (the single-teacher row is assembled from three of them)
    assert all(
        row["judge_run_std_mean"] is not None for row in summary["methods"] if row["method"] != SINGLE_TEACHER
    )


@pytest.mark.slow
def test_quick_demo_statement_matches_the_csv(quick_demo):
    rows = _csv(quick_demo)
    multi, sft = (round(float(rows[m]["judge_avg_mean"]), 2) for m in ("multi-agp", "sft"))
    statement = json.loads((quick_demo / "report" / "summary.json").read_text())["statement"]
    expected = "beat SFT" if multi > sft else "tied with SFT" if multi == sft else "did not beat SFT"
    assert f"multi-teacher {expected}" in statement and statement.count("multi-teacher ") == 1
    assert f"{multi:.2f}" in statement and f"{sft:.2f}" in statement
    assert statement in (quick_demo / "report" / "README.md").read_text()


@pytest.mark.slow
def test_quick_demo_intervals_agree_with_the_tables_and_head_the_report(quick_demo):
    """The bootstrap estimates are Table 1's averages recomputed per question; the headline is the paired one."""
    rows = _csv(quick_demo)
    summary = json.loads((quick_demo / "report" / "summary.json").read_text())
    readme = (quick_demo / "report" / "README.md").read_text()
    for metric in ("judge", "mcq"):
        table = summary["intervals"][metric]
        for method, entry in table.items():
            average = entry["average"]
            assert average["estimate"] == pytest.approx(float(rows[method][f"{metric}_avg_mean"]), abs=1e-6)
            assert average["low"] <= average["estimate"] <= average["high"]
        paired = table["multi-agp"]["vs_reference"]
        difference = float(rows["multi-agp"][f"{metric}_avg_mean"]) - float(rows["sft"][f"{metric}_avg_mean"])
        assert paired["difference"]["estimate"] == pytest.approx(difference, abs=1e-6)
        assert 0 < paired["p_value"] <= 1 and paired["seeds"] == len(QUICK.seeds)
        assert "vs_reference" not in table["teacher"] and "vs_reference" not in table["sft"]
    headline = summary["headline"]
    assert readme.startswith(f"# Drive-KD demo report (quick)\n\n**{headline}**")
    assert f"{paired['difference']['estimate']:+.2f}" in summary["mcq_headline"]
    assert ("Multi-teacher (AGP) beat SFT" in headline) == (
        summary["intervals"]["judge"]["multi-agp"]["vs_reference"]["difference"]["estimate"] > 0
    )


@pytest.mark.slow
def test_quick_demo_writes_images_and_logs(quick_demo):
    report = quick_demo / "report"
    for name in ("scores.png", "training_curves.png", "prestudy.png", "attention.png"):
        with Image.open(report / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100
    logs = report / "logs"
    for method in (m for m in METHODS if m.trained):
        lines = (logs / f"{method.slug}-seed-0.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, QUICK.steps + 1))
    stages = [json.loads(line)["stage"] for line in (logs / "timings.jsonl").read_text().splitlines()]
    assert {"data", "teacher", "train+evaluate", "deployment", "prestudy"} <= set(stages)
    assert "train+evaluate" in (logs / "demo.log").read_text()


def test_shipped_teacher_is_small_and_documented():
    folder = shipped_teacher()
    manifest = read_manifest(folder)
    assert manifest["command"].startswith("drivekd demo make-teacher")
    assert manifest["test_scores"]["mcq_strict_accuracy"] is not None
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 20 * 2**20


def test_stat_is_the_mean_and_sample_std_over_seeds():
    stat = Stat.of([10.0, 12.0, 14.0])
    assert (stat.mean, stat.std, stat.n) == (12.0, 2.0, 3)
    assert Stat.of([5.0]).std is None and Stat.of([None, 4.0]).mean == 4.0
    assert Stat.of([None]).mean is None and Stat.of([1.0, 2.0]).text() == "1.50 ± 0.71"


@pytest.mark.parametrize(
    ("multi", "sft", "outcome"),
    [(41.2, 39.8, "beat SFT"), (38.0, 39.8, "did not beat SFT"), (39.801, 39.799, "tied with SFT")],
)
def test_verdict_says_plainly_who_won(multi, sft, outcome):
    text = verdict(Stat(multi, 1.0, 3), Stat(sft, 0.5, 3), what="average judge score")
    assert f"multi-teacher {outcome}" in text
    assert f"{multi:.2f} ± 1.00" in text and f"{sft:.2f} ± 0.50" in text


def test_verdict_qualifies_noise_and_single_seeds():
    assert "within noise" in verdict(Stat(40.5, 2.0, 3), Stat(40.0, 1.0, 3), what="x")
    assert "exceeds the spread" in verdict(Stat(45.0, 2.0, 3), Stat(40.0, 1.0, 3), what="x")
    assert "One seed" in verdict(Stat(45.0, None, 1), Stat(40.0, None, 1), what="x")


def test_capability_accuracy_pools_reasoning_tasks():
    per_task = {
        "perception": {"correct": 1, "total": 4},
        "prediction": {"correct": 1, "total": 1},
        "behavior": {"correct": 0, "total": 3},
        "overall": {"correct": 2, "total": 8},
    }
    accuracy = capability_accuracy(per_task)
    assert accuracy == {"perception": 25.0, "reasoning": 25.0, "planning": None, "avg": 25.0}


def test_single_teacher_row_takes_each_capability_from_its_recipe():
    def run(**values: float) -> dict[str, float]:
        return {f"{m}_{c}": v for c, v in values.items() for m in ("judge", "mcq")}

    parts = {
        "perception": [run(perception=60.0, reasoning=1.0, planning=1.0)],
        "reasoning": [run(perception=1.0, reasoning=30.0, planning=1.0)],
        "planning": [run(perception=1.0, reasoning=1.0, planning=90.0)],
    }
    (row,) = by_capability(parts)
    assert row["judge_perception"] == 60.0 and row["mcq_reasoning"] == 30.0 and row["judge_planning"] == 90.0
    assert row["judge_avg"] == pytest.approx(60.0) and row["mcq_avg"] == pytest.approx(60.0)
    questions = intervals.by_capability(
        {"perception": [{"p": 1.0, "r": 0.0}], "reasoning": [{"p": 0.0, "r": 2.0}]},
        {"p": "perception", "r": "reasoning", "x": "planning"},
    )
    assert questions == [{"p": 1.0, "r": 2.0}]
    with pytest.raises(ValueError, match="numbers of seeds"):
        by_capability({"perception": [{}], "reasoning": [{}, {}], "planning": [{}]})


def test_run_scores_reads_judge_and_mcq():
    stats = {"mean": 50.0, "std": 0.0, "runs": [50.0] * 5}
    report = {
        "judge": {"per_capability": dict.fromkeys(CAPABILITIES, stats), "overall": stats},
        "mcq": {"strict": {"planning": {"correct": 1, "total": 2}}},
    }
    scores = run_scores(report)
    assert scores["judge_avg"] == 50.0 and scores["judge_run_std"] == 0.0
    assert scores["mcq_planning"] == 50.0 and scores["mcq_perception"] is None and scores["mcq_avg"] == 50.0


def test_workspace_refuses_files_foreign_folders_and_other_settings(tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(WorkspaceError, match="is a file"):
        Workspace(file).claim({})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(WorkspaceError, match="not a demo folder"):
        Workspace(foreign).claim({})
    demo = Workspace(tmp_path / "demo")
    assert demo.claim({"config": {"steps": 1}}) is False
    assert demo.claim({"config": {"steps": 1}}) is True  # same settings: resumed
    with pytest.raises(WorkspaceError, match="differs in: config"):
        demo.claim({"config": {"steps": 2}})


def test_cli_rejects_a_file_as_out(tmp_path):
    file = tmp_path / "report.txt"
    file.write_text("keep me")
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(file)])
    assert result.exit_code == 2 and "is a file" in result.output
    assert file.read_text() == "keep me"


@pytest.mark.parametrize("config", [QUICK, FULL])
def test_every_method_trains_with_the_same_optimiser(config, tmp_path):
    loaded = {
        m.name: load_config(
            None,
            train_overrides(
                m, config, train=tmp_path / "t.jsonl", teacher=tmp_path, seed=0, output_dir=tmp_path
            ),
        )
        for m in METHODS
        if m.trained
    }
    assert {c.optim.model_dump_json() for c in loaded.values()} == {
        next(iter(loaded.values())).optim.model_dump_json()
    }
    assert {c.data.micro_batch for c in loaded.values()} == {config.micro_batch}
    assert {name: (c.distill.recipe, c.gradients.method) for name, c in loaded.items()} == {
        "sft": ("sft", "none"),
        "kl": ("kl", "none"),
        "perception": ("perception", "none"),
        "reasoning": ("reasoning", "none"),
        "planning": ("planning", "none"),
        "multi-none": ("multi", "none"),
        "multi-g2": ("multi", "g2"),
        "multi-agp": ("multi", "agp"),
    }
