"""Per-token labels of rendered scenes and the teacher's dense vision stage."""

from __future__ import annotations

import itertools

import torch
from PIL import Image

from drivekd.data.synthetic.dense import ATTRIBUTES, labelled_views, token_labels
from drivekd.data.synthetic.render import Placement, View
from drivekd.data.synthetic.scene import SceneObject
from drivekd.demo.dense import HELDOUT, pretrain_vision
from drivekd.demo.teacher import TeacherRecipe
from drivekd.models.pair import build_tiny_pair


def _view(boxes: dict[str, tuple[float, float, float, float]], depth: dict[str, float]) -> View:
    placements = {oid: Placement(0.5, 0.5, box, depth[oid]) for oid, box in boxes.items()}
    return View("CAM_FRONT", Image.new("RGB", (112, 56)), placements)


def test_a_token_takes_the_object_covering_most_of_it_and_at_least_a_quarter():
    objects = {
        "car": SceneObject("car", "sedan", "red", 0, 0, motion="going ahead"),
        "bus": SceneObject("bus", "bus", "blue", 0, 0, motion="stopped"),
    }
    # 4 x 2 tokens of 28 px: the car covers token 0 whole and a third of token 1, the bus the other two thirds.
    view = _view({"car": (0, 0, 37.33, 28), "bus": (37.33, 0, 56, 28)}, {"car": 5.0, "bus": 9.0})
    codes: dict[str, dict[str, int]] = {a: {} for a in ATTRIBUTES}
    labels = token_labels(view, objects, (112, 56), codes)
    assert codes["category"] == {"sedan": 1, "bus": 2}
    assert labels["category"].tolist() == [1, 2, 0, 0, 0, 0, 0, 0]
    assert labels["colour"].tolist()[:2] == [codes["colour"]["red"], codes["colour"]["blue"]]
    assert labels["motion"].tolist()[:2] == [codes["motion"]["going ahead"], codes["motion"]["stopped"]]
    small = _view({"car": (28, 28, 33.6, 56)}, {"car": 5.0})  # a fifth of token 5
    assert token_labels(small, objects, (112, 56), codes)["category"].sum() == 0


def test_labelled_views_are_fresh_rendered_scenes_with_objects_on_their_tokens():
    codes: dict[str, dict[str, int]] = {a: {} for a in ATTRIBUTES}
    views = list(itertools.islice(labelled_views(3, (224, 112), codes), 12))
    assert all(v.image.size == (224, 112) and v.labels["category"].shape == (32,) for v in views)
    assert len({v.image.tobytes() for v in views}) == 12
    assert sum(int((v.labels["category"] > 0).sum()) for v in views) > 12
    assert len({v.camera for v in views}) > 1  # one random camera of the six per scene
    front = itertools.islice(labelled_views(3, (224, 112), {a: {} for a in ATTRIBUTES}, ("CAM_FRONT",)), 6)
    assert {v.camera for v in front} == {"CAM_FRONT"}
    again = list(itertools.islice(labelled_views(3, (224, 112), {a: {} for a in ATTRIBUTES}), 2))
    assert [v.image.tobytes() for v in again] == [
        v.image.tobytes() for v in views[:2]
    ]  # deterministic by seed


def test_the_dense_stage_trains_the_vision_tower():
    torch.manual_seed(0)
    recipe = TeacherRecipe()
    pair = build_tiny_pair(recipe.family, image_size=recipe.image_size, seed=0)
    visual = pair.teacher.model.visual
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    seen = []
    report = pretrain_vision(
        visual,
        pair.teacher_processor.image_processor,
        steps=12,
        batch=4,
        lr=3e-3,
        seed=1,
        image_size=(224, 112),
        progress=lambda step, seconds, scores: seen.append((step, set(scores))),
        every=5,
    )
    assert seen == [(5, set(ATTRIBUTES)), (10, set(ATTRIBUTES))]
    assert report["steps"] == 12 and report["heldout_object_tokens"] > 0
    assert report["last_loss"] < report["first_loss"]
    assert any(not torch.equal(before[k], v) for k, v in visual.state_dict().items())
    assert set(report["accuracy_after"]) == set(ATTRIBUTES)
    held = list(itertools.islice(labelled_views(1, (224, 112), {a: {} for a in ATTRIBUTES}), HELDOUT))
    for a in ATTRIBUTES:
        values = [int(x) for v in held for x in v.labels[a] if x > 0]
        top = max(values.count(x) for x in set(values))
        assert report["majority_class"][a] == round(100.0 * top / len(values), 1)
