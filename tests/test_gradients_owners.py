"""Owner groups and the row algebra of the split Gramian."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drivekd.gradients.owners import TokenOwners, split_rows


def _restrict(cotangent: torch.Tensor, loss_groups: torch.Tensor, group: int) -> torch.Tensor:
    return cotangent * (loss_groups == group)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 8),
    groups=st.lists(st.integers(0, 3), min_size=1, max_size=10),
    rank=st.integers(1, 8),
    scale=st.sampled_from([1e-6, 1.0, 1e6]),
)
def test_split_rows_rebuild_every_row_from_group_parts(seed, rows, groups, rank, scale):
    generator = torch.Generator().manual_seed(seed)
    loss_groups = torch.tensor(groups)
    n_groups = max(groups) + 1
    # Rows of limited rank, so that some groups need fewer basis rows than there are rows.
    low = torch.randn(rows, rank, dtype=torch.float64, generator=generator)
    matrix = scale * low @ torch.randn(rank, len(groups), dtype=torch.float64, generator=generator)
    split = split_rows(matrix, loss_groups, n_groups)
    size = split.basis
    parts = torch.stack(
        [_restrict(split.cotangents[s], loss_groups, g) for g in range(n_groups) for s in range(size)]
    )
    torch.testing.assert_close(split.combine @ parts, matrix, rtol=1e-10, atol=1e-10 * scale)
    ranks = [
        int(torch.linalg.matrix_rank(matrix[:, loss_groups == g])) if (loss_groups == g).any() else 0
        for g in range(n_groups)
    ]
    assert size == max(1, *ranks)  # never more rows than the widest group needs
    # Each group's basis rows have the norm of the largest group part, so the backpropagated rows keep the
    # magnitude of the input rows (fp16 loss scaling survives the split).
    largest = max(float(torch.linalg.svdvals(matrix[:, loss_groups == g]).max()) for g in set(groups))
    for g, r in enumerate(ranks):
        norms = _restrict(split.cotangents[:r], loss_groups, g).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, largest), rtol=1e-10, atol=0)


def test_split_rows_rejects_bad_shapes_and_groups():
    with pytest.raises(ValueError, match="rows must be"):
        split_rows(torch.ones(2, 3), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="loss groups must lie"):
        split_rows(torch.ones(2, 2), torch.tensor([0, 2]), 2)


def test_packed_vision_owners_follow_each_rows_share_and_refuse_non_token_axes():
    owners = TokenOwners(torch.tensor([2, 0, 1]), torch.tensor([4, 0, 8]), 3)
    assert owners.text(3).tolist() == [2, 0, 1]
    assert owners.text(4) is None
    # Patches (x4), merged tokens (x1) and tiles (/4) keep the rows' order and proportions.
    assert owners.packed_vision(48).tolist() == [2] * 16 + [1] * 32
    assert owners.packed_vision(12).tolist() == [2] * 4 + [1] * 8
    assert owners.packed_vision(3).tolist() == [2, 1, 1]
    assert owners.packed_vision(4) is None  # 4 * 4 / 12 is not whole: not a token axis
    assert TokenOwners(torch.tensor([0]), torch.tensor([0]), 1).packed_vision(5) is None
