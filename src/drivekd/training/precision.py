"""Which weights AdamW may train: low-precision (bf16/fp16) trainable parameters are refused unless asked for.

bf16 has 8 significant bits, so the spacing of representable numbers just above 1.0 is 2^-7 (0.0078): an AdamW update
of about lr = 5e-5 to a weight near 1.0 rounds away, and without fp32 master weights the student barely trains (the
norm weights never move at the paper's learning rate). The working setting is fp32 weights and optimizer state with
the forward under bf16 autocast (``model.dtype=float32``, ``optim.mixed_precision=bf16``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from drivekd.errors import DriveKDError

LOW_PRECISION = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def low_precision_message(what: str) -> str:
    """Why ``what`` (low-precision trainable weights) is refused, and what to use instead."""
    return (
        f"{what}: AdamW would update bf16/fp16 weights with no fp32 master copy, and bf16's spacing near 1.0 is "
        "2^-7 (0.0078), so updates of about lr 5e-5 round away and the student barely trains; use "
        "model.dtype=float32 with optim.mixed_precision=bf16 (or set optim.allow_low_precision_weights=true to "
        "train them anyway)"
    )


class LowPrecisionWeightsError(DriveKDError):
    """Trainable parameters are bf16/fp16 and ``optim.allow_low_precision_weights`` is false."""


def refuse_low_precision_weights(params: Iterable[torch.Tensor], allowed: bool) -> None:
    """Raise :class:`LowPrecisionWeightsError` when a trainable parameter is bf16/fp16, unless ``allowed``."""
    if allowed:
        return
    dtypes = sorted({LOW_PRECISION[p.dtype] for p in params if p.requires_grad and p.dtype in LOW_PRECISION})
    if dtypes:
        raise LowPrecisionWeightsError(low_precision_message(f"trainable parameters are {'/'.join(dtypes)}"))
