"""Recipes: which teacher signals a run distils, at which layers, and what the student must capture.

Teachers are named by the capability they serve (perception, reasoning, planning). Layers are resolved from the
paper's numbering (config) to 0-based decoder indices here, once per pair of models:

* perception: t-v attention at paper layer 1 (eq. 13), or full attention there (appendix E variant);
* reasoning: full attention at student layers 1..N_s-1 against sliding teacher-layer group means (eqs. 14-15),
  or t-v attention in those layers (variant);
* planning: t-v attention at the penultimate layer (eq. 16), or full attention there (variant).
"""

from __future__ import annotations

from dataclasses import dataclass

from drivekd.capture.recorder import CapturePlan
from drivekd.losses import paper_layer_to_index, teacher_layer_groups
from drivekd.signals.types import SignalNeeds
from drivekd.training.config import CAPABILITIES, DistillConfig, LayersConfig, RoleLayers

TEACHERS = CAPABILITIES


@dataclass(frozen=True)
class Layers:
    """0-based decoder indices for both models."""

    student: dict[str, list[int]]  # teacher name -> student layers it distils into
    teacher: dict[
        str, list[list[int]]
    ]  # teacher name -> per student layer, the teacher layers averaged (eq. 15)


def _role(layers: RoleLayers, depth: int) -> dict[str, list[int]]:
    """Paper layers per teacher for one model, defaults filled in (1, 1..pen, pen)."""
    pen = depth - 1
    first, last = layers.reasoning if layers.reasoning is not None else (1, pen)
    chosen = {
        "perception": [layers.perception if layers.perception is not None else 1],
        "reasoning": list(range(first, last + 1)),
        "planning": [layers.planning if layers.planning is not None else pen],
    }
    for name, picked in chosen.items():
        if not picked or not all(1 <= k <= pen for k in picked):
            raise ValueError(
                f"layers for {name} must lie in 1..{pen} (paper numbering) for a {depth}-layer model"
            )
    return chosen


def resolve_layers(config: LayersConfig, student_depth: int, teacher_depth: int) -> Layers:
    """Map the configured paper layers to decoder indices and pair student layers with teacher groups."""
    student = _role(config.student, student_depth)
    teacher = _role(config.teacher, teacher_depth)
    groups = {name: teacher_layer_groups(student[name], teacher[name]) for name in TEACHERS}
    to_index = {name: [paper_layer_to_index(k, student_depth) for k in student[name]] for name in TEACHERS}
    teacher_index = {
        name: [[paper_layer_to_index(k, teacher_depth) for k in group] for group in groups[name]]
        for name in TEACHERS
    }
    return Layers(to_index, teacher_index)


@dataclass(frozen=True)
class Recipe:
    """Terms of the objective besides CE: attention teachers, or one of the baselines."""

    teachers: tuple[str, ...] = ()
    kl: bool = False
    hidden: str | None = None  # "1" | "mid" | "pen"

    @classmethod
    def of(cls, config: DistillConfig) -> Recipe:
        if config.recipe == "multi":
            return cls(teachers=TEACHERS)
        if config.recipe in TEACHERS:
            return cls(teachers=(config.recipe,))
        if config.recipe == "kl":
            return cls(kl=True)
        if config.recipe == "hidden":
            return cls(hidden=config.hidden_layer)
        return cls()

    @property
    def loss_names(self) -> tuple[str, ...]:
        """Names of the learnable loss weights: w_ce and one per distillation term."""
        extra = ("kl",) if self.kl else ("hidden",) if self.hidden else ()
        return ("ce", *self.teachers, *extra)


def signal_kind(config: DistillConfig, teacher: str) -> str:
    return {
        "perception": config.perception_signal,
        "reasoning": config.reasoning_signal,
        "planning": config.planning_signal,
    }[teacher]


def student_plan(
    recipe: Recipe, layers: Layers, config: DistillConfig, *, chunk_size: int = 256
) -> CapturePlan:
    tv, full = set(), set()
    for teacher in recipe.teachers:
        (tv if signal_kind(config, teacher) == "tv" else full).update(layers.student[teacher])
    return CapturePlan.of(tv=tv, full=full, chunk_size=chunk_size)


def hidden_pairs(recipe: Recipe, student_depth: int, teacher_depth: int) -> list[tuple[int, list[int]]]:
    """Hidden-state baseline: (student paper layer, teacher paper layers averaged) at 1, 1..pen (grouped) or pen."""
    if not recipe.hidden:
        return []

    def pick(depth: int) -> list[int]:
        return {"1": [1], "mid": list(range(1, depth)), "pen": [depth - 1]}[recipe.hidden]

    student = pick(student_depth)
    return list(zip(student, teacher_layer_groups(student, pick(teacher_depth)), strict=True))


def teacher_needs(
    recipe: Recipe, layers: Layers, config: DistillConfig, teacher_depth: int, student_depth: int
) -> SignalNeeds:
    tv: set[int] = set()
    full: set[int] = set()
    for teacher in recipe.teachers:
        wanted = {k for group in layers.teacher[teacher] for k in group}
        (tv if signal_kind(config, teacher) == "tv" else full).update(wanted)
    hidden = {k for _, group in hidden_pairs(recipe, student_depth, teacher_depth) for k in group}
    return SignalNeeds(frozenset(tv), frozenset(full), frozenset(hidden), recipe.kl)
