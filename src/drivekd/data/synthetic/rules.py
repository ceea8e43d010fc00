"""Ground truth of a synthetic scene: object relations and the driving rules that decide the ego action.

The rules look only at objects visible in the views a question shows (``decide``) and are checked from strictest
to mildest: a red light, a pedestrian on the road ahead, a stop sign or a stopped vehicle very close ahead mean
stop (or remain stationary when the ego vehicle already stands still); a yellow light or a stopped, turning or
too-close vehicle in the ego lane mean decelerate; a cyclist or parked car at the right edge of the ego lane means
offset left; otherwise keep going.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from drivekd.data.cameras import CAMERA_LABELS, CAMERAS
from drivekd.data.synthetic.render import Placement, View
from drivekd.data.synthetic.scene import (
    LANE_WIDTH,
    Scene,
    SceneObject,
)
from drivekd.data.tags import ObjectTag

GROUP_ACTION = {
    "stop": "brake gently to a stop",
    "decelerate": "decelerate gradually without braking",
    "offset": "slightly offset to the left",
    "keep": "keep going at the same speed",
}
STATIONARY = "remain stationary"
GROUP_RANK = {"stop": 0, "decelerate": 1, "offset": 2, "keep": 3}
LANE_NAMES = {  # same-direction lane index minus the ego lane's
    -2: "two lanes to the left",
    -1: "in the left lane",
    0: "in the ego lane",
    1: "in the right lane",
    2: "two lanes to the right",
}


@dataclass(frozen=True)
class Decision:
    """What the ego vehicle should do, why, and which actions are clearly safe or clearly unsafe."""

    action: str
    group: str
    rule: str
    trigger: str | None
    reason: str
    probability: str
    safe: tuple[str, ...]
    risky: tuple[str, ...]


@dataclass(frozen=True)
class SceneViews:
    """The cameras a question shows: per visible object, every placement and the camera that shows it best."""

    kind: str  # "single" | "multi"
    placements: dict[str, dict[str, Placement]]  # object id -> camera -> placement

    @classmethod
    def of(cls, kind: str, views: Sequence[View]) -> SceneViews:
        placements: dict[str, dict[str, Placement]] = {}
        for view in views:
            for oid, p in view.placements.items():
                placements.setdefault(oid, {})[view.camera] = p
        return cls(kind, placements)

    def camera(self, obj_id: str) -> str:
        """The camera where the object is closest to the image centre (ties go to the nuScenes order)."""
        cams = self.placements[obj_id]
        return min(cams, key=lambda c: (abs(cams[c].x - 0.5), CAMERAS.index(c)))

    def tag(self, obj_id: str, number: int = 1) -> ObjectTag:
        cam = self.camera(obj_id)
        p = self.placements[obj_id][cam]
        return ObjectTag(id=f"c{number}", camera=cam, x=p.x, y=p.y)


# --- scene relations ---
def _describe(category: str, colour: str) -> str:
    if category in ("pedestrian", "cyclist"):
        return f"{category} in {colour}"
    return "stop sign" if category == "stop sign" else f"{colour} {category}"


def describe(obj: SceneObject) -> str:
    """Short noun phrase: "white van", "pedestrian in red", "green traffic light", "stop sign"."""
    return _describe(obj.category, obj.colour)


def article(text: str) -> str:
    vowel = text[0].lower() in "aeiou"
    return f"{'an' if vowel else 'a'} {text}"


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _half_x(obj: SceneObject) -> float:
    length, width = obj.size
    return (length * abs(math.cos(obj.heading)) + width * abs(math.sin(obj.heading))) / 2


def _gap(obj: SceneObject) -> float:
    """Distance along the road from the ego vehicle's centre to the object's near end (negative behind)."""
    return obj.x - _half_x(obj) if obj.x >= 0 else obj.x + _half_x(obj)


def _on_road(scene: Scene, obj: SceneObject) -> bool:
    return scene.road.right_edge <= obj.y <= scene.road.left_edge


def _zone(scene: Scene, obj: SceneObject) -> str:
    """Where a road user is relative to the ego vehicle's possible paths."""
    dy, gap = obj.y - scene.ego.y, _gap(obj)
    if not obj.is_road_user:
        return "roadside"
    if 0 < gap <= 40 and (
        abs(dy) < 1.0 or (obj.category == "pedestrian" and abs(dy) < 2.6 and _on_road(scene, obj))
    ):
        return "path"
    if 0 < gap <= 40 and -2.6 < dy <= -1.0:
        return "right_edge"
    if -15 < gap < 0 and abs(dy) < 1.0:
        return "behind"
    if -15 < obj.x < 20 and LANE_WIDTH / 2 < dy < 1.5 * LANE_WIDTH:
        return "left"
    if -15 < obj.x < 20 and -1.5 * LANE_WIDTH < dy < -LANE_WIDTH / 2:
        return "right"
    return "away"


