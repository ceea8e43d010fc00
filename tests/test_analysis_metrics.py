"""Pre-study metrics (eqs. 1-5, section 3.2.2 dispersion) against naive float64 references on random tensors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drivekd.analysis.metrics import (
    AdjacentCosine,
    Dispersion,
    IntraConsistency,
    VisionTextCosine,
    attention_dispersion,
    cosine,
    hidden_dispersion,
    mean_pairwise_cosine,
)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def _splits(total: int, rng: np.random.Generator) -> list[slice]:
    """Random contiguous batches covering range(total)."""
    cuts = (
        sorted(rng.choice(np.arange(1, total), size=rng.integers(0, total), replace=False))
        if total > 1
        else []
    )
    edges = [0, *cuts, total]
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


def _hidden(rng: np.random.Generator, layers: int, batch: int, length: int, dim: int) -> list[torch.Tensor]:
    # Large, offset activations like real LLM outliers: cosines must stay accurate.
    scale = 10.0 ** rng.uniform(-2, 3)
    return [
        torch.tensor(rng.normal(1.0, 1.0, (batch, length, dim)) * scale, dtype=torch.float32)
        for _ in range(layers + 1)
    ]


def _valid(rng: np.random.Generator, batch: int, length: int) -> torch.Tensor:
    lengths = rng.integers(1, length + 1, size=batch)
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def test_cosine_matches_reference_and_is_zero_for_a_zero_vector():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    got = cosine(torch.tensor(a), torch.tensor(b))
    assert got.dtype == torch.float64  # float64 in, float64 out
    np.testing.assert_allclose(got.numpy(), [_cos(x, y) for x, y in zip(a, b, strict=True)], atol=1e-12)
    assert cosine(torch.zeros(3), torch.ones(3)).item() == 0.0
    big = torch.full((4,), 3e30)  # would overflow a float32 dot product of raw vectors
    assert cosine(big, big).item() == pytest.approx(1.0)


@SETTINGS
@given(
    seed=st.integers(0, 10_000), layers=st.integers(1, 4), batch=st.integers(1, 4), length=st.integers(1, 9)
)
def test_adjacent_cosine_is_the_token_mean_of_eq1_over_any_batching(seed, layers, batch, length):
    rng = np.random.default_rng(seed)
    hidden, valid = _hidden(rng, layers, batch, length, 6), _valid(rng, batch, length)
    expected = []
    for layer in range(layers):
        values = [
            _cos(hidden[layer][b, i], hidden[layer + 1][b, i])
            for b in range(batch)
            for i in range(length)
            if valid[b, i]
        ]
        expected.append(np.mean(values))
    metric = AdjacentCosine()
    for part in _splits(batch, rng):
        metric.update([h[part] for h in hidden], valid[part])
    np.testing.assert_allclose(metric.result(), expected, atol=1e-6)
    assert metric.tokens == int(valid.sum())


@SETTINGS
@given(
    seed=st.integers(0, 10_000), layers=st.integers(1, 4), batch=st.integers(1, 5), length=st.integers(2, 9)
)
def test_vision_text_cosine_is_eqs_2_3_and_skips_samples_without_a_segment(seed, layers, batch, length):
    rng = np.random.default_rng(seed)
    hidden, valid = _hidden(rng, layers, batch, length, 5), _valid(rng, batch, length)
    vision = torch.tensor(rng.random((batch, length)) < 0.4) & valid
    text = ~vision & valid & torch.tensor(rng.random((batch, length)) < 0.8)
    expected, kept = [], [b for b in range(batch) if vision[b].any() and text[b].any()]
    for h in hidden:
        per_sample = []
        for b in kept:
            v = h[b][vision[b]].double().numpy().mean(0)
            t = h[b][text[b]].double().numpy().mean(0)
            per_sample.append(_cos(v, t))
        expected.append(np.mean(per_sample) if per_sample else None)
    metric = VisionTextCosine()
    for part in _splits(batch, rng):
        metric.update([h[part] for h in hidden], vision[part], text[part])
    if not kept:
        assert metric.result() is None
    else:
        np.testing.assert_allclose(metric.result(), expected, atol=1e-6)
    assert metric.samples == len(kept)


@SETTINGS
@given(seed=st.integers(0, 10_000), count=st.integers(2, 12), zero=st.booleans())
def test_mean_pairwise_cosine_equals_the_double_loop_of_eq5(seed, count, zero):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.3, 1.0, (count, 3, 8))  # (G, layers, D)
    if zero:
        centres[0] = 0.0
    expected = [
        np.mean(
            [_cos(centres[i, layer], centres[j, layer]) for i, j in itertools.combinations(range(count), 2)]
        )
        for layer in range(3)
    ]
    np.testing.assert_allclose(mean_pairwise_cosine(torch.tensor(centres)).numpy(), expected, atol=1e-12)


def test_mean_pairwise_cosine_needs_two_vectors():
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_cosine(torch.ones(1, 4))


def _questions(rng: np.random.Generator, count: int, images: int, layers: int, dim: int):
    capabilities = ["perception", "reasoning", "planning"]
    image = rng.integers(0, images, size=count)
    order = np.argsort(image, kind="stable")  # grouped by image, as the runner streams them
    image = image[order]
    capability = [capabilities[k] for k in rng.integers(0, 3, size=count)]
    vectors = rng.normal(0.5, 1.0, (count, layers, dim))
    return [f"img{i}" for i in image], capability, vectors


def _naive_intra(images, capabilities, vectors):
    centres: dict = {}
    for image, capability, vector in zip(images, capabilities, vectors, strict=True):
        centres.setdefault(capability, {}).setdefault(image, []).append(vector)
    out = {}
    for capability, by_image in centres.items():
        means = [np.mean(v, axis=0) for v in by_image.values()]
        if len(means) < 2:
            out[capability] = None
            continue
        out[capability] = [
            np.mean([_cos(a[layer], b[layer]) for a, b in itertools.combinations(means, 2)])
            for layer in range(vectors.shape[1])
        ]
    return out, centres


@SETTINGS
@given(seed=st.integers(0, 10_000), count=st.integers(1, 30), images=st.integers(1, 8))
def test_intra_consistency_streams_to_eqs_4_5(seed, count, images):
    rng = np.random.default_rng(seed)
    image, capability, vectors = _questions(rng, count, images, 3, 6)
    expected, _ = _naive_intra(image, capability, vectors)
    metric = IntraConsistency()
    tensor = torch.tensor(vectors, dtype=torch.float32)
    closed: set[str] = set()
    for part in _splits(count, rng):
        metric.update(tensor[part], image[part], capability[part])
        finished = {image[k] for k in range(part.stop)} - {image[k] for k in range(part.stop, count)}
        for key in sorted(finished - closed):
            metric.close(key)
            closed.add(key)
        if rng.random() < 0.5:  # result() mid-stream sees the open images and changes nothing
            metric.result()
    got = metric.result()
    assert set(got) == set(expected)
    for key, values in expected.items():
        if values is None:
            assert got[key] is None
        else:
            np.testing.assert_allclose(got[key], values, atol=1e-6)


def test_intra_consistency_refuses_questions_of_a_closed_image():
    metric = IntraConsistency()
    metric.update(torch.ones(1, 2, 3), ["a"], ["perception"])
    metric.close("a")
    with pytest.raises(ValueError, match="closed"):
        metric.update(torch.ones(1, 2, 3), ["a"], ["perception"])
    with pytest.raises(ValueError, match="one image and capability per vector row"):
        metric.update(torch.ones(2, 2, 3), ["b"], ["perception"])


@pytest.mark.parametrize("folds", [2, 4])
def test_intra_standard_error_is_the_fold_spread_over_sqrt_k(folds):
    rng = np.random.default_rng(1)
    images = 13
    vectors = rng.normal(0.5, 1.0, (images, 2, 5))
    metric = IntraConsistency(folds=folds)
    for k in range(images):
        metric.update(torch.tensor(vectors[k : k + 1]), [f"i{k}"], ["planning"])
        metric.close(f"i{k}")
    estimates = []
    for fold in range(folds):
        members = vectors[fold::folds]
        estimates.append(
            [
                np.mean([_cos(a[layer], b[layer]) for a, b in itertools.combinations(members, 2)])
                for layer in range(2)
            ]
        )
    expected = np.sqrt(np.var(estimates, axis=0, ddof=1) / folds)
    np.testing.assert_allclose(metric.standard_errors()["planning"], expected, atol=1e-10)
    assert metric.images() == {"planning": images}
    few = IntraConsistency(folds=4)
    few.update(torch.tensor(vectors[:5]), [f"i{k}" for k in range(5)], ["planning"] * 5)
    assert few.standard_errors()["planning"] is None  # only one fold has two images


def _naive_dispersion(questions, max_questions=None):
    """questions: (image, capability, group, hidden (N, D), maps (N, L, L)) in stream order."""
    by_image: dict = {}
    for q in questions:
        held = by_image.setdefault(q[0], [])
        if max_questions is None or len(held) < max_questions:
            held.append(q)
    per_key: dict = {}
    for held in by_image.values():
        pair_values: dict = {}
        for a, b in itertools.combinations(held, 2):
            kind = "rewording" if a[2] is not None and a[2] == b[2] else "question"
            layers = a[3].shape[0]
            hid = [1 - _cos(a[3][k], b[3][k]) for k in range(layers)]
            m = min(a[4].shape[-1], b[4].shape[-1])
            att = [1 - _cos(a[4][k][:m, :m].ravel(), b[4][k][:m, :m].ravel()) for k in range(layers)]
            scopes = ["all", a[1]] if a[1] == b[1] else ["all"]
            for scope in scopes:
                pair_values.setdefault(("hidden", kind, scope), []).append(hid)
                pair_values.setdefault(("attention", kind, scope), []).append(att)
        for key, values in pair_values.items():
            per_key.setdefault(key, []).append(np.mean(values, axis=0))
    return {key: np.mean(values, axis=0) for key, values in per_key.items()}


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    count=st.integers(1, 14),
    images=st.integers(1, 4),
    max_questions=st.sampled_from([None, 2, 3]),
)
def test_dispersion_matches_the_pairwise_reference(seed, count, images, max_questions):
    rng = np.random.default_rng(seed)
    image, capability, _ = _questions(rng, count, images, 1, 1)
    layers = 3
    questions = []
    for k in range(count):
        length = int(rng.integers(2, 7))
        maps = np.tril(rng.random((layers, length, length)))
        maps /= maps.sum(-1, keepdims=True)
        group = f"{image[k]}-g{rng.integers(0, 2)}" if rng.random() < 0.5 else None
        questions.append((image[k], capability[k], group, rng.normal(size=(layers, 4)), maps))
    expected = _naive_dispersion(questions, max_questions)
    metric = Dispersion(max_questions)
    for k, (im, cap, group, hidden, maps) in enumerate(questions):
        metric.add(im, cap, group, torch.tensor(hidden), torch.tensor(maps, dtype=torch.float32))
        if k + 1 == count or image[k + 1] != im:
            metric.close(im)
    got = metric.result()
    for signal in ("hidden", "attention"):
        for kind in ("question", "rewording"):
            keys = {key for key in expected if key[:2] == (signal, kind)}
            if not keys:
                assert got[signal][kind] is None
                continue
            for key in keys:
                np.testing.assert_allclose(got[signal][kind][key[2]], expected[key], atol=1e-6)
    held = sum(min(image.count(i), max_questions or count) for i in set(image))
    assert got["questions_skipped"] == count - held


def test_dispersion_compares_maps_on_the_top_left_overlap():
    a = torch.rand(2, 5, 5).tril()
    b = a[:, :3, :3].clone()  # the same prefix, a shorter question
    assert torch.allclose(attention_dispersion(a, b), torch.zeros(2), atol=1e-6)
    c = a.clone()
    c[:, 4, :] = torch.rand(5)  # differences beyond the overlap do not count
    assert torch.allclose(attention_dispersion(c, b), torch.zeros(2), atol=1e-6)
    assert hidden_dispersion(torch.eye(3), -torch.eye(3)).tolist() == [2.0, 2.0, 2.0]
    assert math.isclose(
        float(attention_dispersion(a, a.flip(-1))[0]),
        1 - _cos(a[0].ravel(), a[0].flip(-1).ravel()),
        abs_tol=1e-6,
    )


def test_dispersion_without_paraphrases_reports_rewording_as_absent():
    metric = Dispersion()
    for _ in range(3):
        metric.add("img", "planning", None, torch.randn(2, 4), torch.rand(2, 3, 3))
    got = metric.result()
    assert got["hidden"]["rewording"] is None and got["attention"]["rewording"] is None
    assert got["pairs"] == {"question": 3, "rewording": 0}
    assert got["hidden"]["question"]["planning"] is not None
    with pytest.raises(ValueError, match="closed"):
        metric.add("img", "planning", None, torch.randn(2, 4), torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match="at least 2"):
        Dispersion(max_questions=1)
