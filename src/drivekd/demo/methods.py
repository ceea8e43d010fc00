"""The methods the demo compares, and the `drivekd train` overrides that make each one.

Reference rows are evaluated, not trained: the teacher and the untrained student (the initialisation every trained
method of that seed starts from). Trained methods differ only in ``distill.recipe`` and ``gradients.method``;
everything else comes from the :class:`~drivekd.demo.config.DemoConfig` and is the same for all of them. The
single-teacher recipes train on their capability's split only and use no projection, as
:mod:`drivekd.training.recipes` defines them; ``multi-*`` is eq. 17 with no projection, G2 or AGP. Online loss
reweighting follows ``DemoConfig.reweight`` for every recipe alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from drivekd.demo.config import DemoConfig


@dataclass(frozen=True)
class Method:
    name: str  # as the report prints it
    recipe: str | None  # distill.recipe; None for the evaluated-only reference rows
    gradients: str | None = None  # gradients.method for the multi-teacher runs
    about: str = ""
    # Seconds per optimizer step measured on 2 CPU cores at the demo's sizes (one thread, micro-batch 1,
    # reweighting off); only used to start the longest jobs first.
    step_cost: float = 0.0

    @property
    def slug(self) -> str:
        """A folder name."""
        return self.name.replace(" (", "-").replace(")", "").replace(" ", "-")

    @property
    def trained(self) -> bool:
        return self.recipe is not None


TEACHER = Method(
    "teacher", None, about="the shipped tiny teacher (evaluated once; it does not depend on the seed)"
)
UNTRAINED = Method("student (untrained)", None, about="the random student every trained method starts from")
SFT = Method("sft", "sft", about="CE on the answer span only (eq. 9)", step_cost=0.07)
MULTI_AGP = Method(
    "multi-agp", "multi", "agp", about="eq. 17 with AGP (eqs. 18-23): the paper's method", step_cost=0.53
)
METHODS: tuple[Method, ...] = (
    UNTRAINED,
    TEACHER,
    SFT,
    Method("kl", "kl", about="CE + token KL to the teacher's answer distribution (baseline)", step_cost=0.11),
    Method(
        "perception",
        "perception",
        about="CE + t-v attention MSE at layer 1 (eq. 13), perception data",
        step_cost=0.06,
    ),
    Method(
        "reasoning",
        "reasoning",
        about="CE + grouped full-attention MSE (eqs. 14-15), reasoning data",
        step_cost=0.06,
    ),
    Method(
        "planning",
        "planning",
        about="CE + t-v attention MSE at the penultimate layer (eq. 16), planning data",
        step_cost=0.06,
    ),
    Method(
        "multi-none",
        "multi",
        "none",
        about="eq. 17, the three teachers' terms mixed by Pi and summed, no projection",
        step_cost=0.19,
    ),
    Method(
        "multi-g2", "multi", "g2", about="eq. 17 with G2 gradient projection (section 4.5)", step_cost=0.53
    ),
    MULTI_AGP,
)
ABLATION = ("multi-none", "multi-g2", "multi-agp")  # the Table-4-style view
# Table 1's "single-teacher" row, as in the paper: each capability's score is taken from the single-teacher recipe
# trained on that capability's split (capability -> method name).
SINGLE_TEACHER = "single-teacher"
SINGLE_TEACHER_PARTS = {"perception": "perception", "reasoning": "reasoning", "planning": "planning"}
TABLE1 = ("student (untrained)", "teacher", "sft", SINGLE_TEACHER, "multi-agp")
DRIVELM_METHODS = ("teacher", "sft", "multi-agp")


def by_name(name: str) -> Method:
    return next(m for m in METHODS if m.name == name)


class RunSettings(Protocol):
    """The training settings a demo run takes from its config (``DemoConfig``, or the teacher's recipe)."""

    family: str
    micro_batch: int
    lr: float
    warmup_ratio: float
    steps: int
    grad_accum: int


def run_overrides(
    settings: RunSettings, *, recipe: str, train: Path, seed: int, output_dir: Path
) -> list[str]:
    """What every demo training run (and the teacher's) sets: data, optimiser, schedule, one final checkpoint."""
    return [
        f"model.family={settings.family}",
        f"data.train={train}",
        f"data.micro_batch={settings.micro_batch}",
        f"distill.recipe={recipe}",
        f"optim.lr={settings.lr}",
        f"optim.warmup_ratio={settings.warmup_ratio}",
        f"optim.max_steps={settings.steps}",
        f"optim.grad_accum={settings.grad_accum}",
        f"run.output_dir={output_dir}",
        f"run.seed={seed}",
        f"run.save_every={settings.steps}",
        "run.keep_checkpoints=1",
        "run.report_to=[]",
    ]


def train_overrides(
    method: Method, config: DemoConfig, *, train: Path, teacher: Path, seed: int, output_dir: Path
) -> list[str]:
    """Dotted `drivekd train` overrides for one run of ``method`` (the same line works on the command line)."""
    if method.recipe is None:
        raise ValueError(f"{method.name} is evaluated, not trained")
    overrides = run_overrides(config, recipe=method.recipe, train=train, seed=seed, output_dir=output_dir)
    overrides += [
        "model.student=tiny",
        f"model.teacher={teacher}",
        f"reweight.enabled={str(config.reweight).lower()}",
    ]
    if method.gradients is not None:
        overrides.append(f"gradients.method={method.gradients}")
    return overrides
