"""The demo's teacher: a tiny teacher the project trained once and ships as package data, and how it is made.

Training a teacher well takes longer than the demo's budget, so ``drivekd demo make-teacher`` trains the tiny
pair's teacher (SFT on a larger synthetic train split, same generator as the demo), measures it on a synthetic
test split with the demo's own evaluation, and writes the checkpoint (safetensors, config, processor) with a
``MANIFEST.json`` recording the exact command, seeds, data and training settings, versions and the measured
scores. The demo finds the shipped copy with :mod:`importlib.resources`; ``--teacher DIR`` uses another one.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, ProcessorMixin

from drivekd.data.schema import Sample, read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.demo.config import DemoConfig
from drivekd.demo.evaluate import evaluate_model, judge_config, offline_judge
from drivekd.demo.methods import run_overrides
from drivekd.demo.workspace import WorkspaceError, write_json
from drivekd.evaluation.generate import load_model
from drivekd.models.pair import ModelPair, build_tiny_pair
from drivekd.training.config import load_config
from drivekd.training.models import Models
from drivekd.training.trainer import Trainer

MANIFEST = "MANIFEST.json"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class TeacherRecipe:
    """How the shipped teacher is made (recorded in its manifest)."""

    family: str = "qwen2_5_vl"
    seed: int = 0  # model initialisation and sampling order
    data_seed: int = (
        0  # the demo's data seed: the demo's train split is a prefix of this one, its test split unseen
    )
    train_scenes: int = 200
    test_scenes: int = 8
    image_size: tuple[int, int] = (112, 63)
    steps: int = 4000
    lr: float = 2e-3
    warmup_ratio: float = 0.05
    micro_batch: int = 2
    grad_accum: int = 1
    threads: int = 1
    max_new_tokens: int = 64
    judge_runs: int = 5


def shipped_teacher() -> Path:
    """The teacher folder inside the installed package."""
    return Path(str(resources.files("drivekd.demo").joinpath("assets", "teacher")))


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise WorkspaceError(
            f"{folder} has no {MANIFEST}: not a demo teacher (make one with `drivekd demo make-teacher --out DIR`)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def fingerprint(folder: Path) -> str:
    """sha256 of the teacher's weights: a resumed demo must use the same teacher."""
    return hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()


def check_teacher(
    folder: Path, config: DemoConfig, samples: list[Sample], image_root: Path
) -> dict[str, Any]:
    """Refuse a teacher of another family or image size, or one that tokenises differently from the demo's student;
    returns its manifest."""
    manifest = read_manifest(folder)
    made = manifest["recipe"]
    if made["family"] != config.family or tuple(made["image_size"]) != config.image_size:
        raise WorkspaceError(
            f"the teacher in {folder} is a {made['family']} model for {made['image_size']} images; the demo needs "
            f"{config.family} at {list(config.image_size)}"
        )
    model, processor = load_model(folder, dtype="float32")
    student = build_tiny_pair(config.family, image_size=config.image_size)
    pair = ModelPair(student.family, model, student.student, processor, student.student_processor)
    pair.check_layout(samples, image_root)
    return manifest


def _train(recipe: TeacherRecipe, train: Path, output_dir: Path) -> tuple[PreTrainedModel, ProcessorMixin]:
    """SFT of the tiny pair's teacher with the training loop (the teacher is passed as the trained model)."""
    pair = build_tiny_pair(recipe.family, image_size=recipe.image_size, seed=recipe.seed)
    overrides = run_overrides(recipe, recipe="sft", train=train, seed=recipe.seed, output_dir=output_dir)
    config = load_config(None, overrides)
    models = Models(pair.family, pair.teacher.train(), pair.teacher_processor)
    Trainer(config, models=models).train()
    return pair.teacher, pair.teacher_processor


def make_teacher(out: Path, work: Path, recipe: TeacherRecipe, *, command: str) -> dict[str, Any]:
    """Train, measure and write the teacher to ``out`` (which must not exist or be empty); returns the manifest."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WorkspaceError(f"{out} exists and is not an empty folder; remove it or choose another --out")
    torch.set_num_threads(recipe.threads)
    started = time.perf_counter()
    data = work / "data"
    train = generate_split(
        data, n_scenes=recipe.train_scenes, seed=recipe.data_seed, image_size=recipe.image_size
    )
    test = generate_split(
        data, n_scenes=recipe.test_scenes, seed=recipe.data_seed, image_size=recipe.image_size, split="test"
    )
    model, processor = _train(recipe, train.path, work / "train")
    trained = time.perf_counter() - started
    samples = list(read_jsonl(test.path))
    with offline_judge(samples) as url:
        report = evaluate_model(
            model,
            processor,
            samples,
            image_root=data,
            folder=work / "eval",
            name="teacher",
            judge=judge_config(url, recipe.judge_runs),
            max_new_tokens=recipe.max_new_tokens,
            batch_size=16,
        )
    checkpoint = work / "train" / f"checkpoint-{recipe.steps}" / "student"
    shutil.copytree(checkpoint, out, dirs_exist_ok=True)
    judge = report["judge"]
    manifest = {
        "what": "tiny Drive-KD demo teacher: SFT of the tiny pair's teacher on the synthetic driving set",
        "command": command,
        "recipe": asdict(recipe),
        "data": {
            "generator": "drivekd.data.synthetic.generate_split",
            "views": "both",
            "train": {"scenes": recipe.train_scenes, "samples": train.samples, "split": "train"},
            "test": {"scenes": recipe.test_scenes, "samples": test.samples, "split": "test"},
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_scores": {
            "mcq_strict_accuracy": report["mcq"]["strict"]["overall"]["accuracy"],
            "mcq_strict_per_task": {k: v["accuracy"] for k, v in report["mcq"]["strict"].items()},
            "judge_overall": judge["overall"]["mean"],
            "judge_per_capability": {k: v["mean"] for k, v in judge["per_capability"].items()},
            "judge": "offline rubric grader over HTTP (drivekd judge serve)",
        },
        "train_seconds": round(trained, 1),
        "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "sha256": {WEIGHTS: fingerprint(out)},
    }
    write_json(out / MANIFEST, manifest)
    return manifest
