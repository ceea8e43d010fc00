"""The demo's teacher: a tiny teacher the project trained once and ships as package data, and how it is made.

Training a teacher well takes longer than the demo's budget, so ``drivekd demo make-teacher`` trains a larger
tiny teacher of the demo's family (SFT on a large synthetic train split, same generator as the demo), measures it
on its own acceptance split (a data seed used for nothing else) with the demo's evaluation, once with the images
and once with every image replaced by a flat grey one (it must be looking at the pictures), and writes the
checkpoint (half-precision safetensors, config, processor) with a ``MANIFEST.json`` recording the exact command,
seeds, data, training settings, wall time, commit, versions and the measured scores. Training checkpoints every
``checkpoint_every`` steps under the work folder, so a run killed part-way resumes there (with the training time
already spent counted against the budget). The demo finds the shipped copy with :mod:`importlib.resources`;
``--teacher DIR`` uses another one.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import torch
import transformers
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from drivekd.data.schema import AnswerOrder, Sample, read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.demo.config import DemoConfig
from drivekd.demo.dense import pretrain_vision
from drivekd.demo.evaluate import PREDICTIONS, evaluate_model, judge_config, offline_judge
from drivekd.demo.methods import RunSettings, run_overrides
from drivekd.demo.workspace import WorkspaceError, write_json
from drivekd.evaluation import extract_choice
from drivekd.evaluation.choices import extract_yes_no
from drivekd.evaluation.generate import load_model
from drivekd.evaluation.predictions import read_predictions
from drivekd.models.families import TinySize
from drivekd.models.pair import ModelPair, build_tiny_pair
from drivekd.training.checkpoint import list_checkpoints
from drivekd.training.config import load_config
from drivekd.training.models import Models
from drivekd.training.trainer import Trainer

MANIFEST = "MANIFEST.json"
WEIGHTS = "model.safetensors"
BLANK = (128, 128, 128)  # the flat grey that replaces every image in the blind check
# What "competent" means (issue 15): strict MCQ accuracy overall and per question type with MCQs, yes/no accuracy
# per question type without MCQs, judge average, and the drop in MCQ accuracy when the images are blank.
THRESHOLDS = {
    "mcq_overall": 85.0,
    "mcq_per_type": 70.0,
    "yes_no_per_type": 80.0,
    "judge": 70.0,
    "blind_drop": 30.0,
}


@dataclass(frozen=True)
class TeacherRecipe:
    """How the shipped teacher is made (recorded in its manifest)."""

    family: str = "qwen2_5_vl"
    seed: int = 0  # model initialisation and sampling order
    # The demo's data seed: the demo's train split is a prefix of this one, its test split unseen.
    data_seed: int = 0
    train_scenes: int = 1000
    # The teacher's own acceptance split: split name and seed used for nothing else (not the demo's test split).
    acceptance_seed: int = 15
    acceptance_scenes: int = 70
    image_size: tuple[int, int] = (224, 112)
    # Decoder: head_dim 16 like the tiny pair; the vision tower is wider than the student's.
    hidden: int = 128
    layers: int = 6
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 384
    vision_hidden: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    steps: int = 4000
    # Stop early (keeping that step's checkpoint) past this much training time, summed over resumed runs; None: never.
    train_minutes: float | None = 95.0
    checkpoint_every: int = 100  # a killed run resumes from the last of these
    lr: float = 2e-3
    warmup_ratio: float = 0.05
    micro_batch: int = 8
    grad_accum: int = 1
    threads: int = 1
    # The rationale, the chosen option's text, then "Final: <letter>" (data.answer_order): the model states the
    # facts it sees, then the option text they match, right before the letter that labels that text in the question
    # (a letter first, or a letter straight after the rationale, was not learned: docs/demo.md); room for all.
    answer_order: AnswerOrder = "rationale_option_first"
    max_new_tokens: int = 128
    judge_runs: int = 5
    # First stage (:mod:`drivekd.demo.dense`): the vision tower learns objects' category, colour and motion per
    # token from freshly rendered scenes of its own seed stream, before the SFT; 0 steps: no such stage.
    dense_steps: int = 0
    dense_batch: int = 16
    dense_lr: float = 2e-3
    dense_seed: int = 30

    @property
    def size(self) -> TinySize:
        return tiny_size(self)


class MadeRecipe(RunSettings, Protocol):
    """What :func:`train_sft` reads of the recipe of a shipped demo model (the teacher's, the base student's)."""

    seed: int
    checkpoint_every: int
    train_minutes: float | None


def tiny_size(recipe: Any) -> TinySize:
    """The model shape a recipe names in its fields of :class:`TinySize`'s names."""
    return TinySize(**{f.name: getattr(recipe, f.name) for f in fields(TinySize)})


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


