"""Training configuration: typed sections, YAML files, dotted command-line overrides, errors that name the key.

Defaults are the paper's (appendix D.1): AdamW 5e-5, cosine schedule with 3% warmup and min-lr ratio 0.01, seed 42,
3 epochs, micro-batch 1, gradient accumulation 4, Pi of eq. 26. Layers use the paper's numbering (1..N, embeddings
are layer 0); ``None`` means the paper's choice for the model at hand (1, 1..pen, pen).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drivekd.data.schema import CAPABILITIES, Capability
from drivekd.errors import DriveKDError
from drivekd.gradients.mixing import DEFAULT_PI


class ConfigError(DriveKDError):
    """A configuration value or key is wrong; the message names the dotted key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class ModelConfig(_Section):
    family: str = "qwen2_5_vl"
    student: str = "tiny"  # hub id, folder, or "tiny" for an offline tiny model
    teacher: str | None = "tiny"  # one teacher model serving all three capabilities
    teachers: dict[Capability, str] | None = None  # or distinct teacher models per capability
    cache: str | None = None  # a teacher-signal cache folder (drivekd cache-teacher); no teacher in memory
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None


class DataConfig(_Section):
    train: str = ""
    image_root: str | None = None  # default: the JSONL's folder
    padding_side: Literal["left", "right"] = "right"
    micro_batch: int = Field(1, ge=1)  # samples per capability in one micro-step
    capabilities: list[Capability] | None = None  # default: the recipe's


class RoleLayers(_Section):
    perception: int | None = None
    reasoning: tuple[int, int] | None = None  # inclusive paper-layer range
    planning: int | None = None


class LayersConfig(_Section):
    student: RoleLayers = Field(default_factory=RoleLayers)
    teacher: RoleLayers = Field(default_factory=RoleLayers)


class DistillConfig(_Section):
    """Which signal each teacher distils (section 3.3.2; appendix E variants) and how it is compared."""

    recipe: Literal["sft", "kl", "hidden", "perception", "reasoning", "planning", "multi"] = "multi"
    perception_signal: Literal["tv", "full"] = "tv"
    reasoning_signal: Literal["full", "tv"] = "full"
    planning_signal: Literal["tv", "full"] = "tv"
    metric: Literal["mse", "cosine"] = "mse"
    pi: list[list[float]] = Field(default_factory=lambda: [list(row) for row in DEFAULT_PI])  # eq. 26
    kl_temperature: float = Field(1.0, gt=0)
    hidden_layer: Literal["1", "mid", "pen"] = "1"

    @field_validator("pi")
    @classmethod
    def _three_by_three(cls, pi: list[list[float]]) -> list[list[float]]:
        if len(pi) != 3 or any(len(row) != 3 for row in pi) or any(v < 0 for row in pi for v in row):
            raise ValueError("pi must be a 3 x 3 matrix of non-negative weights (rows: batch capability)")
        return pi


class GradientConfig(_Section):
    method: Literal["none", "g1", "g2", "agp"] | None = None  # default: agp for multi, none otherwise
    refresh_every: int = Field(1, ge=1)  # recompute the projection coefficients every N steps (1 = exact)
    eps: float = 1e-20


class ReweightConfig(_Section):
    enabled: bool = True
    lr: float = 3e-4
    alpha: float = 1.5
    ratios: dict[str, float] = Field(default_factory=dict)  # static p_i per weight name; default 1
    bounds: tuple[float, float] = (0.05, 20.0)


class OptimConfig(_Section):
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = 0.0
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    epochs: float = Field(3, gt=0)
    max_steps: int | None = None  # overrides epochs when set
    grad_accum: int = Field(4, ge=1)
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast; fp16 adds dynamic loss scaling

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # `mixed_precision: no` in a YAML file reads as false


class RunConfig(_Section):
    output_dir: str = "runs/train"
    seed: int = 42
    log_every: int = 1
    save_every: int = 50  # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    max_nonfinite_streak: int = 5
    resume: bool = True  # continue from the newest checkpoint in output_dir when there is one
    tensorboard: bool = True
    fsdp: bool = False  # shard the student over the processes (FSDP2); otherwise replicate it (DDP)


class TrainConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    layers: LayersConfig = Field(default_factory=LayersConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    gradients: GradientConfig = Field(default_factory=GradientConfig)
    reweight: ReweightConfig = Field(default_factory=ReweightConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        multi = self.distill.recipe == "multi"
        if self.gradients.method is None:
            # The paper's single-teacher runs use no projection (section 3.3.1).
            self.gradients.method = "agp" if multi else "none"
        elif self.gradients.method in ("g2", "agp") and not multi:
            raise ValueError(f"gradients.method={self.gradients.method} needs distill.recipe=multi")
        no_teacher = self.model.teacher is None and self.model.teachers is None and self.model.cache is None
        if no_teacher and self.distill.recipe != "sft":
            raise ValueError("model.teacher, model.teachers or model.cache is needed for distillation")
        if self.run.fsdp and self.model.lora is not None:
            raise ValueError("run.fsdp with model.lora is not supported; train LoRA students data-parallel")
        return self

    @property
    def capabilities(self) -> list[Capability]:
        if self.data.capabilities is not None:
            return list(self.data.capabilities)
        recipe = self.distill.recipe
        return [recipe] if recipe in CAPABILITIES else list(CAPABILITIES)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, f"{prefix}{name}."))
    return keys


def _parse_value(raw: str) -> Any:
    """A command-line value as YAML, except that only true/false are booleans (YAML 1.1 also reads no/yes/on/off)."""
    value = yaml.safe_load(raw)
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        return raw.strip()
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults) and apply ``key.sub=value`` overrides (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(tree, key.strip(), _parse_value(raw))
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, _known_keys(TrainConfig), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}") from None
        raise ConfigError(f"config key '{key or '<root>'}': {message}") from None


def dump_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
