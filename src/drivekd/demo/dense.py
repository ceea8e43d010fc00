"""The demo teacher's first stage: its vision tower learns objects' category, colour and motion per token.

Trained on answer tokens alone, tiny VLMs from scratch learned the pictures' global features and never an object's
appearance (docs/demo.md); told per token (:mod:`drivekd.data.synthetic.dense`), the same tower learns them within
a minute. One linear head per attribute reads the tower's merged tokens (a Qwen2.5-VL tower's ``pooler_output``);
the heads are dropped after the stage. Every step renders fresh scenes, so nothing is memorised.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from drivekd.data.synthetic.dense import ATTRIBUTES, LabelledView, labelled_views

HELDOUT = 64  # held-out views of the stage's own seed stream (the first ones drawn)
CLASSES = 16  # head width: more than any attribute's values (8 categories, 7 colours, 8 motions)


def _tokens(visual: nn.Module, image_processor: Any, views: list[LabelledView]) -> torch.Tensor:
    device = next(visual.parameters()).device
    encoded = image_processor(images=[v.image for v in views], return_tensors="pt")
    grid = encoded["image_grid_thw"].to(device)
    return visual(encoded["pixel_values"].to(device), grid_thw=grid).pooler_output


def _targets(views: list[LabelledView], attribute: str, device: torch.device) -> torch.Tensor:
    return torch.cat([v.labels[attribute] for v in views]).to(device)


def pretrain_vision(
    visual: nn.Module,
    image_processor: Any,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    image_size: tuple[int, int],
    progress: Callable[[int, float, dict[str, float]], None] | None = None,
    every: int = 250,
    cameras: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Train ``visual`` (in place) for ``steps`` AdamW steps of ``batch`` labelled views; returns the held-out
    per-token accuracy on object tokens per attribute before and after (and that of the majority class), and the
    seconds spent. ``progress`` gets
    (step, seconds, held-out accuracy) every ``every`` steps; ``cameras`` restricts the views (default: all six)."""
    codes: dict[str, dict[str, int]] = {a: {} for a in ATTRIBUTES}
    stream = labelled_views(seed, image_size, codes, *([cameras] if cameras else []))
    held = list(itertools.islice(stream, HELDOUT))
    device = next(visual.parameters()).device
    width = _tokens(visual, image_processor, held[:1]).shape[-1]
    heads = nn.ModuleDict({a: nn.Linear(width, CLASSES) for a in ATTRIBUTES}).to(device)
    optimizer = torch.optim.AdamW([*visual.parameters(), *heads.parameters()], lr=lr)

    def accuracy() -> dict[str, float]:
        was_training = visual.training
        visual.eval()
        with torch.no_grad():
            features = _tokens(visual, image_processor, held)
            scores = {}
            for a in ATTRIBUTES:
                target = _targets(held, a, device)
                on_object = target > 0
                guess = heads[a](features[on_object]).argmax(-1)
                scores[a] = round(100.0 * float((guess == target[on_object]).float().mean()), 1)
        visual.train(was_training)
        return scores

    before = accuracy()
    started = time.perf_counter()
    visual.train()
    losses = []
    for step in range(1, steps + 1):
        views = list(itertools.islice(stream, batch))
        features = _tokens(visual, image_processor, views)
        loss = sum(
            nn.functional.cross_entropy(heads[a](features), _targets(views, a, device)) for a in ATTRIBUTES
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None and step % every == 0:
            progress(step, time.perf_counter() - started, accuracy())
    majority = {}
    for a in ATTRIBUTES:
        target = _targets(held, a, device)
        on_object = target[target > 0]
        majority[a] = round(100.0 * float((on_object == on_object.mode().values).float().mean()), 1)
    return {
        "steps": steps,
        "batch": batch,
        "seconds": round(time.perf_counter() - started, 1),
        "heldout_views": HELDOUT,
        "heldout_object_tokens": int((_targets(held, "category", device) > 0).sum()),
        "accuracy_before": before,
        "accuracy_after": accuracy(),
        "majority_class": majority,  # held-out accuracy of always answering the most frequent class
        "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(losses[-1], 4) if losses else None,
        "classes": codes,
    }
