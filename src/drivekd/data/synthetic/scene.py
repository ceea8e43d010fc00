"""Random synthetic scenes as plain dataclasses: a driving scene around the ego vehicle, or a plain shapes
canvas.

Driving scenes use the road frame: x metres forward along the ego road, y metres to the left, z up. The ego
vehicle is at (0, ``ego.y``) with yaw ``ego.yaw`` (radians, positive to the left). Traffic keeps right: the
ego direction's lanes lie right of y = 0, oncoming lanes left of it. A scenario (what the ego vehicle should
do) is drawn first so that every ego action is common; the ground truth is re-derived from the finished scene
by the rules in ``questions``, never read from the scenario.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

LANE_WIDTH = 3.5
TURN_ANGLE = math.radians(30)  # body yaw of a turning vehicle relative to its lane
ROAD_START, ROAD_END = -80.0, 300.0  # extent of the ego road in x

VEHICLE_SIZES: dict[str, tuple[float, float]] = {  # length, width in metres
    "sedan": (4.5, 1.8),
    "van": (5.0, 2.0),
    "truck": (8.0, 2.5),
    "bus": (11.0, 2.55),
}
OTHER_SIZES: dict[str, tuple[float, float]] = {
    "pedestrian": (0.5, 0.6),
    "cyclist": (1.8, 0.6),
    "traffic light": (0.5, 0.9),
    "stop sign": (0.3, 1.1),
}
VEHICLE_WEIGHTS = {"sedan": 40, "van": 20, "truck": 20, "bus": 20}
# Few, strongly different colours and silhouettes: a tiny VLM must tell them apart at 28 x 28 pixels per token.
VEHICLE_COLOURS = ("white", "black", "red", "blue", "green", "yellow")
CLOTHES_COLOURS = ("red", "blue", "green", "yellow", "white", "purple")
VEHICLE_MOTIONS = ("going ahead", "turn left", "turn right", "stopped")
PEDESTRIAN_MOTIONS = ("crossing the road", "standing still", "walking along the road")
LIGHT_STATES = ("red", "yellow", "green")
STEERS = (
    "going straight",
    "slightly steering to the left",
    "slightly steering to the right",
    "steering to the left",
    "steering to the right",
)
STEER_YAW = dict(zip(STEERS, (0.0, 0.09, -0.09, 0.2, -0.2), strict=True))
SPEEDS = ("not moving", "driving slowly", "driving with normal speed", "driving fast")
WEATHERS = ("clear", "overcast", "dusk")
SCENARIOS: dict[str, tuple[str, ...]] = {  # action group -> scenarios that call for it
    "stop": ("red_light", "pedestrian_crossing", "stop_sign"),
    "decelerate": ("yellow_light", "stopped_lead", "slow_lead"),
    "offset": ("cyclist_edge", "parked_edge"),
    "keep": ("green_light", "clear_road", "moving_lead"),
}
LIGHT_SCENARIOS = {"red_light": "red", "yellow_light": "yellow", "green_light": "green"}

SHAPE_KINDS = ("circle", "square", "triangle", "diamond")
SHAPE_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black")


@dataclass(frozen=True)
class Road:
    """The ego road, an optional crossing road, crosswalk and stop line (x positions in the road frame)."""

    n_same: int  # lanes in the ego direction
    n_opp: int  # oncoming lanes
    ego_lane: int  # 0 is the same-direction lane next to the centre line
    intersection_x: float | None = None  # centre line of the crossing road
    cross_half: float = LANE_WIDTH  # half width of the crossing road
    crosswalk_x: float | None = None  # near edge of the 4 m deep crosswalk across the ego road
    stop_line_x: float | None = None

    @property
    def right_edge(self) -> float:
        return -self.n_same * LANE_WIDTH

    @property
    def left_edge(self) -> float:
        return self.n_opp * LANE_WIDTH

    def lane_centre(self, lane: int) -> float:
        """Centre y of a same-direction lane (``lane`` >= 0) or oncoming lane (``lane`` < 0, -1 innermost)."""
        return -(lane + 0.5) * LANE_WIDTH

    def in_intersection(self, x: float) -> bool:
        return self.intersection_x is not None and abs(x - self.intersection_x) <= self.cross_half


@dataclass(frozen=True)
class Ego:
    y: float
    yaw: float
    steer: str
    speed: str


@dataclass(frozen=True)
class SceneObject:
    """A road user or traffic control; ``colour`` is the body or clothes colour, or a light's state."""

    id: str
    category: str
    colour: str
    x: float
    y: float
    heading: float = 0.0  # body yaw in the road frame
    motion: str = "static"

    @property
    def size(self) -> tuple[float, float]:
        return VEHICLE_SIZES.get(self.category) or OTHER_SIZES[self.category]

    @property
    def is_vehicle(self) -> bool:
        return self.category in VEHICLE_SIZES

    @property
    def is_road_user(self) -> bool:
        return self.category not in ("traffic light", "stop sign")


