"""Recipes: the list of loss terms a run optimises, which teacher signals at which layers.

Teachers are named by the capability they serve (perception, reasoning, planning). Layers are resolved from the
paper's numbering (config) to 0-based decoder indices here, once per pair of models:

* perception: t-v attention at paper layer 1 (eq. 13), or full attention there (appendix E variant);
* reasoning: full attention at student layers 1..N_s-1 against sliding teacher-layer group means (eqs. 14-15),
  or t-v attention in those layers (variant);
* planning: t-v attention at the penultimate layer (eq. 16), or full attention there (variant).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from drivekd.losses import paper_layer_to_index, teacher_layer_groups
from drivekd.signals.types import SignalNeeds
from drivekd.training.config import CAPABILITIES, DistillConfig, LayersConfig, RoleLayers
from drivekd.training.objective import Objective
from drivekd.training.terms import (
    ATTENTION_TERMS,
    AnswerKL,
    AttentionTerm,
    FullAttentionMSE,
    HiddenStateMSE,
    SupervisedCE,
    Term,
)

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
    """The terms a run optimises: CE first, then the teachers' attention terms or one baseline term."""

    terms: tuple[Term, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the loss weights: w_ce and one per other term."""
        return tuple(t.name for t in self.terms)

    @property
    def teachers(self) -> tuple[str, ...]:
        """The capability teachers whose attention terms Pi mixes (eq. 17)."""
        return tuple(t.name for t in self.terms if t.mixed)

    @property
    def baseline(self) -> bool:
        """CE plus an unmixed term (KL or hidden states): never projected."""
        return any(not t.mixed and t.name != "ce" for t in self.terms)


def signal_kind(config: DistillConfig, teacher: str) -> str:
    return {
        "perception": config.perception_signal,
        "reasoning": config.reasoning_signal,
        "planning": config.planning_signal,
    }[teacher]


def recipe_teachers(config: DistillConfig) -> tuple[str, ...]:
    """The capability teachers a recipe distils."""
    if config.recipe == "multi":
        return TEACHERS
    return (config.recipe,) if config.recipe in TEACHERS else ()


def attention_term(config: DistillConfig, teacher: str, layers: Layers) -> AttentionTerm:
    """Teacher ``teacher``'s attention term: its signal kind and metric (registry), layers and groups."""
    kind = signal_kind(config, teacher)
    cls = ATTENTION_TERMS[kind, config.metric]
    options = {"keys": "all"} if cls is FullAttentionMSE and config.normalisation == "reference" else {}
    groups = tuple(tuple(g) for g in layers.teacher[teacher])
    return cls(teacher, tuple(layers.student[teacher]), groups, **options)


def build_recipe(
    config: DistillConfig,
    layers: Layers,
    student_depth: int,
    teacher_depth: int,
    projectors: nn.ModuleList | None = None,
) -> Recipe:
    """The terms of ``config.recipe``; the hidden baseline needs ``projectors`` (one per layer pair)."""
    terms: list[Term] = [SupervisedCE()]
    terms += [attention_term(config, t, layers) for t in recipe_teachers(config)]
    if config.recipe == "kl":
        terms.append(AnswerKL(config.kl_temperature))
    if config.recipe == "hidden":
        pairs = hidden_pairs(config.hidden_layer, student_depth, teacher_depth)
        if projectors is None or len(projectors) != len(pairs):
            raise ValueError(f"the hidden baseline needs {len(pairs)} projectors, one per layer pair")
        terms.append(HiddenStateMSE(tuple((s, tuple(g)) for s, g in pairs), projectors))
    return Recipe(tuple(terms))


def hidden_pairs(layer: str, student_depth: int, teacher_depth: int) -> list[tuple[int, list[int]]]:
    """Hidden-state baseline: (student paper layer, teacher paper layers averaged) at 1, 1..pen (grouped) or pen."""

    def pick(depth: int) -> list[int]:
        return {"1": [1], "mid": list(range(1, depth)), "pen": [depth - 1]}[layer]

    student = pick(student_depth)
    return list(zip(student, teacher_layer_groups(student, pick(teacher_depth)), strict=True))


def attention_needs(
    distill: DistillConfig, layers: LayersConfig, student_depth: int, teacher_depth: int
) -> SignalNeeds:
    """The teacher's attention signals a run of ``distill`` reads for these depths: what a teacher-signal cache for
    it must hold (the hidden baseline reads hidden states, which a cache does not hold, and is refused)."""
    if distill.recipe == "hidden":
        raise ValueError(
            "the hidden-state baseline reads the teacher's hidden states; a cache holds attention only"
        )
    resolved = resolve_layers(layers, student_depth, teacher_depth)
    return Objective(build_recipe(distill, resolved, student_depth, teacher_depth).terms).needs
