"""The demo's base student: a small VLM pretrained on another task of the same synthetic world, as the paper's
students are pretrained small VLMs that every method fine-tunes.

``drivekd demo make-student-base`` builds a randomly initialised tiny model of the teacher's family with the
teacher's tokenizer and processor (same image size, same vision-token layout, so teacher signals line up) but a
shallower, narrower decoder with fewer heads and a smaller vision tower (the teacher has at least
``MIN_TEACHER_RATIO`` times its parameters), and trains it with SFT on the describe domain
(:mod:`drivekd.data.synthetic.describe`: open-ended scene descriptions and object lists, none of the eight
driving question types) from a data seed of its own. The answer-token loss and token accuracy on a held-out
describe split are measured before and after. Training checkpoints under the work folder and resumes there, as
the teacher's does; the folder written (half-precision safetensors, config, processor, ``MANIFEST.json``) loads
as ``model.student=<folder>``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from drivekd.data.collate import VLMCollator
from drivekd.data.schema import Sample, read_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.demo.teacher import (
    MANIFEST,
    WEIGHTS,
    TeacherRecipe,
    checkout_commit,
    device_label,
    fingerprint,
    parameter_count,
    refuse_used_out,
    tiny_size,
    train_sft,
    training_device,
    versions,
    write_half_precision,
)
from drivekd.demo.workspace import write_json
from drivekd.losses.supervised import answer_logits
from drivekd.models.families import FamilyAdapter, TinySize
from drivekd.models.pair import ModelPair, build_tiny_pair
from drivekd.training.models import Models

MIN_TEACHER_RATIO = 3.0  # issue 15: the teacher has at least this many times the base student's parameters
DOMAIN = "describe"
PRETRAIN_SPLIT = "pretrain"
HELDOUT_SPLIT = "pretrain-heldout"


@dataclass(frozen=True)
class StudentBaseRecipe:
    """How the shipped base student is made (recorded in its manifest)."""

    family: str = "qwen2_5_vl"
    seed: int = 0  # the pair's initialisation (the student is its second model) and the sampling order
    # Describe scenes from a seed of their own (the demo and the teacher draw driving scenes from 0 and 15).
    data_seed: int = 1000
    pretrain_scenes: int = 600
    heldout_scenes: int = 30
    image_size: tuple[int, int] = (224, 112)  # the teacher's: same processor, same vision-token layout
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 192
    vision_hidden: int = 32
    vision_depth: int = 1
    vision_heads: int = 2
    # Measured about 1.3 s per batch-8 step on one shared thread: about 30 minutes of training.
    steps: int = 1400
    train_minutes: float | None = 40.0  # stop early past this much training time (resumed runs summed)
    checkpoint_every: int = 100
    lr: float = 2e-3
    warmup_ratio: float = 0.05
    micro_batch: int = 8
    grad_accum: int = 1
    threads: int = 1
    eval_batch: int = 8

    @property
    def size(self) -> TinySize:
        return tiny_size(self)


def shipped_student_base() -> Path:
    """The base student folder inside the installed package."""
    return Path(str(resources.files("drivekd.demo").joinpath("assets", "student-base")))


def build_student(recipe: StudentBaseRecipe, teacher: TeacherRecipe) -> ModelPair:
    """A randomly initialised pair of the teacher's shape and the recipe's (one tokenizer and processor)."""
    if (recipe.family, tuple(recipe.image_size)) != (teacher.family, tuple(teacher.image_size)):
        raise ValueError(
            f"the base student ({recipe.family}, {list(recipe.image_size)} images) must share the teacher's "
            f"family and image size ({teacher.family}, {list(teacher.image_size)})"
        )
    return build_tiny_pair(
        recipe.family,
        teacher=teacher.size,
        student=recipe.size,
        image_size=recipe.image_size,
        seed=recipe.seed,
    )


def shape_against_teacher(pair: ModelPair) -> dict[str, Any]:
    """Parameters of the student and the teacher, their ratio, and the shapes that differ."""
    student, teacher = pair.family.text_config(pair.student), pair.family.text_config(pair.teacher)
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads")
    return {
        "parameters": parameter_count(pair.student),
        "teacher_parameters": parameter_count(pair.teacher),
        "teacher_ratio": round(parameter_count(pair.teacher) / parameter_count(pair.student), 2),
        "student_shape": {k: getattr(student, k) for k in keys},
        "teacher_shape": {k: getattr(teacher, k) for k in keys},
    }


@torch.no_grad()
def answer_metrics(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    family: FamilyAdapter,
    samples: Sequence[Sample],
    image_root: Path,
    *,
    batch_size: int,
) -> dict[str, Any]:
    """Mean answer-token cross-entropy and greedy next-token accuracy (teacher forcing) over ``samples``."""
    collate = VLMCollator(processor, family.image_token_id(model), image_root=image_root)
    was_training = model.training
    model.eval()
    loss, hits, tokens = 0.0, 0, 0
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start : start + batch_size]).to(model.device)
        picked, targets = answer_logits(model(**batch.inputs).logits, batch.labels)
        loss += torch.nn.functional.cross_entropy(picked.float(), targets, reduction="sum").item()
        hits += int((picked.argmax(-1) == targets).sum())
        tokens += targets.numel()
    model.train(was_training)
    return {
        "loss": round(loss / tokens, 4),
        "token_accuracy": round(100.0 * hits / tokens, 2),
        "tokens": tokens,
        "samples": len(samples),
    }


def make_student_base(
    out: Path,
    work: Path,
    recipe: StudentBaseRecipe,
    *,
    command: str,
    teacher: TeacherRecipe | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Pretrain the base student on ``device`` (cpu or cuda) and write it to ``out`` (which must not exist or be
    empty); returns the manifest. Rerun with the same ``work`` folder to resume an interrupted training run."""
    refuse_used_out(out)
    where = training_device(device)
    teacher = teacher or TeacherRecipe()
    torch.set_num_threads(recipe.threads)
    commit = checkout_commit()
    started = time.perf_counter()
    data = work / "data"
    common = {"seed": recipe.data_seed, "image_size": recipe.image_size, "domain": DOMAIN}
    pretrain = generate_split(data, n_scenes=recipe.pretrain_scenes, split=PRETRAIN_SPLIT, **common)
    heldout = generate_split(data, n_scenes=recipe.heldout_scenes, split=HELDOUT_SPLIT, **common)
    pair = build_student(recipe, teacher)
    shape = shape_against_teacher(pair)
    held = list(read_jsonl(heldout.path))

    def measure(model: PreTrainedModel) -> dict[str, Any]:
        return answer_metrics(
            model, pair.student_processor, pair.family, held, data, batch_size=recipe.eval_batch
        )

    before = measure(pair.student.to(where))  # the seeded initialisation, also on a resumed run
    models = Models(pair.family, pair.student.train(), pair.student_processor)
    checkpoint, steps, trained = train_sft(
        models, recipe, pretrain.path, work / "train", extra=["data.capabilities=[perception]"]
    )
    after = measure(pair.student)
    write_half_precision(pair.student, checkpoint, out)
    manifest = {
        "what": "tiny Drive-KD demo base student: a small Qwen2.5-VL-architecture VLM pretrained (SFT) on "
        "open-ended descriptions of synthetic driving scenes; every demo method fine-tunes it",
        "command": command,
        "commit": commit,
        "recipe": asdict(recipe),
        "teacher_recipe": {k: v for k, v in asdict(teacher).items() if k in (*asdict(recipe.size), "family")},
        **shape,
        "data": {
            "generator": "drivekd.data.synthetic.generate_split",
            "domain": DOMAIN,
            "views": "both",
            "pretrain": {
                "scenes": recipe.pretrain_scenes,
                "samples": pretrain.samples,
                "split": PRETRAIN_SPLIT,
                "seed": recipe.data_seed,
                "by_question_type": dict(pretrain.by_question_type),
            },
            "heldout": {
                "scenes": recipe.heldout_scenes,
                "samples": heldout.samples,
                "split": HELDOUT_SPLIT,
                "seed": recipe.data_seed,
            },
        },
        "heldout_before": before,
        "heldout_after": after,
        "heldout": "answer-token cross-entropy and next-token accuracy (teacher forcing) on the held-out split",
        "dtype": "float16",
        "steps_done": steps,
        "stopped_by_time_budget": steps < recipe.steps,
        "train_seconds": round(trained, 1),
        "wall_seconds_last_run": round(time.perf_counter() - started, 1),
        "device": device_label(where, recipe.threads),
        "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "sha256": {WEIGHTS: fingerprint(out)},
    }
    write_json(out / MANIFEST, manifest)
    return manifest
