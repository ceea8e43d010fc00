"""Training configuration: typed sections, YAML files, dotted command-line overrides, errors that name the key.

Defaults are the paper's (appendix D.1): AdamW 5e-5, cosine schedule with 3% warmup and min-lr ratio 0.01, seed 42,
3 epochs, micro-batch 1, gradient accumulation 4, Pi of eq. 26. Layers use the paper's numbering (1..N, embeddings
are layer 0); ``None`` means the paper's choice for the model at hand (1, 1..pen, pen).
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drivekd.data.roles import TVRows
from drivekd.data.schema import CAPABILITIES, AnswerOrder, Capability
from drivekd.errors import DriveKDError
from drivekd.gradients.mixing import DEFAULT_PI
from drivekd.training.precision import low_precision_message


class ConfigError(DriveKDError):
    """A configuration value or key is wrong; the message names the dotted key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class ProcessorConfig(_Section):
    """Image resolution / vision-token budget, applied to the student's and every live teacher's processor alike
    (their token layouts must agree). Qwen2.5-VL / Qwen3-VL: pixels per image (min_pixels, max_pixels);
    InternVL: tiles per image (min_patches, max_patches). Unset: the processor's own setting."""

    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    min_patches: int | None = Field(None, ge=1)
    max_patches: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ProcessorConfig:
        for low, high in (("min_pixels", "max_pixels"), ("min_patches", "max_patches")):
            a, b = getattr(self, low), getattr(self, high)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{low}={a} is above {high}={b}")
        return self


class ModelConfig(_Section):
    family: str = "qwen2_5_vl"
    student: str = "tiny"  # hub id, folder, or "tiny" for an offline tiny model
    teacher: str | None = "tiny"  # one teacher model serving all three capabilities
    teachers: dict[Capability, str] | None = None  # or distinct teacher models per capability
    cache: str | None = None  # a teacher-signal cache folder (drivekd cache-teacher); no teacher in memory
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    # live teachers' weights (frozen, no optimizer state); default: model.dtype
    teacher_dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = None
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    # dtype of the HF folder in each checkpoint (what transformers/vLLM load); native: what the pretrained
    # checkpoint's config declares, else model.dtype. Resume restores the exact working weights either way.
    save_dtype: Literal["native", "float32", "bfloat16", "float16"] = "native"
    # Student parameters left out of training: fnmatch patterns on parameter names ("visual.*"), or the alias
    # vision_tower (the family's vision encoder); a pattern matching nothing is an error (training/freeze.py).
    freeze: list[str] = Field(default_factory=list)
    processor: ProcessorConfig = Field(default_factory=ProcessorConfig)


