"""Online loss reweighting (appendix B.1, eq. 25; D.1): target, fixed point, direction, exponent sign, bounds,
inactive terms and exact resume."""

from __future__ import annotations

import io
import math

import pytest
import torch

from drivekd.gradients import LossReweighter

LR = 3e-4


def naive_targets(p, alpha, first, losses, weighted):
    """Eq. 25 with the total weighted magnitude kept: written out term by term."""
    names = list(losses)
    ratios = [losses[n] / first[n] for n in names]
    mean = sum(ratios) / len(ratios)
    shares = [p[n] * (ratio / mean) ** alpha for n, ratio in zip(names, ratios, strict=True)]
    total = sum(weighted[n] for n in names)
    return {n: total * share / sum(shares) for n, share in zip(names, shares, strict=True)}


def test_weights_start_where_asked_and_use_softplus_plus_eps():
    r = LossReweighter(["ce", "planning"], [1.0, 2.0], alpha=1.0, initial={"ce": 0.5, "planning": 3.0})
    assert r.weights() == pytest.approx({"ce": 0.5, "planning": 3.0}, rel=1e-12)
    for name in r.names:
        expected = float(torch.nn.functional.softplus(r.raw[name].detach())) + 1e-8
        assert r.weights()[name] == pytest.approx(expected, rel=1e-15)


def test_targets_follow_eq25_and_l0_is_recorded_when_a_term_first_appears():
    p = {"ce": 1.0, "perception": 2.0, "planning": 0.5}
    r = LossReweighter(list(p), p, alpha=1.5, initial={"ce": 1.0, "perception": 0.8, "planning": 1.7})
    r.update({"ce": 2.0, "perception": 0.4}, {"ce": 1.0, "perception": 3.0})  # planning not active yet
    steps = [
        ({"ce": 1.5, "perception": 0.1, "planning": 5.0}, {"ce": 0.7, "perception": 2.0, "planning": 0.2}),
        ({"ce": 1.2, "perception": 0.3, "planning": 2.0}, {"ce": 0.9, "perception": 1.0, "planning": 0.4}),
    ]
    first = {"ce": 2.0, "perception": 0.4, "planning": 5.0}
    for losses, norms in steps:
        before = r.weights()
        step = r.update(losses, norms)
        weighted = {n: before[n] * norms[n] for n in losses}
        assert step.weighted_norms == pytest.approx(weighted, rel=1e-12)
        assert step.targets == pytest.approx(naive_targets(p, 1.5, first, losses, weighted), rel=1e-12)
        assert sum(step.targets.values()) == pytest.approx(sum(weighted.values()), rel=1e-12)
        objective = sum(abs(weighted[n] - step.targets[n]) for n in losses)
        assert step.objective == pytest.approx(objective, rel=1e-12)
    assert set(step.as_log()) >= {
        "reweight/objective",
        "reweight/w/ce",
        "reweight/target/planning",
        "reweight/r/ce",
    }


def test_an_exact_fixed_point_does_not_move():
    r = LossReweighter(["a", "b"], {"a": 1.0, "b": 1.0}, alpha=1.0)
    before = r.weights()
    for _ in range(50):
        step = r.update({"a": 2.0, "b": 3.0}, {"a": 0.5, "b": 0.5})
        assert step.objective == 0.0
    assert r.weights() == before


def test_near_the_fixed_point_weights_stay_put_and_away_from_it_they_drift():
    p = {"a": 1.0, "b": 3.0, "c": 0.5}
    start = {"a": 0.7, "b": 1.9, "c": 1.2}
    losses = {"a": 2.0, "b": 1.0, "c": 4.0}
    at_target = {n: p[n] / start[n] for n in p}  # w_i G_i = p_i: the target with r_i = 1 (first step)
    r = LossReweighter(list(p), p, alpha=0.5, initial=start)
    for _ in range(200):
        r.update(losses, at_target)
        assert all(abs(r.weights()[n] - start[n]) <= 3 * LR for n in p)  # L1 + Adam: at most a few lr
    off = dict(at_target, a=1.1 * at_target["a"])  # w_a G_a above its target, so the others are below theirs
    r = LossReweighter(list(p), p, alpha=0.5, initial=start)
    for _ in range(200):
        r.update(losses, off)
    moved = {n: (r.weights()[n] - start[n]) / LR for n in p}
    assert moved["a"] < -50 and moved["b"] > 50 and moved["c"] > 50


