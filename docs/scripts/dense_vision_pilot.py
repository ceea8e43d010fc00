"""Pilot: can the demo teacher's vision tower learn objects' local attributes from dense labels, and how fast?

The answer-token loss of the teacher runs (docs/demo.md) never taught the vision tower an object's category,
colour or motion. This trains the same tower (``TeacherRecipe``'s shape, freshly initialised) with one linear head
per attribute on its merged vision tokens, labelled from the renderer's object boxes (a token takes the object
that covers most of it, at least a quarter; else background), on front-view scenes of a seed used for nothing
else, and prints held-out per-token accuracy on object tokens as it trains. Run from the repository root:

    python docs/scripts/dense_vision_pilot.py --images 2000 --seconds 240
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from PIL import Image
from torch import nn

from drivekd.data.synthetic.render import render_views
from drivekd.data.synthetic.scene import sample_scene
from drivekd.demo.teacher import TeacherRecipe
from drivekd.models.pair import build_tiny_pair

CELL = 28  # one merged vision token: 14 px patches, 2 x 2 merge
ATTRIBUTES = ("category", "colour", "motion")


def labelled(
    rng: random.Random, size: tuple[int, int], codes: dict[str, dict[str, int]]
) -> tuple[Image.Image, dict]:
    """A front-view image and, per attribute, one label per merged token (0: background)."""
    scene = sample_scene(rng, "pilot")
    view = render_views(scene, ["CAM_FRONT"], size)[0]
    columns, rows = size[0] // CELL, size[1] // CELL
    labels = {a: torch.zeros(rows * columns, dtype=torch.long) for a in ATTRIBUTES}
    cover = torch.zeros(rows * columns)
    objects = {o.id: o for o in scene.objects}
    for oid, placement in view.placements.items():
        obj, (x0, y0, x1, y1) = objects[oid], placement.box
        for r in range(rows):
            for c in range(columns):
                width = max(0.0, min(x1, (c + 1) * CELL) - max(x0, c * CELL))
                height = max(0.0, min(y1, (r + 1) * CELL) - max(y0, r * CELL))
                share, k = width * height / CELL**2, r * columns + c
                if share >= 0.25 and share > cover[k]:
                    cover[k] = share
                    for a, value in zip(ATTRIBUTES, (obj.category, obj.colour, obj.motion), strict=True):
                        labels[a][k] = codes[a].setdefault(value, len(codes[a]) + 1)
    return view.image, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = TeacherRecipe()
    pair = build_tiny_pair(recipe.family, teacher=recipe.size, image_size=recipe.image_size, seed=0)
    visual, processor = pair.teacher.model.visual, pair.teacher_processor
    codes: dict[str, dict[str, int]] = {a: {} for a in ATTRIBUTES}
    rng = random.Random(5)
    train = [labelled(rng, recipe.image_size, codes) for _ in range(args.images)]
    held = [labelled(random.Random(10_000 + i), recipe.image_size, codes) for i in range(64)]
    heads = nn.ModuleDict({a: nn.Linear(visual.merger.mlp[-1].out_features, 16) for a in ATTRIBUTES})
    optimizer = torch.optim.AdamW([*visual.parameters(), *heads.parameters()], lr=2e-3)

    def tokens(images: list[Image.Image]) -> torch.Tensor:
        enc = processor.image_processor(images=images, return_tensors="pt")
        return visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output

    def held_out() -> dict[str, float]:
        visual.eval()
        with torch.no_grad():
            features = tokens([image for image, _ in held])
            scores = {}
            for a in ATTRIBUTES:
                target = torch.cat([labels[a] for _, labels in held])
                on_object = target > 0
                guess = heads[a](features).argmax(-1)
                scores[a] = round(100 * float((guess[on_object] == target[on_object]).float().mean()), 1)
        visual.train()
        return scores

    print(f"before training: {held_out()} ({args.images} train images, 64 held out)", flush=True)
    started, step = time.perf_counter(), 0
    while time.perf_counter() - started < args.seconds:
        batch = random.Random(step).sample(train, args.batch)
        features = tokens([image for image, _ in batch])
        loss = sum(
            nn.functional.cross_entropy(heads[a](features), torch.cat([labels[a] for _, labels in batch]))
            for a in ATTRIBUTES
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 250 == 0:
            print(f"step {step}, {time.perf_counter() - started:.0f} s: {held_out()}", flush=True)
    print(f"final, step {step}: {held_out()}; classes: {codes}")


if __name__ == "__main__":
    main()
