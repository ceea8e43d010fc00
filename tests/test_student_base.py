"""The demo's base student: its pretraining domain (describe), its shape against the teacher's, and
``drivekd demo make-student-base`` end to end with a tiny recipe."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from drivekd.data.schema import read_jsonl
from drivekd.data.synthetic import QUESTION_TYPES, generate_split
from drivekd.data.synthetic.describe import DESCRIBE_TYPES, ask_describe
from drivekd.data.synthetic.questions import SceneViews
from drivekd.data.synthetic.render import render_views
from drivekd.data.synthetic.rules import describe, relation, where
from drivekd.data.synthetic.scene import sample_scene
from drivekd.demo.config import PRESETS
from drivekd.demo.student_base import (
    MIN_TEACHER_RATIO,
    StudentBaseRecipe,
    build_student,
    make_student_base,
    shape_against_teacher,
    shipped_student_base,
)
from drivekd.demo.teacher import TeacherRecipe, fingerprint, parameter_count
from drivekd.models.pair import load_spec


@pytest.fixture(scope="module")
def describe_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("describe")
    summary = generate_split(out, n_scenes=6, seed=1000, split="pretrain", domain="describe")
    return out, list(read_jsonl(summary.path))


def test_describe_domain_asks_open_descriptions_not_the_driving_types(describe_split) -> None:
    _, samples = describe_split
    assert len(samples) == 6 * 2 * len(DESCRIBE_TYPES)  # both view settings
    assert {s.meta["question_type"] for s in samples} == set(DESCRIBE_TYPES)
    assert not set(DESCRIBE_TYPES) & set(QUESTION_TYPES)
    assert {s.kind for s in samples} == {"open"} and all(s.options is None for s in samples)
    assert {s.meta["domain"] for s in samples} == {"describe"}
    assert {s.meta["views"] for s in samples} == {"single", "multi"}
    assert {len(s.images) for s in samples} == {1, 6}
    assert all(s.id.startswith("describe-pretrain-1000-") for s in samples)


def test_describe_answers_state_the_scene_facts(describe_split) -> None:
    _, samples = describe_split
    for s in samples:
        gt = s.meta["gt"]
        if s.meta["question_type"] == "describe_scene":
            assert f"It is {gt['weather']} weather." in s.answer
            assert (f"The traffic light ahead is {gt['traffic_light']}." in s.answer) == bool(
                gt["traffic_light"]
            )
            assert ("an intersection" in s.answer) == gt["intersection"]
            assert ("a crosswalk" in s.answer) == gt["crosswalk"]
            assert f"The ego vehicle is {gt['ego']['speed']}" in s.answer
        else:
            assert len(gt["objects"]) == 0 or s.answer.startswith(f"I can see {len(gt['objects'])} object")
            for obj in gt["objects"]:
                assert obj["relation"] in s.answer and obj["where"] in s.answer


def test_describe_objects_are_the_visible_ones_with_their_relations() -> None:
    """Rebuilt from one scene: every object the views show is listed with describe(), relation() and where()."""
    scene = sample_scene(random.Random(3), "s")
    rendered = render_views(scene, ("CAM_FRONT",), (224, 112))
    views = SceneViews.of("single", rendered)
    listed = ask_describe(scene, views, random.Random(0))[1]
    visible = [o for o in scene.objects if o.id in views.placements]
    hidden = [o for o in scene.objects if o.id not in views.placements]
    for obj in visible:
        assert f"{describe(obj)} {relation(scene, obj)}, {where(obj)}" in listed.answer
    assert {o["object_id"] for o in listed.gt["objects"]} == {o.id for o in visible}
    assert not {o.id for o in hidden} & {o["object_id"] for o in listed.gt["objects"]}


def test_describe_scenes_are_their_own_and_the_seed_is_disjoint(tmp_path: Path, describe_split) -> None:
    """The base student's data seed is none of the demo's or the teacher's, and a describe scene is not the driving
    scene of the same seed, split and index (a stream of its own)."""
    recipe, teacher = StudentBaseRecipe(), TeacherRecipe()
    used = {teacher.data_seed, teacher.acceptance_seed, *(c.data_seed for c in PRESETS.values())}
    assert recipe.data_seed not in used
    out, samples = describe_split
    driving = generate_split(tmp_path, n_scenes=1, seed=1000, split="pretrain")
    a = (out / samples[0].images[0].path).read_bytes()
    b = (tmp_path / next(iter(read_jsonl(driving.path))).images[0].path).read_bytes()
    assert a != b


def test_recipe_shape_differs_from_the_teacher_and_is_3x_smaller() -> None:
    recipe, teacher = StudentBaseRecipe(), TeacherRecipe()
    assert (recipe.family, recipe.image_size) == (teacher.family, teacher.image_size)
    for field in ("layers", "hidden", "heads", "vision_hidden"):
        assert getattr(recipe, field) != getattr(teacher, field), field
    shape = shape_against_teacher(build_student(recipe, teacher))
    assert shape["teacher_parameters"] >= MIN_TEACHER_RATIO * shape["parameters"]
    assert shape["student_shape"] == {
        "num_hidden_layers": recipe.layers,
        "hidden_size": recipe.hidden,
        "num_attention_heads": recipe.heads,
    }


def test_student_shares_the_teachers_token_layout(describe_split) -> None:
    out, samples = describe_split
    pair = build_student(StudentBaseRecipe(), TeacherRecipe())
    pair.check_layout([samples[0], samples[2]], out)  # a single-view and a six-camera sample


def test_make_student_base_writes_a_loadable_pretrained_folder(tmp_path: Path) -> None:
    recipe = replace(StudentBaseRecipe(), pretrain_scenes=4, heldout_scenes=1, steps=6, checkpoint_every=3)
    out = tmp_path / "out"
    manifest = make_student_base(out, tmp_path / "work", recipe, command="test")
    written = json.loads((out / "MANIFEST.json").read_text())
    assert written == json.loads(json.dumps(manifest))
    assert written["steps_done"] == 6 and written["dtype"] == "float16"
    assert written["device"] == f"CPU, {recipe.threads} thread(s)"
    assert written["data"]["pretrain"] | {"by_question_type": None} == {
        "scenes": 4,
        "samples": 16,
        "split": "pretrain",
        "seed": 1000,
        "by_question_type": None,
    }
    assert written["heldout_after"]["loss"] < written["heldout_before"]["loss"]
    assert written["teacher_ratio"] >= MIN_TEACHER_RATIO
    model, _ = load_spec(out)
    assert sum(p.numel() for p in model.parameters()) == written["parameters"]
    assert model.config.text_config.num_hidden_layers == recipe.layers
    assert (out / "model.safetensors").stat().st_size < 10 * 2**20


def test_make_student_base_refuses_a_used_out_folder(tmp_path: Path) -> None:
    from drivekd.cli import app

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("x")
    result = CliRunner().invoke(app, ["demo", "make-student-base", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not an empty folder" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: --device cuda is allowed")
@pytest.mark.parametrize("command", ["make-student-base", "make-teacher"])
def test_device_cuda_without_a_gpu_is_refused_before_anything_is_written(
    tmp_path: Path, command: str
) -> None:
    from drivekd.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["demo", command, "--out", str(out), "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA GPU is visible" in result.output
    assert not out.exists()


def test_shipped_base_student_is_small_documented_and_pretrained() -> None:
    folder = shipped_student_base()
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["command"].startswith("drivekd demo make-student-base")
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 10 * 2**20
    assert manifest["recipe"] == json.loads(json.dumps(asdict(StudentBaseRecipe())))
    assert manifest["sha256"]["model.safetensors"] == fingerprint(folder)
    assert manifest["heldout_after"]["loss"] < manifest["heldout_before"]["loss"] / 4
    assert manifest["teacher_parameters"] == parameter_count(
        build_student(StudentBaseRecipe(), TeacherRecipe()).teacher
    )
