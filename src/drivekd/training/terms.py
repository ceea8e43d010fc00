"""Loss terms as typed objects: one small class per signal, each computing its value with the pure loss functions.

A term declares its ``name`` (its loss weight and log key), the teacher ``source`` it reads (a capability teacher,
``"base"`` for the KL / hidden baselines, none for CE), what it needs from the student (captured attention layers,
hidden states) and from the teacher (:class:`SignalNeeds`), the ``unit`` it averages over (the normaliser kept
across a gradient-accumulation window, :func:`unit_count`) and whether Pi mixes it (eq. 17). A recipe is a list of
terms (:mod:`drivekd.training.recipes`); the objective loops over them (:mod:`drivekd.training.objective`).

Attention terms are a mean over their student layers (:func:`drivekd.losses.layer_mean`) of a per-layer loss
against the teacher's group-mean target (eq. 15). Their per-layer values are computed as the student's forward
records each map (or from the maps collected after it), so each paper equation has one implementation here:

========================  ====================================================================
class                     equations
========================  ====================================================================
``SupervisedCE``          9
``AnswerKL``              KL baseline (section 4.5)
``HiddenStateMSE``        hidden-state baselines at 1 / mid / pen (section 4.5, appendix E)
``TextToVisionMSE``       12-13, 16 (and 12 at any layer for the appendix-E t-v reasoning variant)
``TextToVisionCosine``    30-31
``FullAttentionMSE``      11, 14-15 (one layer: the appendix-E full perception / planning variants)
``FullAttentionCosine``   32-35
========================  ====================================================================

Adding a signal is one class here and one line in :data:`ATTENTION_TERMS` (or in the recipe builder for a term
that is not an attention signal).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from drivekd.data.collate import IGNORE_INDEX, Batch
from drivekd.data.roles import TVIndex
from drivekd.losses import (
    answer_kl,
    full_attention_cosine_map,
    full_attention_mse,
    group_targets,
    grouped_hidden_mse,
    layer_mean,
    supervised_loss,
    text_to_vision_cosine_blocks,
    text_to_vision_mse_blocks,
)
from drivekd.signals.types import SignalNeeds, TeacherSignals

Unit = Literal["answer_tokens", "tokens", "queries", "samples", "tv_samples"]
MapKind = Literal["tv", "full"]


@dataclass(frozen=True)
class Rows:
    """The rows of one capability in a micro-batch and what the terms read from them.

    ``logits`` and ``labels`` are laid out alike (logits may be kept at some positions only); ``index`` is the
    batch's :class:`TVIndex` restricted to these rows; ``teacher`` maps a source name to its signals for the whole
    batch; ``hidden`` holds the student's hidden states (``outputs.hidden_states``) when a term asked for them.
    """

    capability: str
    rows: torch.Tensor
    batch: Batch
    index: TVIndex
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    teacher: Mapping[str, TeacherSignals] | None = None
    hidden: Sequence[torch.Tensor] = ()

    @property
    def valid(self) -> torch.Tensor:
        return self.batch.roles.valid[self.rows]


def unit_count(unit: Unit, rows: Rows) -> int:
    """How many items of ``unit`` the rows hold: the weight of their share of a window mean."""
    if unit == "answer_tokens":
        return int((rows.batch.labels[rows.rows][:, 1:] != IGNORE_INDEX).sum())
    if unit in ("tokens", "queries"):
        return int(rows.valid.sum())
    if unit == "samples":
        return int(rows.valid.any(dim=1).sum())
    if unit == "tv_samples":
        return int(((rows.index.text_count > 0) & (rows.index.vision_count > 0)).sum())
    raise ValueError(f"unknown unit {unit!r}")


class Term(ABC):
    """A loss term of the objective (see the module docstring)."""

    name: str
    unit: ClassVar[Unit]
    source: str | None = None  # the teacher source it reads
    mixed: ClassVar[bool] = False  # Pi mixes it (a capability teacher's attention term in eq. 17)
    student_hidden: ClassVar[bool] = False  # needs outputs.hidden_states

    def needs(self) -> SignalNeeds:
        """What the teacher must provide."""
        return SignalNeeds()

    @abstractmethod
    def value(self, rows: Rows) -> torch.Tensor:
        """The term on ``rows`` (a mean over its unit)."""


@dataclass(frozen=True)
class SupervisedCE(Term):
    """L_sup (eq. 9): mean token NLL over the answer span."""

    name: str = "ce"
    unit: ClassVar[Unit] = "answer_tokens"

    def value(self, rows: Rows) -> torch.Tensor:
        return supervised_loss(rows.logits, rows.labels)


@dataclass(frozen=True)
class AnswerKL(Term):
    """Token-level KL to the teacher on the answer span, with temperature (a baseline)."""

    temperature: float = 1.0
    name: str = "kl"
    source: str | None = "base"
    unit: ClassVar[Unit] = "answer_tokens"

    def needs(self) -> SignalNeeds:
        return SignalNeeds(logits=True)

    def value(self, rows: Rows) -> torch.Tensor:
        teacher = rows.teacher[self.source].logits[rows.rows]
        if teacher.shape[1] != rows.logits.shape[1]:  # the student kept logits at some positions only
            teacher = teacher[:, logit_positions(rows.batch.labels)]
        return answer_kl(rows.logits, teacher, rows.labels, self.temperature)


@dataclass(frozen=True, eq=False)
class HiddenStateMSE(Term):
    """Hidden-state MSE at student paper layers ``pairs[k][0]`` against group means of teacher layers
    ``pairs[k][1]`` (paper numbering, ``hidden_states[l]``), through learned projectors when widths differ."""

    pairs: tuple[tuple[int, tuple[int, ...]], ...]
    projectors: nn.ModuleList
    name: str = "hidden"
    source: str | None = "base"
    unit: ClassVar[Unit] = "tokens"
    student_hidden: ClassVar[bool] = True

    def needs(self) -> SignalNeeds:
        return SignalNeeds(hidden_layers=frozenset(k for _, group in self.pairs for k in group))

    def value(self, rows: Rows) -> torch.Tensor:
        teacher = rows.teacher[self.source]
        targets = group_targets(
            {k: t[rows.rows] for k, t in teacher.hidden.items()}, [g for _, g in self.pairs]
        )
        students = [rows.hidden[layer][rows.rows] for layer, _ in self.pairs]
        return grouped_hidden_mse(students, targets, rows.valid, list(self.projectors))


@dataclass(frozen=True)
class AttentionTerm(Term):
    """A capability teacher's attention signal: the mean over ``student_layers`` (0-based decoder indices) of a
    per-layer loss against the mean of the teacher layers of each group (``teacher_groups``, eq. 15)."""

    name: str
    student_layers: tuple[int, ...]
    teacher_groups: tuple[tuple[int, ...], ...]
    kind: ClassVar[MapKind]
    mixed: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.student_layers or len(self.student_layers) != len(self.teacher_groups):
            raise ValueError(
                f"term {self.name!r}: need one teacher group per student layer, got {len(self.student_layers)} "
                f"layers and {len(self.teacher_groups)} groups"
            )

    @property
    def source(self) -> str:  # type: ignore[override]
        return self.name

    def needs(self) -> SignalNeeds:
        layers = frozenset(k for group in self.teacher_groups for k in group)
        if self.kind == "tv":
            return SignalNeeds(tv_layers=layers)
        return SignalNeeds(full_layers=layers, full_group=max(len(g) for g in self.teacher_groups))

    def target(self, teacher: Mapping[str, TeacherSignals], position: int) -> torch.Tensor:
        """The teacher's group-mean target for the whole batch at student layer ``student_layers[position]``
        (the caller selects each capability's rows of it).

        One layer at a time and reading only that group's teacher maps, so a stream holds one target while it
        builds a layer's loss, not every layer's targets (nor, with a cache, every teacher map) at once.
        """
        signals = teacher[self.source].tv if self.kind == "tv" else teacher[self.source].full
        group = self.teacher_groups[position]
        return group_targets({k: signals[k] for k in group if k in signals}, [group])[0]

    @abstractmethod
    def layer_loss(self, student: torch.Tensor, target: torch.Tensor, rows: Rows) -> torch.Tensor:
        """The loss of one layer's student map (a tv block or a full map of ``rows``) against its target."""

    def value(self, rows: Rows) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is built from captured maps: use Objective / LayerStream")

    def reduce(self, per_layer: Sequence[torch.Tensor]) -> torch.Tensor:
        """The term from its per-layer losses, in ``student_layers`` order."""
        return layer_mean(per_layer)


@dataclass(frozen=True)
class TextToVisionMSE(AttentionTerm):
    """Eq. 12 per layer: per sample sum of squared errors over T_b x V_b divided by |T_b||V_b|."""

    kind: ClassVar[MapKind] = "tv"
    unit: ClassVar[Unit] = "tv_samples"

    def layer_loss(self, student: torch.Tensor, target: torch.Tensor, rows: Rows) -> torch.Tensor:
        return text_to_vision_mse_blocks(student, target, rows.index)


@dataclass(frozen=True)
class TextToVisionCosine(AttentionTerm):
    """Eqs. 30-31 per layer: per sample 1 - cos over the T_b x V_b entries."""

    kind: ClassVar[MapKind] = "tv"
    unit: ClassVar[Unit] = "tv_samples"

    def layer_loss(self, student: torch.Tensor, target: torch.Tensor, rows: Rows) -> torch.Tensor:
        return text_to_vision_cosine_blocks(student, target, rows.index)


@dataclass(frozen=True)
class FullAttentionMSE(AttentionTerm):
    """Eq. 11 per layer (mean over valid queries of the per-query key mean); ``keys`` picks the key mean: the
    keys a query may attend (the paper) or every key of the sample (the released code, ``"all"``)."""

    keys: Literal["causal", "all"] = "causal"
    kind: ClassVar[MapKind] = "full"
    unit: ClassVar[Unit] = "queries"

    def layer_loss(self, student: torch.Tensor, target: torch.Tensor, rows: Rows) -> torch.Tensor:
        return full_attention_mse(student, target, rows.valid, self.keys)


@dataclass(frozen=True)
class FullAttentionCosine(AttentionTerm):
    """Eqs. 33-34 per layer: per sample 1 - cos over the valid entries; a mean over samples (eq. 35)."""

    kind: ClassVar[MapKind] = "full"
    unit: ClassVar[Unit] = "samples"

    def layer_loss(self, student: torch.Tensor, target: torch.Tensor, rows: Rows) -> torch.Tensor:
        return full_attention_cosine_map(student, target, rows.valid)


# (signal kind, metric) -> attention term class
ATTENTION_TERMS: dict[tuple[MapKind, str], type[AttentionTerm]] = {
    ("tv", "mse"): TextToVisionMSE,
    ("tv", "cosine"): TextToVisionCosine,
    ("full", "mse"): FullAttentionMSE,
    ("full", "cosine"): FullAttentionCosine,
}


def logit_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits a loss needs (for ``logits_to_keep``): those predicting an answer token in any row.

    The last one is repeated once: the loss's shift (logits at t predict labels at t + 1) drops the final column,
    so the duplicate keeps every real position paired with its target (see :func:`kept_labels`).
    """
    positions = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    return torch.cat([positions, positions[-1:]])


def kept_labels(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Labels laid out for logits kept at ``positions`` (from :func:`logit_positions`)."""
    targets = labels[:, positions[:-1] + 1]
    return torch.cat([torch.full_like(targets[:, :1], IGNORE_INDEX), targets], dim=1)
