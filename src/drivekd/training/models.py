"""Build the student and the teacher sources a training config asks for.

``"tiny"`` builds an offline tiny pair of the configured family (tests, demo); anything else is a hub id or a
folder loaded with ``from_pretrained``. Teachers are live models (one shared by all capabilities, or one per
capability) or a teacher-signal cache. Every model must be of ``model.family`` (checked from its config before any
weights load); that teachers tokenise like the student is the trainer's check (:meth:`Trainer.check_layouts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.console import Console
from transformers import PreTrainedModel, ProcessorMixin

from drivekd.errors import ModelSourceError
from drivekd.models.families import FamilyAdapter, check_model_source, get_family
from drivekd.models.pair import ModelPair, build_tiny_pair
from drivekd.signals.live import LiveTeacher
from drivekd.signals.types import TeacherSource
from drivekd.training import distributed as dist
from drivekd.training.config import CAPABILITIES, TrainConfig
from drivekd.training.freeze import freeze

console = Console(stderr=True, soft_wrap=True)


@dataclass
class Models:
    family: FamilyAdapter
    student: PreTrainedModel
    processor: ProcessorMixin
    # Teacher name ("perception", "reasoning", "planning", or "base" for the KL / hidden baselines) -> source.
    sources: dict[str, TeacherSource] = field(default_factory=dict)
    teacher_depth: int | None = None
    teacher_width: int | None = None
    teacher_models: list[PreTrainedModel] = field(default_factory=list)
    teacher_processors: list[ProcessorMixin] = field(default_factory=list)  # teacher_models' processors


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _load(
    family: FamilyAdapter, name: str, config: TrainConfig, tiny: ModelPair | None, role: str
) -> tuple[PreTrainedModel, ProcessorMixin]:
    if name == "tiny":
        if tiny is None:
            raise ValueError(
                f"model.{role}='tiny' needs model.student='tiny' too (a tiny pair is built together)"
            )
        return (
            (tiny.teacher, tiny.teacher_processor)
            if role == "teacher"
            else (tiny.student, tiny.student_processor)
        )
    dtype = config.model.teacher_dtype if role == "teacher" else None
    return family.load(name, dtype=_dtype(dtype or config.model.dtype))


def check_families(config: TrainConfig) -> None:
    """Refuse a student or teacher whose saved config is of another family than ``model.family`` (read without
    loading weights): models of different families tokenise differently and cannot be distilled into each other."""
    family = get_family(config.model.family)
    model = config.model
    names = {"model.student": model.student}
    if model.cache is None:
        names |= {"model.teacher": model.teacher} if model.teachers is None else {}
        names |= {f"model.teachers.{k}": v for k, v in (model.teachers or {}).items()}
    for key, name in names.items():
        if not name or name == "tiny":
            continue
        model_type = getattr(check_model_source(name), "model_type", None)
        if model_type not in family.model_types:
            raise ModelSourceError(
                f"{key}={name} is of model type {model_type} but model.family={family.name}: teacher and student must be "
                f"of one family (one tokenizer and token layout), so give a {family.name} model or set model.family "
                "and every model to the other family"
            )


def build_models(config: TrainConfig, device: torch.device | str | None = None) -> Models:
    family = get_family(config.model.family)
    check_families(config)
    tiny = (
        build_tiny_pair(config.model.family, seed=config.run.seed) if config.model.student == "tiny" else None
    )
    student, processor = _load(family, config.model.student, config, tiny, "student")
    budget = config.model.processor.model_dump(exclude_none=True)  # applied to every processor alike
    family.configure_processor(processor, budget)
    if device is None:
        from accelerate import PartialState

        device = PartialState().device  # also joins the process group under accelerate launch / torchrun
    student = student.to(device=device, dtype=_dtype(config.model.dtype)).train()
    if config.model.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = config.model.lora
        student = get_peft_model(
            student,
            LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
            ),
        )
    if config.model.freeze:
        frozen = freeze(student, config.model.freeze, family)
        if dist.rank_and_world()[0] == 0:
            console.print(frozen.summary(sum(p.numel() for p in student.parameters())))
    models = Models(family, student, processor)
    if config.distill.recipe == "sft":
        return models
    names = (
        ["base"]
        if config.distill.recipe in ("kl", "hidden")
        else [t for t in CAPABILITIES if config.distill.recipe in (t, "multi")]
    )
    if config.model.cache is not None:
        from drivekd.signals.cache import CachedTeacher

        source = CachedTeacher(config.model.cache)
        rows = config.distill.tv_rows
        if source.index.tv_rows != rows:
            raise ValueError(
                f"teacher cache {config.model.cache} holds t-v blocks over tv_rows={source.index.tv_rows!r} but "
                f"distill.normalisation={config.distill.normalisation} reads tv_rows={rows!r}: rewrite the cache "
                f"with drivekd cache-teacher --tv-rows {rows}, or train with the normalisation it was made for"
            )
        models.sources = dict.fromkeys(names, source)
        models.teacher_depth = getattr(source, "num_layers", None)
        return models
    paths = config.model.teachers or dict.fromkeys(CAPABILITIES, config.model.teacher)
    loaded: dict[str, LiveTeacher] = {}
    for name in names:
        path = paths["reasoning"] if name == "base" else paths[name]
        if path not in loaded:
            model, teacher_processor = _load(family, path, config, tiny, "teacher")
            family.configure_processor(teacher_processor, budget)
            dtype = _dtype(config.model.teacher_dtype or config.model.dtype)
            model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
            loaded[path] = LiveTeacher(model)
            models.teacher_models.append(model)
            models.teacher_processors.append(teacher_processor)
        models.sources[name] = loaded[path]
    depths = {len(family.decoder_layers(m)) for m in models.teacher_models}
    if len(depths) > 1:
        raise ValueError(
            f"teachers per capability must have the same depth for one layer map, got {sorted(depths)}"
        )
    models.teacher_depth = depths.pop()
    models.teacher_width = family.text_config(models.teacher_models[0]).hidden_size
    return models
