"""The atomic loss terms of one micro-batch: CE per capability (eq. 9) and each teacher's term per capability.

A micro-batch holds samples of several capabilities in one forward; the term of capability c uses c's rows. Every
term is normalised over the whole gradient-accumulation window, exactly as one large batch would be: a loss that is
a mean over N items of the micro-batch is rescaled by N / N_window, so summing the window's gradients gives the
gradient of the window's mean (CE: answer tokens; full maps: valid queries; t-v blocks: samples with text and vision
tokens; hidden states: valid tokens; KL: answer tokens).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from drivekd.capture.recorder import CapturedAttention
from drivekd.data.collate import IGNORE_INDEX, Batch
from drivekd.data.roles import TVIndex
from drivekd.losses import (
    answer_kl,
    full_attention_cosine,
    full_attention_mse,
    group_targets,
    grouped_hidden_mse,
    supervised_loss,
    text_to_vision_cosine_blocks,
    text_to_vision_mse_blocks,
)
from drivekd.signals.types import TeacherSignals
from drivekd.training.config import DistillConfig
from drivekd.training.recipes import Layers, Recipe, signal_kind


@dataclass(frozen=True)
class Term:
    """One atomic loss: ``name`` is "ce", a teacher name, "kl" or "hidden"; ``capability`` its batch rows."""

    name: str
    capability: str
    value: torch.Tensor


def _unit(name: str, kind: str) -> str:
    """What a term averages over (the normaliser kept across the accumulation window)."""
    if name in ("ce", "kl"):
        return "answer_tokens"
    if name == "hidden":
        return "tokens"
    return "queries" if kind == "full" else "tv_samples"


def _count(unit: str, batch: Batch, index: TVIndex, rows: torch.Tensor) -> int:
    if unit == "answer_tokens":
        return int((batch.labels[rows][:, 1:] != IGNORE_INDEX).sum())
    if unit in ("tokens", "queries"):
        return int(batch.roles.valid[rows].sum())
    picked = index.select(rows)
    return int(((picked.text_count > 0) & (picked.vision_count > 0)).sum())


def capability_rows(batch: Batch) -> dict[str, torch.Tensor]:
    rows: dict[str, list[int]] = {}
    for k, capability in enumerate(batch.capabilities):
        rows.setdefault(capability, []).append(k)
    return {c: torch.tensor(r, device=batch.labels.device) for c, r in rows.items()}


def term_units(recipe: Recipe, config: DistillConfig) -> dict[str, str]:
    units = {"ce": _unit("ce", "")}
    units.update({t: _unit(t, signal_kind(config, t)) for t in recipe.teachers})
    if recipe.kl:
        units["kl"] = _unit("kl", "")
    if recipe.hidden:
        units["hidden"] = _unit("hidden", "")
    return units


def window_counts(
    batches: Sequence[Batch], recipe: Recipe, config: DistillConfig
) -> Counter[tuple[str, str]]:
    """Normalisers of every (term, capability) over an accumulation window of micro-batches."""
    totals: Counter[tuple[str, str]] = Counter()
    units = term_units(recipe, config)
    for batch in batches:
        index = TVIndex.from_masks(batch.roles.text, batch.roles.vision)
        for capability, rows in capability_rows(batch).items():
            for name, unit in units.items():
                totals[name, capability] += _count(unit, batch, index, rows)
    return totals


class Objective:
    """Builds the atomic terms of a micro-batch from the student's outputs and the teacher's signals."""

    def __init__(
        self,
        recipe: Recipe,
        layers: Layers,
        config: DistillConfig,
        projectors: nn.ModuleList | None = None,
        hidden_pairs: Sequence[tuple[int, list[int]]] = (),
    ) -> None:
        self.recipe, self.layers, self.config = recipe, layers, config
        self.projectors = projectors
        self.hidden_pairs = list(hidden_pairs)
        self.units = term_units(recipe, config)

    def terms(
        self,
        batch: Batch,
        index: TVIndex,
        logits: torch.Tensor,
        captured: CapturedAttention,
        teacher: Mapping[str, TeacherSignals],
        window: Counter[tuple[str, str]],
        student_hidden: Sequence[torch.Tensor] = (),
        logit_positions: torch.Tensor | None = None,
        streamed: StreamedTerms | None = None,
    ) -> list[Term]:
        """``teacher`` maps each teacher name (or "base" for the KL / hidden baselines) to its signals.

        ``index`` is the batch's ``TVIndex.from_masks(roles.text, roles.vision)``, the one the attention was captured
        with. ``logits`` may cover only ``logit_positions`` (from :func:`logit_positions`) to save memory.
        ``streamed``: the attention terms already built during the forward (:meth:`stream`); without it they are
        built here from ``captured``, by the same code.
        """
        if streamed is None and self.recipe.teachers:
            streamed = self.stream(batch, index, teacher)
            streamed.feed(captured)
        labels = batch.labels if logit_positions is None else kept_labels(batch.labels, logit_positions)
        terms = []
        for capability, rows in capability_rows(batch).items():
            values = {"ce": supervised_loss(logits[rows], labels[rows])}
            for name in self.recipe.teachers:
                values[name] = streamed.values[name, capability]
            if self.recipe.kl:
                teacher_logits = teacher["base"].logits[rows]
                if logit_positions is not None:
                    teacher_logits = teacher_logits[:, logit_positions]
                values["kl"] = answer_kl(
                    logits[rows], teacher_logits, labels[rows], self.config.kl_temperature
                )
            if self.recipe.hidden:
                values["hidden"] = self._hidden(rows, batch, teacher["base"], student_hidden)
            for name, value in values.items():
                local = _count(self.units[name], batch, index, rows)
                total = window[name, capability]
                terms.append(Term(name, capability, value * (local / total) if total else value * 0))
        return terms

    def _targets(self, name: str, rows: torch.Tensor, teacher: TeacherSignals) -> list[torch.Tensor]:
        """Teacher targets on ``rows``, one per student layer (sliding teacher-layer groups averaged)."""
        signals = teacher.tv if signal_kind(self.config, name) == "tv" else teacher.full
        return group_targets({k: t[rows] for k, t in signals.items()}, self.layers.teacher[name])

    def _layer_loss(
        self, kind: str, student: torch.Tensor, target: torch.Tensor, picked: TVIndex, valid: torch.Tensor
    ) -> torch.Tensor:
        cosine = self.config.metric == "cosine"
        if kind == "tv":
            loss = text_to_vision_cosine_blocks if cosine else text_to_vision_mse_blocks
            return loss(student, target, picked)
        if cosine:
            return full_attention_cosine([student], [target], valid)
        return full_attention_mse(student, target, valid)

    def stream(self, batch: Batch, index: TVIndex, teacher: Mapping[str, TeacherSignals]) -> StreamedTerms:
        """A map consumer for :class:`AttentionRecorder` that builds the attention terms as the forward runs."""
        return StreamedTerms(self, batch, index, teacher)

    def _hidden(
        self,
        rows: torch.Tensor,
        batch: Batch,
        teacher: TeacherSignals,
        student_hidden: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        groups = [group for _, group in self.hidden_pairs]
        targets = group_targets({k: t[rows] for k, t in teacher.hidden.items()}, groups)
        students = [student_hidden[layer][rows] for layer, _ in self.hidden_pairs]
        return grouped_hidden_mse(students, targets, batch.roles.valid[rows], list(self.projectors))


class StreamedTerms:
    """Attention terms accumulated layer by layer while the student's forward records each map.

    A term built after the forward sits after every layer in the autograd graph, so the backward creates the
    gradients of all captured maps at once when it starts (R-fold in a Gramian's vmapped backward). Built here,
    each layer's share sits right after that layer and its map's gradient appears just before the layer's backward.
    A term is the mean over its layers of the per-layer loss (eqs. 12-15, 30-35); :meth:`feed` builds the same sums
    from collected maps when the forward could not stream them (gradient checkpointing).
    """

    def __init__(
        self, objective: Objective, batch: Batch, index: TVIndex, teacher: Mapping[str, TeacherSignals]
    ) -> None:
        self.objective = objective
        self.capabilities = capability_rows(batch)
        self.valid = {c: batch.roles.valid[rows] for c, rows in self.capabilities.items()}
        self.picked = {c: index.select(rows) for c, rows in self.capabilities.items()}
        self.targets = {
            (name, c): objective._targets(name, rows, teacher[name])
            for name in objective.recipe.teachers
            for c, rows in self.capabilities.items()
        }
        self.values: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, layer: int, kind: str, maps: torch.Tensor) -> None:
        for name in self.objective.recipe.teachers:
            layers = self.objective.layers.student[name]
            if layer not in layers or signal_kind(self.objective.config, name) != kind:
                continue
            position = layers.index(layer)
            for c, rows in self.capabilities.items():
                share = self.objective._layer_loss(
                    kind, maps[rows], self.targets[name, c][position], self.picked[c], self.valid[c]
                ) / len(layers)
                self.values[name, c] = share if (name, c) not in self.values else self.values[name, c] + share

    def feed(self, captured: CapturedAttention) -> None:
        """Build the terms from maps collected after the forward, layer by layer as the stream would."""
        for kind, maps in (("full", captured.full), ("tv", captured.tv)):
            for layer in sorted(maps):
                self(layer, kind, maps[layer])


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
