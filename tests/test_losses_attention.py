"""Attention losses (eqs. 10-12, 14, 30-35) against naive loops written straight from the equations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drivekd.data.roles import TVIndex
from drivekd.losses import (
    full_attention_cosine,
    full_attention_mse,
    group_targets,
    head_mean,
    masked_mean,
    reasoning_attention_loss,
    text_to_vision_cosine,
    text_to_vision_cosine_blocks,
    text_to_vision_mse,
    text_to_vision_mse_blocks,
)

EPS = 1e-8
SETTINGS = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**31 - 1)
batches = st.integers(1, 3)
lengths = st.integers(1, 9)


# ----------------------------------------------------------------------------------------------- inputs


def random_padding(gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
    """(B, L) valid mask, each sample left- or right-padded to a random length >= 1."""
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        n = int(torch.randint(1, length + 1, (1,), generator=gen))
        if torch.rand(1, generator=gen) < 0.5:
            valid[b, length - n :] = True
        else:
            valid[b, :n] = True
    return valid


def random_maps(gen: torch.Generator, valid: torch.Tensor, heads: int = 0) -> torch.Tensor:
    """Row-stochastic causal float64 maps (softmax with -inf on future and padding keys).

    Rows of padding queries hold finite garbage: every loss must ignore them. ``heads`` > 0 adds a head dim.
    """
    batch, length = valid.shape
    shape = (batch, heads, length, length) if heads else (batch, length, length)
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & valid[:, None, :]
    query_valid = valid[:, :, None]
    if heads:
        allowed, query_valid = allowed[:, None], query_valid[:, None]
    scores = torch.randn(shape, generator=gen, dtype=torch.float64).masked_fill(~allowed, -math.inf)
    garbage = 3 * torch.rand(shape, generator=gen, dtype=torch.float64)
    return torch.where(query_valid, torch.softmax(scores, dim=-1), garbage)


def random_roles(gen: torch.Generator, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and vision masks: every valid token is text, vision or special (neither) at random."""
    draw = torch.randint(0, 5, valid.shape, generator=gen)  # 0-1 vision, 2-3 text, 4 special
    vision = valid & (draw < 2)
    text = valid & (draw >= 2) & (draw < 4)
    return text, vision


def batch_inputs(seed: int, batch: int, length: int):
    gen = torch.Generator().manual_seed(seed)
    valid = random_padding(gen, batch, length)
    student, teacher = random_maps(gen, valid), random_maps(gen, valid)
    text, vision = random_roles(gen, valid)
    return gen, valid, student, teacher, text, vision


# ------------------------------------------------------------------------------------------ references


