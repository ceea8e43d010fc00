"""Which loss group owns which tokens, and the row algebra that lets a Gramian be split by group.

In a Drive-KD micro-step every loss of capability c reads only the batch rows (and their images) of capability c.
So the gradient of a combination of losses restricted to those rows is the gradient of its c-part alone. The engine
exploits this: it backpropagates a few "basis" rows whose c-parts span every row the step needs, and splits each
module's gradient by owner group; the Gramian of any needed row then follows by linear algebra
(:func:`split_rows`). Backpropagating S rows instead of R = (rows per group) x (groups) is what makes the split
engine cheaper than one vmapped row per needed combination.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenOwners:
    """Owner group of every batch row, and how many vision tokens each row holds.

    ``rows``: (B,) group index of each batch row; ``vision``: (B,) vision (image-placeholder) tokens per row, in the
    order the vision encoder receives the images (row by row); ``groups``: number of groups.
    """

    rows: torch.Tensor
    vision: torch.Tensor
    groups: int

    def text(self, length: int) -> torch.Tensor | None:
        """Owners of a text-side module input whose dim 0 is the batch; None when dim 0 is not the batch."""
        return self.rows if length == self.rows.numel() else None

    def packed_vision(self, length: int) -> torch.Tensor | None:
        """Owners along dim 0 of a vision-side input whose length is proportional to the vision tokens.

        A vision encoder sees the images of row 0, then of row 1, ...; its inputs (patches, merged patches, tiles)
        come in the same order, each row's share proportional to its vision tokens. None when ``length`` does not
        split exactly in those proportions (then dim 0 is not a token axis).
        """
        counts = self.vision.to(torch.int64)
        total = int(counts.sum())
        if total == 0 or (counts * length % total).any():
            return None
        return torch.repeat_interleave(self.rows, counts * length // total)


def owners_of(groups_of_rows: list[int], vision_tokens: torch.Tensor, groups: int) -> TokenOwners:
    return TokenOwners(torch.tensor(groups_of_rows, dtype=torch.int64), vision_tokens.detach().cpu(), groups)


@dataclass(frozen=True)
class SplitRows:
    """Basis rows to backpropagate and how the needed rows combine from their group parts.

    ``cotangents``: (S, M) rows over the M losses; ``combine``: (R, G*S) with
    rows[p] = sum_{g,s} combine[p, g*S + s] * (cotangents[s] restricted to the losses of group g).
    """

    cotangents: torch.Tensor
    combine: torch.Tensor

    @property
    def basis(self) -> int:
        return self.cotangents.shape[0]


def split_rows(rows: torch.Tensor, loss_groups: torch.Tensor, groups: int, rtol: float = 1e-12) -> SplitRows:
    """Orthonormal bases of each group's part of ``rows`` (R x M), padded to a common size S.

    S is the largest rank of any group's part, so the engine backpropagates S rows, not R. The bases are scaled by
    the largest singular value overall so that the backpropagated rows keep the magnitude of ``rows`` (fp16 loss
    scaling); ``combine`` undoes the scale.
    """
    rows = rows.to(torch.float64)
    loss_groups = loss_groups.to(torch.int64)
    if rows.dim() != 2 or rows.shape[1] != loss_groups.numel():
        raise ValueError(f"rows must be (R, {loss_groups.numel()}), got {tuple(rows.shape)}")
    if loss_groups.numel() and not (int(loss_groups.min()) >= 0 and int(loss_groups.max()) < groups):
        raise ValueError(f"loss groups must lie in [0, {groups}), got {loss_groups.tolist()}")
    bases = []
    for g in range(groups):
        part = rows[:, loss_groups == g]
        if part.numel() == 0:
            bases.append((part.new_zeros(0, part.shape[1]), part.new_zeros(0)))
            continue
        _, sigma, vh = torch.linalg.svd(part, full_matrices=False)
        keep = sigma > rtol * sigma.max()  # none when the part is all zeros
        bases.append((vh[keep], sigma[keep]))
    size = max(1, max(basis.shape[0] for basis, _ in bases))
    scale = max((float(s.max()) for _, s in bases if s.numel()), default=1.0)
    cotangents = rows.new_zeros(size, rows.shape[1])
    combine = rows.new_zeros(rows.shape[0], groups * size)
    for g, (basis, _) in enumerate(bases):
        columns = (loss_groups == g).nonzero().flatten()
        cotangents[: basis.shape[0], columns] = scale * basis
        combine[:, g * size : g * size + basis.shape[0]] = rows[:, columns] @ basis.T / scale
    return SplitRows(cotangents, combine)
