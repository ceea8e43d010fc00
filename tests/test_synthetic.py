"""Synthetic generator: determinism, schema validity, coverage, tag placement, rule consistency, balance."""

from __future__ import annotations

import dataclasses
import inspect
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drivekd.data.cameras import CAMERAS
from drivekd.data.schema import CAPABILITIES, Sample, read_jsonl
from drivekd.data.synthetic import QUESTION_TYPES, generate_dataset, generate_split
from drivekd.data.synthetic.questions import GENERAL_TYPES, GROUP_ACTION, STATIONARY
from drivekd.data.synthetic.render import render_views
from drivekd.data.synthetic.scene import sample_scene
from drivekd.data.tags import parse_tags

SMALL = (128, 72)
STOP_ACTIONS = {GROUP_ACTION["stop"], STATIONARY}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def driving(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Sample]]:
    out = tmp_path_factory.mktemp("driving")
    summary = generate_split(out, n_scenes=120, seed=3, image_size=SMALL)
    rows = list(read_jsonl(summary.path, check_files=True))
    assert len(rows) == summary.samples
    on_disk = [p for p in (out / "images").rglob("*.png")]
    assert summary.images == len(on_disk) > 120 * len(CAMERAS)  # the cameras and the framed copies
    return out, rows


def test_same_seed_gives_identical_bytes_even_across_hash_seeds(tmp_path: Path) -> None:
    generate_split(tmp_path / "a", n_scenes=4, seed=11, image_size=SMALL)
    script = (
        "import sys; from drivekd.data.synthetic import generate_split; "
        "generate_split(sys.argv[1], n_scenes=4, seed=11, image_size=(128, 72))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "b")], check=True, env=env)
    first, second = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert first.keys() == second.keys() and first == second
    generate_split(tmp_path / "c", n_scenes=4, seed=12, image_size=SMALL)
    assert _tree_bytes(tmp_path / "c")["train.jsonl"] != first["train.jsonl"]


def test_every_type_capability_kind_and_view_setting_appears(driving: tuple[Path, list[Sample]]) -> None:
    _, rows = driving
    assert {r.meta["question_type"] for r in rows} == set(QUESTION_TYPES)
    assert {r.capability for r in rows} == set(CAPABILITIES)
    assert {r.task for r in rows} == {"perception", "prediction", "behavior", "planning"}
    assert {r.kind for r in rows} == {"mcq", "open", "yes/no"}
    assert {r.meta["views"] for r in rows} == {"single", "multi"}
    assert {r.meta["domain"] for r in rows} == {"driving"}
    assert len({r.id for r in rows}) == len(rows)
    for r in rows:
        assert QUESTION_TYPES[r.meta["question_type"]] == r.task
        cams = [im.camera for im in r.images]
        assert cams == (["CAM_FRONT"] if r.meta["views"] == "single" else list(CAMERAS))
        assert all(not Path(im.path).is_absolute() for im in r.images)
        assert r.answer and r.rationale
        if r.kind == "mcq":
            assert all(f"{k}. {v}" in r.question for k, v in r.options.items())
            assert r.meta["gt"]["answer_text"] == r.options[r.answer]


def test_tags_are_in_the_question_and_on_a_shown_camera(driving: tuple[Path, list[Sample]]) -> None:
    _, rows = driving
    for r in rows:
        # Object extraction names its objects in the answer, every other type in the question.
        assert {str(t) for t in parse_tags(r.question + " " + r.answer)} == {str(t) for t in r.objects}
        shown = {im.camera for im in r.images}
        for tag, obj in zip(r.objects, r.meta["gt"]["objects"], strict=True):
            assert tag.camera in shown
            assert 0.0 <= tag.x <= 1.0 and 0.0 <= tag.y <= 1.0
            assert (obj["camera"], obj["x"], obj["y"]) == (tag.camera, tag.x, tag.y)


def test_tag_pixel_shows_the_object_not_the_background() -> None:
    size = (256, 144)
    checked = 0
    for index in range(16):
        scene = sample_scene(random.Random(index), f"s{index}")
        views = render_views(scene, CAMERAS, size)
        empty = render_views(dataclasses.replace(scene, objects=()), CAMERAS, size)
        for view, background in zip(views, empty, strict=True):
            drawn, bare = np.asarray(view.image, dtype=int), np.asarray(background.image, dtype=int)
            for placement in view.placements.values():
                u = min(int(placement.x * size[0]), size[0] - 1)
                v = min(int(placement.y * size[1]), size[1] - 1)
                assert np.abs(drawn[v, u] - bare[v, u]).sum() > 12
                checked += 1
    assert checked > 40


def test_rule_derived_answers_match_structured_ground_truth(driving: tuple[Path, list[Sample]]) -> None:
    _, rows = driving
    decisions: dict[tuple[str, str], tuple[str, str]] = {}
    for r in rows:
        gt = r.meta["gt"]
        decision = decisions.setdefault((r.scene_id, r.meta["views"]), (gt["rule"], gt["ego_action"]))
        assert decision == (gt["rule"], gt["ego_action"]), "one decision per scene and view setting"
        assert gt["ego_action"] in gt["safe_actions"]
        assert not set(gt["safe_actions"]) & set(gt["risky_actions"])
        if gt["environment"]["traffic_light"] == "red" or gt["environment"]["stop_sign"]:
            assert gt["ego_action"] in STOP_ACTIONS
        if gt["rule"] == "pedestrian_in_path":
            assert gt["ego_action"] in STOP_ACTIONS
        if gt["ego_action"] in STOP_ACTIONS:
            assert (gt["ego_action"] == STATIONARY) == (gt["ego"]["speed"] == "not moving")
        if gt["rule"] == "clear_road":
            assert gt["ego_action"] == GROUP_ACTION["keep"] and gt["trigger"] is None
        qtype = r.meta["question_type"]
        if qtype == "moving_status":
            assert gt["answer_text"] == gt["target"]["motion"].capitalize() + "."
        elif qtype == "ego_behavior":
            assert gt["answer_text"] == (
                f"The ego vehicle is {gt['ego']['steer']}. The ego vehicle is {gt['ego']['speed']}."
            )
        elif qtype == "rationale_grounded_planning":
            assert gt["target"]["action"] == gt["objects"][0]["action"]
            if gt["objects"][0]["is_trigger"]:
                assert gt["target"]["action"] == gt["ego_action"]
        elif qtype == "collision_inducing_actions" and r.kind == "open":
            hits = gt["objects"][0]["collision_actions"]
            assert (r.answer == "No such action will lead to a collision.") == (not hits)
        elif qtype == "safe_action_set" and r.kind == "yes/no":
            assert (r.answer == "Yes.") == (gt["target"]["asked_action"] in gt["safe_actions"])


def test_answers_are_balanced(driving: tuple[Path, list[Sample]]) -> None:
    _, rows = driving
    letters = Counter(r.answer for r in rows if r.kind == "mcq")
    total = sum(letters.values())
    assert set(letters) == {"A", "B", "C", "D"}
    assert all(0.2 < n / total < 0.3 for n in letters.values()), letters
    yes_no = Counter(r.answer for r in rows if r.kind == "yes/no")
    assert all(0.35 < yes_no[a] / yes_no.total() < 0.65 for a in ("Yes.", "No.")), yes_no
    behaviour = [r.meta["gt"] for r in rows if r.meta["question_type"] == "ego_behavior"]
    actions = Counter(gt["ego_action"] for gt in behaviour)
    assert set(actions) == {*GROUP_ACTION.values(), STATIONARY}, actions
    assert max(actions.values()) / len(behaviour) < 0.4, actions
    assert (
        len({gt["ego"]["steer"] for gt in behaviour}) == 5
        and len({gt["ego"]["speed"] for gt in behaviour}) == 4
    )


def test_general_domain(tmp_path: Path) -> None:
    summary = generate_split(tmp_path, n_scenes=12, seed=0, split="pre", domain="general", image_size=SMALL)
    rows = list(read_jsonl(tmp_path / "pre.jsonl", check_files=True))
    assert summary.samples == len(rows) > 24
    assert {r.meta["domain"] for r in rows} == {"general"}
    assert {(r.capability, r.task) for r in rows} == {("perception", "perception")}
    assert {r.kind for r in rows} == {"mcq", "open", "yes/no"}
    assert {r.meta["question_type"] for r in rows} == set(GENERAL_TYPES)
    for r in rows:
        assert [im.camera for im in r.images] == ["CAM_FRONT"]
        gt = r.meta["gt"]
        if r.meta["question_type"] == "general_count":
            kind = gt["target"]["kind"]
            assert r.options[r.answer] == str(sum(s[0] == kind for s in gt["shapes"]))


def test_dataset_splits_single_view_and_jpeg(tmp_path: Path) -> None:
    summaries = generate_dataset(
        tmp_path, n_scenes=10, seed=5, views="single", image_size=SMALL, image_format="jpg"
    )
    assert {k: s.scenes for k, s in summaries.items()} == {"train": 8, "val": 1, "test": 1}
    scene_ids = {k: {r.scene_id for r in read_jsonl(s.path)} for k, s in summaries.items()}
    assert not scene_ids["train"] & scene_ids["val"] and not scene_ids["train"] & scene_ids["test"]
    images = sorted(p.name for p in (tmp_path / "images").rglob("*") if p.is_file())
    assert images and {name.split("-")[0].removesuffix(".jpg") for name in images} == {"CAM_FRONT"}
    assert all(name.endswith(".jpg") for name in images)
    assert {r.meta["views"] for s in summaries.values() for r in read_jsonl(s.path)} == {"single"}


def test_no_letter_prior_in_any_question_type(driving: tuple[Path, list[Sample]]) -> None:
    """Options are shuffled: in every question type each letter is right about a quarter of the time, so a model
    that ignores the images cannot beat chance by the letter or the options' order."""
    _, rows = driving
    by_type: dict[str, Counter[str]] = {}
    for r in rows:
        if r.kind == "mcq":
            assert r.options is not None and set(r.options) == {"A", "B", "C", "D"}
            by_type.setdefault(r.meta["question_type"], Counter())[r.answer] += 1
    assert len(by_type) == 6, by_type
    for qtype, letters in by_type.items():
        assert letters.total() >= 60, (qtype, letters)
        assert all(0.1 < letters[k] / letters.total() < 0.4 for k in "ABCD"), (qtype, letters)
    vehicles = [
        r.options
        for r in rows
        if r.meta["question_type"] == "moving_status"
        and r.meta["gt"]["objects"][0]["category"] != "pedestrian"
    ]
    assert len({tuple(o.values()) for o in vehicles}) > 6  # the same four motions, in many orders


def test_synth_defaults_draw_from_the_demo_teachers_training_distribution() -> None:
    """`drivekd data synth` with its defaults writes what the demo teacher was trained on: its image size, both
    view settings and its data seed (so its train split is a prefix of the teacher's)."""
    from drivekd.data.cli import synth_cmd
    from drivekd.data.synthetic.generate import DEFAULT_SIZE
    from drivekd.demo.teacher import TeacherRecipe

    defaults = {k: p.default for k, p in inspect.signature(synth_cmd).parameters.items()}
    recipe = TeacherRecipe()
    assert (defaults["width"], defaults["height"]) == DEFAULT_SIZE == recipe.image_size
    assert defaults["views"] == "both" and defaults["domain"] == "driving"
    assert defaults["seed"] == recipe.data_seed


def test_a_tagged_question_shows_its_object_framed_and_nothing_else_changed(
    driving: tuple[Path, list[Sample]],
) -> None:
    """Visual prompting (mark_objects, the default): a question naming objects by tag shows, for each tagged
    camera, a copy of that camera's image that differs from it only on a frame around each tagged object's
    placement; every other camera, and every question without a tag, shows the plain rendering."""
    out, rows = driving
    tagged = [r for r in rows if parse_tags(r.question)]
    assert tagged and len(tagged) < len(rows)
    for row in tagged[:40]:
        cams = {t.camera: t for t in parse_tags(row.question)}
        for ref in row.images:
            plain = out / Path(ref.path).parent / f"{ref.camera}.png"
            shown = np.asarray(Image.open(out / ref.path), dtype=np.int16)
            base = np.asarray(Image.open(plain), dtype=np.int16)
            if ref.camera not in cams:
                assert ref.path == plain.relative_to(out).as_posix()
                continue
            assert ref.path != plain.relative_to(out).as_posix()
            changed = np.argwhere(np.abs(shown - base).sum(axis=2) > 0)
            assert len(changed), "the framed copy equals the plain image"
            tag = cams[ref.camera]
            h, w = base.shape[:2]
            ys, xs = changed[:, 0], changed[:, 1]
            # the frame surrounds the tag point: it has pixels left, right, above and below it
            u, v = tag.x * w, tag.y * h
            assert xs.min() < u < xs.max() and ys.min() < v < ys.max()
            assert (shown[ys, xs] == 255).all(axis=1).mean() > 0.9  # a white frame
    for row in [r for r in rows if not parse_tags(r.question)][:20]:
        assert all(Path(ref.path).name == f"{ref.camera}.png" for ref in row.images)


def test_mark_objects_off_gives_the_plain_renderings(tmp_path: Path) -> None:
    summary = generate_split(tmp_path, n_scenes=3, seed=3, image_size=SMALL, mark_objects=False)
    rows = list(read_jsonl(summary.path, check_files=True))
    assert summary.images == 3 * len(CAMERAS)
    assert all(Path(ref.path).name == f"{ref.camera}.png" for r in rows for ref in r.images)