def ref_full_mse(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> float:
    """Eq. 11: mean over valid (b, i) of the mean over keys j <= i, j valid, of (S - T)^2."""
    s, t, v = student.tolist(), teacher.tolist(), valid.tolist()
    total, queries = 0.0, 0
    for b in range(len(v)):
        for i in range(len(v[b])):
            if not v[b][i]:
                continue
            keys = [j for j in range(i + 1) if v[b][j]]
            total += sum((s[b][i][j] - t[b][i][j]) ** 2 for j in keys) / len(keys)
            queries += 1
    return total / queries if queries else 0.0


def ref_tv_mse(student, teacher, text, vision) -> float:
    """Eq. 12 over every text row (including those before the first vision token)."""
    s, t = student.tolist(), teacher.tolist()
    per_sample = []
    for b in range(text.shape[0]):
        rows = [i for i in range(text.shape[1]) if text[b, i]]
        cols = [j for j in range(vision.shape[1]) if vision[b, j]]
        if not rows or not cols:
            continue
        total = sum((s[b][i][j] - t[b][i][j]) ** 2 for i in rows for j in cols)
        per_sample.append(total / (len(rows) * len(cols)))
    return sum(per_sample) / len(per_sample) if per_sample else 0.0


def ref_cosine_distance(u: list[float], v: list[float], eps: float) -> float:
    """1 - <u / (|u| + eps), v / (|v| + eps)> (eqs. 30-31, 34-35)."""
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
    return 1 - sum((a / (nu + eps)) * (b / (nv + eps)) for a, b in zip(u, v, strict=True))


def ref_tv_cosine(student, teacher, text, vision, eps=EPS) -> float:
    s, t = student.tolist(), teacher.tolist()
    per_sample = []
    for b in range(text.shape[0]):
        rows = [i for i in range(text.shape[1]) if text[b, i]]
        cols = [j for j in range(vision.shape[1]) if vision[b, j]]
        if not rows or not cols:
            continue
        u = [s[b][i][j] for i in rows for j in cols]
        v = [t[b][i][j] for i in rows for j in cols]
        per_sample.append(ref_cosine_distance(u, v, eps))
    return sum(per_sample) / len(per_sample) if per_sample else 0.0


def ref_full_cosine(students, teachers, valid, eps=EPS) -> float:
    v = valid.tolist()
    per_sample = []
    for b in range(len(v)):
        entries = [(i, j) for i in range(len(v[b])) for j in range(i + 1) if v[b][i] and v[b][j]]
        if not entries:
            continue
        per_layer = []
        for student, teacher in zip(students, teachers, strict=True):
            s, t = student.tolist(), teacher.tolist()
            u = [s[b][i][j] for i, j in entries]
            w = [t[b][i][j] for i, j in entries]
            per_layer.append(ref_cosine_distance(u, w, eps))
        per_sample.append(sum(per_layer) / len(per_layer))
    return sum(per_sample) / len(per_sample) if per_sample else 0.0


def ref_blocks(maps: torch.Tensor, text: torch.Tensor, vision: torch.Tensor, fill: float) -> torch.Tensor:
    """Text-to-vision blocks the way capture builds them: rows are text tokens at or after the first vision
    token, columns vision tokens, both left-packed; the padding of the block holds ``fill``."""
    batch = maps.shape[0]
    rows, cols = [], []
    for b in range(batch):
        vis = [j for j in range(maps.shape[1]) if vision[b, j]]
        first = vis[0] if vis else maps.shape[1]
        rows.append([i for i in range(maps.shape[1]) if text[b, i] and i > first])
        cols.append(vis)
    tq, vk = max(map(len, rows)), max(map(len, cols))
    block = torch.full((batch, tq, vk), fill, dtype=maps.dtype)
    for b in range(batch):
        for r, i in enumerate(rows[b]):
            for c, j in enumerate(cols[b]):
                block[b, r, c] = maps[b, i, j]
    return block


# ------------------------------------------------------------------------------------------ head mean


def test_head_mean_matches_loop():
    gen = torch.Generator().manual_seed(0)
    attn = random_maps(gen, torch.ones(2, 5, dtype=torch.bool), heads=3)
    got = head_mean(attn)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                want = sum(attn[b, h, i, j].item() for h in range(3)) / 3
                assert got[b, i, j].item() == pytest.approx(want, abs=1e-15)


def test_head_mean_rejects_maps_without_heads():
    with pytest.raises(ValueError, match="B, H, L, L"):
        head_mean(torch.zeros(2, 4, 4))


# ----------------------------------------------------------------------------------- against references


@SETTINGS
@given(seed=seeds, batch=batches, length=lengths)
def test_full_attention_mse_matches_reference(seed, batch, length):
    _, valid, s, t, _, _ = batch_inputs(seed, batch, length)
    got = full_attention_mse(s, t, valid)
    assert got.item() == pytest.approx(ref_full_mse(s, t, valid), rel=1e-10, abs=1e-14)


def test_full_attention_mse_pools_queries_over_samples():
    """Sample 0: 1 valid query, error 1; sample 1: 3 queries, error 0. Pooled 1/4 (per-sample mean: 1/2)."""
    valid = torch.tensor([[False, False, True], [True, True, True]])
    s, t = torch.zeros(2, 3, 3), torch.zeros(2, 3, 3)
    s[0, 2, 2] = 1.0
    assert full_attention_mse(s, t, valid).item() == pytest.approx(0.25)


@SETTINGS
@given(seed=seeds, batch=batches, length=lengths)
def test_text_to_vision_mse_matches_reference(seed, batch, length):
    _, _, s, t, text, vision = batch_inputs(seed, batch, length)
    got = text_to_vision_mse(s, t, text, vision)
    assert got.item() == pytest.approx(ref_tv_mse(s, t, text, vision), rel=1e-10, abs=1e-14)


@SETTINGS
@given(seed=seeds, batch=batches, length=lengths)
def test_text_to_vision_cosine_matches_reference(seed, batch, length):
    _, _, s, t, text, vision = batch_inputs(seed, batch, length)
    got = text_to_vision_cosine(s, t, text, vision)
    assert got.item() == pytest.approx(ref_tv_cosine(s, t, text, vision), rel=1e-9, abs=1e-12)


@SETTINGS
@given(seed=seeds, batch=batches, length=lengths, layers=st.integers(1, 3))
def test_full_attention_cosine_matches_reference(seed, batch, length, layers):
    gen, valid, *_ = batch_inputs(seed, batch, length)
    students = [random_maps(gen, valid) for _ in range(layers)]
    teachers = [random_maps(gen, valid) for _ in range(layers)]
    got = full_attention_cosine(students, teachers, valid)
    assert got.item() == pytest.approx(ref_full_cosine(students, teachers, valid), rel=1e-9, abs=1e-12)


@SETTINGS
@given(seed=seeds, batch=batches, length=lengths, layers=st.integers(1, 3), group=st.integers(1, 3))
def test_reasoning_attention_loss_matches_reference(seed, batch, length, layers, group):
    gen, valid, *_ = batch_inputs(seed, batch, length)
    students = [random_maps(gen, valid) for _ in range(layers)]
    teacher = {k: random_maps(gen, valid) for k in range(1, layers + group)}
    groups = [list(range(i, i + group)) for i in range(1, layers + 1)]
    got = reasoning_attention_loss(students, group_targets(teacher, groups), valid)
    want = 0.0
    for student, members in zip(students, groups, strict=True):
        target = teacher[members[0]].clone()
        for k in members[1:]:
            target += teacher[k]
        want += ref_full_mse(student, target / len(members), valid) / layers
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-14)