class _BudgetedTrainer(Trainer):
    """The training loop, ending (with its final checkpoint) at the first step past a training-time budget; the
    steps of a resumed run count with the seconds its log recorded (every step is logged)."""

    def __init__(self, *args: Any, budget_seconds: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget_seconds = budget_seconds
        self.spent: float | None = None  # read from the log at the first step, after any resume trimmed it

    def logged_seconds(self) -> float:
        """Training seconds of the steps in the log (every run's, up to the resumed checkpoint)."""
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        return sum(json.loads(line).get("seconds", 0.0) for line in lines if line.strip())

    def train_step(self) -> dict[str, Any]:
        if self.spent is None:
            self.spent = self.logged_seconds()
        record = super().train_step()
        self.spent += record["seconds"]
        if self.budget_seconds is not None and self.spent > self.budget_seconds:
            self.total_steps = self.step  # the loop saves this step's checkpoint and stops
        return record


def train_sft(
    models: Models,
    recipe: MadeRecipe,
    train: Path,
    output_dir: Path,
    *,
    extra: Sequence[str] = (),
    device: torch.device | None = None,
) -> tuple[Path, int, float]:
    """SFT of ``models.student`` (trained in place) on ``train`` with the training loop, checkpointing every
    ``recipe.checkpoint_every`` steps and resuming from the newest checkpoint in ``output_dir``; ``extra`` are more
    config overrides. Returns the final checkpoint, the steps done and the training seconds (over every resumed
    run). ``device``: where the model trains (its own device when None)."""
    if device is not None:
        models.student.to(device)
    overrides = run_overrides(recipe, recipe="sft", train=train, seed=recipe.seed, output_dir=output_dir)
    checkpoints = [f"run.save_every={recipe.checkpoint_every}", "run.log_every=1", "run.resume=true"]
    config = load_config(None, [*overrides, *checkpoints, *extra])
    budget = None if recipe.train_minutes is None else 60 * recipe.train_minutes
    trainer = _BudgetedTrainer(config, models=models, budget_seconds=budget)
    result = trainer.train()
    checkpoint = result.checkpoint or trainer.resume_from  # a rerun of a finished run trains no step
    if checkpoint is None:
        raise WorkspaceError(f"the training in {output_dir} wrote no checkpoint")
    spent = trainer.logged_seconds() if trainer.spent is None else trainer.spent
    return Path(checkpoint), result.steps, spent


def _train(
    recipe: TeacherRecipe, train: Path, output_dir: Path, device: torch.device
) -> tuple[PreTrainedModel, ProcessorMixin, Path, int, float, dict[str, Any] | None]:
    """The dense vision stage when the recipe has one, then SFT of the teacher (:func:`train_sft`); returns the
    model, its processor, the final checkpoint, the SFT steps done, the SFT seconds and the dense stage's report.
    A resumed run whose SFT has a checkpoint keeps the dense report it wrote (the checkpoint holds its weights)."""
    pair = build_tiny_pair(recipe.family, teacher=recipe.size, image_size=recipe.image_size, seed=recipe.seed)
    dense = _dense_stage(recipe, pair, output_dir, device)
    models = Models(pair.family, pair.teacher.train(), pair.teacher_processor)
    checkpoint, steps, spent = train_sft(
        models, recipe, train, output_dir, extra=[f"data.answer_order={recipe.answer_order}"], device=device
    )
    return pair.teacher, pair.teacher_processor, checkpoint, steps, spent, dense


def _dense_stage(
    recipe: TeacherRecipe, pair: ModelPair, output_dir: Path, device: torch.device
) -> dict[str, Any] | None:
    """Run the recipe's dense vision stage (none with 0 steps) and keep its report beside the SFT's folder."""
    if not recipe.dense_steps:
        return None
    report_file = output_dir.parent / "dense-stage.json"
    if report_file.exists() and list_checkpoints(output_dir):
        return json.loads(report_file.read_text())
    pair.teacher.to(device)
    report = run_dense_stage(
        recipe,
        pair,
        progress=lambda step, seconds, scores: print(
            f"dense stage: step {step}/{recipe.dense_steps}, {seconds:.0f} s, held-out token accuracy {scores}",
            file=sys.stderr,
            flush=True,
        ),
    )
    write_json(report_file, report)
    return report


def run_dense_stage(
    recipe: TeacherRecipe,
    pair: ModelPair,
    *,
    progress: Callable[[int, float, dict[str, float]], None] | None = None,
    steps: int | None = None,
    cameras: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """The recipe's dense stage on ``pair``'s teacher (``steps`` and ``cameras`` override it, as the pilot does)."""
    return pretrain_vision(
        pair.teacher.model.visual,
        pair.teacher_processor.image_processor,
        steps=recipe.dense_steps if steps is None else steps,
        batch=recipe.dense_batch,
        lr=recipe.dense_lr,
        seed=recipe.dense_seed,
        image_size=recipe.image_size,
        progress=progress,
        cameras=cameras,
    )


def blank_images(samples: Sequence[Sample], image_root: Path, out: Path) -> Path:
    """A copy of the samples' image tree under ``out`` with every image replaced by a flat grey one of its size."""
    for path in sorted({im.path for s in samples for im in s.images}):
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(image_root / path) as image:
            Image.new("RGB", image.size, BLANK).save(target)
    return out


def _percent(hits: Sequence[bool]) -> float | None:
    return 100.0 * sum(hits) / len(hits) if hits else None


def per_question_type(
    samples: Sequence[Sample], predictions: Mapping[str, str | None], judged: Sequence[Mapping[str, Any]] = ()
) -> dict[str, dict[str, Any]]:
    """Strict MCQ accuracy, yes/no accuracy (each with its count) and judge average per question type (over the runs
    that graded each sample; a sample no run graded is left out)."""
    mcq: dict[str, list[bool]] = defaultdict(list)
    yes_no: dict[str, list[bool]] = defaultdict(list)
    for s in samples:
        qtype, answer = s.meta["question_type"], predictions.get(s.id)
        if s.kind == "mcq":
            mcq[qtype].append(extract_choice(answer, "strict") == s.answer)
        elif s.kind == "yes/no":
            yes_no[qtype].append(extract_yes_no(answer) == extract_yes_no(s.answer))
    types = {s.id: s.meta["question_type"] for s in samples}
    judge: dict[str, list[float]] = defaultdict(list)
    for row in judged:
        graded = [
            score for score in row["scores"] if score is not None
        ]  # None: a failed grading, not a grade
        if graded:
            judge[types[row["id"]]].append(sum(graded) / len(graded))
    out = {}
    for qtype in sorted({s.meta["question_type"] for s in samples}):
        out[qtype] = {
            "mcq_strict_accuracy": _percent(mcq[qtype]),
            "mcq_questions": len(mcq[qtype]),
            "yes_no_accuracy": _percent(yes_no[qtype]),
            "yes_no_questions": len(yes_no[qtype]),
            "judge": sum(judge[qtype]) / len(judge[qtype]) if judge[qtype] else None,
        }
    return out


def acceptance(scores: Mapping[str, Any]) -> dict[str, Any]:
    """Each of issue 15's criteria for a competent teacher: the measured value, its threshold and whether it is
    met; a type without MCQs passes on yes/no accuracy or, failing that, on a judge average of at least 60."""
    checks: dict[str, Any] = {}

    def check(name: str, value: float | None, threshold: float) -> None:
        checks[name] = {
            "value": value,
            "threshold": threshold,
            "met": value is not None and value >= threshold,
        }

    check("mcq_strict_accuracy", scores["mcq_strict_accuracy"], THRESHOLDS["mcq_overall"])
    for qtype, row in scores["per_question_type"].items():
        if row["mcq_questions"]:
            check(f"mcq_strict_accuracy/{qtype}", row["mcq_strict_accuracy"], THRESHOLDS["mcq_per_type"])
        else:
            check(f"yes_no_accuracy/{qtype}", row["yes_no_accuracy"], THRESHOLDS["yes_no_per_type"])
            if not checks[f"yes_no_accuracy/{qtype}"]["met"]:
                check(f"judge/{qtype}", row["judge"], 60.0)
    check("judge_overall", scores["judge_overall"], THRESHOLDS["judge"])
    blind = scores["blind_mcq_strict_accuracy"]
    check("blind_drop", scores["mcq_strict_accuracy"] - blind, THRESHOLDS["blind_drop"])
    met = [c["met"] for name, c in checks.items() if not name.startswith("yes_no_accuracy/") or c["met"]]
    return {"all_met": all(met), "checks": checks}


def measure(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    samples: list[Sample],
    image_root: Path,
    work: Path,
    *,
    max_new_tokens: int,
    judge_runs: int,
) -> dict[str, Any]:
    """The teacher's scores on ``samples``: MCQ, yes/no and judge overall and per question type, and the strict MCQ
    accuracy with every image blank (``blind_mcq_strict_accuracy``)."""
    mcq = [s for s in samples if s.kind == "mcq"]
    blind_root = blank_images(mcq, image_root, work / "blind-images")
    with offline_judge(samples) as url:
        judge = judge_config(url, judge_runs)
        kwargs = {"judge": judge, "max_new_tokens": max_new_tokens, "batch_size": 16}
        report = evaluate_model(
            model, processor, samples, image_root=image_root, folder=work / "eval", name="teacher", **kwargs
        )
        blind = evaluate_model(
            model, processor, mcq, image_root=blind_root, folder=work / "eval-blind", name="blind", **kwargs
        )
    predictions = {k: r.prediction for k, r in read_predictions(work / "eval" / PREDICTIONS).items()}
    judged = report["judge"]
    return {
        "mcq_strict_accuracy": report["mcq"]["strict"]["overall"]["accuracy"],
        "mcq_strict_per_task": {k: v["accuracy"] for k, v in report["mcq"]["strict"].items()},
        "yes_no_accuracy": report["yes_no"]["overall"]["accuracy"],
        "judge_overall": judged["overall"]["mean"],
        "judge_per_capability": {k: v["mean"] for k, v in judged["per_capability"].items()},
        "per_question_type": per_question_type(samples, predictions, report.get("per_sample", [])),
        "blind_mcq_strict_accuracy": blind["mcq"]["strict"]["overall"]["accuracy"],
        "blind": f"the same {len(mcq)} MCQs with every image replaced by a flat grey {BLANK} image",
        "judge": "offline rubric grader over HTTP (drivekd judge serve)",
    }


def checkout_commit() -> str | None:
    """The commit of the checkout that runs this (None outside a git checkout)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def refuse_used_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WorkspaceError(f"{out} exists and is not an empty folder; remove it or choose another --out")


def write_half_precision(model: PreTrainedModel, checkpoint: Path, out: Path) -> None:
    """The trained model in ``out``: the checkpoint's files (config, processor), the weights in float16 (the
    shipped copy stays small)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint / "student", out, dirs_exist_ok=True)
    model.to(torch.float16).save_pretrained(out)


def versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def training_device(name: str) -> torch.device:
    """``cpu`` or ``cuda`` (the first visible GPU), refused with a clear error when that device is not there."""
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch here; train with --device cpu")
    return torch.device(name)


def device_label(device: torch.device, threads: int) -> str:
    """What a manifest records as the device a model was made on."""
    if device.type == "cuda":
        return f"CUDA, {torch.cuda.get_device_name(device)}"
    return f"CPU, {threads} thread(s)"


def make_teacher(
    out: Path, work: Path, recipe: TeacherRecipe, *, command: str, device: str = "cpu"
) -> dict[str, Any]:
    """Train, measure and write the teacher to ``out`` (which must not exist or be empty) on ``device`` (cpu or
    cuda); returns the manifest. Rerun with the same ``work`` folder to resume an interrupted training run."""
    refuse_used_out(out)
    where = training_device(device)
    torch.set_num_threads(recipe.threads)
    commit = checkout_commit()
    started = time.perf_counter()
    data = work / "data"
    train = generate_split(
        data, n_scenes=recipe.train_scenes, seed=recipe.data_seed, image_size=recipe.image_size
    )
    accept = generate_split(
        data,
        n_scenes=recipe.acceptance_scenes,
        seed=recipe.acceptance_seed,
        image_size=recipe.image_size,
        split="acceptance",
    )
    model, processor, checkpoint, steps, trained, dense = _train(recipe, train.path, work / "train", where)
    model = model.eval()
    samples = list(read_jsonl(accept.path))
    scores = measure(
        model,
        processor,
        samples,
        data,
        work,
        max_new_tokens=recipe.max_new_tokens,
        judge_runs=recipe.judge_runs,
    )
    write_half_precision(model, checkpoint, out)
    manifest = {
        "what": "tiny Drive-KD demo teacher: SFT of a tiny Qwen2.5-VL-architecture teacher on the synthetic driving set",
        "command": command,
        "commit": commit,
        "recipe": asdict(recipe),
        "data": {
            "generator": "drivekd.data.synthetic.generate_split",
            "views": "both",
            "train": {
                "scenes": recipe.train_scenes,
                "samples": train.samples,
                "split": "train",
                "seed": recipe.data_seed,
            },
            "test": {
                "scenes": recipe.acceptance_scenes,
                "samples": accept.samples,
                "split": "acceptance",
                "seed": recipe.acceptance_seed,
                "mcq": accept.by_kind["mcq"],
                "yes/no": accept.by_kind["yes/no"],
            },
        },
        "parameters": parameter_count(model),
        "dtype": "float16",
        "dense_stage": dense,
        "steps_done": steps,
        "stopped_by_time_budget": steps < recipe.steps,
        "test_scores": scores,
        "acceptance": acceptance(scores),
        "train_seconds": round(trained, 1),
        "wall_seconds_last_run": round(time.perf_counter() - started, 1),
        "device": device_label(where, recipe.threads),
        "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "sha256": {WEIGHTS: fingerprint(out)},
    }
    write_json(out / MANIFEST, manifest)
    return manifest
