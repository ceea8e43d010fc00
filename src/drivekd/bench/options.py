"""Checks of the benchmarks' --device and --dtype, made before anything is built or a worker is started."""

from __future__ import annotations

import torch

DTYPES = ("float32", "bfloat16", "float16")


def check_device_and_dtype(device: str | None, dtype: str | None) -> None:
    """Raise ``ValueError`` naming the flag when ``device`` is not cpu or an available cuda device, or ``dtype``
    is not one the benchmarks run in (``None`` is the default, cpu / float32)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:<index>, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
