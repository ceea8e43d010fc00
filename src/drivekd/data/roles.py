"""Per-token roles of a collated batch and the text-to-vision index derived from them.

The roles follow the paper: vision tokens are the image placeholder tokens that the vision tower fills; text tokens are
every non-special, non-padding, non-vision token of prompt and answer (eq. 12's T_b); the answer span carries the
labels of eq. 9.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import torch

# Which tokens are the text queries of a text-to-vision block: the paper's T_b (text tokens of prompt and answer)
# or, as the released training code does, every non-padding token that is not a vision token (special tokens too).
TVRows = Literal["text", "non_image"]


@dataclass(frozen=True)
class TokenRoles:
    """Boolean masks of shape (B, L)."""

    vision: torch.Tensor
    text: torch.Tensor
    answer: torch.Tensor
    padding: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """Tokens that are not padding (the attention mask)."""
        return ~self.padding

    def to(self, device: torch.device | str) -> TokenRoles:
        return TokenRoles(*(m.to(device) for m in (self.vision, self.text, self.answer, self.padding)))


@dataclass(frozen=True)
class TVIndex:
    """Which rows (text queries) and columns (vision keys) of the L x L map a text-to-vision block covers.

    Rows of text tokens that precede every vision token of their sample are zero for any causal model, so they are
    left out of the block (``skip_leading``) while ``text_count`` keeps the paper's |T_b| for the normalisation.
    Indices are right-padded with 0 and flagged invalid.
    """

    query_index: torch.Tensor  # (B, Tq) long
    query_valid: torch.Tensor  # (B, Tq) bool
    key_index: torch.Tensor  # (B, Vk) long
    key_valid: torch.Tensor  # (B, Vk) bool
    text_count: torch.Tensor  # (B,) long, |T_b|
    vision_count: torch.Tensor  # (B,) long, |V_b|

    @classmethod
    def from_masks(cls, text: torch.Tensor, vision: torch.Tensor, *, skip_leading: bool = True) -> TVIndex:
        if text.shape != vision.shape or text.dim() != 2:
            raise ValueError(
                f"text and vision masks must both be (B, L), got {tuple(text.shape)}, {tuple(vision.shape)}"
            )
        text, vision = text.bool(), vision.bool()
        if (text & vision).any():
            raise ValueError("a token cannot be both text and vision")
        rows = text
        if skip_leading:
            # A text query can see a vision key only at or after the first vision token of its sample.
            rows = text & (vision.long().cumsum(dim=1) > 0)
        query_index, query_valid = _packed_positions(rows)
        key_index, key_valid = _packed_positions(vision)
        return cls(query_index, query_valid, key_index, key_valid, text.sum(1), vision.sum(1))

    @classmethod
    def of_roles(cls, roles: TokenRoles, rows: TVRows = "text") -> TVIndex:
        """The index of a batch's roles with ``rows`` as its text queries (see :data:`TVRows`)."""
        if rows == "text":
            return cls.from_masks(roles.text, roles.vision)
        if rows == "non_image":
            return cls.from_masks(roles.valid & ~roles.vision, roles.vision)
        raise ValueError(f"text-to-vision rows must be 'text' or 'non_image', got {rows!r}")

    def gather(self, maps: torch.Tensor) -> torch.Tensor:
        """Cut the (B, Tq, Vk) block out of full (B, L, L) maps; invalid entries are zero."""
        rows = torch.gather(maps, 1, self.query_index.unsqueeze(-1).expand(-1, -1, maps.shape[-1]))
        return self.gather_keys(rows)

    def gather_keys(self, rows: torch.Tensor) -> torch.Tensor:
        """Cut the vision-key columns out of (B, Tq, L) query rows; invalid entries are zero."""
        block = torch.gather(rows, 2, self.key_index.unsqueeze(1).expand(-1, rows.shape[1], -1))
        return torch.where(self.pair_mask, block, torch.zeros((), dtype=block.dtype, device=block.device))

    def select(self, rows: torch.Tensor) -> TVIndex:
        """The index of a subset of the batch's samples (block widths are kept)."""
        return self._map(lambda t: t[rows])

    @property
    def pair_mask(self) -> torch.Tensor:
        """(B, Tq, Vk) mask of the valid (query, key) pairs."""
        return self.query_valid.unsqueeze(-1) & self.key_valid.unsqueeze(1)

    def to(self, device: torch.device | str) -> TVIndex:
        return self._map(lambda t: t.to(device))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TVIndex:
        return TVIndex(*(fn(getattr(self, f.name)) for f in fields(self)))


def _packed_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row of a (B, L) mask, left-packed and padded with 0."""
    counts = mask.sum(dim=1)
    width = int(counts.max().item()) if mask.numel() else 0
    # A stable sort on "is not selected" keeps selected positions first and in order.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(valid, order, torch.zeros_like(order)), valid
