"""Atomic checkpoints: the student in Hugging Face format plus everything needed to resume bit for bit.

A checkpoint is written into ``checkpoint-N.tmp`` and renamed to ``checkpoint-N`` only when complete, so a run
killed mid-write leaves the previous checkpoint as the newest one. ``trainer_state.pt`` holds the optimizer,
scheduler, RNG, sampler, reweighting, stage-2 permutation generator and counters.

The HF folder ``student`` is written in the save dtype (``model.save_dtype``; native: the dtype the pretrained
checkpoint declares), which is what transformers and vLLM load. When that cast loses anything (fp32 master weights
saved as bf16, say), the exact working values of every cast tensor are kept in ``master_weights.safetensors``, and
resume restores them bit for bit.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
MASTER_FILE = "master_weights.safetensors"  # exact working values of the tensors the HF folder holds cast
_ALIASES = "aliases"  # safetensors metadata: names that share another name's tensor (tied weights)


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
    save_dtype: torch.dtype | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and keep only the ``keep`` newest.

    ``weights``: the full state dict to save instead of the student's own (a sharded student's gathered weights).
    ``save_dtype``: the floating dtype of the HF folder (default: the working dtypes as they are).
    """
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = weights if weights is not None else _saved_state(student)
    cast = _cast(weights, save_dtype)
    lost = {name: tensor for name, tensor in weights.items() if _lossy(tensor.dtype, cast[name].dtype)}
    student.save_pretrained(tmp / "student", state_dict=cast)  # may rename cast's keys in place
    if save_dtype is not None:
        _declare_dtype(tmp / "student" / "config.json", save_dtype)
    if lost:
        _save_exact(lost, tmp / MASTER_FILE)
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


def _saved_state(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the HF folder holds: the whole state dict, or a PEFT student's trainable (adapter) tensors only."""
    state = student.state_dict()
    if not hasattr(student, "peft_config"):
        return state
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in state.items() if name in trainable}


def _storage(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Identifies a tensor's data; ``state_dict`` hands out a new view object per name of a tied weight."""
    return tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()


def _lossy(source: torch.dtype, target: torch.dtype) -> bool:
    return torch.promote_types(source, target) != target


def _cast(weights: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors in ``dtype`` (the same tensor where nothing changes); tied tensors stay one tensor."""
    done: dict[tuple[Any, ...], torch.Tensor] = {}
    out = {}
    for name, tensor in weights.items():
        if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
            out[name] = tensor
            continue
        key = _storage(tensor)
        if key not in done:
            done[key] = tensor.detach().to(dtype)
        out[name] = done[key]
    return out


def _declare_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Make a saved ``config.json`` (and its sub-configs) declare ``dtype``; save_pretrained writes the working one.

    No file: a PEFT adapter folder, whose base model declares its own.
    """
    if not config_file.exists():
        return
    name = str(dtype).removeprefix("torch.")
    tree = json.loads(config_file.read_text())
    for node in [tree, *(v for v in tree.values() if isinstance(v, dict))]:
        if "dtype" in node or node is tree:
            node["dtype"] = name
    config_file.write_text(json.dumps(tree, indent=2, sort_keys=True) + "\n")


def _save_exact(weights: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors of ``weights`` as they are; a tensor under several names (tied) is stored once."""
    from safetensors.torch import save_file

    first: dict[tuple[Any, ...], str] = {}
    stored, aliases = {}, {}
    for name, tensor in weights.items():
        key = _storage(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            stored[name] = tensor.detach().contiguous()
    save_file(stored, str(path), metadata={_ALIASES: json.dumps(aliases)})


def master_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The exact working values a checkpoint's HF folder holds cast, under the student's state-dict names."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = checkpoint / MASTER_FILE
    if not path.exists():
        return {}
    with safe_open(str(path), framework="pt") as handle:
        aliases = json.loads((handle.metadata() or {}).get(_ALIASES, "{}"))
    weights = load_file(str(path))
    weights.update({name: weights[target] for name, target in aliases.items()})
    return weights


@functools.cache
def _declared_dtype(source: str) -> str | None:
    from transformers import AutoConfig

    try:
        dtype = getattr(AutoConfig.from_pretrained(source), "dtype", None)
    except (OSError, ValueError):
        return None
    return None if dtype is None else str(dtype).removeprefix("torch.")


def resolve_save_dtype(save_dtype: str, source: str, working: str) -> torch.dtype:
    """``model.save_dtype`` as a dtype: native is what ``source``'s pretrained config declares, else ``working``."""
    if save_dtype == "native":
        save_dtype = (None if source == "tiny" else _declared_dtype(source)) or working
    return getattr(torch, save_dtype)


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
        _load_exact(student, master_weights(checkpoint))
        return
    student.load_state_dict(saved_weights(student, checkpoint), strict=True)


def _load_exact(student: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy master weights into ``student`` (adapters of a PEFT student); every name must be the student's."""
    if not weights:
        return
    unexpected = student.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise KeyError(f"{MASTER_FILE} holds weights the student does not have: {unexpected[:3]}")


def saved_weights(student: torch.nn.Module, checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's full-model weights under ``student``'s own state-dict names.

    Read through ``from_pretrained``, which undoes the key renaming transformers applies to vision-language
    checkpoints on save, then with the exact master weights in place of the cast ones. A sharded (FSDP2) student's
    class is a wrapper subclass; the model class underneath loads.
    """
    from torch.distributed.fsdp import FSDPModule

    dtype = next(student.parameters()).dtype
    cls = next(c for c in type(student).__mro__ if not issubclass(c, FSDPModule))
    weights = cls.from_pretrained(checkpoint / "student", dtype=dtype).state_dict()
    master = master_weights(checkpoint)
    unknown = sorted(master.keys() - weights.keys())
    if unknown:
        raise KeyError(f"{MASTER_FILE} holds weights the student does not have: {unknown[:3]}")
    weights.update(master)
    return weights