def test_terms_that_decayed_less_gain_weight_when_alpha_is_positive():
    for alpha, expect_up in ((1.0, True), (0.0, None)):
        r = LossReweighter(["slow", "fast"], [1.0, 1.0], alpha=alpha)
        norms = {"slow": 1.0, "fast": 1.0}
        r.update({"slow": 1.0, "fast": 1.0}, norms)  # L(0)
        for _ in range(20):
            step = r.update({"slow": 0.9, "fast": 0.1}, norms)
        w = r.weights()
        if expect_up:
            assert step.relative_decay["slow"] > 1 > step.relative_decay["fast"]
            assert step.targets["slow"] > step.targets["fast"]
            assert w["slow"] > 1.0 > w["fast"]
        else:
            assert w == pytest.approx({"slow": 1.0, "fast": 1.0}, abs=1e-15)


def test_bounds_hold_and_a_weight_at_a_bound_can_leave_it():
    r = LossReweighter(["a", "b"], {"a": 100.0, "b": 1.0}, alpha=0.0, lr=0.3, bounds=(0.5, 2.0))
    losses = {"a": 1.0, "b": 1.0}
    for _ in range(100):
        r.update(losses, {"a": 1.0, "b": 1.0})
        assert all(0.5 <= w <= 2.0 for w in r.weights().values())
    assert r.weights()["a"] == pytest.approx(2.0, rel=1e-9)
    assert r.weights()["b"] == pytest.approx(0.5, rel=1e-9)
    for _ in range(100):  # now w_a G_a far above its share: a must come down from its bound
        r.update(losses, {"a": 1000.0, "b": 1.0})
        assert all(0.5 <= w <= 2.0 for w in r.weights().values())
    assert r.weights()["a"] < 1.5


def test_inactive_terms_keep_their_weight_even_with_momentum():
    r = LossReweighter(["a", "b", "c"], [1.0, 1.0, 1.0], alpha=1.0)
    for _ in range(5):
        r.update({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 1.0, "b": 2.0, "c": 4.0})
    c_before = r.weights()["c"]
    for _ in range(5):
        r.update({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 2.0})
    assert r.weights()["c"] == c_before


def run(r: LossReweighter, steps: int, offset: int) -> list[dict[str, float]]:
    out = []
    for s in range(offset, offset + steps):
        losses = {"ce": 2.0 / (1 + 0.1 * s), "perception": 1.0 / (1 + 0.3 * s), "planning": 3.0 - 0.01 * s}
        norms = {"ce": 1.0 + 0.05 * s, "perception": 0.3, "planning": 2.0 / (1 + s)}
        out.append(r.update(losses, norms).weights)
    return out


def make() -> LossReweighter:
    return LossReweighter(["ce", "perception", "planning"], [1.0, 0.5, 2.0], alpha=1.0, lr=1e-2)


def test_state_dict_resumes_exactly():
    a = make()
    run(a, 5, 0)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    expected = run(a, 5, 5)
    buffer.seek(0)
    state = torch.load(buffer)
    b = make()
    b.load_state_dict(state)
    assert run(b, 5, 5) == expected
    # Without the AdamW state (or without L_i(0)) the continuation differs: the state really matters.
    c = make()
    c.load_state_dict({k: v for k, v in state.items() if k != "_extra_state"}, strict=False)
    assert run(c, 5, 5) != expected
    d = make()
    d.load_state_dict({**state, "initial_losses": torch.full((3,), math.nan, dtype=torch.float64)})
    assert run(d, 5, 5) != expected


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="identifiers"):
        LossReweighter(["a.b"], [1.0], alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        LossReweighter(["a"], [1.0], alpha=-1.0)
    with pytest.raises(ValueError, match="bounds"):
        LossReweighter(["a"], [1.0], alpha=1.0, bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="outside the bounds"):
        LossReweighter(["a"], [1.0], alpha=1.0, bounds=(0.1, 0.5))
    with pytest.raises(ValueError, match="positive"):
        LossReweighter(["a"], [0.0], alpha=1.0)
    r = LossReweighter(["a", "b"], [1.0, 1.0], alpha=1.0)
    with pytest.raises(ValueError, match="unknown"):
        r.update({"z": 1.0}, {"z": 1.0})
    with pytest.raises(ValueError, match="keys of losses"):
        r.update({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ValueError, match="finite"):
        r.update({"a": math.nan}, {"a": 1.0})
    with pytest.raises(ValueError, match="L_i\\(0\\) must be > 0"):
        r.update({"a": 0.0}, {"a": 1.0})
