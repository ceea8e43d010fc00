"""L_sup (eq. 9), the token-level KL baseline and the hidden-state MSE baselines against naive loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drivekd.losses import (
    HiddenProjector,
    answer_kl,
    group_targets,
    grouped_hidden_mse,
    hidden_mse,
    supervised_loss,
    token_nll,
)

SETTINGS = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**31 - 1)


def random_logits_and_labels(seed: int, batch: int, length: int, vocab: int):
    """float64 logits and labels with -100 on a random subset of positions (label 0 is never predicted)."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[torch.rand(batch, length, generator=gen) < 0.4] = -100
    return gen, logits, labels


def ref_log_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    log_z = top + math.log(sum(math.exp(x - top) for x in scaled))
    return [x - log_z for x in scaled]


def ref_answer_positions(labels: torch.Tensor) -> list[tuple[int, int]]:
    """(b, t) whose logits predict a labelled token: labels[b, t + 1] != -100."""
    batch, length = labels.shape
    return [(b, t) for b in range(batch) for t in range(length - 1) if labels[b, t + 1] != -100]


def ref_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    total, count = 0.0, 0
    for b, t in ref_answer_positions(labels):
        total -= ref_log_softmax(logits[b, t].tolist())[int(labels[b, t + 1])]
        count += 1
    return total, count


def ref_answer_kl(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> float:
    per_token = []
    for b, t in ref_answer_positions(labels):
        log_q = ref_log_softmax(student[b, t].tolist(), temperature)
        log_p = ref_log_softmax(teacher[b, t].tolist(), temperature)
        kl = sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True))
        per_token.append(temperature**2 * kl)
    return sum(per_token) / len(per_token) if per_token else 0.0


# ------------------------------------------------------------------------------------------ L_sup


@SETTINGS
@given(seed=seeds, batch=st.integers(1, 3), length=st.integers(1, 7), vocab=st.integers(2, 9))
def test_token_nll_matches_reference(seed, batch, length, vocab):
    _, logits, labels = random_logits_and_labels(seed, batch, length, vocab)
    total, count = token_nll(logits, labels)
    want_total, want_count = ref_token_nll(logits, labels)
    assert count == want_count
    assert total.item() == pytest.approx(want_total, rel=1e-10, abs=1e-12)
    assert supervised_loss(logits, labels).item() == pytest.approx(want_total / max(want_count, 1), rel=1e-10)


def test_token_nll_sums_split_across_micro_batches():
    """Summing token_nll over micro-batches and dividing by the total count gives the full-batch L_sup."""
    _, logits, labels = random_logits_and_labels(1, 3, 6, 5)
    labels[0, 1:] = -100
    labels[1, 1:5] = 2
    parts = [token_nll(logits[i : i + 1], labels[i : i + 1]) for i in range(3)]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert total.item() == pytest.approx(supervised_loss(logits, labels).item(), rel=1e-12)
    assert total.item() != pytest.approx(sum((p[0] / max(p[1], 1)).item() for p in parts) / 3, rel=1e-6)


def test_token_nll_never_reads_logits_that_predict_no_label():
    """NaN logits at unlabelled positions and at the last position (which predicts nothing) do not leak."""
    _, logits, labels = random_logits_and_labels(2, 2, 6, 5)
    labels[:, 3] = -100
    labels[:, 4] = 1
    dirty = logits.clone()
    dirty[:, 2] = math.nan  # predicts labels[:, 3] == -100
    dirty[:, -1] = math.nan
    assert token_nll(dirty, labels)[0].item() == pytest.approx(token_nll(logits, labels)[0].item(), rel=1e-14)


def test_token_nll_computes_in_float32_for_half_precision_logits():
    _, logits, labels = random_logits_and_labels(3, 2, 5, 11)
    total, _ = token_nll(logits.bfloat16(), labels)
    assert total.dtype == torch.float32
    want, _ = ref_token_nll(logits.bfloat16().double(), labels)
    assert total.item() == pytest.approx(want, rel=1e-5)


def test_supervised_loss_without_answer_tokens_is_a_graph_connected_zero():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = supervised_loss(logits, torch.full((2, 4), -100))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert (logits.grad == 0).all()


def test_token_nll_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="B, L, V"):
        token_nll(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))


# ------------------------------------------------------------------------------------------ KL


@SETTINGS
@given(
    seed=seeds,
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    vocab=st.integers(2, 8),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
)
def test_answer_kl_matches_reference(seed, batch, length, vocab, temperature):
    gen, teacher, labels = random_logits_and_labels(seed, batch, length, vocab)
    student = 3 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)
    got = answer_kl(student, teacher, labels, temperature).item()
    assert got == pytest.approx(ref_answer_kl(student, teacher, labels, temperature), rel=1e-9, abs=1e-12)
    assert got >= 0
    assert answer_kl(teacher, teacher, labels, temperature).item() == pytest.approx(0.0, abs=1e-12)


def test_answer_kl_direction_is_teacher_to_student():
    """KL(p || q) != KL(q || p) in general: check the order on one token by hand."""
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    student = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 1]])
    p = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    want = sum(pk * math.log(pk / 0.5) for pk in p)
    assert answer_kl(student, teacher, labels).item() == pytest.approx(want, rel=1e-12)