@dataclass(frozen=True)
class Building:
    x0: float
    x1: float
    y0: float
    y1: float
    height: float
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    scene_id: str
    road: Road
    ego: Ego
    objects: tuple[SceneObject, ...]
    buildings: tuple[Building, ...]
    weather: str
    scenario: str

    def object(self, obj_id: str) -> SceneObject:
        return next(o for o in self.objects if o.id == obj_id)


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x: float  # centre, normalised to [0, 1]
    y: float
    size: float  # radius as a fraction of the image height


@dataclass(frozen=True)
class ShapeScene:
    scene_id: str
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]


class _Placer:
    """Adds objects with fresh ids, silently skipping one whose footprint overlaps an earlier object's."""

    def __init__(self) -> None:
        self.objects: list[SceneObject] = []
        self._boxes: list[tuple[float, float, float, float]] = []

    def add(
        self, category: str, colour: str, x: float, y: float, heading: float = 0.0, motion: str = "static"
    ) -> None:
        obj = SceneObject(f"o{len(self.objects) + 1}", category, colour, x, y, heading, motion)
        length, width = obj.size
        c, s = abs(math.cos(heading)), abs(math.sin(heading))
        hx, hy = (length * c + width * s) / 2 + 0.4, (length * s + width * c) / 2 + 0.4
        box = (x - hx, x + hx, y - hy, y + hy)
        if not any(b[0] < box[1] and box[0] < b[1] and b[2] < box[3] and box[2] < b[3] for b in self._boxes):
            self.objects.append(obj)
            self._boxes.append(box)


def _vehicle(rng: random.Random, exclude: tuple[str, ...] = ()) -> tuple[str, str]:
    cats = [c for c in VEHICLE_WEIGHTS if c not in exclude]
    category = rng.choices(cats, weights=[VEHICLE_WEIGHTS[c] for c in cats])[0]
    return category, rng.choice(VEHICLE_COLOURS)


def _sample_road(rng: random.Random, scenario: str, waiting: bool) -> Road:
    n_same = rng.choice((1, 2, 2, 3))
    n_opp = rng.choice((1, 1, 2)) if n_same == 1 else rng.choice((0, 1, 1, 2))
    rightmost = scenario in ("stop_sign", "cyclist_edge", "parked_edge")
    ego_lane = n_same - 1 if rightmost else rng.randrange(n_same)
    light = scenario in LIGHT_SCENARIOS
    if light or scenario == "stop_sign":
        intersection = True
    else:
        intersection = rng.random() < (0.5 if scenario == "slow_lead" else 0.3)
    crosswalk = scenario == "pedestrian_crossing" or (intersection and rng.random() < 0.4)
    if not intersection and not crosswalk:
        return Road(n_same, n_opp, ego_lane)
    if waiting:
        stop_x = rng.uniform(8.5, 10.0) if scenario == "stop_sign" else rng.uniform(3.0, 6.0)
    elif light:
        stop_x = rng.uniform(6.0, 18.0)
    else:
        stop_x = rng.uniform(9.0, 26.0)
    crosswalk_x = stop_x + 1.0 if crosswalk else None
    if not intersection:
        return Road(n_same, n_opp, ego_lane, crosswalk_x=crosswalk_x, stop_line_x=stop_x)
    cross_half = LANE_WIDTH * rng.choice((1, 1, 2))
    near_edge = stop_x + (5.5 if crosswalk else 1.5)
    return Road(n_same, n_opp, ego_lane, near_edge + cross_half, cross_half, crosswalk_x, stop_x)


