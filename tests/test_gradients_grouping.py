"""The teacher grouping of AGP / G2 / G1 / none (the released code's reading) in Gramian form against explicit
vectors, its properties, the teacher rows of eq. 17, and the released code's reweighting rule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drivekd.gradients import (
    agp_teacher_grouped,
    combine_teacher_weights,
    g2_teacher_grouped,
    pcgrad,
    stage2_order,
    teacher_grouped_weights,
    teacher_matrix,
)
from drivekd.gradients.reweight import ReferenceReweighter

TEACHERS = ("perception", "reasoning", "planning")


def _vectors(seed: int, dim: int, k: int, log_scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(1 + k, dim, generator=g, dtype=torch.float64)
    scales = 10 ** (log_scale * torch.rand(1 + k, 1, generator=g, dtype=torch.float64))
    return rows * scales


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    dim=st.integers(2, 48),
    k=st.integers(1, 3),
    log_scale=st.floats(-6, 6),
    symmetric=st.booleans(),
    share=st.sampled_from(["per_follower", "once"]),
)
def test_gramian_form_equals_the_explicit_vectors(seed, dim, k, log_scale, symmetric, share):
    g = _vectors(seed, dim, k, log_scale)
    names = list(TEACHERS[:k])
    order = [names[i] for i in torch.randperm(k, generator=torch.Generator().manual_seed(seed)).tolist()]
    followers = {n: g[1 + i] for i, n in enumerate(names)}
    record: dict = {}
    explicit = (g2_teacher_grouped if symmetric else agp_teacher_grouped)(
        g[0], followers, order, anchor_share=share, record=record
    )
    coefficients, stats = teacher_grouped_weights(
        g @ g.T, 0, {n: 1 + i for i, n in enumerate(names)}, order, symmetric=symmetric, anchor_share=share
    )
    got = coefficients @ g
    scale = (
        float(coefficients.abs() @ g.norm(dim=1)) + 1e-300
    )  # the size of the summed terms (see gradients.md)
    assert float((got - explicit).norm()) <= 1e-10 * scale
    for name in names:  # the same stage-1 decisions
        assert stats.stage1[name, "sup"] == record[name, "sup"]
    assert stats.order == tuple(order)


def test_without_conflicts_once_equals_no_projection_and_per_follower_repeats_the_anchor():
    sup = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    followers = {
        "perception": torch.tensor([1.0, 1.0, 0.0]).double(),
        "planning": torch.tensor([1.0, 0, 1]).double(),
    }
    plain = sup + sum(followers.values())
    once = agp_teacher_grouped(sup, followers, ["planning", "perception"], anchor_share="once")
    twice = agp_teacher_grouped(sup, followers, ["planning", "perception"])
    torch.testing.assert_close(once, plain)
    torch.testing.assert_close(twice, plain + sup)  # K = 2 followers: the anchor enters twice


def test_a_conflicting_follower_keeps_no_component_against_the_anchor():
    sup = torch.tensor([1.0, 0.0], dtype=torch.float64)
    follower = torch.tensor([-2.0, 1.0], dtype=torch.float64)
    update = agp_teacher_grouped(sup, {"reasoning": follower}, ["reasoning"])
    # Stage 1 leaves f' = (0, 1), merged = (1, 1); one follower: no stage 2.
    torch.testing.assert_close(update, torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_stage2_projects_against_the_unprojected_merged_gradients():
    """With m_a = (1, 0), m_b = (-1, 1), m_c = (0, -1): each projected against the ORIGINAL others in order."""
    sup = torch.zeros(2, dtype=torch.float64)
    merged = {
        "perception": torch.tensor([1.0, 0.0]).double(),
        "reasoning": torch.tensor([-1.0, 1.0]).double(),
        "planning": torch.tensor([0.0, -1.0]).double(),
    }
    order = ["perception", "reasoning", "planning"]
    # By hand: a vs b (dot -1): a - (-1/2) b = (0.5, 0.5); vs c (dot -0.5): + 0.5 c = (0.5, 0). b vs a (dot -1):
    # b + a = (0, 1); vs c (dot -1): (0, 0). c vs a (dot 0): c; vs b (dot -1): c + b / 2 = (-0.5, -0.5).
    expected = torch.tensor([0.5, 0.0]) + torch.tensor([0.0, 0.0]) + torch.tensor([-0.5, -0.5])
    torch.testing.assert_close(agp_teacher_grouped(sup, merged, order), expected.double())


@pytest.mark.parametrize("method", ["none", "g1", "g2", "agp"])
def test_combine_teacher_weights_draws_its_order_and_matches_the_references(method):
    g = _vectors(3, 10, 3, 1.0)
    followers = {n: 1 + i for i, n in enumerate(TEACHERS)}
    generator = torch.Generator().manual_seed(7)
    twin = torch.Generator().manual_seed(7)
    coefficients, _ = combine_teacher_weights(method, g @ g.T, 0, followers, generator)
    vectors = {n: g[1 + i] for i, n in enumerate(TEACHERS)}
    if method == "none":
        expected = g.sum(0)
    elif method == "g1":
        expected = pcgrad(list(g), stage2_order(twin, range(4)))
    else:
        reference = agp_teacher_grouped if method == "agp" else g2_teacher_grouped
        expected = reference(g[0], vectors, stage2_order(twin, list(TEACHERS)))
    torch.testing.assert_close(coefficients @ g, expected)


def test_teacher_rows_weight_each_sample_by_its_own_pi_row():
    terms = [("perception", "ce"), ("perception", "reasoning"), ("planning", "ce"), ("planning", "reasoning")]
    pi = [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]]
    rows = teacher_matrix(terms, {"ce": 2.0, "reasoning": 3.0}, pi)
    assert (
        rows.rows == ("sup", "reasoning") and rows.sup_index == 0 and rows.follower_index == {"reasoning": 1}
    )
    expected = torch.tensor([[2.0, 0, 2.0, 0], [0, 0.1 * 3.0, 0, 0.3 * 3.0]], dtype=torch.float64)
    torch.testing.assert_close(rows.matrix, expected)


class _ReleasedRule:
    """The released code's reweighting update, written out step by step from its description (float64)."""

    def __init__(self, static: dict[str, float], lr=3e-4, bounds=(1e-6, 1e6), min_ce=0.6, eps=1e-8):
        self.static, self.bounds, self.min_ce, self.eps = static, bounds, min_ce, eps
        self.a = {
            n: torch.tensor(math.log(math.expm1(w)), dtype=torch.float64, requires_grad=True)
            for n, w in static.items()
        }
        self.opt = torch.optim.AdamW(list(self.a.values()), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.first: dict[str, float] = {}

    def w(self, n):
        value = torch.clamp(torch.nn.functional.softplus(self.a[n]) + self.eps, *self.bounds)
        return torch.clamp(value, min=self.min_ce) if n == "ce" else value

    def step(self, losses, norms, alpha=0.0):
        for n in losses:
            self.first.setdefault(n, losses[n])
        big_g = {n: self.w(n) * norms[n] for n in losses}
        total = sum(big_g.values())
        p = {n: self.static[n] / sum(self.static.values()) for n in losses}
        r = {n: losses[n] / self.first[n] for n in losses}
        r_bar = sum(r.values()) / len(r)
        objective = sum((big_g[n] - p[n] * total * (r[n] / r_bar) ** alpha).abs() for n in losses)
        self.opt.zero_grad()
        objective.backward()
        self.opt.step()
        with torch.no_grad():
            new = {n: self.w(n) for n in losses}
            scale = sum(self.static.values()) / float(sum(new.values()))
            for n in losses:
                value = torch.clamp(new[n] * scale, *self.bounds)
                value = torch.clamp(value, min=self.min_ce) if n == "ce" else value
                self.a[n].copy_(torch.log(torch.expm1(value)))
        return {n: float(self.w(n)) for n in losses}


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_reference_reweighting_follows_the_released_rule(alpha):
    static = {"ce": 1.0, "perception": 0.5, "reasoning": 2.0}
    mine = ReferenceReweighter(list(static), static, alpha=alpha, lr=0.05)
    theirs = _ReleasedRule(static, lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        losses = {n: float(torch.rand(1, generator=g)) + 0.1 for n in static}
        norms = {n: float(torch.rand(1, generator=g)) * 10 for n in static}
        step = mine.update(losses, norms)
        expected = theirs.step(losses, norms, alpha)
        assert step.weights == pytest.approx(expected, rel=1e-9)
    weights = mine.weights()
    assert sum(weights.values()) == pytest.approx(
        sum(static.values()), rel=1e-6
    )  # rescaled to the static sum
    assert weights["ce"] >= 0.6


def test_reference_reweighting_keeps_the_ce_floor_and_skips_a_lone_term():
    mine = ReferenceReweighter(["ce", "planning"], {"ce": 1.0, "planning": 1.0}, lr=0.5)
    for _ in range(30):  # CE's gradient is huge: its weight is pushed down to the floor
        mine.update({"ce": 1.0, "planning": 1.0}, {"ce": 100.0, "planning": 1.0})
    assert mine.weights()["ce"] == pytest.approx(0.6)
    assert mine.update({"ce": 1.0}, {"ce": 1.0}) is None
