"""Atomic, checksummed checkpoints: the student in Hugging Face format plus everything needed to resume bit for bit.

A checkpoint is written into ``checkpoint-N.tmp`` and renamed to ``checkpoint-N`` only when complete, so a run
killed mid-write leaves the previous checkpoint as the newest one. Nothing in it is a pickle: the trainer state
(optimizer, scheduler, RNG, sampler, reweighting, stage-2 permutation generator, counters) is
``trainer_state.safetensors`` plus ``trainer_state.json`` (:mod:`drivekd.training.statefile`), and ``config.yaml`` is
a copy of the run's config. ``manifest.json``, written last, holds the sha256 and size of every other file; a
checkpoint without it, or whose files differ from it, is not resumed (:func:`problem`).

The HF folder ``student`` is written in the save dtype (``model.save_dtype``; native: the dtype the pretrained
checkpoint declares), which is what transformers and vLLM load. When that cast loses anything (fp32 master weights
saved as bf16, say), the exact working values of every cast tensor are kept in ``master_weights.safetensors``, and
resume restores them bit for bit.

Checkpoints of the earlier format (a pickled ``trainer_state.pt``, no manifest) are refused; :func:`migrate` converts
one, reading the pickle with ``torch.load(weights_only=True)``, which runs no code from the file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drivekd.errors import DriveKDError
from drivekd.training import statefile

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
OLD_STATE_FILE = "trainer_state.pt"  # the earlier, pickled format
CONFIG_FILE = "config.yaml"  # the run's config when the checkpoint was written
MANIFEST = "manifest.json"  # sha256 and size of every other file, written last
MASTER_FILE = "master_weights.safetensors"  # exact working values of the tensors the HF folder holds cast
MIGRATE_COMMAND = "drivekd migrate-checkpoint"
_ALIASES = "aliases"  # safetensors metadata: names that share another name's tensor (tied weights)
_NAME = re.compile(r"checkpoint-(\d+)")
BEST = "best"  # the best checkpoint by run.best_metric (training/validation.py), never rotated
BEST_FILE = "best.json"  # in best/: the step and validation metrics it was kept for


class CheckpointError(DriveKDError):
    """A checkpoint cannot be resumed or migrated (corrupt, truncated, incomplete, of the old format)."""


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
    config_text: str | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and keep only the ``keep`` newest.

    ``weights``: the full state dict to save instead of the student's own (a sharded student's gathered weights).
    ``save_dtype``: the floating dtype of the HF folder (default: the working dtypes as they are).
    ``config_text``: the run's config, kept as ``config.yaml`` in the checkpoint.
    """
    final = output_dir / f"checkpoint-{step}"
    tmp = _write(
        output_dir / f"checkpoint-{step}.tmp", student, processor, state, weights, save_dtype, config_text
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(
    output_dir: Path,
    metrics: dict[str, Any],
    student: Any,
    processor: Any,
    state: dict[str, Any],
    weights: dict[str, torch.Tensor] | None = None,
    save_dtype: torch.dtype | None = None,
    config_text: str | None = None,
) -> Path:
    """Write ``best/`` as :func:`save_checkpoint` writes a checkpoint (same contents and manifest, plus
    :data:`BEST_FILE` holding ``metrics``), outside the rotation of ``checkpoint-N`` folders.

    It is written into ``best.tmp``; the old ``best`` is moved to ``best.old`` and the new one renamed into place, so a
    kill leaves a complete ``best`` or a complete ``best.old`` (:func:`best_checkpoint` falls back to it)."""
    final, old = output_dir / BEST, output_dir / f"{BEST}.old"
    extra = {BEST_FILE: json.dumps(metrics, indent=1) + "\n"}
    tmp = _write(
        output_dir / f"{BEST}.tmp", student, processor, state, weights, save_dtype, config_text, extra
    )
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def best_checkpoint(output_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The kept best checkpoint with its metrics (``best``, or ``best.old`` left by a kill mid-swap), if valid."""
    for folder in (output_dir / BEST, output_dir / f"{BEST}.old"):
        if folder.is_dir() and problem(folder) is None and (folder / BEST_FILE).is_file():
            return folder, json.loads((folder / BEST_FILE).read_text())
    return None


def _write(
    tmp: Path,
    student: Any,
    processor: Any,
    state: dict[str, Any],
    weights: dict[str, torch.Tensor] | None = None,
    save_dtype: torch.dtype | None = None,
    config_text: str | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write a complete checkpoint into ``tmp`` (emptied first), its manifest last; ``extra``: more text files."""
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
    statefile.save_state(state, tmp / STATE_TENSORS, tmp / STATE_JSON)
    if config_text is not None:
        (tmp / CONFIG_FILE).write_text(config_text)
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    write_manifest(tmp)
    return tmp


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Folders named ``checkpoint-<N>``, oldest first (not ``checkpoint-N.tmp``, ``best`` or any other name);
    whether each is valid is :func:`problem`'s question."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, leave_out: str | None = None) -> None:
    """Record the sha256 and size of every file under ``folder`` (but ``leave_out``) in its ``manifest.json``."""
    names = [name for name in _files(folder) if name != leave_out]
    files = {
        name: {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size} for name in names
    }
    manifest = {"format": "drivekd-checkpoint", "version": 1, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed (old format, no manifest, a file missing, truncated, changed or not
    listed), or None when every file matches its manifest."""
    manifest = checkpoint / MANIFEST
    if (checkpoint / OLD_STATE_FILE).exists():
        return (
            f"it is in the old format ({OLD_STATE_FILE}, a pickle, which is never loaded): convert it once with "
            f"`{MIGRATE_COMMAND} {checkpoint}`"
        )
    if not manifest.is_file():
        return f"it is incomplete: it has no {MANIFEST} (written last, so the write was interrupted)"
    try:
        listed = json.loads(manifest.read_text())["files"]
        expected = {name: (entry["sha256"], int(entry["bytes"])) for name, entry in listed.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable (corrupt)"
    for name, (digest, size) in sorted(expected.items()):
        path = checkpoint / name
        if not path.is_file():
            return f"it is incomplete: {name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, not the {size} written (truncated or replaced)"
        if _sha256(path) != digest:
            return f"{name} does not match its sha256 checksum (corrupt or changed since it was written)"
    unlisted = sorted(set(_files(checkpoint)) - expected.keys())
    if unlisted:
        return f"it holds files its {MANIFEST} does not list: {', '.join(unlisted[:3])}"
    return None


def resume_point(output_dir: Path, mode: bool | str) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint to resume from under ``run.resume=mode`` and the newer ones skipped with their problems.

    ``True``: the newest checkpoint, refused (:class:`CheckpointError`) when it is not valid; ``"latest_valid"``: the
    newest valid one; ``False``: none.
    """
    found = list_checkpoints(output_dir) if mode is not False else []
    skipped: list[tuple[Path, str]] = []
    for checkpoint in reversed(found):
        why = problem(checkpoint)
        if why is None:
            return checkpoint, skipped
        if mode is True:
            older = "; or set run.resume=latest_valid to resume from the newest valid checkpoint instead"
            raise CheckpointError(f"cannot resume from {checkpoint}: {why}{older}")
        skipped.append((checkpoint, why))
    if skipped:
        listed = "; ".join(f"{c.name}: {why}" for c, why in skipped)
        raise CheckpointError(
            f"{output_dir} holds no valid checkpoint to resume from ({listed}): repair or remove them, or train "
            "into a new run.output_dir"
        )
    return None, skipped


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
    """The trainer state of a checkpoint (check it with :func:`problem` first; resume does)."""
    return statefile.load_state(checkpoint / STATE_TENSORS, checkpoint / STATE_JSON)


def _numpy_globals() -> list[Any]:
    """What a pickled numpy array (numpy's RNG state) needs from ``torch.load(weights_only=True)``: no code runs."""
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def migrate(checkpoint: Path) -> None:
    """Convert a checkpoint of the old format (pickled ``trainer_state.pt``) into this one, in place.

    The pickle is read with ``torch.load(weights_only=True)``, which accepts tensors, containers and numpy arrays
    and refuses anything that would run code; a refused file changes nothing.
    """
    old = checkpoint / OLD_STATE_FILE
    if not old.is_file():
        raise CheckpointError(f"{checkpoint} has no {OLD_STATE_FILE} to migrate")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_globals()):
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before it refuses them
            state = torch.load(old, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler's and the zip reader's errors alike: the file is not usable
        raise CheckpointError(
            f"cannot migrate {checkpoint}: torch.load(weights_only=True) refused {OLD_STATE_FILE}: "
            f"{_unpickler_reason(err)}. Nothing was run or changed; a file that needs more than tensors, containers "
            "and arrays is not a Drive-KD trainer state"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(
            f"cannot migrate {checkpoint}: {OLD_STATE_FILE} is not a Drive-KD trainer state"
        )
    statefile.save_state(state, checkpoint / STATE_TENSORS, checkpoint / STATE_JSON)
    write_manifest(
        checkpoint, leave_out=OLD_STATE_FILE
    )  # until the pickle is gone it stays of the old format
    old.unlink()


def _unpickler_reason(err: Exception) -> str:
    """The line of torch's weights-only error that says what was refused (it wraps it in advice to disable it)."""
    paragraphs = [p.strip() for p in str(err).split("\n\n") if p.strip()]
    middle = [p for p in paragraphs[1:] if not p.startswith("Check the documentation")] or paragraphs[:1]
    reason = " ".join(p.split("WeightsUnpickler error:")[-1].strip() for p in middle)
    return reason.rstrip(".") or type(err).__name__


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
