"""Teacher mixing (eqs. 17, 26), combination Gramians, and the whole chain on a real network: one backward of
sum_m (A^T c)_m L_m equals the explicit AGP / G2 / G1 update built from per-loss gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from drivekd.data.schema import CAPABILITIES
from drivekd.gradients import (
    DEFAULT_PI,
    agp,
    agp_weights,
    atomic_coefficients,
    combination_gramian,
    combination_matrix,
    g2,
    g2_weights,
    group_norms,
    none_weights,
    pcgrad,
    pcgrad_weights,
    pi_matrix,
)

WEIGHTS = {"ce": 0.7, "perception": 1.3, "reasoning": 0.4, "planning": 2.0}
SKEWED_PI = ((0.7, 0.2, 0.1), (0.05, 0.9, 0.05), (0.3, 0.3, 0.4))  # not symmetric: rows and columns differ


def all_terms(seed: int = 0) -> list[tuple[str, str]]:
    """Every (capability, loss) atomic term, in a shuffled order so that no code can rely on it."""
    terms = [(c, loss) for c in CAPABILITIES for loss in ("ce", *CAPABILITIES)]
    perm = torch.randperm(len(terms), generator=torch.Generator().manual_seed(seed)).tolist()
    return [terms[i] for i in perm]


def explicit_rows(flat: torch.Tensor, terms, weights, pi=DEFAULT_PI):
    """sup[c] = w_ce g(CE_c) and distill[c] = sum_t pi[c][t] w_t g(L_t(c)), written straight from eq. 17."""
    index = {term: m for m, term in enumerate(terms)}
    sup, distill = {}, {}
    for ci, c in enumerate(CAPABILITIES):
        if (c, "ce") in index:
            sup[c] = weights["ce"] * flat[index[c, "ce"]]
        teachers = [t for t in CAPABILITIES if (c, t) in index]
        if teachers:
            distill[c] = sum(pi[ci][CAPABILITIES.index(t)] * weights[t] * flat[index[c, t]] for t in teachers)
    return sup, distill


def test_default_pi_is_row_stochastic_and_favours_the_specialised_teacher():
    pi = pi_matrix(DEFAULT_PI)
    assert torch.allclose(pi.sum(1), torch.ones(3, dtype=torch.float64))
    assert all(pi[i, i] > pi[i, j] for i in range(3) for j in range(3) if i != j)


def test_combination_rows_are_eq17_mixtures():
    terms = all_terms(1)
    flat = torch.randn(len(terms), 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    comb = combination_matrix(terms, WEIGHTS, SKEWED_PI)
    sup, distill = explicit_rows(flat, terms, WEIGHTS, SKEWED_PI)
    rows = comb.matrix @ flat
    for c in CAPABILITIES:
        assert torch.allclose(rows[comb.sup_index[c]], sup[c], rtol=1e-14, atol=0)
        assert torch.allclose(rows[comb.distill_index[c]], distill[c], rtol=1e-13, atol=1e-15)
        assert (
            comb.rows[comb.sup_index[c]] == f"{c}:sup" and comb.rows[comb.distill_index[c]] == f"{c}:distill"
        )
    gram = flat @ flat.T
    assert torch.allclose(combination_gramian(gram, comb.matrix), rows @ rows.T, rtol=1e-12, atol=1e-12)
    c = torch.randn(len(comb.rows), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(atomic_coefficients(comb.matrix, c) @ flat, c @ rows, rtol=1e-12, atol=1e-12)


def test_a_capability_without_distillation_has_only_its_sup_row():
    terms = [("planning", "ce"), ("perception", "ce"), ("perception", "reasoning")]
    comb = combination_matrix(terms, WEIGHTS)
    assert comb.rows == ("perception:sup", "perception:distill", "planning:sup")
    assert comb.distill_index == {"perception": 1}
    # Pi row of perception, column of the reasoning teacher, times w_r.
    assert comb.matrix[1, 2] == pytest.approx(DEFAULT_PI[0][1] * WEIGHTS["reasoning"], rel=1e-15)


def test_group_norms_are_the_norms_of_the_weighted_loss_groups():
    terms = all_terms(2)
    flat = torch.randn(len(terms), 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    index = {term: m for m, term in enumerate(terms)}
    norms = group_norms(flat @ flat.T, terms, SKEWED_PI)
    assert set(norms) == {"ce", *CAPABILITIES}
    ce = sum(flat[index[c, "ce"]] for c in CAPABILITIES)
    assert norms["ce"] == pytest.approx(float(ce.norm()), rel=1e-12)
    for ti, t in enumerate(CAPABILITIES):
        group = sum(SKEWED_PI[ci][ti] * flat[index[c, t]] for ci, c in enumerate(CAPABILITIES))
        assert norms[t] == pytest.approx(float(group.norm()), rel=1e-12)


def test_bad_terms_weights_and_pi_are_refused():
    with pytest.raises(ValueError, match="atomic term 0"):
        combination_matrix([("driving", "ce")], WEIGHTS)
    with pytest.raises(ValueError, match="repeated"):
        combination_matrix([("planning", "ce"), ("planning", "ce")], WEIGHTS)
    with pytest.raises(ValueError, match="no \\('perception', 'ce'\\) term"):
        combination_matrix([("perception", "planning")], WEIGHTS)
    with pytest.raises(ValueError, match="weights lack"):
        combination_matrix([("perception", "ce"), ("perception", "planning")], {"ce": 1.0})
    with pytest.raises(ValueError, match="3x3"):
        pi_matrix([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="non-negative"):
        pi_matrix([[1.0, -0.1, 0.1], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


class Losses:
    """A float64 MLP with one CE per capability batch and three 'teacher' terms per batch that pull hidden layers
    or the logits towards targets (stand-ins for the layer-1, intermediate and penultimate attention losses).

    Built for conflicts: the capability batches share inputs but not labels, and the logit targets penalise the
    labelled class, so CE and distillation gradients, and the capabilities' gradients, point against each other.
    """

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4))
        self.net.double()
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 4, (6,), generator=gen)
        self.x = {c: x + 0.1 * torch.randn(6, 5, generator=gen, dtype=torch.float64) for c in CAPABILITIES}
        self.y = {c: (y + k) % 4 for k, c in enumerate(CAPABILITIES)}
        self.depth = {"perception": 2, "reasoning": 4, "planning": 5}
        with torch.no_grad():
            self.target = {}
            for c in CAPABILITIES:
                for t in CAPABILITIES:
                    out = self.net[: self.depth[t]](self.x[c])
                    push = -F.one_hot(self.y[c], 4) if t == "planning" else 0.0  # against the label
                    noise = torch.randn(out.shape, generator=gen, dtype=torch.float64)
                    self.target[c, t] = out + push + 0.5 * noise

    def __call__(self, terms) -> list[torch.Tensor]:
        out = []
        for c, loss in terms:
            if loss == "ce":
                out.append(F.cross_entropy(self.net(self.x[c]), self.y[c]))
            else:
                hidden = self.net[: self.depth[loss]](self.x[c])
                out.append(F.mse_loss(hidden, self.target[c, loss]))
        return out

    def flat_grad(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.net.parameters()])

    def per_loss(self, terms) -> torch.Tensor:
        params = list(self.net.parameters())
        return torch.stack(
            [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, params, materialize_grads=True)])
                for v in self(terms)
            ]
        )


@pytest.mark.parametrize("method", ["agp", "g2", "g1", "none"])
def test_one_backward_of_the_coefficient_weighted_losses_is_the_explicit_update(method):
    model = Losses(seed=1)
    terms = all_terms(3)
    flat = model.per_loss(terms)  # (12, P): the explicit per-loss gradients, for the reference only
    comb = combination_matrix(terms, WEIGHTS)
    gram = combination_gramian(flat @ flat.T, comb.matrix)
    sup, distill = explicit_rows(flat, terms, WEIGHTS)
    fired = [0, 0]
    if method in ("agp", "g2"):
        cases = list(itertools.permutations(CAPABILITIES))
    elif method == "g1":
        cases = [list(p) for p in itertools.permutations(range(len(comb.rows)))][::97]
    else:
        cases = [None]
    for order in cases:
        if method == "agp":
            rows, stats = agp_weights(gram, comb.sup_index, comb.distill_index, order)
            want = agp(sup, distill, order)
        elif method == "g2":
            rows, stats = g2_weights(gram, comb.sup_index, comb.distill_index, order)
            want = g2(sup, distill, order)
        elif method == "g1":
            rows, stats = pcgrad_weights(gram, order, names=comb.rows)
            explicit = [
                sup[c] if part == "sup" else distill[c] for c, part in (r.split(":") for r in comb.rows)
            ]
            want = pcgrad(explicit, order)
        else:
            rows, stats = none_weights(gram, comb.sup_index, comb.distill_index)
            want = sum(sup.values()) + sum(distill.values())
        coefficients = atomic_coefficients(comb.matrix, rows)
        model.net.zero_grad()
        loss = sum(c * v for c, v in zip(coefficients, model(terms), strict=True))
        loss.backward()
        got = model.flat_grad()
        assert float((got - want).norm()) <= 1e-12 * float(want.norm())
        fired = [fired[0] + stats.stage1_fired, fired[1] + stats.stage2_fired]
    # Conflicts really occurred, so every stage was exercised (G1 has a single stage, none has no stage).
    expected_stages = {"none": 0, "g1": 1}.get(method, 2)
    assert [count > 0 for count in fired] == [True] * expected_stages + [False] * (2 - expected_stages)