def _place_trigger(rng: random.Random, scenario: str, road: Road, ego: Ego, placer: _Placer) -> None:
    """The object that makes the scenario's rule fire, placed where CAM_FRONT sees it."""
    if scenario in LIGHT_SCENARIOS or road.intersection_x is not None:
        state = LIGHT_SCENARIOS.get(scenario, "stop" if scenario == "stop_sign" else "green")
        if state == "stop":
            placer.add("stop sign", "red", road.stop_line_x or 0.0, road.right_edge - 0.9)
        else:
            light_x = (road.intersection_x or 0.0) + road.cross_half + 1.0
            placer.add("traffic light", state, light_x, road.right_edge / 2)
    if scenario == "pedestrian_crossing":
        x = (road.crosswalk_x or 0.0) + rng.uniform(1.2, 2.8)
        heading = rng.choice((math.pi / 2, -math.pi / 2))
        placer.add(
            "pedestrian",
            rng.choice(CLOTHES_COLOURS),
            x,
            ego.y + rng.uniform(-2.2, 2.2),
            heading,
            "crossing the road",
        )
    elif scenario in ("stopped_lead", "slow_lead", "moving_lead"):
        category, colour = _vehicle(rng)
        length = VEHICLE_SIZES[category][0]
        motion, heading = "going ahead", 0.0
        if scenario == "stopped_lead":
            gap, motion = rng.uniform(12.0, 26.0), "stopped"
        elif scenario == "moving_lead":
            gap = rng.uniform(15.0, 28.0)
        elif road.intersection_x is not None:
            gap = road.intersection_x - road.cross_half + rng.uniform(-1.0, 2.0)
            motion = rng.choice(("turn left", "turn right"))
            heading = TURN_ANGLE if motion == "turn left" else -TURN_ANGLE
        else:
            gap = rng.uniform(6.0, 10.5)
        placer.add(category, colour, gap + length / 2, ego.y + rng.uniform(-0.3, 0.3), heading, motion)
    elif scenario == "cyclist_edge":
        x = rng.uniform(9.0, 24.0)
        placer.add(
            "cyclist",
            rng.choice(CLOTHES_COLOURS),
            x,
            road.right_edge + rng.uniform(0.45, 0.7),
            0.0,
            "going ahead",
        )
    elif scenario == "parked_edge":
        category, colour = _vehicle(rng, exclude=("truck", "bus"))
        x = rng.uniform(9.0, 22.0) + VEHICLE_SIZES[category][0] / 2
        placer.add(category, colour, x, road.right_edge - rng.uniform(0.2, 0.5), 0.0, "stopped")


def _in_ego_zone(ego: Ego, x: float, y: float, length: float) -> bool:
    """Whether a footprint centred at (x, y) reaches the strip ahead of the ego vehicle the rules inspect."""
    return x + length / 2 > 0 and x - length / 2 < 45 and abs(y - ego.y) < 3.0


def _distractor(
    rng: random.Random, road: Road, ego: Ego, scenario: str, placer: _Placer, turn: bool = False
) -> None:
    """One road user that adds clutter without creating a new reason to act.

    ``turn`` asks for a vehicle turning in the intersection (when the ego vehicle's signal lets traffic move).
    """
    choices = ["same_lane", "oncoming", "behind", "sidewalk", "sidewalk"]
    if road.intersection_x is not None:
        choices.append("cross")
    kind = rng.choice(("same_lane", "oncoming")) if turn else rng.choice(choices)
    if kind == "sidewalk":
        right = rng.random() < 0.6
        y = road.right_edge - rng.uniform(0.8, 2.5) if right else road.left_edge + rng.uniform(0.8, 2.5)
        motion = rng.choice(("standing still", "walking along the road"))
        heading = (
            rng.choice((0.0, math.pi))
            if motion != "standing still"
            else rng.choice((math.pi / 2, -math.pi / 2))
        )
        placer.add("pedestrian", rng.choice(CLOTHES_COLOURS), rng.uniform(-25.0, 40.0), y, heading, motion)
        return
    category, colour = _vehicle(rng)
    length = VEHICLE_SIZES[category][0]
    waiting_traffic = scenario in ("red_light", "stop_sign", "yellow_light") and road.stop_line_x is not None
    if kind == "cross":
        centre = road.intersection_x or 0.0
        from_right = rng.random() < 0.5
        heading = math.pi / 2 if from_right else -math.pi / 2
        x = centre + LANE_WIDTH / 2 if from_right else centre - LANE_WIDTH / 2  # keep right
        if scenario in ("red_light", "stop_sign", "yellow_light"):
            y, motion = rng.uniform(-28.0, 28.0), "going ahead"
        else:
            stop = road.right_edge - 2.0 - length / 2 if from_right else road.left_edge + 2.0 + length / 2
            y, motion = stop + math.copysign(rng.uniform(0.0, 12.0), stop), "stopped"
    else:
        if kind == "oncoming":
            lanes, heading = [-1 - k for k in range(road.n_opp)], math.pi
        elif kind == "same_lane":
            lanes, heading = [i for i in range(road.n_same) if i != road.ego_lane], 0.0
        else:
            lanes, heading = [road.ego_lane], 0.0
        if not lanes:
            return
        y = road.lane_centre(rng.choice(lanes))
        turning = kind != "behind" and road.intersection_x is not None and not waiting_traffic
        turning = turning and (turn or rng.random() < 0.3)
        if turning:
            x = (road.intersection_x or 0.0) + rng.uniform(-0.5, 0.5) * road.cross_half
            motion = rng.choice(("turn left", "turn right"))
            heading += TURN_ANGLE if motion == "turn left" else -TURN_ANGLE
        else:
            x = rng.uniform(-30.0, 50.0) if kind != "behind" else -rng.uniform(4.0, 25.0) - length / 2
            stopped = (waiting_traffic and x < (road.stop_line_x or 0.0)) or ego.speed == "not moving"
            motion = "stopped" if stopped or rng.random() < 0.15 else "going ahead"
            if road.in_intersection(x):
                return
    if _in_ego_zone(ego, x, y, length):
        return
    placer.add(category, colour, x, y, heading, motion)


