"""Attention-map distillation losses: MSE (eqs. 10-12, 14) and the appendix-E cosine variants (eqs. 30-35).

Maps are head-mean attention probabilities of shape (B, L, L), queries on dim 1 and keys on dim 2; masks are
(B, L), bool or 0/1. Only valid entries enter a loss (appendix E: causal and padding masks apply to every
attention loss): for full maps the causal pairs of non-padding query and key, for text-to-vision blocks the
causal pairs of ``TVIndex.pair_mask``. Future pairs are zero in causal maps, so masking them leaves eq. 12
as is (its normalisation keeps |T_b||V_b|). Everything else is masked out (not multiplied by zero), so
garbage or NaN there changes neither the value nor the gradient. Arithmetic runs in at least float32.

Teacher tensors are used as given: produce them under ``torch.no_grad()`` when only the student trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from drivekd.data.roles import TVIndex


def head_mean(attn: torch.Tensor) -> torch.Tensor:
    """Average (B, H, L, L) attention over heads into (B, L, L) (eq. 10)."""
    if attn.dim() != 4:
        raise ValueError(f"attention must be (B, H, L, L), got shape {tuple(attn.shape)}")
    return attn.mean(dim=1)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or as is when already float32 or wider (float64 inputs keep their precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the True entries of ``mask`` (same shape); a graph-connected 0 if none."""
    mask = mask.bool()
    return torch.where(mask, values, 0).sum() / mask.sum().clamp(min=1)


