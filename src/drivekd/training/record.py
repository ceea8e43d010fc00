"""The record of a run in its output folder: ``config.yaml`` is written once and never rewritten.

A training run into a folder that already holds a run continues it only when the configs agree outside the keys a
resume may change (:data:`RESUMABLE`: logging, checkpoint cadence and count, trackers, the resume switch itself);
any other difference is refused with the differing keys, whatever ``run.resume`` says, so that neither the old run
nor its record is overwritten. Changes to resumable keys are appended to ``config_history.jsonl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from drivekd.errors import DriveKDError
from drivekd.training.checkpoint import CONFIG_FILE, list_checkpoints
from drivekd.training.config import TrainConfig

RECORD = "config.yaml"  # the run's record in output_dir (each checkpoint keeps a copy, CONFIG_FILE)
HISTORY = "config_history.jsonl"
# Keys that do not change what is trained. optim.max_steps is not one: it sets the lr schedule. Of the evaluation
# keys only the cadence is: another split, sample bound or best metric would make best/ incomparable.
RESUMABLE = frozenset(
    {
        "run.log_every",
        "run.save_every",
        "run.keep_checkpoints",
        "run.report_to",
        "run.eval_every",
        "run.resume",
        "run.output_dir",
    }
)


class RunRecordError(DriveKDError):
    """The output folder holds another run (a different config, or checkpoints that would be overwritten)."""


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}{key}."))
    return out


def config_text(config: TrainConfig) -> str:
    """The config as the record holds it."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _tree(config: TrainConfig) -> dict[str, Any]:
    # Through YAML, as the record is, so that both sides are compared in the same representation.
    return yaml.safe_load(config_text(config))


def _saved_tree(path: Path) -> dict[str, Any]:
    """The recorded config with today's defaults filled in (keys added since it was written compare equal to their
    defaults); as written when it no longer validates."""
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return _tree(TrainConfig.model_validate(raw))
    except ValidationError:
        return raw


def differences(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs, with (saved, new); a key missing on one side is None there."""
    old, now = leaves(saved), leaves(new)
    return {k: (old.get(k), now.get(k)) for k in sorted(old.keys() | now.keys()) if old.get(k) != now.get(k)}


def check_output_dir(config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Refuse to train into a folder holding another run; returns the resumable keys that changed."""
    folder = Path(config.run.output_dir)
    record = folder / RECORD
    checkpoints = list_checkpoints(folder) if folder.is_dir() else []
    unset = "output_dir" not in config.run.model_fields_set
    where = f"{folder}" + (" (run.output_dir is not set, so the default is used)" if unset else "")
    fix = "set run.output_dir to a new folder for a new run"
    if not record.exists() and checkpoints:  # a run folder without its record: the newest checkpoint's copy
        record = checkpoints[-1] / CONFIG_FILE
        if not record.exists():
            raise RunRecordError(
                f"{where} holds {checkpoints[-1].name} but no {RECORD}, so it cannot be told whether it belongs to "
                f"this config: {fix}"
            )
    if not record.exists():
        return {}
    diff = differences(_saved_tree(record), _tree(config))
    changed = {k: v for k, v in diff.items() if k not in RESUMABLE}
    if changed:
        listed = ", ".join(f"{k} ({_show(a)} -> {_show(b)})" for k, (a, b) in changed.items())
        raise RunRecordError(
            f"{where} holds a run with a different config; it is neither resumed nor overwritten. Differing keys: "
            f"{listed}. {fix.capitalize()}, or rerun with the recorded values ({record}) to continue it"
        )
    if checkpoints and config.run.resume is False:
        raise RunRecordError(
            f"{where} holds checkpoints of an earlier run ({checkpoints[-1].name}) and run.resume=false would "
            f"overwrite them: {fix}, or set run.resume=true to continue it"
        )
    return {k: v for k, v in diff.items() if k in RESUMABLE}


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)


def write_record(config: TrainConfig, changed: dict[str, tuple[Any, Any]], step: int) -> None:
    """Write ``config.yaml`` if the folder has none; otherwise log the resumable changes of this start."""
    folder = Path(config.run.output_dir)
    record = folder / RECORD
    if not record.exists():
        record.write_text(config_text(config))
        return
    if changed:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_at_step": step, "changed": changed}
        with (folder / HISTORY).open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
