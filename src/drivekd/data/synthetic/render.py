"""PIL rendering of synthetic scenes into nuScenes-style camera images, and where each object lands in them.

Every camera is a level pinhole at the ego vehicle's centre, 1.5 m above the ground, turned by its rig yaw. The
road, its markings and the buildings are ground polygons and 3-D boxes clipped at a near plane, projected and
painted far to near. Road users and signals are schematic icons standing at their projected position: a flat
silhouette per category in the object's colour, at least ``ICON_MIN`` of the image height tall whatever its
distance, so that a tiny VLM's 28 x 28-pixel vision tokens can see it. What a model must read is drawn
explicitly and large: a motion marker above each road user (arrow up, left or right, a red brake bar, a
crossing or walking arrow), the lit lamp of a traffic light, and in CAM_FRONT the ego vehicle's own arrow (tilt:
steering; length and colour: speed). Images are drawn at twice the requested size and box-filtered down;
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
LINE_WHITE, LINE_YELLOW = (236, 236, 230), (232, 186, 40)
GLASS, TYRE, SKIN, TROUSERS, POLE = (58, 74, 96), (34, 34, 36), (222, 178, 146), (46, 46, 64), (92, 92, 98)
LAMP_ON: dict[str, Colour] = {"red": (255, 48, 40), "yellow": (255, 204, 40), "green": (60, 236, 96)}
LAMP_OFF: dict[str, Colour] = {"red": (70, 24, 24), "yellow": (70, 60, 20), "green": (20, 60, 30)}
DASH_PERIOD = 10.0
DASH_FRACTION = {
    "not moving": 0.2,
    "driving slowly": 0.35,
    "driving with normal speed": 0.5,
    "driving fast": 0.7,
}

# Icons (schematic, in units of U, the icon scale in pixels; x right, y down from the ground contact point):
# every object is drawn as a large flat silhouette so that its category, colour and motion cover several
# vision tokens, whatever its distance (the icon shrinks with distance only down to ICON_MIN).
ICON_K = 3.0  # U = focal * ICON_K / depth, clamped to [ICON_MIN, ICON_MAX] x image height
ICON_MIN, ICON_MAX = 0.2, 0.42
OUTLINE = (16, 16, 20)
# Motion markers drawn above a road user (colour, shape).
MARKER: dict[str, tuple[Colour, str]] = {
    "going ahead": ((0, 220, 255), "up"),
    "turn left": ((255, 150, 0), "left"),
    "turn right": ((255, 0, 220), "right"),
    "stopped": ((255, 24, 24), "bar"),
    "crossing the road": ((150, 255, 0), "across"),
    "walking along the road": ((150, 255, 0), "along"),
}
# The ego vehicle's own motion, drawn at the bottom centre of CAM_FRONT: arrow tilt per steer (degrees, left
# negative) and arrow length (fraction of the image height) and colour per speed.
EGO_TILT = {
    "going straight": 0.0,
    "slightly steering to the left": -20.0,
    "slightly steering to the right": 20.0,
    "steering to the left": -48.0,
    "steering to the right": 48.0,
}
EGO_ARROW: dict[str, tuple[float, Colour]] = {
    "not moving": (0.0, (255, 24, 24)),
    "driving slowly": (0.14, (60, 255, 60)),
    "driving with normal speed": (0.23, (255, 170, 0)),
    "driving fast": (0.32, (255, 0, 255)),
}
ANCHOR_Z = {"traffic light": 5.1, "stop sign": 2.45}


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
    def rect(self, icon: Icon, x0: float, y0: float, x1: float, y1: float, fill: Colour) -> None:
        """A rectangle in icon units, outlined."""
        u, v, s = icon.u, icon.v, icon.unit
        self.draw.rectangle(
            [u + x0 * s, v + y0 * s, u + x1 * s, v + y1 * s],
            fill=fill,
            outline=OUTLINE,
            width=max(1, round(s / 24)),
        )

    def disc(self, icon: Icon, x: float, y: float, r: float, fill: Colour) -> None:
        u, v, s = icon.u + x * icon.unit, icon.v + y * icon.unit, icon.unit
        self.draw.ellipse([u - r * s, v - r * s, u + r * s, v + r * s], fill=fill, outline=OUTLINE)

    def vehicle(self, obj: SceneObject, icon: Icon) -> None:
        body = RGB[obj.colour]
        w, h = ICON_SHAPE[obj.category]
        if obj.category == "sedan":
            self.rect(icon, -0.5, -h, 0.45, -0.55, GLASS)
            self.rect(icon, -w / 2, -0.6, w / 2, -0.12, body)
        elif obj.category == "van":
            self.rect(icon, -w / 2, -h, w / 2, -0.12, body)
            self.rect(icon, -w / 2 + 0.12, -h + 0.15, w / 2 - 0.12, -h + 0.45, GLASS)
        elif obj.category == "truck":
            self.rect(icon, -w / 2, -h, 0.45, -0.12, body)
            self.rect(icon, 0.55, -1.0, w / 2, -0.12, body)
            self.rect(icon, 0.68, -0.88, w / 2 - 0.1, -0.58, GLASS)
        else:  # bus
            self.rect(icon, -w / 2, -h, w / 2, -0.12, body)
            for k in range(4):
                x0 = -w / 2 + 0.15 + k * (w - 0.3) / 4
                self.rect(icon, x0 + 0.04, -h + 0.18, x0 + (w - 0.3) / 4 - 0.04, -h + 0.55, GLASS)
        for x in (-w / 2 + 0.35, w / 2 - 0.35):
            self.disc(icon, x, -0.14, 0.15, TYRE)

    def pedestrian(self, obj: SceneObject, icon: Icon) -> None:
        if obj.motion == "standing still":
            self.rect(icon, -0.16, -0.62, 0.16, 0.0, TROUSERS)
        else:
            self.draw.polygon(
                _scaled(icon, [(-0.34, 0.0), (-0.14, 0.0), (0.0, -0.62), (-0.1, -0.62)]), TROUSERS
            )
            self.draw.polygon(_scaled(icon, [(0.34, 0.0), (0.14, 0.0), (0.0, -0.62), (0.1, -0.62)]), TROUSERS)
        self.rect(icon, -0.38, -1.22, 0.38, -0.6, RGB[obj.colour])
        self.disc(icon, 0.0, -1.38, 0.16, SKIN)

    def cyclist(self, obj: SceneObject, icon: Icon) -> None:
        for x in (-0.45, 0.45):
            self.disc(icon, x, -0.3, 0.28, TYRE)
        self.draw.line(
            _scaled(icon, [(-0.45, -0.3), (0.0, -0.62), (0.45, -0.3)]),
            fill=POLE,
            width=max(2, round(icon.unit / 10)),
        )
        self.rect(icon, -0.24, -1.22, 0.24, -0.6, RGB[obj.colour])
        self.disc(icon, 0.05, -1.38, 0.16, SKIN)

    def traffic_light(self, obj: SceneObject, icon: Icon) -> None:
        ground = self.cam.project(self.cam.to_cam((obj.x, self.scene.road.right_edge - 0.8, 0.0)))
        self.draw.line([(icon.u, icon.v), (icon.u, ground[1])], fill=POLE, width=max(2, round(icon.unit / 8)))
        self.rect(icon, -0.45, -1.0, 0.45, 1.0, (26, 26, 30))
        for state, y in (("red", -0.62), ("yellow", 0.0), ("green", 0.62)):
            lit = state == obj.colour
            self.disc(icon, 0.0, y, 0.36 if lit else 0.24, LAMP_ON[state] if lit else LAMP_OFF[state])

    def stop_sign(self, obj: SceneObject, icon: Icon) -> None:
        self.draw.line(
            [(icon.u, icon.v), (icon.u, icon.v + 1.4 * icon.unit)],
            fill=POLE,
            width=max(2, round(icon.unit / 8)),
        )
        octagon = [
            (0.62 * math.cos(math.pi / 8 + k * math.pi / 4), 0.62 * math.sin(math.pi / 8 + k * math.pi / 4))
            for k in range(8)
        ]
        self.draw.polygon(_scaled(icon, octagon), fill=(250, 250, 250))
        self.draw.polygon(_scaled(icon, [(x * 0.84, y * 0.84) for x, y in octagon]), fill=(204, 22, 28))
        self.rect(icon, -0.36, -0.08, 0.36, 0.08, (250, 250, 250))

    def marker(self, obj: SceneObject, icon: Icon) -> None:
        """The road user's motion marker above its icon."""
        if obj.motion not in MARKER:
            return
        colour, shape = MARKER[obj.motion]
        top = icon.box[1] - 0.1 * icon.unit
        u, s = icon.u, icon.unit
        width = max(2, round(s / 7))
        head = 0.22 * s
        if shape == "bar":
            self.draw.rectangle(
                [u - 0.45 * s, top - 0.28 * s, u + 0.45 * s, top - 0.08 * s], fill=colour, outline=OUTLINE
            )
            return
        if shape in ("up", "along"):
            a, b = (u, top - 0.05 * s), (u, top - 0.75 * s)
        else:
            sign = -1 if shape == "left" else 1
            a, b = (u - sign * 0.45 * s, top - 0.35 * s), (u + sign * 0.45 * s, top - 0.35 * s)
        self.draw.line([a, b], fill=colour, width=width)
        ends = [(a, b)] if shape in ("up", "left", "right") else [(a, b), (b, a)]
        for start, tip in ends:
            dx, dy = tip[0] - start[0], tip[1] - start[1]
            n = math.hypot(dx, dy)
            dx, dy = dx / n, dy / n
            self.draw.polygon(
                [
                    (tip[0] + dx * head, tip[1] + dy * head),
                    (tip[0] - dy * head, tip[1] + dx * head),
                    (tip[0] + dy * head, tip[1] - dx * head),
                ],
                fill=colour,
            )

    def ego_arrow(self) -> tuple[float, float, float, float]:
        """The ego vehicle's steering (tilt) and speed (length and colour) at the bottom centre of CAM_FRONT;
        returns the box it covers."""
        ego = self.scene.ego
        length, colour = EGO_ARROW[ego.speed]
        w, h = self.cam.width, self.cam.height
        base = (w / 2, h - 0.04 * h)
        if length == 0.0:
            square = (w / 2 - 0.09 * h, h - 0.2 * h, w / 2 + 0.09 * h, h - 0.02 * h)
            self.draw.rectangle(square, fill=colour, outline=OUTLINE)
            return square
        tilt = math.radians(EGO_TILT[ego.steer])
        dx, dy = math.sin(tilt), -math.cos(tilt)
        tip = (base[0] + dx * length * h, base[1] + dy * length * h)
        self.draw.line([base, tip], fill=colour, width=max(3, round(0.07 * h)))
        head = 0.1 * h
        self.draw.polygon(
            [
                (tip[0] + dx * head, tip[1] + dy * head),
                (tip[0] - dy * head, tip[1] + dx * head),
                (tip[0] + dy * head, tip[1] - dx * head),
            ],
            fill=colour,
        )
        reach = head + 0.04 * h
        return (min(base[0], tip[0]) - reach, min(base[1], tip[1]) - reach, max(base[0], tip[0]) + reach, h)

    def object(self, obj: SceneObject, icon: Icon) -> None:
        if obj.is_vehicle:
            self.vehicle(obj, icon)
        elif obj.category == "pedestrian":
            self.pedestrian(obj, icon)
        elif obj.category == "cyclist":
            self.cyclist(obj, icon)
        elif obj.category == "traffic light":
            self.traffic_light(obj, icon)
        else:
            self.stop_sign(obj, icon)
        self.marker(obj, icon)