class DataConfig(_Section):
    train: str = ""
    val: str | None = None  # a JSONL evaluated every run.eval_every steps (training/validation.py)
    image_root: str | None = None  # default: the JSONL's folder
    padding_side: Literal["left", "right"] = "right"
    # mixed: a micro-step holds micro_batch samples drawn from the whole set (appendix D.1's batch);
    # per_capability: micro_batch samples of every capability (needed by gradients.grouping=capability).
    sampler: Literal["mixed", "per_capability"] = "mixed"
    micro_batch: int = Field(1, ge=1)  # samples per micro-step (mixed) or per capability (per_capability)
    capabilities: list[Capability] | None = None  # default: the recipe's
    allow_outside_root: bool = False  # open image paths outside image_root (absolute, ../) too
    # Token limit of a sample (question, images and answer); default: the student's max_position_embeddings.
    max_length: int | None = Field(None, ge=1)
    # A sample over max_length: an error, or skipped and listed.
    overlong: Literal["refuse", "skip"] = "refuse"
    # The supervised text: the short answer then the rationale (DriveBench's layout), or for MCQ and yes/no samples
    # the rationale then a "Final: <answer>" line (a model states what it sees before it chooses; the demo
    # teacher's setting; open answers keep the answer first); rationale_option_first also restates an MCQ's chosen
    # option on a "Chosen:" line before the Final line (the letter then follows the text it labels in the question).
    answer_order: AnswerOrder = "answer_first"


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
    # paper: t-v rows over the text tokens T_b, full-map MSE over the keys a query may attend (eqs. 11-12);
    # reference: the released code's t-v rows over every non-image token and full-map MSE over all keys.
    normalisation: Literal["paper", "reference"] = "paper"

    @property
    def tv_rows(self) -> TVRows:
        """The text queries of t-v blocks this normalisation reads (``TVIndex.of_roles``)."""
        return "non_image" if self.normalisation == "reference" else "text"

    @field_validator("hidden_layer", mode="before")
    @classmethod
    def _layer_name(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value  # `hidden_layer: 1` reads as an int

    @field_validator("pi")
    @classmethod
    def _three_by_three(cls, pi: list[list[float]]) -> list[list[float]]:
        if len(pi) != 3 or any(len(row) != 3 for row in pi) or any(v < 0 for row in pi for v in row):
            raise ValueError("pi must be a 3 x 3 matrix of non-negative weights (rows: batch capability)")
        return pi


class GradientConfig(_Section):
    method: Literal["none", "g1", "g2", "agp"] | None = None  # default: agp for multi, none otherwise
    # teacher: per micro-step one CE anchor and one follower per teacher term (the released code's reading);
    # capability: per-capability anchors and followers, stage 2 across capabilities (docs/gradients.md).
    grouping: Literal["teacher", "capability"] = "teacher"
    # per_follower: each merged gradient is g_sup + f_k' (CE enters once per follower, as released);
    # once: g_sup / K + f_k', so that without conflicts AGP equals no projection (teacher grouping only).
    anchor_share: Literal["per_follower", "once"] = "per_follower"
    refresh_every: int = Field(1, ge=1)  # recompute the projection coefficients every N steps (1 = exact)
    eps: float = 1e-20


REWEIGHT_DEFAULTS = {
    "paper": {"alpha": 1.5, "bounds": (0.05, 20.0)},
    "reference": {"alpha": 0.0, "bounds": (1e-6, 1e6)},
}


class ReweightConfig(_Section):
    enabled: bool = True
    # paper: eq. 25 as written (appendix B.1); reference: the released code's update rule (docs/training.md).
    mode: Literal["paper", "reference"] = "paper"
    lr: float = 3e-4
    alpha: float | None = Field(None, ge=0)  # default: 1.5 (paper), 0 (reference)
    ratios: dict[str, float] = Field(default_factory=dict)  # static p_i per weight name; default 1
    bounds: tuple[float, float] | None = None  # default: (0.05, 20) (paper), (1e-6, 1e6) (reference)
    min_ce_weight: float = Field(0.6, ge=0)  # reference mode: the CE weight is kept >= this

    @model_validator(mode="after")
    def _mode_defaults(self) -> ReweightConfig:
        defaults = REWEIGHT_DEFAULTS[self.mode]
        if self.alpha is None:
            self.alpha = defaults["alpha"]
        if self.bounds is None:
            self.bounds = defaults["bounds"]
        return self


class OptimConfig(_Section):
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = 0.0
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    grad_accum: int = Field(4, ge=1)
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast; fp16 adds dynamic loss scaling
    allow_low_precision_weights: bool = False  # let AdamW train bf16/fp16 weights (no fp32 master copy)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # `mixed_precision: no` in a YAML file reads as false


class RunConfig(_Section):
    output_dir: str = "runs/train"
    seed: int = 42
    log_every: int = Field(1, ge=1)
    save_every: int = Field(50, ge=1)  # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    max_nonfinite_streak: int = 5
    # true: continue from the newest checkpoint in output_dir (refused when it is corrupt or incomplete);
    # latest_valid: from the newest valid one, naming those skipped; false: start afresh (refused over checkpoints)
    resume: bool | Literal["latest_valid"] = True
    # experiment trackers (training/tracking.py): tensorboard (<output_dir>/tensorboard), wandb, mlflow; [] for none
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"]
    )
    eval_every: int = Field(50, ge=1)  # optimizer steps between evaluations on data.val (and after the last)
    eval_max_samples: int = Field(100, ge=1)  # the first N samples of data.val are evaluated
    # the validation metric best/ is kept by: lower is better, higher for an accuracy (val/mcq_accuracy)
    best_metric: str = "val/loss"
    fsdp: bool = False  # shard the student over the processes (FSDP2); otherwise replicate it (DDP)

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_flag(cls, values: Any) -> Any:
        """The earlier ``run.tensorboard: true|false`` reads as ``report_to: [tensorboard]`` / ``[]``, with a warning
        (run records written before report_to keep resuming)."""
        if not isinstance(values, dict) or "tensorboard" not in values:
            return values
        values = dict(values)
        flag = values.pop("tensorboard")
        if "report_to" in values:
            raise ValueError("run.tensorboard and run.report_to are both set: keep run.report_to only")
        warnings.warn(
            f"run.tensorboard is replaced by run.report_to: read run.tensorboard={str(flag).lower()} as "
            f"run.report_to={'[tensorboard]' if flag else '[]'}; write that instead",
            FutureWarning,
            stacklevel=2,
        )
        values["report_to"] = ["tensorboard"] if flag else []
        return values


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
        recipe = self.distill.recipe
        if self.gradients.method == "g1" and recipe in ("sft", "kl", "hidden"):
            raise ValueError(f"gradients.method=g1 projects teacher terms; distill.recipe={recipe} has none")
        if self.gradients.grouping == "capability" and self.data.sampler != "per_capability":
            raise ValueError(
                "gradients.grouping=capability needs data.sampler=per_capability (every micro-step must hold "
                "samples of every capability)"
            )
        no_teacher = self.model.teacher is None and self.model.teachers is None and self.model.cache is None
        if no_teacher and recipe != "sft":
            raise ValueError("model.teacher, model.teachers or model.cache is needed for distillation")
        if self.model.cache is not None and recipe in ("kl", "hidden"):
            raise ValueError(
                f"distill.recipe={recipe} needs teacher {'logits' if recipe == 'kl' else 'hidden states'}, which a "
                "teacher-signal cache does not hold (attention maps only): give model.teacher instead of model.cache"
            )
        if self.run.fsdp and self.model.lora is not None:
            raise ValueError("run.fsdp with model.lora is not supported; train LoRA students data-parallel")
        return self

    @property
    def pooled_window(self) -> bool:
        """Whether window normalisers pool all capabilities (the mixed sampler's mean over the window)."""
        return self.data.sampler == "mixed"

    @model_validator(mode="after")
    def _trainable_precision(self) -> TrainConfig:
        low = self.model.dtype in ("bfloat16", "float16") and self.model.lora is None
        if low and not self.optim.allow_low_precision_weights:
            raise ValueError(low_precision_message(f"model.dtype={self.model.dtype} without model.lora"))
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
