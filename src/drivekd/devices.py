"""The device a command runs on when none is given: the first CUDA GPU when there is one, else the CPU."""

from __future__ import annotations


def default_device() -> str:
    """``"cuda"`` when torch sees a CUDA device, else ``"cpu"`` (torch is imported here, not at CLI start)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
