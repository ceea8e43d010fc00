"""Pilot: can the demo teacher's vision tower learn objects' local attributes from dense labels, and how fast?

The answer-token loss of the teacher runs (docs/demo.md) never made their answers name an object's category,
colour or motion from the picture. This runs the teacher's dense stage alone (:func:`drivekd.demo.dense.
pretrain_vision`: the ``TeacherRecipe`` vision tower, freshly initialised, one linear head per attribute on its
merged tokens, labels from the renderer's object boxes, fresh scenes of one random camera at every step) and prints
the held-out per-token accuracy on object tokens as it trains, and the majority-class baseline. Run from the
repository root:

    python docs/scripts/dense_vision_pilot.py --steps 1500
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter

import torch

from drivekd.data.synthetic.dense import ATTRIBUTES, labelled_views
from drivekd.demo.dense import HELDOUT, pretrain_vision
from drivekd.demo.teacher import TeacherRecipe
from drivekd.models.pair import build_tiny_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--front-only", action="store_true", help="CAM_FRONT views only (default: all six)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = TeacherRecipe()
    pair = build_tiny_pair(recipe.family, teacher=recipe.size, image_size=recipe.image_size, seed=0)
    cameras = ("CAM_FRONT",) if args.front_only else None
    codes: dict[str, dict[str, int]] = {a: {} for a in ATTRIBUTES}
    stream = labelled_views(recipe.dense_seed, recipe.image_size, codes, *([cameras] if cameras else []))
    held = list(itertools.islice(stream, HELDOUT))  # the stage's own held-out views
    for a in ATTRIBUTES:
        labels = torch.cat([v.labels[a] for v in held])
        labels = labels[labels > 0].tolist()
        print(f"majority class, {a}: {100 * Counter(labels).most_common(1)[0][1] / len(labels):.1f}%")
    report = pretrain_vision(
        pair.teacher.model.visual,
        pair.teacher_processor.image_processor,
        steps=args.steps,
        batch=recipe.dense_batch,
        lr=recipe.dense_lr,
        seed=recipe.dense_seed,
        image_size=recipe.image_size,
        progress=lambda step, seconds, scores: print(f"step {step}, {seconds:.0f} s: {scores}", flush=True),
        cameras=cameras,
    )
    print({k: v for k, v in report.items() if k != "classes"})


if __name__ == "__main__":
    main()
