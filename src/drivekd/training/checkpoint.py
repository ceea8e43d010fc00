"""Atomic checkpoints: the student in Hugging Face format plus everything needed to resume bit for bit.

A checkpoint is written into ``checkpoint-N.tmp`` and renamed to ``checkpoint-N`` only when complete, so a run
killed mid-write leaves the previous checkpoint as the newest one. ``trainer_state.pt`` holds the optimizer,
scheduler, RNG, sampler, reweighting, stage-2 permutation generator and counters.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    student: Any,
    processor: Any,
    state: dict[str, Any],
    keep: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and keep only the ``keep`` newest.

    ``weights``: the full state dict to save instead of the student's own (a sharded student's gathered weights).
    """
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    student.save_pretrained(tmp / "student", state_dict=weights)
    if processor is not None:
        processor.save_pretrained(tmp / "student")
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_FILE, weights_only=False)


def load_student_weights(student: torch.nn.Module, checkpoint: Path) -> None:
    """Restore trained weights saved by ``save_pretrained`` (full model or PEFT adapter) into ``student``.

    A full model is copied in (so optimizer references stay valid).
    """
    from safetensors.torch import load_file

    folder = checkpoint / "student"
    adapter = folder / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(student, load_file(adapter))
        return
    student.load_state_dict(saved_weights(student, checkpoint), strict=True)


def saved_weights(student: torch.nn.Module, checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's full-model weights under ``student``'s own state-dict names.

    Read through ``from_pretrained``, which undoes the key renaming transformers applies to vision-language
    checkpoints on save. A sharded (FSDP2) student's class is a wrapper subclass; the model class underneath loads.
    """
    from torch.distributed.fsdp import FSDPModule

    dtype = next(student.parameters()).dtype
    cls = next(c for c in type(student).__mro__ if not issubclass(c, FSDPModule))
    return cls.from_pretrained(checkpoint / "student", dtype=dtype).state_dict()
