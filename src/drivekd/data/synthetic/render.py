"""PIL rendering of synthetic scenes into nuScenes-style camera images, and where each object lands in them.

Every camera is a level pinhole at the ego vehicle's centre, 1.5 m above the ground, turned by its rig yaw.
Ground polygons and 3-D boxes are clipped at a near plane, projected and painted far to near. What a model
must read is drawn explicitly: body yaw and lit indicators for turning vehicles, lit brake lights and no
motion streaks for stopped ones, the lit lamp of a traffic light, lane-dash length for the ego speed and the
road's vanishing point for its steering. Images are drawn at twice the requested size and box-filtered down;
placements are reported at the requested size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from drivekd.data.synthetic.scene import (
    LANE_WIDTH,
    ROAD_END,
    ROAD_START,
    TURN_ANGLE,
    Ego,
    Scene,
    SceneObject,
    ShapeScene,
)

CAM_HEIGHT = 1.5
HORIZON = 0.48  # principal point height as a fraction of the image height
NEAR = 0.3
MAX_DEPTH = 90.0
SUPERSAMPLE = 2
CAMERA_RIG: dict[str, tuple[float, float]] = {  # yaw and horizontal field of view, degrees (nuScenes layout)
    "CAM_FRONT": (0.0, 70.0),
    "CAM_FRONT_LEFT": (55.0, 70.0),
    "CAM_FRONT_RIGHT": (-55.0, 70.0),
    "CAM_BACK": (180.0, 110.0),
    "CAM_BACK_LEFT": (110.0, 70.0),
    "CAM_BACK_RIGHT": (-110.0, 70.0),
}

Colour = tuple[int, int, int]
Point = tuple[float, float, float]
RGB: dict[str, Colour] = {
    "white": (236, 236, 232),
    "black": (28, 28, 32),
    "silver": (176, 180, 188),
    "red": (200, 30, 34),
    "blue": (34, 70, 196),
    "green": (36, 146, 66),
    "yellow": (236, 200, 36),
    "brown": (122, 78, 42),
    "orange": (240, 130, 30),
    "purple": (128, 50, 160),
}
SKY: dict[str, tuple[Colour, Colour]] = {  # top, horizon
    "clear": ((96, 152, 222), (190, 218, 240)),
    "overcast": ((140, 146, 156), (204, 206, 210)),
    "dusk": ((60, 62, 118), (238, 156, 98)),
}
GROUND, SIDEWALK, ASPHALT = (100, 116, 82), (166, 164, 158), (76, 76, 80)
LINE_WHITE, LINE_YELLOW, STREAK = (236, 236, 230), (232, 186, 40), (150, 150, 162)
GLASS, TYRE, SKIN, TROUSERS, POLE = (58, 74, 96), (34, 34, 36), (222, 178, 146), (46, 46, 64), (92, 92, 98)
BRAKE_ON, BRAKE_OFF, HEADLIGHT, INDICATOR = (255, 36, 36), (112, 26, 26), (250, 246, 204), (255, 160, 0)
LAMP_ON: dict[str, Colour] = {"red": (255, 48, 40), "yellow": (255, 204, 40), "green": (60, 236, 96)}
LAMP_OFF: dict[str, Colour] = {"red": (70, 24, 24), "yellow": (70, 60, 20), "green": (20, 60, 30)}
LAMP_Z = {"red": 5.65, "yellow": 5.1, "green": 4.55}
DASH_PERIOD = 10.0
DASH_FRACTION = {
    "not moving": 0.2,
    "driving slowly": 0.35,
    "driving with normal speed": 0.5,
    "driving fast": 0.7,
}

# Vehicle parts: rear and front as fractions of the length, width fraction, z0, z1, role, glass band or None.
Part = tuple[float, float, float, float, float, str, tuple[float, float] | None]
_SEDAN: tuple[Part, ...] = (
    (0.03, 0.97, 0.92, 0.0, 0.35, "tyre", None),
    (0.0, 1.0, 1.0, 0.3, 0.85, "body", None),
    (0.25, 0.75, 0.9, 0.85, 1.42, "body", (0.92, 1.36)),
)
VEHICLE_PARTS: dict[str, tuple[Part, ...]] = {
    "sedan": _SEDAN,
    "taxi": (*_SEDAN, (0.44, 0.56, 0.4, 1.42, 1.68, "sign", None)),
    "SUV": (
        (0.03, 0.97, 0.92, 0.0, 0.4, "tyre", None),
        (0.0, 1.0, 1.0, 0.35, 1.0, "body", None),
        (0.1, 0.8, 0.94, 1.0, 1.78, "body", (1.06, 1.7)),
    ),
    "pickup": (
        (0.03, 0.97, 0.92, 0.0, 0.42, "tyre", None),
        (0.0, 1.0, 1.0, 0.4, 1.05, "body", None),
        (0.45, 0.8, 0.94, 1.05, 1.85, "body", (1.12, 1.78)),
    ),
    "van": (
        (0.03, 0.97, 0.92, 0.0, 0.38, "tyre", None),
        (0.0, 1.0, 1.0, 0.35, 2.15, "body", (1.4, 1.95)),
    ),
    "truck": (
        (0.02, 0.98, 0.9, 0.0, 0.55, "tyre", None),
        (0.0, 0.76, 1.0, 0.6, 3.4, "cargo", None),
        (0.78, 1.0, 1.0, 0.5, 2.9, "body", (1.8, 2.6)),
    ),
    "bus": (
        (0.02, 0.98, 0.94, 0.0, 0.4, "tyre", None),
        (0.0, 1.0, 1.0, 0.35, 3.1, "body", (1.5, 2.6)),
    ),
}
LAMP_BAND = {"sedan": 0.55, "taxi": 0.55, "SUV": 0.65, "pickup": 0.7, "van": 0.65, "truck": 0.85, "bus": 0.7}
ANCHOR_Z = {"pedestrian": 1.15, "cyclist": 1.22, "traffic light": 5.1, "stop sign": 2.45}


@dataclass(frozen=True)
class Placement:
    """Where an object is drawn in one camera: its anchor (normalised x, y), pixel box and depth in metres."""

    x: float
    y: float
    box: tuple[float, float, float, float]
    depth: float


@dataclass(frozen=True)
class View:
    """One rendered camera and the objects that are clearly visible in it (anchor inside, not hidden)."""

    camera: str
    image: Image.Image
    placements: dict[str, Placement]


class _Camera:
    def __init__(self, name: str, ego: Ego, width: int, height: int) -> None:
        yaw, fov = CAMERA_RIG[name]
        turn = ego.yaw + math.radians(yaw)
        self.cos, self.sin, self.ego_y = math.cos(turn), math.sin(turn), ego.y
        self.width, self.height = width, height
        self.focal = width / 2 / math.tan(math.radians(fov) / 2)
        self.cy = height * HORIZON

    def to_cam(self, p: Point) -> Point:
        """Road frame -> (depth, left offset, height)."""
        dy = p[1] - self.ego_y
        return (p[0] * self.cos + dy * self.sin, -p[0] * self.sin + dy * self.cos, p[2])

    def project(self, q: Point) -> tuple[float, float]:
        return (self.width / 2 - self.focal * q[1] / q[0], self.cy + self.focal * (CAM_HEIGHT - q[2]) / q[0])

    def polygon(self, points: Sequence[Point]) -> list[tuple[float, float]] | None:
        clipped = _clip_near([self.to_cam(p) for p in points])
        return [self.project(q) for q in clipped] if len(clipped) >= 3 else None


def _clip_near(points: list[Point]) -> list[Point]:
    """Sutherland-Hodgman clip of a polygon in camera coordinates to depth >= NEAR."""
    out: list[Point] = []
    for i, a in enumerate(points):
        b = points[(i + 1) % len(points)]
        if a[0] >= NEAR:
            out.append(a)
        if (a[0] >= NEAR) != (b[0] >= NEAR):
            t = (NEAR - a[0]) / (b[0] - a[0])
            out.append((NEAR, a[1] + t * (b[1] - a[1]), a[2] + t * (b[2] - a[2])))
    return out


def _shade(colour: Colour, factor: float) -> Colour:
    r, g, b = colour
    return (min(255, int(r * factor)), min(255, int(g * factor)), min(255, int(b * factor)))


def _quad_x(x0: float, x1: float, y: float, width: float, z: float = 0.0) -> list[Point]:
    """A ground strip along x."""
    return [(x0, y - width / 2, z), (x1, y - width / 2, z), (x1, y + width / 2, z), (x0, y + width / 2, z)]


def _rect(x0: float, x1: float, y0: float, y1: float) -> list[Point]:
    return [(x0, y0, 0.0), (x1, y0, 0.0), (x1, y1, 0.0), (x0, y1, 0.0)]


class _Box:
    """An oriented box; local x is forward (length), local y is left (width)."""

    def __init__(
        self,
        cx: float,
        cy: float,
        heading: float,
        x0: float,
        x1: float,
        y0: float,
        y1: float,
        z0: float,
        z1: float,
    ) -> None:
        self.cx, self.cy, self.c, self.s = cx, cy, math.cos(heading), math.sin(heading)
        self.x0, self.x1, self.y0, self.y1, self.z0, self.z1 = x0, x1, y0, y1, z0, z1

    def world(self, lx: float, ly: float, z: float) -> Point:
        return (self.cx + lx * self.c - ly * self.s, self.cy + lx * self.s + ly * self.c, z)

    def faces(self) -> dict[str, tuple[Point, list[Point]]]:
        """Visible-side test data per face: outward normal (road frame) and corners."""
        x0, x1, y0, y1, z0, z1 = self.x0, self.x1, self.y0, self.y1, self.z0, self.z1
        w = self.world
        return {
            "front": ((self.c, self.s, 0.0), [w(x1, y0, z0), w(x1, y1, z0), w(x1, y1, z1), w(x1, y0, z1)]),
            "rear": ((-self.c, -self.s, 0.0), [w(x0, y1, z0), w(x0, y0, z0), w(x0, y0, z1), w(x0, y1, z1)]),
            "left": ((-self.s, self.c, 0.0), [w(x1, y1, z0), w(x0, y1, z0), w(x0, y1, z1), w(x1, y1, z1)]),
            "right": ((self.s, -self.c, 0.0), [w(x0, y0, z0), w(x1, y0, z0), w(x1, y0, z1), w(x0, y0, z1)]),
            "top": ((0.0, 0.0, 1.0), [w(x0, y0, z1), w(x1, y0, z1), w(x1, y1, z1), w(x0, y1, z1)]),
        }

    def corners(self) -> list[Point]:
        return [
            self.world(x, y, z)
            for x in (self.x0, self.x1)
            for y in (self.y0, self.y1)
            for z in (self.z0, self.z1)
        ]


SHADE = {"front": 1.0, "rear": 0.92, "left": 0.78, "right": 0.72, "top": 1.12}


class _Painter:
    """Draws one camera image."""

    def __init__(self, scene: Scene, camera: _Camera, image: Image.Image) -> None:
        self.scene, self.cam, self.draw = scene, camera, ImageDraw.Draw(image)
        self.eye = (0.0, scene.ego.y, CAM_HEIGHT)

    def poly(self, points: Sequence[Point], fill: Colour) -> None:
        projected = self.cam.polygon(points)
        if projected:
            self.draw.polygon(projected, fill=fill)

    def visible_faces(self, box: _Box) -> dict[str, list[Point]]:
        out = {}
        for name, (normal, corners) in box.faces().items():
            cx = sum(p[0] for p in corners) / 4
            cy = sum(p[1] for p in corners) / 4
            cz = sum(p[2] for p in corners) / 4
            to_eye = (self.eye[0] - cx, self.eye[1] - cy, self.eye[2] - cz)
            if normal[0] * to_eye[0] + normal[1] * to_eye[1] + normal[2] * to_eye[2] > 0:
                out[name] = corners
        return out

    def box(self, box: _Box, colour: Colour) -> dict[str, list[Point]]:
        faces = self.visible_faces(box)
        for name, corners in faces.items():
            self.poly(corners, _shade(colour, SHADE[name]))
        return faces

    # --- background ---
    def background(self) -> None:
        top, horizon = SKY[self.scene.weather]
        width, height, cy = self.cam.width, self.cam.height, int(self.cam.cy)
        bands = 32
        for k in range(bands):
            t = k / (bands - 1)
            colour = tuple(int(a + (b - a) * t) for a, b in zip(top, horizon, strict=True))
            self.draw.rectangle([0, cy * k // bands, width, cy * (k + 1) // bands], fill=colour)
        self.draw.rectangle([0, cy, width, height], fill=GROUND)
        for b in sorted(
            self.scene.buildings, key=lambda b: -math.hypot((b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2)
        ):
            self.box(_Box(0.0, 0.0, 0.0, b.x0, b.x1, b.y0, b.y1, 0.0, b.height), b.colour)

    def road(self) -> None:
        road = self.scene.road
        lo, hi = road.right_edge, road.left_edge
        self.poly(_rect(ROAD_START, ROAD_END, lo - 3.0, hi + 3.0), SIDEWALK)
        xi = road.intersection_x
        if xi is not None:
            self.poly(_rect(xi - road.cross_half - 3.0, xi + road.cross_half + 3.0, -200.0, 200.0), SIDEWALK)
        self.poly(_rect(ROAD_START, ROAD_END, lo, hi), ASPHALT)
        if xi is not None:
            self.poly(_rect(xi - road.cross_half, xi + road.cross_half, -200.0, 200.0), ASPHALT)
            for y0, y1 in ((-200.0, lo), (hi, 200.0)):
                self.poly(
                    [(xi - 0.1, y0, 0.0), (xi + 0.1, y0, 0.0), (xi + 0.1, y1, 0.0), (xi - 0.1, y1, 0.0)],
                    LINE_YELLOW,
                )

    def markings(self) -> None:
        road, speed = self.scene.road, self.scene.ego.speed
        segments = [(ROAD_START, ROAD_END)]
        if road.intersection_x is not None:
            segments = [
                (ROAD_START, road.intersection_x - road.cross_half),
                (road.intersection_x + road.cross_half, ROAD_END),
            ]
        dash = DASH_PERIOD * DASH_FRACTION[speed]
        dashed = [-k * LANE_WIDTH for k in range(1, road.n_same)] + [
            k * LANE_WIDTH for k in range(1, road.n_opp)
        ]
        for x0, x1 in segments:
            self.poly(_quad_x(x0, x1, road.right_edge + 0.25, 0.15), LINE_WHITE)
            self.poly(_quad_x(x0, x1, road.left_edge - 0.25, 0.15), LINE_WHITE if road.n_opp else LINE_YELLOW)
            if road.n_opp and road.n_same == 1 and road.n_opp == 1:
                self._dashes(x0, x1, 0.0, dash, LINE_YELLOW)
            elif road.n_opp:
                for y in (-0.15, 0.15):
                    self.poly(_quad_x(x0, x1, y, 0.12), LINE_YELLOW)
            for y in dashed:
                self._dashes(x0, x1, y, dash, LINE_WHITE)
        if road.stop_line_x is not None:
            self.poly(_rect(road.stop_line_x, road.stop_line_x + 0.5, road.right_edge, 0.0), LINE_WHITE)
        if road.crosswalk_x is not None:
            y = road.right_edge + 0.3
            while y + 0.5 < road.left_edge:
                self.poly(_rect(road.crosswalk_x, road.crosswalk_x + 4.0, y, y + 0.55), LINE_WHITE)
                y += 1.1

    def _dashes(self, x0: float, x1: float, y: float, length: float, colour: Colour) -> None:
        start = math.ceil(max(x0, -60.0) / DASH_PERIOD) * DASH_PERIOD
        x = start
        while x + length <= min(x1, 120.0):
            self.poly(_quad_x(x, x + length, y, 0.15), colour)
            x += DASH_PERIOD

    # --- objects ---
    def streaks(self, obj: SceneObject) -> None:
        """Motion streaks on the ground behind a moving vehicle or cyclist, along the lane it came from."""
        if obj.motion not in ("going ahead", "turn left", "turn right") or obj.category == "pedestrian":
            return
        length, width = obj.size
        approach = obj.heading + {"turn left": -TURN_ANGLE, "turn right": TURN_ANGLE}.get(obj.motion, 0.0)
        body = _Box(obj.x, obj.y, obj.heading, -length / 2, length / 2, -width / 2, width / 2, 0.0, 0.0)
        rear = body.world(-length / 2, 0.0, 0.0)
        trail = _Box(rear[0], rear[1], approach, -4.0, -0.3, 0.0, 0.0, 0.0, 0.0)
        offsets = (0.0,) if obj.category == "cyclist" else (-width / 2 + 0.35, width / 2 - 0.35)
        for off in offsets:
            self.poly(
                [
                    trail.world(-0.3, off - 0.09, 0.0),
                    trail.world(-4.0, off - 0.09, 0.0),
                    trail.world(-4.0, off + 0.09, 0.0),
                    trail.world(-0.3, off + 0.09, 0.0),
                ],
                STREAK,
            )

    def vehicle(self, obj: SceneObject) -> None:
        length, width = obj.size
        colour = RGB[obj.colour]
        parts = sorted(VEHICLE_PARTS[obj.category], key=lambda p: -self._part_distance(obj, p))
        for rear, front, wfrac, z0, z1, role, glass in parts:
            half = width * wfrac / 2
            box = _Box(
                obj.x, obj.y, obj.heading, (rear - 0.5) * length, (front - 0.5) * length, -half, half, z0, z1
            )
            fill = {"body": colour, "tyre": TYRE, "cargo": (214, 214, 208), "sign": (250, 236, 150)}[role]
            faces = self.box(box, fill)
            if glass is not None:
                self._glass(box, faces, glass)
        self._lamps(obj)

    def _part_distance(self, obj: SceneObject, part: Part) -> float:
        length = obj.size[0]
        mid = ((part[0] + part[1]) / 2 - 0.5) * length
        x, y = obj.x + mid * math.cos(obj.heading), obj.y + mid * math.sin(obj.heading)
        return math.hypot(x, y - self.eye[1])

    def _glass(self, box: _Box, faces: dict[str, list[Point]], band: tuple[float, float]) -> None:
        inset_x, inset_y = (box.x1 - box.x0) * 0.08, (box.y1 - box.y0) * 0.1
        z0, z1 = band
        quads = {
            "front": [(box.x1 + 0.02, box.y0 + inset_y), (box.x1 + 0.02, box.y1 - inset_y)],
            "rear": [(box.x0 - 0.02, box.y1 - inset_y), (box.x0 - 0.02, box.y0 + inset_y)],
            "left": [(box.x1 - inset_x, box.y1 + 0.02), (box.x0 + inset_x, box.y1 + 0.02)],
            "right": [(box.x0 + inset_x, box.y0 - 0.02), (box.x1 - inset_x, box.y0 - 0.02)],
        }
        for name, ((ax, ay), (bx, by)) in quads.items():
            if name in faces:
                w = box.world
                self.poly([w(ax, ay, z0), w(bx, by, z0), w(bx, by, z1), w(ax, ay, z1)], GLASS)

    def _lamps(self, obj: SceneObject) -> None:
        length, width = obj.size
        body = _Box(obj.x, obj.y, obj.heading, -length / 2, length / 2, -width / 2, width / 2, 0.0, 1.0)
        faces = self.visible_faces(body)
        z = LAMP_BAND[obj.category]
        half, w = width / 2, body.world

        def lamp(x: float, ya: float, yb: float, z0: float, z1: float, colour: Colour) -> None:
            self.poly([w(x, ya, z0), w(x, yb, z0), w(x, yb, z1), w(x, ya, z1)], colour)

        rear_x, front_x = -length / 2 - 0.03, length / 2 + 0.03
        for side in (-1, 1):
            if "rear" in faces:
                lamp(
                    rear_x,
                    side * (half - 0.5),
                    side * (half - 0.08),
                    z,
                    z + 0.22,
                    BRAKE_ON if obj.motion == "stopped" else BRAKE_OFF,
                )
            if "front" in faces:
                lamp(front_x, side * (half - 0.5), side * (half - 0.08), z, z + 0.2, HEADLIGHT)
        side = {"turn left": 1, "turn right": -1}.get(obj.motion)
        if side is None:
            return
        for x, face in ((rear_x, "rear"), (front_x, "front")):
            if face in faces:
                lamp(x, side * (half - 0.45), side * (half - 0.02), z + 0.26, z + 0.55, INDICATOR)
        flank = "left" if side > 0 else "right"
        if flank in faces:
            y = side * (half + 0.03)
            self.poly(
                [
                    w(length / 2 - 1.0, y, z),
                    w(length / 2 - 0.3, y, z),
                    w(length / 2 - 0.3, y, z + 0.35),
                    w(length / 2 - 1.0, y, z + 0.35),
                ],
                INDICATOR,
            )

    def pedestrian(self, obj: SceneObject) -> None:
        h = obj.heading
        if obj.motion == "standing still":
            self.box(_Box(obj.x, obj.y, h, -0.12, 0.12, -0.18, 0.18, 0.0, 0.85), TROUSERS)
        else:
            legs = sorted(((0.17, 0.09), (-0.17, -0.09)), key=lambda s: -self._local_distance(obj, *s))
            for lx, ly in legs:
                self.box(_Box(obj.x, obj.y, h, lx - 0.1, lx + 0.1, ly - 0.09, ly + 0.09, 0.0, 0.85), TROUSERS)
        self.box(_Box(obj.x, obj.y, h, -0.15, 0.15, -0.26, 0.26, 0.85, 1.47), RGB[obj.colour])
        self.box(_Box(obj.x, obj.y, h, -0.11, 0.11, -0.11, 0.11, 1.49, 1.74), SKIN)

    def cyclist(self, obj: SceneObject) -> None:
        h = obj.heading
        self.box(_Box(obj.x, obj.y, h, -0.85, 0.85, -0.12, 0.12, 0.15, 0.85), TYRE)
        self.box(_Box(obj.x, obj.y, h, -0.3, 0.1, -0.24, 0.24, 0.9, 1.52), RGB[obj.colour])
        self.box(_Box(obj.x, obj.y, h, -0.05, 0.17, -0.11, 0.11, 1.54, 1.78), SKIN)

    def _local_distance(self, obj: SceneObject, lx: float, ly: float) -> float:
        c, s = math.cos(obj.heading), math.sin(obj.heading)
        return math.hypot(obj.x + lx * c - ly * s, obj.y + lx * s + ly * c - self.eye[1])

    def traffic_light(self, obj: SceneObject) -> None:
        pole_y = self.scene.road.right_edge - 0.8
        self.box(_Box(obj.x, pole_y, 0.0, -0.12, 0.12, -0.12, 0.12, 0.0, 6.4), POLE)
        self.box(_Box(obj.x, 0.0, 0.0, -0.08, 0.08, pole_y, obj.y + 0.45, 6.2, 6.36), POLE)
        faces = self.box(_Box(obj.x, obj.y, 0.0, -0.25, 0.25, -0.45, 0.45, 4.0, 6.2), (26, 26, 30))
        if "rear" not in faces:
            return
        for state, z in LAMP_Z.items():
            centre = self.cam.to_cam((obj.x - 0.27, obj.y, z))
            if centre[0] < NEAR:
                continue
            u, v = self.cam.project(centre)
            r = self.cam.focal * 0.3 / centre[0]
            lit = state == obj.colour
            self.draw.ellipse([u - r, v - r, u + r, v + r], fill=LAMP_ON[state] if lit else LAMP_OFF[state])

    def stop_sign(self, obj: SceneObject) -> None:
        self.box(_Box(obj.x, obj.y, 0.0, -0.05, 0.05, -0.05, 0.05, 0.0, 2.0), POLE)
        centre = self.cam.to_cam((obj.x, obj.y, ANCHOR_Z["stop sign"]))
        if centre[0] < NEAR:
            return
        u, v = self.cam.project(centre)
        r = self.cam.focal * 0.55 / centre[0]
        octagon = [
            (u + r * math.cos(math.pi / 8 + k * math.pi / 4), v + r * math.sin(math.pi / 8 + k * math.pi / 4))
            for k in range(8)
        ]
        self.draw.polygon(octagon, fill=(250, 250, 250))
        inner = [(u + (p[0] - u) * 0.84, v + (p[1] - v) * 0.84) for p in octagon]
        self.draw.polygon(inner, fill=(204, 22, 28))
        self.draw.rectangle([u - 0.6 * r, v - 0.13 * r, u + 0.6 * r, v + 0.13 * r], fill=(250, 250, 250))

    def object(self, obj: SceneObject) -> None:
        if obj.is_vehicle:
            self.vehicle(obj)
        elif obj.category == "pedestrian":
            self.pedestrian(obj)
        elif obj.category == "cyclist":
            self.cyclist(obj)
        elif obj.category == "traffic light":
            self.traffic_light(obj)
        else:
            self.stop_sign(obj)


def _extent(obj: SceneObject) -> list[Point]:
    """3-D points whose projections bound the object's main body (not poles or streaks)."""
    if obj.category == "traffic light":
        return _Box(obj.x, obj.y, 0.0, -0.25, 0.25, -0.45, 0.45, 4.0, 6.2).corners()
    if obj.category == "stop sign":
        z = ANCHOR_Z["stop sign"]
        return _Box(obj.x, obj.y, 0.0, 0.0, 0.0, -0.55, 0.55, z - 0.55, z + 0.55).corners()
    length, width = obj.size
    top = max(p[4] for p in VEHICLE_PARTS[obj.category]) if obj.is_vehicle else 1.78
    return _Box(obj.x, obj.y, obj.heading, -length / 2, length / 2, -width / 2, width / 2, 0.0, top).corners()