def relation(scene: Scene, obj: SceneObject) -> str:
    road = scene.road
    if obj.category == "traffic light":
        return "above the road ahead"
    if obj.category == "stop sign":
        return "at the right side of the road"
    if abs(math.sin(obj.heading)) > 0.9 and obj.category != "pedestrian":
        return "on the crossing road"
    if not _on_road(scene, obj):
        return "on the sidewalk" if obj.category == "pedestrian" else "at the right roadside"
    crosswalk = road.crosswalk_x
    if obj.category == "pedestrian" and crosswalk is not None and crosswalk <= obj.x <= crosswalk + 4.0:
        return "on the crosswalk"
    dy = obj.y - scene.ego.y
    if abs(dy) < 1.0:
        return "in the ego lane"
    if -2.6 < dy <= -1.0:
        return "at the right edge of the ego lane"
    if obj.y > 0:
        return "in the oncoming lane"
    offset = int(-obj.y // LANE_WIDTH) - road.ego_lane
    return LANE_NAMES[offset]


def where(obj: SceneObject) -> str:
    if abs(obj.x) < 2.0:
        return "beside the ego vehicle"
    return f"about {round(abs(obj.x))} m {'ahead' if obj.x > 0 else 'behind'}"


def _view_label(camera: str) -> str:
    return CAMERA_LABELS[camera].replace("-", " ")


# --- rules ---
def _rule_of(scene: Scene, obj: SceneObject) -> tuple[str, str, str] | None:
    """The rule this object fires on its own: (rule, action group, reason), or None."""
    desc = describe(obj)
    if obj.category == "traffic light" and obj.x > 0:
        group = {"red": "stop", "yellow": "decelerate", "green": "keep"}[obj.colour]
        return f"{obj.colour}_light", group, f"the traffic light ahead is {obj.colour}"
    if obj.category == "stop sign" and obj.x > 0:
        return "stop_sign", "stop", "there is a stop sign ahead"
    zone, gap = _zone(scene, obj), _gap(obj)
    if zone == "path" and obj.category == "pedestrian":
        return "pedestrian_in_path", "stop", f"the {desc} is crossing the road in front of the ego vehicle"
    if zone == "path" and gap <= 35:
        if obj.motion == "stopped" and gap < 10:
            return "vehicle_stopped_close", "stop", f"the {desc} is stopped just ahead in the ego lane"
        if obj.motion == "stopped":
            return "vehicle_stopped_ahead", "decelerate", f"the {desc} ahead in the ego lane is stopped"
        if obj.motion in ("turn left", "turn right"):
            return "vehicle_turning_ahead", "decelerate", f"the {desc} ahead in the ego lane is turning"
        if gap < 12:
            return "vehicle_too_close", "decelerate", f"the {desc} ahead in the ego lane is too close"
    if zone == "right_edge" and gap <= 35:
        return "obstacle_right_edge", "offset", f"the {desc} occupies the right edge of the ego lane"
    return None


def _group_action(scene: Scene, group: str) -> str:
    return STATIONARY if group == "stop" and scene.ego.speed == "not moving" else GROUP_ACTION[group]


def _lane_clear(scene: Scene, visible: Sequence[SceneObject], lane: int) -> bool:
    centre = scene.road.lane_centre(lane)
    return not any(o.is_road_user and abs(o.y - centre) < 1.75 and -15 < o.x < 20 for o in visible)


def decide(scene: Scene, views: SceneViews) -> Decision:
    """Apply the rules to the objects visible in ``views``."""
    visible = [o for o in scene.objects if o.id in views.placements]
    fired = [(GROUP_RANK[r[1]], o.x, o.id, r) for o in visible if (r := _rule_of(scene, o)) is not None]
    if fired:
        _, _, trigger, (rule, group, reason) = min(fired)
    else:
        trigger, rule, group, reason = None, "clear_road", "keep", "the lane ahead is clear"
    action = _group_action(scene, group)
    probability = "medium" if group in ("decelerate", "offset") else "high"
    road, multi = scene.road, views.kind == "multi"
    safe = [action]
    if group == "stop" and action != STATIONARY and trigger and scene.object(trigger).x >= 20:
        safe.append(GROUP_ACTION["decelerate"])
    elif group in ("decelerate", "offset"):
        safe.append(GROUP_ACTION["stop" if group == "decelerate" else "decelerate"])
    elif group == "keep":
        safe.append(GROUP_ACTION["decelerate"])
    risky = []
    if group in ("stop", "decelerate") and action != STATIONARY:
        risky.append(GROUP_ACTION["keep"])
    if group != "keep":
        risky.append("accelerate and go straight")
    if group == "offset":
        risky.append("slightly offset to the right")
    for side, lane in (("left", road.ego_lane - 1), ("right", road.ego_lane + 1)):
        change = f"change lanes to the {side}"
        if not 0 <= lane < road.n_same or (multi and not _lane_clear(scene, visible, lane)):
            risky.append(change)
        elif multi and group != "stop":
            safe.append(change)
    if multi and any(_zone(scene, o) == "behind" and o.is_road_user for o in visible):
        risky.append("back up")
    return Decision(action, group, rule, trigger, reason, probability, tuple(safe), tuple(risky))


def object_plan(scene: Scene, obj: SceneObject, decision: Decision) -> tuple[str, str, str]:
    """(action, reason, probability) for "what could the ego vehicle do based on this object"."""
    if obj.id == decision.trigger:
        return decision.action, decision.reason, decision.probability
    fired = _rule_of(scene, obj)
    if fired is not None and fired[1] != "keep":
        return (
            _group_action(scene, fired[1]),
            fired[2],
            "medium" if fired[1] in ("decelerate", "offset") else "high",
        )
    joiner = "and" if decision.trigger is None else "while"
    reason = f"the {describe(obj)} does not block the ego vehicle's path, {joiner} {decision.reason}"
    return decision.action, reason, "high" if decision.group == "keep" else "medium"


def collisions(scene: Scene, obj: SceneObject) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """(actions that would hit the object, actions that clearly would not, one-clause explanation)."""
    zone = _zone(scene, obj)
    stationary_like = obj.motion in ("stopped", "turn left", "turn right") or obj.category == "pedestrian"
    if zone == "path":
        hits = (
            (GROUP_ACTION["keep"], "accelerate and go straight")
            if stationary_like or _gap(obj) < 12
            else ("accelerate and go straight",)
        )
        return hits, ("back up", STATIONARY, GROUP_ACTION["stop"]), "it is in the ego vehicle's path ahead"
    if zone == "right_edge":
        return (
            ("slightly offset to the right", "turn right sharply"),
            ("slightly offset to the left", GROUP_ACTION["stop"], STATIONARY, "back up"),
            "it occupies the right edge of the ego lane ahead",
        )
    if zone == "behind":
        hits = ("back up",) if obj.motion == "stopped" else ("back up", "brake suddenly")
        harmless = (GROUP_ACTION["keep"], "accelerate and go straight", "turn left sharply")
        return hits, harmless, "it follows right behind the ego vehicle in the same lane"
    if zone in ("left", "right"):
        other = "right" if zone == "left" else "left"
        return (
            (f"change lanes to the {zone}", f"turn {zone} sharply"),
            (f"change lanes to the {other}", GROUP_ACTION["stop"], STATIONARY, "back up"),
            f"it is right next to the ego vehicle on the {zone}",
        )
    return (), (), "it is not on any path the ego vehicle could take now"
