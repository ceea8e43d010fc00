"""Exact properties of the explicit-vector AGP, G2 and G1 references (eqs. 18-23), and what does not hold."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from drivekd.gradients import agp, agp_merge, g2, g2_merge, pcgrad, project_out

CAPS = ("perception", "reasoning", "planning")
seeds = st.integers(0, 2**31 - 1)
dims = st.integers(2, 24)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def conflicting_pair(seed: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two vectors with a negative dot product."""
    a, b = randn(seed, 2, dim)
    if torch.dot(a, b) > 0:
        b = -b
    return a, b


def chain(v: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 22 for one vector: projected in turn against each original in ``others``."""
    for u in others:
        v, _ = project_out(v, u)
    return v


@given(seeds, dims)
def test_projection_fires_only_on_conflict_and_leaves_an_orthogonal_shorter_vector(seed, dim):
    v, u = randn(seed, 2, dim)
    projected, fired = project_out(v, u)
    assert fired == bool(torch.dot(v, u) < 0)
    if not fired:
        assert torch.equal(projected, v)
    else:
        assert abs(torch.dot(projected, u)) <= 1e-12 * v.norm() * u.norm()
        assert projected.norm() <= v.norm()
        # Exactly the removed component: ||v'||^2 = ||v||^2 - (v.u)^2 / ||u||^2.
        expected = v.norm() ** 2 - torch.dot(v, u) ** 2 / u.norm() ** 2
        assert torch.isclose(projected.norm() ** 2, expected, rtol=1e-10, atol=1e-12 * v.norm() ** 2)


@given(seeds, dims)
def test_agp_stage1_keeps_the_anchor_and_makes_the_follower_non_conflicting(seed, dim):
    sup, distill = conflicting_pair(seed, dim)
    merged, fired = agp_merge(sup, distill)
    assert fired
    follower = merged - sup
    scale = sup.norm() * distill.norm()
    assert torch.dot(follower, sup) >= -1e-12 * scale  # = 0 up to round-off and the 1e-20 eps
    assert torch.dot(merged, sup) >= sup.norm() ** 2 - 1e-12 * scale  # the anchor's component is all there
    # The follower lost exactly its component along the anchor and nothing else.
    lost = distill - follower
    assert torch.allclose(
        lost, torch.dot(distill, sup) / sup.norm() ** 2 * sup, rtol=1e-10, atol=1e-12 * scale
    )


@given(seeds, dims)
def test_g2_stage1_changes_the_anchor_where_agp_does_not(seed, dim):
    sup, distill = conflicting_pair(seed, dim)
    merged, fired = g2_merge(sup, distill)
    assert fired
    # Symmetric: merged . sup = ||sup||^2 - (sup.distill)^2 / ||distill||^2 < ||sup||^2.
    expected = sup.norm() ** 2 - torch.dot(sup, distill) ** 2 / distill.norm() ** 2
    scale = sup.norm() ** 2 + sup.norm() * distill.norm()
    assert torch.isclose(torch.dot(merged, sup), expected, rtol=0, atol=1e-12 * scale)
    assert torch.dot(merged, sup) < sup.norm() ** 2
    assert torch.dot(merged, distill) < distill.norm() ** 2
    agp_merged, _ = agp_merge(sup, distill)
    assert torch.dot(agp_merged, sup) > torch.dot(merged, sup)


@given(seeds, dims)
def test_merges_without_conflict_are_plain_sums(seed, dim):
    sup, distill = randn(seed, 2, dim).abs()  # positive entries: positive dot product
    assert torch.equal(agp_merge(sup, distill)[0], sup + distill)
    assert torch.equal(g2_merge(sup, distill)[0], sup + distill)


@given(seeds, dims, st.integers(1, 3), st.permutations(range(3)))
def test_no_conflict_anywhere_gives_the_plain_sum(seed, dim, n_caps, perm):
    caps = [CAPS[i] for i in perm[:n_caps]]
    vectors = randn(seed, 2 * n_caps, dim).abs()
    sup = {c: vectors[2 * i] for i, c in enumerate(caps)}
    distill = {c: vectors[2 * i + 1] for i, c in enumerate(caps)}
    total = vectors.sum(0)
    for method in (agp, g2):
        record = {}
        assert torch.allclose(method(sup, distill, caps, record=record), total, rtol=1e-14, atol=0)
        assert not any(record.values())
    assert torch.allclose(pcgrad(list(vectors), list(range(2 * n_caps))), total, rtol=1e-14, atol=0)


@given(seeds, dims)
def test_two_task_pcgrad_update_never_conflicts_with_either_gradient(seed, dim):
    g1, g2_ = conflicting_pair(seed, dim)
    update = pcgrad([g1, g2_], [0, 1])
    scale = g1.norm() * g2_.norm() + g1.norm() ** 2 + g2_.norm() ** 2
    for g in (g1, g2_):
        assert torch.dot(update, g) >= -1e-12 * scale
    # With two tasks the order does not matter.
    assert torch.allclose(update, pcgrad([g1, g2_], [1, 0]), rtol=1e-14, atol=0)


@given(seeds, dims, st.permutations(range(4)))
def test_each_projected_vector_is_shorter_and_agrees_with_the_last_one_checked(seed, dim, order):
    """What stage 2 / PCGrad guarantees for any number of tasks, checked per vector with eq. 22 by hand."""
    grads = list(randn(seed, 4, dim))
    total = torch.zeros(dim, dtype=torch.float64)
    for i in order:
        others = [grads[j] for j in order if j != i]
        projected = chain(grads[i], others)
        assert projected.norm() <= grads[i].norm() * (1 + 1e-14)
        assert torch.dot(projected, others[-1]) >= -1e-12 * grads[i].norm() * others[-1].norm()
        total = total + projected
    assert torch.allclose(pcgrad(grads, order), total, rtol=1e-13, atol=1e-13 * sum(g.norm() for g in grads))


def find(condition, dim: int = 2, tries: int = 500) -> list[torch.Tensor]:
    for seed in range(tries):
        grads = list(randn(seed, 3, dim))
        if condition(grads):
            return grads
    raise AssertionError("no case found")


def test_three_tasks_have_no_full_guarantee():
    """With three tasks a projected vector can conflict again with a gradient checked earlier, and the update
    can conflict with an original gradient: stage 2 reduces conflicts, it does not remove them."""

    def earlier_conflict(grads):
        projected = chain(grads[0], [grads[1], grads[2]])
        return torch.dot(projected, grads[1]) < -1e-6

    grads = find(earlier_conflict)
    assert torch.dot(chain(grads[0], grads[1:]), grads[1]) < 0
    grads = find(lambda g: min(torch.dot(pcgrad(g, [0, 1, 2]), x) for x in g) < -1e-6)
    assert min(torch.dot(pcgrad(grads, [0, 1, 2]), g) for g in grads) < 0


def test_the_order_matters_for_three_capabilities():
    def order_sensitive(grads):
        sup = dict(zip(CAPS, grads, strict=True))
        results = [agp(sup, {}, list(p)) for p in itertools.permutations(CAPS)]
        return max((r - results[0]).norm() for r in results) > 1e-3

    grads = find(order_sensitive)
    sup = dict(zip(CAPS, grads, strict=True))
    results = {p: agp(sup, {}, list(p)) for p in itertools.permutations(CAPS)}
    assert len({tuple(r.round(decimals=8).tolist()) for r in results.values()}) > 1
    assert not torch.allclose(pcgrad(grads, [0, 1, 2]), pcgrad(grads, [2, 1, 0]))


@given(seeds, dims, st.floats(-3, 3), st.permutations(CAPS))
def test_updates_are_scale_equivariant(seed, dim, log_scale, order):
    """Exactly so without the eps of the denominators (the 1e-20 matters where ||g||^2 is not far above it)."""
    s = (-1) ** seed * 10.0**log_scale  # negative scales too: dot signs are unchanged
    vectors = randn(seed, 6, dim)
    sup = dict(zip(CAPS, vectors[:3], strict=True))
    distill = dict(zip(CAPS, vectors[3:], strict=True))
    bound = 1e-12 * abs(s) * vectors.norm(dim=1).sum()
    for method in (agp, g2):
        scaled = method(
            {c: s * v for c, v in sup.items()}, {c: s * v for c, v in distill.items()}, order, eps=0.0
        )
        assert (scaled - s * method(sup, distill, order, eps=0.0)).norm() <= bound
    unscaled = pcgrad(list(vectors), range(6), eps=0.0)
    assert (pcgrad(list(s * vectors), range(6), eps=0.0) - s * unscaled).norm() <= bound


def test_eps_keeps_underflowing_and_zero_gradients_finite():
    v = torch.tensor([1.0, 0.5], dtype=torch.float64)
    tiny = torch.tensor([-1e-170, 0.0], dtype=torch.float64)  # ||tiny||^2 underflows to 0, v . tiny < 0
    assert torch.dot(tiny, tiny) == 0 and torch.dot(v, tiny) < 0
    without_eps = pcgrad([v, tiny], [0, 1], eps=0.0)
    assert not torch.isfinite(without_eps).all()
    update = pcgrad([v, tiny], [0, 1])
    assert torch.isfinite(update).all()
    assert torch.allclose(update, v + tiny, rtol=1e-14, atol=0)  # the eps-damped projection is negligible
    zero = torch.zeros(2, dtype=torch.float64)
    for method in (agp, g2):
        assert torch.equal(method({"perception": zero}, {"perception": zero}, ["perception"]), zero)
        record = {}
        out = method(
            {"perception": v, "reasoning": zero},
            {"perception": tiny},
            ["reasoning", "perception"],
            record=record,
        )
        assert torch.isfinite(out).all()
        assert record["perception:distill", "perception:sup"]


def test_a_capability_without_distillation_merges_to_its_anchor():
    sup = dict(zip(CAPS, randn(0, 3, 5), strict=True))
    distill = {"perception": randn(1, 5)}
    record = {}
    out = agp(sup, distill, list(CAPS), record=record)
    assert ("reasoning:distill", "reasoning:sup") not in record
    assert ("perception:distill", "perception:sup") in record
    expected = pcgrad(
        [agp_merge(sup["perception"], distill["perception"])[0], sup["reasoning"], sup["planning"]], [0, 1, 2]
    )
    assert torch.allclose(out, expected, rtol=1e-14, atol=0)


def test_bad_input_is_refused():
    v = randn(0, 3)
    with pytest.raises(ValueError, match="permutation"):
        agp({"perception": v}, {}, ["reasoning"])
    with pytest.raises(ValueError, match="permutation"):
        pcgrad([v, v], [0, 0])
    with pytest.raises(ValueError, match="sup lacks"):
        g2({"perception": v}, {"planning": v}, ["perception"])
    with pytest.raises(ValueError, match="1-D"):
        pcgrad([v, randn(1, 4)], [0, 1])
