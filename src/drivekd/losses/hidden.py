"""Hidden-state MSE baselines, one layer pair or grouped like the reasoning attention loss (section 3.3.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from drivekd.losses.attention import at_least_float32, check_layer_pairs, layer_mean, masked_mean


class HiddenProjector(nn.Module):
    """Maps student hidden states to the teacher width: a learned Linear if widths differ, else identity."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj: nn.Module = (
            nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else nn.Identity()
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


def hidden_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    projector: nn.Module | None = None,
) -> torch.Tensor:
    """Mean over non-padding tokens of the feature-mean squared error of projected student vs teacher.

    Hidden states are (B, L, D); the projector (default: none) maps the student width to the teacher's.
    """
    projected = student_hidden if projector is None else projector(student_hidden)
    if projected.shape != teacher_hidden.shape:
        raise ValueError(
            f"projected student hidden states {tuple(projected.shape)} do not match the teacher's "
            f"{tuple(teacher_hidden.shape)}; pass a HiddenProjector when widths differ"
        )
    if attention_mask.shape != teacher_hidden.shape[:2]:
        raise ValueError(
            f"attention_mask must be (B, L) = {tuple(teacher_hidden.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )
    valid = attention_mask.bool()
    diff = (at_least_float32(projected) - at_least_float32(teacher_hidden)).masked_fill(
        ~valid.unsqueeze(-1), 0
    )
    return masked_mean(diff.square().mean(-1), valid)


def grouped_hidden_mse(
    student_hiddens: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    projectors: Sequence[nn.Module | None],
) -> torch.Tensor:
    """Mean over the selected student layers of ``hidden_mse`` against group-mean teacher hidden states.

    ``teacher_targets`` come from ``group_targets`` over ``teacher_layer_groups`` (the "mid" hidden baseline);
    ``projectors`` holds one per student layer (repeat one module to share it).
    """
    check_layer_pairs(student_hiddens, teacher_targets)
    if len(projectors) != len(student_hiddens):
        raise ValueError(
            f"need one projector per student layer, got {len(projectors)} for {len(student_hiddens)}"
        )
    return layer_mean(
        [
            hidden_mse(s, t, attention_mask, p)
            for s, t, p in zip(student_hiddens, teacher_targets, projectors, strict=True)
        ]
    )
