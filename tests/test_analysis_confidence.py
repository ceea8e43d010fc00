"""Teacher confidence on answer tokens (eqs. 6-8) and position-normalised binning against naive references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drivekd.analysis.confidence import Confidence, confidence_metrics, position_bins

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


def _naive(logits: np.ndarray, temperature: float, k: int = 10) -> np.ndarray:
    rows = []
    for z in logits.astype(np.float64):
        p = np.exp((z - z.max()) / temperature)
        p /= p.sum()
        top = sorted(p, reverse=True)[:k]
        m, s = top[0], sum(top)
        rows.append((m, s, m - (s - m) / (k - 1)))
    return np.array(rows).T


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    tokens=st.integers(1, 6),
    vocab=st.integers(10, 60),
    temperature=st.sampled_from([0.7, 1.0, 2.0, 0.3]),
)
def test_confidence_metrics_are_eqs_6_to_8(seed, tokens, vocab, temperature):
    logits = np.random.default_rng(seed).normal(0, 4, (tokens, vocab))
    got = confidence_metrics(torch.tensor(logits, dtype=torch.float32), temperature).numpy()
    np.testing.assert_allclose(got, _naive(logits, temperature), atol=2e-6)
    top1, mass, margin = got
    assert np.all(top1 <= mass + 1e-7) and np.all(mass <= 1 + 1e-6) and np.all(margin <= top1 + 1e-7)


def test_top1_falls_and_margin_narrows_as_the_temperature_rises():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)) * 3
    values = [confidence_metrics(logits, t) for t in (0.7, 1.0, 2.0)]
    assert torch.all(values[0][0] >= values[1][0]) and torch.all(values[1][0] >= values[2][0])
    confident = torch.zeros(1, 20)
    confident[0, 3] = 50.0
    assert confidence_metrics(confident, 1.0)[:, 0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    uniform = torch.zeros(1, 20)
    assert confidence_metrics(uniform, 1.0)[2, 0].item() == pytest.approx(0.0, abs=1e-7)


def test_confidence_metrics_refuse_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        confidence_metrics(torch.zeros(1, 20), 0.0)
    with pytest.raises(ValueError, match="vocabulary"):
        confidence_metrics(torch.zeros(1, 5), 1.0)
    with pytest.raises(ValueError, match="positive"):
        Confidence((1.0, -2.0))
    with pytest.raises(ValueError, match="n_bins"):
        Confidence(n_bins=0)


@given(length=st.integers(1, 200), n_bins=st.integers(1, 20))
@settings(deadline=None, derandomize=True)
def test_position_bins_are_floor_of_the_relative_centre(length, n_bins):
    bins = position_bins(length, n_bins).tolist()
    assert bins == [min(int((t + 0.5) / length * n_bins), n_bins - 1) for t in range(length)]
    assert bins == sorted(bins) and bins[0] >= 0 and bins[-1] <= n_bins - 1
    if length % n_bins == 0:
        assert np.bincount(bins, minlength=n_bins).tolist() == [length // n_bins] * n_bins


def test_confidence_accumulator_pools_tokens_per_domain_and_bin():
    rng = np.random.default_rng(3)
    answers = [
        (rng.normal(0, 3, (int(rng.integers(1, 9)), 30)), "driving" if k % 3 else "general") for k in range(9)
    ]
    metric = Confidence((0.7, 2.0), n_bins=4)
    for logits, domain in answers:
        metric.update(torch.tensor(logits, dtype=torch.float32), domain)
    metric.update(torch.zeros(0, 30), "driving")  # an empty answer adds nothing
    got = metric.result()
    assert got["bin_centres"] == [0.125, 0.375, 0.625, 0.875]
    for domain in ("driving", "general"):
        mine = [a for a, d in answers if d == domain]
        assert got["domains"][domain]["answers"] == len(mine)
        assert got["domains"][domain]["tokens"] == sum(len(a) for a in mine)
        for temperature in (0.7, 2.0):
            per_bin: dict[int, list] = {}
            every = []
            for logits in mine:
                values = _naive(logits, temperature)
                for t, b in enumerate(position_bins(len(logits), 4).tolist()):
                    per_bin.setdefault(b, []).append(values[:, t])
                    every.append(values[:, t])
            for j, name in enumerate(("top1", "top10", "margin")):
                entry = got["domains"][domain]["by_temperature"][f"{temperature:g}"][name]
                expected = [np.mean([v[j] for v in per_bin[b]]) if b in per_bin else None for b in range(4)]
                for value, want in zip(entry["bins"], expected, strict=True):
                    assert (value is None) == (want is None)
                    if want is not None:
                        assert value == pytest.approx(want, abs=2e-6)
                assert entry["mean"] == pytest.approx(np.mean([v[j] for v in every]), abs=2e-6)
