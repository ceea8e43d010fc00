"""Hard-label supervised loss over the answer span (eq. 9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from drivekd.losses.attention import at_least_float32

IGNORE_INDEX = -100


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N, V) logits that predict the N labelled tokens, and those labels (N,).

    Causal shift: the logits at position t predict ``labels[:, t + 1]``; labels equal to -100 are ignored.
    Positions are selected before any upcast, so no float32 vocabulary copy is made for unlabelled positions.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, L, V) and labels (B, L), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    return logits[:, :-1][selected], targets[selected]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed answer-token NLL (in at least float32) and the number of answer tokens.

    Kept apart so that a trainer can divide the sum over accumulated micro-batches by their total count.
    """
    picked, targets = answer_logits(logits, labels)
    return F.cross_entropy(at_least_float32(picked), targets, reduction="sum"), targets.numel()


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_sup (eq. 9): mean NLL over the answer tokens of the batch; a graph-connected 0 if there are none."""
    total, count = token_nll(logits, labels)
    return total / max(count, 1)
