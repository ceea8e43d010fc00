"""Pilot: can the demo teacher's vision tower learn objects' local attributes from dense labels, and how fast?

The answer-token loss of the teacher runs (docs/demo.md) never made their answers name an object's category,
colour or motion from the picture. This runs the teacher's dense stage alone (:func:`drivekd.demo.dense.
pretrain_vision`: the ``TeacherRecipe`` vision tower, freshly initialised, one linear head per attribute on its
merged tokens, labels from the renderer's object boxes, fresh scenes of one random camera at every step) and prints
the held-out per-token accuracy on object tokens as it trains, then the report with the majority-class baseline.
Run from the repository root:

    python docs/scripts/dense_vision_pilot.py --steps 1500
"""

from __future__ import annotations

import argparse

import torch

from drivekd.demo.teacher import TeacherRecipe, run_dense_stage
from drivekd.models.pair import build_tiny_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--front-only", action="store_true", help="CAM_FRONT views only (default: all six)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = TeacherRecipe()
    pair = build_tiny_pair(recipe.family, teacher=recipe.size, image_size=recipe.image_size, seed=0)
    report = run_dense_stage(
        recipe,
        pair,
        steps=args.steps,
        cameras=("CAM_FRONT",) if args.front_only else None,
        progress=lambda step, seconds, scores: print(f"step {step}, {seconds:.0f} s: {scores}", flush=True),
    )
    print({k: v for k, v in report.items() if k != "classes"})


if __name__ == "__main__":
    main()