@dataclass(frozen=True)
class Icon:
    """Where an object's icon is drawn (supersampled pixels): reference point, unit, box, centre and depth."""

    u: float
    v: float  # ground contact (road users) or centre (traffic light, stop sign)
    unit: float
    box: tuple[float, float, float, float]
    centre: tuple[float, float]
    depth: float


# Icon width and height in units (road users stand on their ground point; signals are centred on it).
ICON_SHAPE: dict[str, tuple[float, float]] = {
    "sedan": (1.9, 0.95),
    "van": (1.8, 1.35),
    "truck": (2.5, 1.6),
    "bus": (2.8, 1.4),
    "pedestrian": (0.8, 1.55),
    "cyclist": (1.5, 1.55),
    "traffic light": (0.9, 2.0),
    "stop sign": (1.24, 1.24),
}


def _scaled(icon: Icon, points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(icon.u + x * icon.unit, icon.v + y * icon.unit) for x, y in points]


def _anchor(obj: SceneObject) -> Point:
    """The 3-D point an icon hangs from: the ground under a road user, the centre of a sign or light."""
    return (obj.x, obj.y, ANCHOR_Z.get(obj.category, 0.0))


def _icon(obj: SceneObject, cam: _Camera) -> Icon | None:
    """The object's icon in ``cam``, or None when it is behind the camera or too far."""
    q = cam.to_cam(_anchor(obj))
    if not NEAR <= q[0] <= MAX_DEPTH:
        return None
    u, v = cam.project(q)
    unit = min(max(cam.focal * ICON_K / q[0], ICON_MIN * cam.height), ICON_MAX * cam.height)
    w, h = ICON_SHAPE[obj.category]
    if obj.is_road_user:
        box = (u - w / 2 * unit, v - h * unit, u + w / 2 * unit, v)
    else:
        box = (u - w / 2 * unit, v - h / 2 * unit, u + w / 2 * unit, v + h / 2 * unit)
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    if obj.is_vehicle:
        centre = (u, v - 0.4 * unit)  # the body, below a sedan's or truck's glass
    return Icon(u, v, unit, box, centre, q[0])