def _anchor(obj: SceneObject) -> Point:
    """The point a tag refers to: inside the drawn body, so the tag pixel shows the object."""
    if obj.is_vehicle:
        body = next(p for p in VEHICLE_PARTS[obj.category] if p[5] in ("body", "cargo"))
        return (obj.x, obj.y, (body[3] + body[4]) / 2)
    if obj.category == "traffic light":
        return (obj.x - 0.25, obj.y, ANCHOR_Z["traffic light"])
    if obj.category == "cyclist":
        return (obj.x - 0.1 * math.cos(obj.heading), obj.y - 0.1 * math.sin(obj.heading), ANCHOR_Z["cyclist"])
    return (obj.x, obj.y, ANCHOR_Z[obj.category])


def _place(obj: SceneObject, cam: _Camera) -> Placement | None:
    """The object's anchor and pixel box at the output size, or None when its anchor is behind or too far."""
    anchor = cam.to_cam(_anchor(obj))
    if not NEAR <= anchor[0] <= MAX_DEPTH:
        return None
    u, v = cam.project(anchor)
    points = [cam.project(q) for q in (cam.to_cam(p) for p in _extent(obj)) if q[0] >= NEAR]
    us, vs = [p[0] for p in points], [p[1] for p in points]
    box = (max(min(us), 0.0), max(min(vs), 0.0), min(max(us), cam.width), min(max(vs), cam.height))
    ss = SUPERSAMPLE
    return Placement(round(u / cam.width, 4), round(v / cam.height, 4), tuple(c / ss for c in box), anchor[0])


