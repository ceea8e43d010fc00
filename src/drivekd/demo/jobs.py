"""One unit of the demo's parallel work: train one method for one seed (when it is trained), then evaluate it.

Jobs run in worker processes with one torch thread each: the tiny models gain little from intra-op threads, and
one thread per process keeps steps steady when other programs share the cores (two threads spin-waiting against
a busy neighbour were measured 50x slower). Workers write their console output to a log file, not the terminal.
A training run that has no final checkpoint (interrupted) is removed and redone, so its log is never appended to
a partial one.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from drivekd.data.schema import read_jsonl
from drivekd.demo.config import DemoConfig
from drivekd.demo.evaluate import evaluate_model, judge_config
from drivekd.demo.methods import TEACHER, Method, by_name, train_overrides
from drivekd.demo.workspace import Workspace
from drivekd.evaluation.generate import load_model
from drivekd.models.pair import build_tiny_pair
from drivekd.training.config import load_config
from drivekd.training.trainer import train


@dataclass(frozen=True)
class Job:
    """One model to train (when its method is trained) and evaluate; ``drivelm_root`` (the DriveLM sample's
    image folder) also evaluates it on the converted DriveLM questions."""

    method: str
    seed: int | None  # None for the teacher
    root: Path
    config: DemoConfig
    teacher: Path
    judge_url: str
    drivelm_root: Path | None


def init_worker(log: Path) -> None:
    """Worker start-up: one torch thread, stdout and stderr (file descriptors) appended to ``log``."""
    torch.set_num_threads(1)
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def final_checkpoint(ws: Workspace, method: Method, seed: int, steps: int) -> Path:
    return ws.run_dir(method, seed) / f"checkpoint-{steps}" / "student"


def _train(job: Job, method: Method, seed: int) -> tuple[Path, float | None]:
    ws = Workspace(job.root)
    final = final_checkpoint(ws, method, seed, job.config.steps)
    if final.is_dir():
        return final, None
    run_dir = ws.run_dir(method, seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    overrides = train_overrides(
        method, job.config, train=ws.split("train"), teacher=job.teacher, seed=seed, output_dir=run_dir
    )
    train(load_config(None, overrides))
    return final, time.perf_counter() - started


def _model(job: Job, method: Method) -> tuple[PreTrainedModel, ProcessorMixin, dict[str, Any]]:
    """The model to evaluate, trained first when the method is trained; timings of what was done now."""
    if method is TEACHER:
        model, processor = load_model(job.teacher, dtype="float32")
        return model, processor, {}
    if job.seed is None:
        raise ValueError(f"{method.name} needs a seed")
    if method.trained:
        path, seconds = _train(job, method, job.seed)
        model, processor = load_model(path, dtype="float32")
        return model, processor, {"train_s": seconds}
    pair = build_tiny_pair(job.config.family, image_size=job.config.image_size, seed=job.seed)
    return pair.student, pair.student_processor, {}


def run_job(job: Job) -> dict[str, Any]:
    """Train (if needed) and evaluate one model; returns what was timed (``None``: reused from an earlier run)."""
    ws = Workspace(job.root)
    method = by_name(job.method)
    model, processor, timings = _model(job, method)
    splits = [("test", ws.split("test"), ws.data)]
    if job.drivelm_root is not None:
        splits.append(("drivelm", ws.drivelm, job.drivelm_root))
    for split, path, root in splits:
        started = time.perf_counter()
        evaluate_model(
            model,
            processor,
            list(read_jsonl(path, image_root=root)),
            image_root=root,
            folder=ws.eval_dir(method, job.seed, split),
            name=method.name if job.seed is None else f"{method.name} (seed {job.seed})",
            judge=judge_config(job.judge_url, job.config.judge_runs),
            max_new_tokens=job.config.max_new_tokens,
            batch_size=job.config.eval_batch_size,
        )
        timings[f"eval_{split}_s"] = time.perf_counter() - started
    return {"method": job.method, "seed": job.seed, **timings}
