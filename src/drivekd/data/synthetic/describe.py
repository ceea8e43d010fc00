"""The "describe" domain: open-ended descriptions of the driving world's scenes, a pretraining task for the demo's
base student (not one of the paper's eight question types, no options).

A scene is rendered as the driving domain renders it and asked, per view setting, to be described (weather, road
layout, the visible traffic light, the ego vehicle's motion and its arrow cue, how many objects are seen) and to
list the visible objects with where they are (:func:`~drivekd.data.synthetic.rules.describe`,
:func:`~drivekd.data.synthetic.rules.relation`, :func:`~drivekd.data.synthetic.rules.where`, the camera). Every
answer is built from the scene's facts, stored as plain JSON in ``QA.gt``.
"""

from __future__ import annotations

import random
from typing import Any

from drivekd.data.cameras import CAMERAS
from drivekd.data.synthetic.questions import QA, SPEED_CUES, STEER_CUES
from drivekd.data.synthetic.rules import SceneViews, _view_label, article, describe, relation, where
from drivekd.data.synthetic.scene import Scene, SceneObject

DESCRIBE_TYPES = ("describe_scene", "list_objects")
PHRASINGS = {
    "describe_scene": (
        "Describe the scene.",
        "Describe the driving scene in the images.",
        "What does the scene look like?",
    ),
    "list_objects": (
        "List the objects you can see and where they are.",
        "Which objects are visible, and where is each of them?",
        "Name every object in the images and say where it is.",
    ),
}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _objects_seen(visible: list[SceneObject], views: SceneViews) -> list[SceneObject]:
    """Visible objects in camera order (the camera that shows each best), nearest first within a camera."""
    return sorted(visible, key=lambda o: (CAMERAS.index(views.camera(o.id)), abs(o.x)))


def _object_text(scene: Scene, obj: SceneObject, views: SceneViews) -> str:
    text = f"{article(describe(obj))} {relation(scene, obj)}, {where(obj)} in the {_view_label(views.camera(obj.id))} view"
    return f"{text} ({obj.motion})" if obj.is_road_user else text


def _scene_text(scene: Scene, visible: list[SceneObject]) -> str:
    road, ego = scene.road, scene.ego
    oncoming = _count(road.n_opp, "oncoming lane") if road.n_opp else "no oncoming lane"
    parts = [
        f"It is {scene.weather} weather.",
        f"The road has {_count(road.n_same, 'lane')} in the ego direction and {oncoming}.",
    ]
    ahead = [
        name
        for name, x in (("an intersection", road.intersection_x), ("a crosswalk", road.crosswalk_x))
        if x is not None
    ]
    if ahead:
        parts.append(f"There is {' and '.join(ahead)} ahead.")
    lights = [o.colour for o in visible if o.category == "traffic light"]
    if lights:
        parts.append(f"The traffic light ahead is {lights[0]}.")
    if any(o.category == "stop sign" for o in visible):
        parts.append("A stop sign stands at the right side of the road.")
    parts.append(
        f"The ego vehicle is {ego.speed} and {ego.steer}: {SPEED_CUES[ego.speed]} and {STEER_CUES[ego.steer]}."
        if ego.speed != "not moving"
        else f"The ego vehicle is not moving: {SPEED_CUES[ego.speed]}."
    )
    parts.append(f"{_count(len(visible), 'object')} can be seen." if visible else "No object can be seen.")
    return " ".join(parts)


def _list_text(scene: Scene, ordered: list[SceneObject], views: SceneViews) -> str:
    if not ordered:
        return "No object can be seen."
    listed = "; ".join(_object_text(scene, o, views) for o in ordered)
    return f"I can see {_count(len(ordered), 'object')}: {listed}."


def ask_describe(scene: Scene, views: SceneViews, rng: random.Random) -> list[QA]:
    """A scene description and an object list for ``scene`` seen through ``views`` (phrasing drawn by ``rng``)."""
    visible = [o for o in scene.objects if o.id in views.placements]
    ordered = _objects_seen(visible, views)
    gt: dict[str, Any] = {
        "views": views.kind,
        "weather": scene.weather,
        "lanes": {"same": scene.road.n_same, "oncoming": scene.road.n_opp},
        "intersection": scene.road.intersection_x is not None,
        "crosswalk": scene.road.crosswalk_x is not None,
        "traffic_light": next((o.colour for o in visible if o.category == "traffic light"), None),
        "ego": {"steer": scene.ego.steer, "speed": scene.ego.speed},
        "objects": [
            {
                "object_id": o.id,
                "category": o.category,
                "colour": o.colour,
                "motion": o.motion,
                "camera": views.camera(o.id),
                "relation": relation(scene, o),
                "where": where(o),
            }
            for o in ordered
        ],
    }
    answers = {
        "describe_scene": _scene_text(scene, visible),
        "list_objects": _list_text(scene, ordered, views),
    }
    return [
        QA(
            qtype,
            "open",
            rng.choice(PHRASINGS[qtype]),
            answers[qtype],
            "",
            None,
            [],
            {**gt, "question_type": qtype},
        )
        for qtype in DESCRIBE_TYPES
    ]