def _buildings(rng: random.Random, road: Road) -> tuple[Building, ...]:
    blocked = None
    if road.intersection_x is not None:
        blocked = (road.intersection_x - road.cross_half - 4.0, road.intersection_x + road.cross_half + 4.0)
    out: list[Building] = []
    for side in (-1, 1):
        edge = road.right_edge - 4.0 if side < 0 else road.left_edge + 4.0
        x = -70.0 + rng.uniform(0.0, 8.0)
        while x < 140.0:
            width = rng.uniform(8.0, 22.0)
            if blocked is None or x + width < blocked[0] or x > blocked[1]:
                depth = rng.uniform(8.0, 14.0)
                y0 = edge + side * rng.uniform(0.0, 3.0)
                shade = rng.randint(110, 200)
                tint = (
                    shade + rng.randint(-20, 20),
                    shade + rng.randint(-20, 10),
                    shade + rng.randint(-30, 0),
                )
                out.append(
                    Building(
                        x,
                        x + width,
                        min(y0, y0 + side * depth),
                        max(y0, y0 + side * depth),
                        rng.uniform(6.0, 22.0),
                        tint,
                    )
                )
            x += width + rng.uniform(1.0, 6.0)
    return tuple(out)


def sample_scene(rng: random.Random, scene_id: str) -> Scene:
    """A driving scene whose scenario is drawn uniformly over the four action groups."""
    scenario = rng.choice(SCENARIOS[rng.choice(tuple(SCENARIOS))])
    waiting = scenario in SCENARIOS["stop"] and rng.random() < 0.35
    road = _sample_road(rng, scenario, waiting)
    steer = "going straight" if waiting else rng.choice(STEERS)
    speed = "not moving" if waiting else rng.choice(SPEEDS[1:])
    ego = Ego(road.lane_centre(road.ego_lane), STEER_YAW[steer], steer, speed)
    placer = _Placer()
    _place_trigger(rng, scenario, road, ego, placer)
    for k in range(rng.randint(1, 3)):
        _distractor(rng, road, ego, scenario, placer, turn=k == 0)
    return Scene(
        scene_id, road, ego, tuple(placer.objects), _buildings(rng, road), rng.choice(WEATHERS), scenario
    )


def sample_shapes(rng: random.Random, scene_id: str) -> ShapeScene:
    """Two to six coloured shapes on a plain background, one per cell of a jittered 3 x 2 grid."""
    cells = rng.sample(range(6), rng.randint(2, 6))
    shapes = []
    for cell in cells:
        col, row = cell % 3, cell // 3
        x = (col + 0.5 + rng.uniform(-0.15, 0.15)) / 3
        y = (row + 0.5 + rng.uniform(-0.12, 0.12)) / 2
        shapes.append(
            Shape(rng.choice(SHAPE_KINDS), rng.choice(SHAPE_COLOURS), x, y, rng.uniform(0.12, 0.19))
        )
    grey = rng.randint(215, 245)
    return ShapeScene(scene_id, (grey, grey, rng.randint(205, 245)), tuple(shapes))