# ----------------------------------------------------------------------------------------- properties


@SETTINGS
@given(seed=seeds, batch=batches, length=lengths, scale=st.floats(0.1, 10.0))
def test_mse_properties(seed, batch, length, scale):
    _, valid, s, t, text, vision = batch_inputs(seed, batch, length)
    for loss in (
        lambda a, b: full_attention_mse(a, b, valid),
        lambda a, b: text_to_vision_mse(a, b, text, vision),
    ):
        value = loss(s, t)
        assert value.item() >= 0
        assert loss(s, s).item() == 0
        assert loss(t, s).item() == pytest.approx(value.item(), rel=1e-12, abs=1e-15)
        assert loss(scale * s, scale * t).item() == pytest.approx(
            scale**2 * value.item(), rel=1e-9, abs=1e-14
        )


@SETTINGS
@given(seed=seeds, batch=batches, length=lengths, scale=st.floats(0.5, 2.0))
def test_cosine_properties(seed, batch, length, scale):
    _, valid, s, t, text, vision = batch_inputs(seed, batch, length)
    for loss in (
        lambda a, b: full_attention_cosine([a], [b], valid),
        lambda a, b: text_to_vision_cosine(a, b, text, vision),
    ):
        value = loss(s, t).item()
        assert 0 <= value <= 1  # non-negative maps: cosine in [0, 1]
        assert loss(t, s).item() == pytest.approx(value, rel=1e-12, abs=1e-15)
        # Scale invariance holds up to eps / norm, and norms of text-to-vision entries can be ~1e-4.
        assert loss(scale * s, scale * t).item() == pytest.approx(value, abs=1e-4)
    # Every valid row of a map sums to 1, so the full vector's norm is >= 1 / sqrt(L) and eps is negligible.
    assert full_attention_cosine([s], [s], valid).item() == pytest.approx(0.0, abs=1e-6)


def test_text_to_vision_cosine_is_zero_for_equal_maps():
    valid, text, vision = _layout()
    maps = random_maps(torch.Generator().manual_seed(8), valid)
    assert text_to_vision_cosine(maps, maps, text, vision).item() == pytest.approx(0.0, abs=1e-6)


def test_text_to_vision_cosine_of_an_all_zero_sample_is_one():
    """All text before the image: the causal T_b x V_b entries are zero, cos = 0 with eps, the loss is 1."""
    text = torch.tensor([[True, True, False]])
    vision = torch.tensor([[False, False, True]])
    maps = random_maps(torch.Generator().manual_seed(9), torch.ones(1, 3, dtype=torch.bool))
    assert text_to_vision_cosine(maps, maps, text, vision).item() == 1.0


