"""Layer numbering and the layer-group matching of section 3.3.2 (eq. 15)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drivekd.losses import (
    group_targets,
    mid_layers,
    paper_layer_to_index,
    penultimate_layer,
    reasoning_layers,
    teacher_layer_groups,
)

layer_sets = st.lists(st.integers(1, 60), min_size=1, max_size=30, unique=True).map(sorted)


def test_equal_depths_pair_layers_one_to_one():
    layers = [1, 2, 3, 4, 5]
    assert teacher_layer_groups(layers, layers) == [[1], [2], [3], [4], [5]]


def test_fewer_student_layers_slide_a_window_of_m_minus_k_plus_one():
    assert teacher_layer_groups([1, 2, 3], [11, 12, 13, 14, 15]) == [[11, 12, 13], [12, 13, 14], [13, 14, 15]]


def test_more_student_layers_clamp_to_the_last_teacher_layers():
    assert teacher_layer_groups([1, 2, 3, 4, 5], [2, 4, 6]) == [[2], [4], [6], [6], [6]]


def test_groups_use_the_given_layer_numbers_not_positions():
    assert teacher_layer_groups([3, 9], [1, 5, 7]) == [[1, 5], [5, 7]]


def test_paper_ranges_give_the_worked_example():
    """Student N=4 and teacher N=6: reasoning layers 1..3 and 1..5, i.e. K=3, M=5, g=3."""
    assert teacher_layer_groups(reasoning_layers(4), reasoning_layers(6)) == [[1, 2, 3], [2, 3, 4], [3, 4, 5]]


@settings(max_examples=200, deadline=None)
@given(student=layer_sets, teacher=layer_sets)
def test_group_properties(student, teacher):
    groups = teacher_layer_groups(student, teacher)
    k, m = len(student), len(teacher)
    g = max(1, m - k + 1)
    assert len(groups) == k
    starts = []
    for group in groups:
        assert len(group) == g
        start = teacher.index(group[0])
        assert group == teacher[start : start + g]  # consecutive teacher layers, all within the teacher set
        starts.append(start)
    assert starts == sorted(starts)  # s_i nondecreasing
    assert starts[0] == 0
    assert {layer for group in groups for layer in group} == set(teacher)  # every teacher layer is used


@settings(max_examples=200, deadline=None)
@given(student=layer_sets, teacher=layer_sets)
def test_groups_match_the_one_based_formula(student, teacher):
    k, m = len(student), len(teacher)
    g = max(1, m - k + 1)
    want = []
    for i in range(1, k + 1):
        s_i = min(i - 1, m - g)
        want.append([teacher[s_i + r - 1] for r in range(1, g + 1)])  # k_{s_i+1}, ..., k_{s_i+g}
    assert teacher_layer_groups(student, teacher) == want


@pytest.mark.parametrize(
    ("student", "teacher", "message"),
    [
        ([], [1, 2], "student_layers must not be empty"),
        ([1, 2], [], "teacher_layers must not be empty"),
        ([2, 1], [1, 2], "student_layers must be strictly increasing"),
        ([1, 2], [1, 1, 2], "teacher_layers must be strictly increasing"),
    ],
)
def test_invalid_layer_lists_are_refused(student, teacher, message):
    with pytest.raises(ValueError, match=message):
        teacher_layer_groups(student, teacher)


def test_layer_numbering():
    assert paper_layer_to_index(1, 28) == 0
    assert paper_layer_to_index(28, 28) == 27
    assert penultimate_layer(28) == 27
    assert reasoning_layers(5) == [1, 2, 3, 4]
    assert mid_layers(6) == [2, 3, 4]
    assert mid_layers(4) == [2]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: paper_layer_to_index(0, 28), "embeddings"),
        (lambda: paper_layer_to_index(29, 28), r"1\.\.28"),
        (lambda: penultimate_layer(1), "at least 2"),
        (lambda: reasoning_layers(1), "at least 2"),
        (lambda: mid_layers(3), "at least 4"),
    ],
)
def test_invalid_layer_numbers_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_group_targets_average_each_group():
    gen = torch.Generator().manual_seed(0)
    maps = {k: torch.rand(2, 4, 4, generator=gen, dtype=torch.float64) for k in (3, 5, 7)}
    got = group_targets(maps, [[3, 5], [5, 7], [3, 5, 7], [7]])
    for target, members in zip(got, [[3, 5], [5, 7], [3, 5, 7], [7]], strict=True):
        for b in range(2):
            for i in range(4):
                for j in range(4):
                    want = sum(maps[k][b, i, j].item() for k in members) / len(members)
                    assert target[b, i, j].item() == pytest.approx(want, rel=1e-14)
    assert got[3] is maps[7]  # a group of one is not copied


def test_group_targets_name_missing_layers():
    with pytest.raises(KeyError, match=r"\[4\]"):
        group_targets({3: torch.zeros(1)}, [[3, 4]])
    with pytest.raises(ValueError, match="empty"):
        group_targets({3: torch.zeros(1)}, [[]])