def check_layer_pairs(students: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
    """Refuse per-layer lists that are empty or of different lengths (one target per student layer)."""
    if len(students) == 0 or len(students) != len(targets):
        raise ValueError(
            f"need one teacher target per selected student layer, got {len(students)} student "
            f"layers and {len(targets)} targets"
        )


KeyNorm = Literal["causal", "all"]


def full_attention_mse(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor, keys: KeyNorm = "causal"
) -> torch.Tensor:
    """Full-attention MSE (eq. 11).

    For each valid query (b, i) the squared error (S - T)^2 summed over the keys it may attend (j <= i, j not
    padding) and divided by how many keys: those it may attend (``keys="causal"``, the paper's mean) or every
    non-padding key of its sample (``keys="all"``, the released code's mean over all L keys, whose future
    entries are zero in both maps); then the mean over all valid queries of the batch, pooled over samples.
    """
    _check_full_maps(student, teacher, attention_mask)
    valid = attention_mask.bool()
    if keys == "causal":
        key_count = valid.cumsum(1).clamp(min=1)  # keys j <= i that are not padding
    elif keys == "all":
        key_count = valid.sum(1, keepdim=True).clamp(min=1)
    else:
        raise ValueError(f"keys must be 'causal' or 'all', got {keys!r}")
    per_query = _masked_diff(student, teacher, _causal_pairs(valid)).square().sum(-1) / key_count
    return masked_mean(per_query, valid)


def layer_mean(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean over the selected student layers of a per-layer loss (eqs. 14, 35 and the grouped baselines)."""
    if len(values) == 0:
        raise ValueError("need the loss of at least one layer")
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total / len(values)


def reasoning_attention_loss(
    student_maps: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    keys: KeyNorm = "causal",
) -> torch.Tensor:
    """L_r (eq. 14): mean over the selected student layers of eq. 11 against group-mean teacher targets."""
    check_layer_pairs(student_maps, teacher_targets)
    return layer_mean(
        [
            full_attention_mse(s, t, attention_mask, keys)
            for s, t in zip(student_maps, teacher_targets, strict=True)
        ]
    )


def text_to_vision_mse(
    student: torch.Tensor, teacher: torch.Tensor, text_mask: torch.Tensor, vision_mask: torch.Tensor
) -> torch.Tensor:
    """Text-to-vision MSE (eq. 12) on full (B, L, L) maps; see ``text_to_vision_mse_blocks``."""
    _check_full_maps(student, teacher, text_mask)
    index = TVIndex.from_masks(text_mask, vision_mask)
    return text_to_vision_mse_blocks(index.gather(student), index.gather(teacher), index)


def text_to_vision_mse_blocks(
    student_block: torch.Tensor, teacher_block: torch.Tensor, index: TVIndex
) -> torch.Tensor:
    """Text-to-vision MSE (eq. 12) on (B, Tq, Vk) blocks laid out by ``index``.

    Per sample the sum of (S - T)^2 over T_b x V_b divided by |T_b||V_b| (the full counts of ``index``, so
    rows the block skips count as zero error), then the mean over samples. Samples with no text or no vision
    token have no pair and are left out of the mean; with none left the result is a zero still connected to
    the graph.
    """
    pairs = _block_pairs(student_block, teacher_block, index)
    norm = (index.text_count * index.vision_count).clamp(min=1)
    per_sample = _masked_diff(student_block, teacher_block, pairs).square().sum((1, 2)) / norm
    return masked_mean(per_sample, _has_pairs(index))


def text_to_vision_cosine(
    student: torch.Tensor,
    teacher: torch.Tensor,
    text_mask: torch.Tensor,
    vision_mask: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Text-to-vision cosine loss (eqs. 30-31) on full (B, L, L) maps; see the ``_blocks`` twin."""
    _check_full_maps(student, teacher, text_mask)
    index = TVIndex.from_masks(text_mask, vision_mask)
    return text_to_vision_cosine_blocks(index.gather(student), index.gather(teacher), index, eps)


def text_to_vision_cosine_blocks(
    student_block: torch.Tensor, teacher_block: torch.Tensor, index: TVIndex, eps: float = 1e-8
) -> torch.Tensor:
    """Text-to-vision cosine loss (eqs. 30-31) on (B, Tq, Vk) blocks laid out by ``index``.

    Per sample 1 - <a_s / (|a_s| + eps), a_t / (|a_t| + eps)> over the T_b x V_b entries (skipped rows are
    zero and change neither norms nor dot), then the mean over samples, leaving out samples without pairs as
    ``text_to_vision_mse_blocks`` does. A sample whose entries are all zero (all its text before its first
    image) has cosine 0 and so contributes a constant 1, as eqs. 30-31 with eps prescribe; it has no gradient.
    """
    pairs = _block_pairs(student_block, teacher_block, index)
    per_sample = _cosine_distance(student_block, teacher_block, pairs, eps)
    return masked_mean(per_sample, _has_pairs(index))


def full_attention_cosine_map(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Full-attention cosine loss of one layer (eqs. 33-34): per sample 1 - cos over all valid (causal,
    non-padding) query-key entries, then the mean over the samples that have at least one token."""
    _check_full_maps(student, teacher, attention_mask)
    per_sample = _cosine_distance(student, teacher, _causal_pairs(attention_mask), eps)
    return masked_mean(per_sample, attention_mask.bool().any(dim=1))


def full_attention_cosine(
    student_maps: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Grouped full-attention cosine loss (eqs. 32-35): the mean over layers of ``full_attention_cosine_map``
    against group-mean teacher targets (the same samples enter every layer, so this is also the per-sample
    mean over layers averaged over samples)."""
    check_layer_pairs(student_maps, teacher_targets)
    return layer_mean(
        [
            full_attention_cosine_map(s, t, attention_mask, eps)
            for s, t in zip(student_maps, teacher_targets, strict=True)
        ]
    )


def _check_full_maps(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> None:
    if student.shape != teacher.shape or student.dim() != 3 or student.shape[1] != student.shape[2]:
        raise ValueError(
            f"student and teacher maps must both be (B, L, L), got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if mask.shape != student.shape[:2]:
        raise ValueError(f"mask must be (B, L) = {tuple(student.shape[:2])}, got {tuple(mask.shape)}")


def _causal_pairs(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, L) mask of the causal pairs (j <= i) whose query and key are both non-padding."""
    valid = attention_mask.bool()
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    return causal & valid.unsqueeze(2) & valid.unsqueeze(1)


def _block_pairs(student_block: torch.Tensor, teacher_block: torch.Tensor, index: TVIndex) -> torch.Tensor:
    """Check blocks against ``index``; return the (B, Tq, Vk) mask of valid causal (key <= query) pairs."""
    causal = index.key_index.unsqueeze(1) <= index.query_index.unsqueeze(2)
    pairs = index.pair_mask & causal
    if student_block.shape != pairs.shape or teacher_block.shape != pairs.shape:
        raise ValueError(
            f"blocks must be (B, Tq, Vk) = {tuple(pairs.shape)} as laid out by the index, got "
            f"{tuple(student_block.shape)} and {tuple(teacher_block.shape)}"
        )
    return pairs


def _has_pairs(index: TVIndex) -> torch.Tensor:
    """(B,) samples with at least one text query and one vision key."""
    return (index.text_count > 0) & (index.vision_count > 0)


def _masked_diff(student: torch.Tensor, teacher: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    return (at_least_float32(student) - at_least_float32(teacher)).masked_fill(~pairs, 0)


def _cosine_distance(
    student: torch.Tensor, teacher: torch.Tensor, pairs: torch.Tensor, eps: float
) -> torch.Tensor:
    """(B,) 1 - cosine of the per-sample vectors of entries under ``pairs``, each divided by norm + eps."""
    s = at_least_float32(student).masked_fill(~pairs, 0)
    t = at_least_float32(teacher).masked_fill(~pairs, 0)
    dims = tuple(range(1, s.dim()))
    dot = (s * t).sum(dims)
    norms = (torch.linalg.vector_norm(s, dim=dims) + eps) * (torch.linalg.vector_norm(t, dim=dims) + eps)
    return 1 - dot / norms
