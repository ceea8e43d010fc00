"""Experiment trackers (``run.report_to``) through accelerate's tracker classes, on rank 0 only.

``tensorboard`` writes event files to ``<output_dir>/tensorboard``; ``wandb`` starts a run in the project named after
the output folder, its files under ``<output_dir>/wandb`` (``WANDB_MODE=offline`` keeps it off the network);
``mlflow`` logs to the experiment named after the output folder (``MLFLOW_TRACKING_URI``, default ``./mlruns``).
Every numeric value of a log record is logged at its step; W&B and MLflow also get the run's config as dotted keys.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from drivekd.errors import DriveKDError

TRACKERS = ("tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class TrackerError(DriveKDError):
    """A tracker in ``run.report_to`` cannot start (its package is missing)."""


def _tracker(name: str, output_dir: Path) -> GeneralTracker:
    project = output_dir.resolve().name
    if name == "tensorboard":
        return TensorBoardTracker("tensorboard", output_dir)
    if name == "wandb":
        return WandBTracker(project, dir=str(output_dir))
    return MLflowTracker(experiment_name=project)


class Trackers:
    """The started trackers of a run; ``log`` sends a record's numbers to all of them."""

    def __init__(self, names: Sequence[str], output_dir: Path, config: dict[str, Any]) -> None:
        missing = [n for n in names if importlib.util.find_spec(_PACKAGES[n]) is None]
        if missing:
            raise TrackerError(
                f"run.report_to names {', '.join(missing)}, which is not installed: pip install "
                f"{' '.join(_PACKAGES[n] for n in missing)}, or leave it out of run.report_to"
            )
        self.trackers = [_tracker(name, output_dir) for name in names]
        for tracker in self.trackers:
            tracker.start()
            if (
                tracker.name != "tensorboard"
            ):  # TensorBoard's hparams want a metric; the run folder has config.yaml
                tracker.store_init_configuration(config)

    def log(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        for tracker in self.trackers:
            tracker.log(values, step=record["step"])

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
