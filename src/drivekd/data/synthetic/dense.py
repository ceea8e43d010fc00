"""Per-vision-token labels of rendered scenes: which object's category, colour and motion each token shows.

A dense signal for a vision tower trained from scratch (the demo teacher's first stage): answer tokens name an
object's appearance a few times per sample, these labels name it at every token it covers. A token is one merged
vision token of the processor's grid (``cell`` pixels square: 14 px patches, 2 x 2 merge) in raster order, the
order a Qwen2.5-VL vision tower returns its merged tokens in; it takes the object whose box covers most of it, at
least ``min_share`` of it, else background (label 0).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from drivekd.data.synthetic.render import CAMERA_RIG, View, render_views
from drivekd.data.synthetic.scene import Scene, SceneObject, sample_scene

ATTRIBUTES = ("category", "colour", "motion")


@dataclass(frozen=True)
class LabelledView:
    """A rendered camera and one label per token for each attribute (0: background)."""

    camera: str
    image: Image.Image
    labels: dict[str, torch.Tensor]


def token_labels(
    view: View,
    objects: dict[str, SceneObject],
    size: tuple[int, int],
    codes: dict[str, dict[str, int]],
    *,
    cell: int = 28,
    min_share: float = 0.25,
) -> dict[str, torch.Tensor]:
    """Labels of ``view``'s tokens; ``codes`` maps each attribute's values to class ids (1, 2, ...), extended with
    values it has not seen."""
    columns, rows = size[0] // cell, size[1] // cell
    labels = {a: torch.zeros(rows * columns, dtype=torch.long) for a in ATTRIBUTES}
    cover = [0.0] * (rows * columns)
    for oid, placement in view.placements.items():
        obj, (x0, y0, x1, y1) = objects[oid], placement.box
        values = (obj.category, obj.colour, obj.motion)
        for r in range(int(y0 // cell), min(rows, int(y1 // cell) + 1)):
            for c in range(int(x0 // cell), min(columns, int(x1 // cell) + 1)):
                width = max(0.0, min(x1, (c + 1) * cell) - max(x0, c * cell))
                height = max(0.0, min(y1, (r + 1) * cell) - max(y0, r * cell))
                share, k = width * height / cell**2, r * columns + c
                if share >= min_share and share > cover[k]:
                    cover[k] = share
                    for attribute, value in zip(ATTRIBUTES, values, strict=True):
                        labels[attribute][k] = codes[attribute].setdefault(value, len(codes[attribute]) + 1)
    return labels


def labelled_views(
    seed: int,
    size: tuple[int, int],
    codes: dict[str, dict[str, int]],
    cameras: tuple[str, ...] = tuple(CAMERA_RIG),
    **options: float,
) -> Iterator[LabelledView]:
    """An endless stream of freshly sampled scenes, one random camera of ``cameras`` each, with their labels."""
    rng = random.Random(seed)
    for index in itertools.count():
        scene: Scene = sample_scene(rng, f"dense-{seed}-{index}")
        view = render_views(scene, [rng.choice(cameras)], size)[0]
        objects = {o.id: o for o in scene.objects}
        yield LabelledView(view.camera, view.image, token_labels(view, objects, size, codes, **options))