def _place(icon: Icon, cam: _Camera) -> Placement:
    """The icon's centre and pixel box at the output size."""
    ss = SUPERSAMPLE
    x0, y0, x1, y1 = icon.box
    box = (max(x0, 0.0), max(y0, 0.0), min(x1, cam.width), min(y1, cam.height))
    x, y = icon.centre
    return Placement(
        round(x / cam.width, 4), round(y / cam.height, 4), tuple(c / ss for c in box), icon.depth
    )


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
        placements: dict[str, Placement] = {}
        icons = {o.id: icon for o in scene.objects if (icon := _icon(o, cam)) is not None}
        for obj in sorted(scene.objects, key=lambda o: -icons[o.id].depth if o.id in icons else 0.0):
            if obj.id in icons:
                painter.object(obj, icons[obj.id])
                placements[obj.id] = _place(icons[obj.id], cam)
        if name == "CAM_FRONT":  # drawn over everything; an object whose tag point it covers is not visible
            a0, b0, a1, b1 = (c / SUPERSAMPLE for c in painter.ego_arrow())
            placements = {
                k: p
                for k, p in placements.items()
                if not (a0 <= p.x * size[0] <= a1 and b0 <= p.y * size[1] <= b1)
            }
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


MARK_COLOUR = (255, 255, 255)
MARK_PAD, MARK_WIDTH = 3, 2  # pixels at the output size


def mark(image: Image.Image, placement: Placement) -> Image.Image:
    """A copy of ``image`` with a white frame around the object at ``placement``: the visual prompt that shows a
    tiny VLM which object a question's ``<cK,CAM,x,y>`` tag names (it need not learn to read coordinates)."""
    marked = image.copy()
    x0, y0, x1, y1 = placement.box
    w, h = marked.size
    frame = [
        max(x0 - MARK_PAD, 0),
        max(y0 - MARK_PAD, 0),
        min(x1 + MARK_PAD, w - 1),
        min(y1 + MARK_PAD, h - 1),
    ]
    ImageDraw.Draw(marked).rectangle(frame, outline=MARK_COLOUR, width=MARK_WIDTH)
    return marked
