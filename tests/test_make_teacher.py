"""`drivekd demo make-teacher` end to end on a tiny recipe: it trains, measures (with and without the pictures) and
writes a loadable half-precision folder whose manifest says how it was made."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from drivekd.demo.teacher import TeacherRecipe, fingerprint, make_teacher
from drivekd.models.pair import load_spec

TINY = replace(
    TeacherRecipe(),
    train_scenes=2,
    acceptance_scenes=1,
    steps=2,
    checkpoint_every=1,
    micro_batch=2,
    judge_runs=1,
    max_new_tokens=8,
    hidden=32,
    layers=2,
    heads=2,
    kv_heads=1,
    intermediate=64,
    vision_hidden=16,
    vision_depth=1,
    dense_steps=2,
    dense_batch=2,
)


def test_make_teacher_writes_a_measured_loadable_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = make_teacher(out, tmp_path / "work", TINY, command="test")
    written = json.loads((out / "MANIFEST.json").read_text())
    assert written == json.loads(json.dumps(manifest))
    assert written["steps_done"] == 2 and written["dtype"] == "float16"
    assert written["device"] == "CPU, 1 thread(s)"
    assert written["dense_stage"]["steps"] == 2 and set(written["dense_stage"]["accuracy_after"]) == {
        "category",
        "colour",
        "motion",
    }
    assert (
        written["data"]["test"]["split"] == "acceptance"
        and written["data"]["test"]["seed"] == TINY.acceptance_seed
    )
    scores = written["test_scores"]
    assert 0 <= scores["mcq_strict_accuracy"] <= 100 and 0 <= scores["blind_mcq_strict_accuracy"] <= 100
    checks = written["acceptance"]["checks"]
    assert (
        checks["blind_drop"]["value"] == scores["mcq_strict_accuracy"] - scores["blind_mcq_strict_accuracy"]
    )
    assert written["acceptance"]["all_met"] is False  # two steps of a tiny model know nothing
    assert written["sha256"]["model.safetensors"] == fingerprint(out)
    model, _ = load_spec(out)
    assert sum(p.numel() for p in model.parameters()) == written["parameters"]
    assert model.config.text_config.num_hidden_layers == TINY.layers


def test_a_resumed_make_teacher_keeps_its_dense_stage_report(tmp_path: Path) -> None:
    """The rerun resumes the SFT from its checkpoint (which holds the dense stage's weights) and reports the stage
    it did not run again."""
    first = make_teacher(tmp_path / "a", tmp_path / "work", TINY, command="test")
    again = make_teacher(tmp_path / "b", tmp_path / "work", TINY, command="test")
    assert again["dense_stage"] == first["dense_stage"]
    assert again["sha256"] == first["sha256"]


def test_make_teacher_options_reach_the_recipe_and_the_device(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from drivekd.cli import app
    from drivekd.demo import teacher

    seen = {}

    def fake(out, work, recipe, *, command, device):
        seen.update(recipe=recipe, device=device, command=command)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(teacher, "make_teacher", fake)
    args = [
        "--dense-steps",
        "7",
        "--lr",
        "0.01",
        "--micro-batch",
        "3",
        "--train-minutes",
        "2.5",
        "--steps",
        "9",
    ]
    result = CliRunner().invoke(app, ["demo", "make-teacher", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and "stopped by the test" in result.output
    recipe = seen["recipe"]
    assert (recipe.dense_steps, recipe.lr, recipe.micro_batch, recipe.train_minutes, recipe.steps) == (
        7,
        0.01,
        3,
        2.5,
        9,
    )
    assert seen["device"] == "cpu" and seen["command"].startswith("drivekd")