@SETTINGS
@given(seed=seeds, batch=batches, length=lengths)
def test_entries_outside_the_valid_region_are_ignored(seed, batch, length):
    """NaN on future keys, padding rows and padding columns changes neither values nor gradients."""
    _, valid, s, t, text, vision = batch_inputs(seed, batch, length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    outside = ~(causal & valid[:, :, None] & valid[:, None, :])
    dirty_s, dirty_t = s.masked_fill(outside, math.nan), t.masked_fill(outside, math.nan)
    losses = (
        lambda a, b: full_attention_mse(a, b, valid),
        lambda a, b: text_to_vision_mse(a, b, text, vision),
        lambda a, b: full_attention_cosine([a], [b], valid),
        lambda a, b: text_to_vision_cosine(a, b, text, vision),
    )
    for loss in losses:
        clean_s, dirty = s.clone().requires_grad_(), dirty_s.clone().requires_grad_()
        clean_value, dirty_value = loss(clean_s, t), loss(dirty, dirty_t)
        (clean_grad,) = torch.autograd.grad(clean_value, clean_s)
        (dirty_grad,) = torch.autograd.grad(dirty_value, dirty)
        assert dirty_value.item() == pytest.approx(clean_value.item(), rel=1e-12, abs=1e-15)
        assert torch.isfinite(dirty_grad).all()
        torch.testing.assert_close(dirty_grad, clean_grad)
        assert (dirty_grad[outside] == 0).all()


def test_masked_mean_ignores_masked_values_even_nan():
    values = torch.tensor([1.0, math.nan, 3.0, math.inf], requires_grad=True)
    mask = torch.tensor([True, False, True, False])
    mean = masked_mean(values, mask)
    assert mean.item() == 2.0
    mean.backward()
    assert values.grad.tolist() == [0.5, 0.0, 0.5, 0.0]
    empty = masked_mean(values, torch.zeros(4, dtype=torch.bool))
    assert empty.item() == 0 and empty.requires_grad


def test_full_attention_cosine_leaves_out_all_padding_samples():
    gen = torch.Generator().manual_seed(10)
    valid = torch.tensor([[True, True, True, False], [False, False, False, False]])
    s, t = random_maps(gen, valid), random_maps(gen, valid)
    alone = full_attention_cosine([s[:1]], [t[:1]], valid[:1])
    assert full_attention_cosine([s], [t], valid).item() == pytest.approx(alone.item(), rel=1e-12)
    assert full_attention_mse(s, t, valid).item() == pytest.approx(
        full_attention_mse(s[:1], t[:1], valid[:1]).item()
    )


# ------------------------------------------------------------------------------------------ gradients


def test_gradcheck_mse_and_cosine_losses():
    gen = torch.Generator().manual_seed(3)
    valid = torch.tensor([[False, True, True, True, True], [True, True, True, True, False]])
    text = torch.tensor([[False, True, False, True, True], [True, False, False, True, False]])
    vision = torch.tensor([[False, False, True, False, False], [False, True, True, False, False]])
    teacher = random_maps(gen, valid)
    student = random_maps(gen, valid).requires_grad_()
    index = TVIndex.from_masks(text, vision)
    losses = {
        "full_mse": lambda s: full_attention_mse(s, teacher, valid),
        "reasoning": lambda s: reasoning_attention_loss([s, s * 0.5], [teacher, teacher], valid),
        "tv_mse": lambda s: text_to_vision_mse(s, teacher, text, vision),
        "tv_mse_blocks": lambda s: text_to_vision_mse_blocks(index.gather(s), index.gather(teacher), index),
        "tv_cosine": lambda s: text_to_vision_cosine(s, teacher, text, vision),
        "full_cosine": lambda s: full_attention_cosine([s], [teacher], valid),
    }
    for name, loss in losses.items():
        assert torch.autograd.gradcheck(loss, (student,)), name


def test_full_attention_mse_is_memory_sane_at_length_1200():
    """A sequence of realistic length runs forward and backward in float32 without (B, L, L, ...) blow-ups."""
    gen = torch.Generator().manual_seed(4)
    valid = torch.ones(2, 1200, dtype=torch.bool)
    valid[0, :100] = False
    student = torch.rand(2, 1200, 1200, generator=gen).requires_grad_()
    teacher = torch.rand(2, 1200, 1200, generator=gen)
    loss = full_attention_mse(student.bfloat16(), teacher.bfloat16(), valid)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


# ----------------------------------------------------------------------------------- text-to-vision blocks


def _layout() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text before the first image, two images with text between and after, special tokens and both paddings.

    Roles: P padding, S special, T text, V vision.
    """
    rows = ["PPSTTVVTSVVVTT", "STVVTTTTSTTPPP", "SSTTTSTTPPPPPP"]  # the last sample has no vision
    valid = torch.tensor([[c != "P" for c in r] for r in rows])
    text = torch.tensor([[c == "T" for c in r] for r in rows])
    vision = torch.tensor([[c == "V" for c in r] for r in rows])
    return valid, text, vision


def _assert_block_path_equals_full_path(s, t, text, vision):
    index = TVIndex.from_masks(text, vision)
    for full, blocks in (
        (text_to_vision_mse, text_to_vision_mse_blocks),
        (text_to_vision_cosine, text_to_vision_cosine_blocks),
    ):
        want = full(s, t, text, vision)
        got = blocks(ref_blocks(s, text, vision, math.nan), ref_blocks(t, text, vision, -7.0), index)
        assert torch.equal(got, want), full.__name__


def test_block_path_equals_full_path_on_fixed_layout():
    valid, text, vision = _layout()
    gen = torch.Generator().manual_seed(5)
    s, t = random_maps(gen, valid), random_maps(gen, valid)
    _assert_block_path_equals_full_path(s, t, text, vision)
    assert text_to_vision_mse(s, t, text, vision).item() == pytest.approx(
        ref_tv_mse(s, t, text, vision), rel=1e-12
    )
    assert text_to_vision_cosine(s, t, text, vision).item() == pytest.approx(
        ref_tv_cosine(s, t, text, vision), rel=1e-12
    )


@SETTINGS
@given(seed=seeds, batch=batches, length=lengths)
def test_block_path_equals_full_path(seed, batch, length):
    _, _, s, t, text, vision = batch_inputs(seed, batch, length)
    _assert_block_path_equals_full_path(s, t, text, vision)


def test_block_normalisation_counts_skipped_leading_text():
    """Skipped leading text rows still count in |T_b|: one error of 1 over 3 text x 1 vision gives 1/3."""
    text = torch.tensor([[True, True, False, True]])
    vision = torch.tensor([[False, False, True, False]])
    index = TVIndex.from_masks(text, vision)
    student, teacher = torch.ones(1, 1, 1, requires_grad=True), torch.zeros(1, 1, 1)
    assert text_to_vision_mse_blocks(student, teacher, index).item() == pytest.approx(1 / 3)


def test_blocks_of_the_wrong_shape_are_refused():
    _, text, vision = _layout()
    index = TVIndex.from_masks(text, vision)
    with pytest.raises(ValueError, match="Tq, Vk"):
        text_to_vision_mse_blocks(torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), index)


def test_samples_without_vision_or_text_are_left_out():
    valid, text, vision = _layout()
    gen = torch.Generator().manual_seed(6)
    s, t = random_maps(gen, valid), random_maps(gen, valid)
    no_text = text.clone()
    no_text[1] = False  # sample 1 now has vision but no text; sample 2 has text but no vision
    for loss in (text_to_vision_mse, text_to_vision_cosine):
        alone = loss(s[:1], t[:1], no_text[:1], vision[:1])
        assert loss(s, t, no_text, vision).item() == pytest.approx(alone.item(), rel=1e-12)
        assert alone.item() > 0


def test_no_qualifying_sample_gives_a_graph_connected_zero():
    valid, text, vision = _layout()
    gen = torch.Generator().manual_seed(7)
    student = random_maps(gen, valid).requires_grad_()
    teacher = random_maps(gen, valid)
    no_vision = torch.zeros_like(vision)
    for loss in (text_to_vision_mse, text_to_vision_cosine):
        value = loss(student, teacher, text, no_vision)
        assert value.item() == 0 and value.requires_grad
        (grad,) = torch.autograd.grad(value, student)
        assert (grad == 0).all()


def test_full_maps_and_masks_must_agree():
    valid, text, vision = _layout()
    maps = torch.zeros(3, 14, 14)
    with pytest.raises(ValueError, match="B, L, L"):
        full_attention_mse(maps, torch.zeros(3, 14, 13), valid)
    with pytest.raises(ValueError, match="mask"):
        full_attention_mse(maps, maps, valid[:, :5])
    with pytest.raises(ValueError, match="B, L, L"):
        text_to_vision_mse(maps, maps[:2], text, vision)
    with pytest.raises(ValueError, match="one teacher target"):
        reasoning_attention_loss([maps, maps], [maps], valid)
    with pytest.raises(ValueError, match="one teacher target"):
        full_attention_cosine([], [], valid)