def _clearly_visible(placements: dict[str, Placement], size: tuple[int, int]) -> dict[str, Placement]:
    """Objects whose anchor is inside the image, that are not tiny, and whose anchor and most of whose box no
    nearer object's box covers."""
    out = {}
    for oid, p in placements.items():
        x0, y0, x1, y1 = p.box
        if not (0.01 <= p.x <= 0.99 and 0.01 <= p.y <= 0.99) or y1 - y0 < 3.0 or x1 - x0 < 1.5:
            continue
        u, v = p.x * size[0], p.y * size[1]
        hidden = False
        for other in placements.values():
            if other.depth >= p.depth:
                continue
            a0, b0, a1, b1 = other.box
            overlap = max(0.0, min(x1, a1) - max(x0, a0)) * max(0.0, min(y1, b1) - max(y0, b0))
            if (a0 <= u <= a1 and b0 <= v <= b1) or overlap > 0.5 * (x1 - x0) * (y1 - y0):
                hidden = True
                break
        if not hidden:
            out[oid] = p
    return out


def render_views(scene: Scene, cameras: Iterable[str], size: tuple[int, int]) -> list[View]:
    """Render ``scene`` into each named camera at ``size`` (width, height)."""
    width, height = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    views = []
    for name in cameras:
        cam = _Camera(name, scene.ego, width, height)
        image = Image.new("RGB", (width, height))
        painter = _Painter(scene, cam, image)
        painter.background()
        painter.road()
        painter.markings()
        for obj in scene.objects:
            painter.streaks(obj)
        placements: dict[str, Placement] = {}
        depth = {o.id: cam.to_cam(_anchor(o))[0] for o in scene.objects}
        for obj in sorted(scene.objects, key=lambda o: -depth[o.id]):
            if depth[obj.id] > -2.0:
                painter.object(obj)
            placement = _place(obj, cam)
            if placement is not None:
                placements[obj.id] = placement
        views.append(View(name, image.reduce(SUPERSAMPLE), _clearly_visible(placements, size)))
    return views


def render_shapes(scene: ShapeScene, size: tuple[int, int]) -> Image.Image:
    """The shapes of a general-domain scene on their plain background."""
    width, height = size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE
    image = Image.new("RGB", (width, height), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        u, v, r = shape.x * width, shape.y * height, shape.size * height
        fill = RGB[shape.colour]
        if shape.kind == "circle":
            draw.ellipse([u - r, v - r, u + r, v + r], fill=fill)
        elif shape.kind == "square":
            draw.rectangle([u - 0.85 * r, v - 0.85 * r, u + 0.85 * r, v + 0.85 * r], fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([(u, v - r), (u + r * 0.95, v + r * 0.75), (u - r * 0.95, v + r * 0.75)], fill=fill)
        else:
            draw.polygon([(u, v - r), (u + 0.8 * r, v), (u, v + r), (u - 0.8 * r, v)], fill=fill)
    return image.reduce(SUPERSAMPLE)