def test_answer_kl_refuses_mismatched_vocabularies_and_bad_temperatures():
    labels = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        answer_kl(torch.zeros(1, 3, 5), torch.zeros(1, 3, 6), labels)
    with pytest.raises(ValueError, match="temperature"):
        answer_kl(torch.zeros(1, 3, 5), torch.zeros(1, 3, 5), labels, temperature=0.0)


# ------------------------------------------------------------------------------------------ hidden states


def random_hidden(seed: int, batch: int, length: int, student_dim: int, teacher_dim: int):
    gen = torch.Generator().manual_seed(seed)
    valid = torch.rand(batch, length, generator=gen) < 0.7
    valid[:, 0] = True
    student = torch.randn(batch, length, student_dim, generator=gen, dtype=torch.float64)
    teacher = torch.randn(batch, length, teacher_dim, generator=gen, dtype=torch.float64)
    return gen, valid, student, teacher


def ref_hidden_mse(student, teacher, valid, weight=None, bias=None) -> float:
    """Mean over valid (b, t) of mean_d (W s + c - t)_d^2; identity when ``weight`` is None."""
    per_token = []
    for b in range(valid.shape[0]):
        for t in range(valid.shape[1]):
            if not valid[b, t]:
                continue
            s = student[b, t].tolist()
            if weight is not None:
                s = [
                    sum(w * x for w, x in zip(row, s, strict=True)) + c
                    for row, c in zip(weight, bias, strict=True)
                ]
            target = teacher[b, t].tolist()
            per_token.append(sum((x - y) ** 2 for x, y in zip(s, target, strict=True)) / len(target))
    return sum(per_token) / len(per_token)


@SETTINGS
@given(seed=seeds, batch=st.integers(1, 3), length=st.integers(1, 6), dim=st.integers(1, 6))
def test_hidden_mse_without_projection_matches_reference(seed, batch, length, dim):
    _, valid, student, teacher = random_hidden(seed, batch, length, dim, dim)
    projector = HiddenProjector(dim, dim)
    assert isinstance(projector.proj, torch.nn.Identity)
    want = ref_hidden_mse(student, teacher, valid)
    assert hidden_mse(student, teacher, valid, projector).item() == pytest.approx(want, rel=1e-10)
    assert hidden_mse(student, teacher, valid).item() == pytest.approx(want, rel=1e-10)
    assert hidden_mse(teacher, teacher, valid).item() == 0
    assert hidden_mse(3 * student, 3 * teacher, valid).item() == pytest.approx(9 * want, rel=1e-10)


@SETTINGS
@given(
    seed=seeds,
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    dims=st.tuples(st.integers(1, 5), st.integers(1, 5)),
)
def test_hidden_mse_with_projection_matches_reference(seed, batch, length, dims):
    student_dim, teacher_dim = dims
    if student_dim == teacher_dim:
        teacher_dim += 1
    _, valid, student, teacher = random_hidden(seed, batch, length, student_dim, teacher_dim)
    projector = HiddenProjector(student_dim, teacher_dim).double()
    assert isinstance(projector.proj, torch.nn.Linear)
    weight, bias = projector.proj.weight.tolist(), projector.proj.bias.tolist()
    want = ref_hidden_mse(student, teacher, valid, weight, bias)
    assert hidden_mse(student, teacher, valid, projector).item() == pytest.approx(want, rel=1e-10)


def test_hidden_mse_ignores_padding_and_refuses_mismatched_widths():
    _, valid, student, teacher = random_hidden(5, 2, 5, 4, 4)
    valid[1, 2:] = False
    dirty = teacher.clone()
    dirty[1, 2:] = math.nan
    student.requires_grad_()
    value = hidden_mse(student, dirty, valid)
    assert value.item() == pytest.approx(hidden_mse(student, teacher, valid).item())
    (grad,) = torch.autograd.grad(value, student)
    assert torch.isfinite(grad).all() and (grad[1, 2:] == 0).all()
    with pytest.raises(ValueError, match="HiddenProjector"):
        hidden_mse(student, torch.zeros(2, 5, 3, dtype=torch.float64), valid)


def test_hidden_mse_gradcheck_through_the_projector():
    _, valid, student, teacher = random_hidden(6, 2, 4, 3, 2)
    projector = HiddenProjector(3, 2).double()
    student.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: hidden_mse(s, teacher, valid, projector), (student,))
    hidden_mse(student, teacher, valid, projector).backward()
    assert projector.proj.weight.grad is not None and projector.proj.weight.grad.abs().sum() > 0


def test_grouped_hidden_mse_matches_reference():
    gen, valid, _, _ = random_hidden(7, 2, 5, 3, 4)
    students = [torch.randn(2, 5, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    teacher = {k: torch.randn(2, 5, 4, generator=gen, dtype=torch.float64) for k in (1, 2, 3)}
    groups = [[1, 2], [2, 3]]
    projectors = [HiddenProjector(3, 4).double() for _ in range(2)]
    got = grouped_hidden_mse(students, group_targets(teacher, groups), valid, projectors).item()
    want = 0.0
    for student, members, projector in zip(students, groups, projectors, strict=True):
        target = (teacher[members[0]] + teacher[members[1]]) / 2
        weight, bias = projector.proj.weight.tolist(), projector.proj.bias.tolist()
        want += ref_hidden_mse(student, target, valid, weight, bias) / 2
    assert got == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError, match="one projector per student layer"):
        grouped_hidden_mse(students, group_targets(teacher, groups), valid, projectors[:1])
