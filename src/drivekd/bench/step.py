"""`drivekd bench step`: the cost of a multi-teacher Drive-KD optimizer step, one fresh process per variant.

Every variant runs full optimizer steps of the same student on the same micro-batches (one sample per capability,
gradient accumulation 1) and is compared with a plain SFT step (CE only) measured in the same run:

* ``sft``: CE only; ``none``: the multi-teacher loss (eq. 17) with no projection;
* ``agp``: exact AGP in Gramian form (one vmapped backward for the Gramian, one backward of sum c_k L_k);
* ``agp_amortised``: AGP whose coefficients are refreshed every ``refresh`` steps;
* ``naive``: AGP from K flattened per-term gradient copies (K backward passes, explicit vectors);
* ``agp_live``: exact AGP with the teacher run live instead of read from the cache (all others use the cache).

Ratios are wall time and peak-memory growth of one step over the ``sft`` figures.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from drivekd.bench.measure import measure
from drivekd.bench.workers import ratios, run_variants

VARIANTS = ("sft", "none", "agp", "agp_amortised", "naive", "agp_live")


@dataclass(frozen=True)
class StepBenchConfig:
    family: str = "qwen2_5_vl"
    student: tuple[int, int, int, int, int] = (256, 8, 8, 2, 768)  # hidden, layers, heads, kv heads, MLP
    teacher: tuple[int, int, int, int, int] = (384, 12, 12, 4, 1152)
    image_size: tuple[int, int] = (448, 252)  # 144 vision tokens per image
    periods: int = 1  # measured steps = periods x refresh, the same for every variant
    refresh: int = 8
    device: str = "cpu"
    dtype: str = "float32"


QUICK = StepBenchConfig(
    student=(64, 4, 4, 2, 128), teacher=(96, 6, 6, 2, 192), image_size=(224, 126), periods=1, refresh=2
)


def _pair(cfg: StepBenchConfig) -> Any:
    from drivekd.models.families import TinySize
    from drivekd.models.pair import build_tiny_pair

    def size(shape: tuple[int, int, int, int, int]) -> TinySize:
        hidden, layers, heads, kv, mlp = shape
        return TinySize(hidden=hidden, layers=layers, heads=heads, kv_heads=kv, intermediate=mlp)

    return build_tiny_pair(
        cfg.family, teacher=size(cfg.teacher), student=size(cfg.student), image_size=cfg.image_size, seed=0
    )


def _trainer(variant: str, cfg: StepBenchConfig, workdir: Path) -> Any:
    from drivekd.data.schema import read_jsonl
    from drivekd.signals.cache import CachedTeacher
    from drivekd.training.config import load_config
    from drivekd.training.models import Models
    from drivekd.training.trainer import Trainer

    pair = _pair(cfg)
    dtype = getattr(torch, cfg.dtype)
    student = pair.student.to(cfg.device, dtype).train()
    models = Models(pair.family, student, pair.student_processor)
    recipe = "sft" if variant == "sft" else "multi"
    if recipe == "multi":
        if variant == "agp_live":
            from drivekd.signals.live import LiveTeacher

            source = LiveTeacher(pair.teacher.to(cfg.device, dtype).requires_grad_(False))
        else:
            source = CachedTeacher(workdir / "cache")  # no teacher in memory
        models.sources = dict.fromkeys(("perception", "reasoning", "planning"), source)
        models.teacher_depth = cfg.teacher[1]
    pair.teacher = None
    method = {"none": "none", "naive": "none"}.get(variant, "agp")
    overrides = [
        f"data.train={workdir / 'data' / 'train.jsonl'}",
        f"run.output_dir={workdir / variant}",
        f"distill.recipe={recipe}",
        "optim.grad_accum=1",
        "run.tensorboard=false",
        "run.resume=false",
        "reweight.enabled=false",
        f"gradients.refresh_every={cfg.refresh if variant == 'agp_amortised' else 1}",
    ]
    if recipe == "multi":
        overrides.append(f"gradients.method={method}")
    config = load_config(overrides=overrides)
    samples = list(read_jsonl(workdir / "data" / "train.jsonl"))
    return Trainer(config, samples=samples, models=models)


def _naive_step(trainer: Any) -> None:
    """AGP from explicit per-term gradients: K backward passes, K flattened copies, then the vector algorithm."""
    from drivekd.capture.recorder import AttentionRecorder
    from drivekd.data.roles import TVIndex
    from drivekd.gradients import agp, stage2_order
    from drivekd.training.objective import logit_positions, window_counts

    batch = trainer.collate(trainer.sampler.next()).to(trainer.device)
    window = window_counts([batch], trainer.recipe, trainer.config.distill)
    index = TVIndex.from_masks(batch.roles.text, batch.roles.vision)
    teacher = trainer._teacher_signals(batch, index)
    positions = logit_positions(batch.labels)
    params = [p for p in trainer.models.student.parameters() if p.requires_grad]
    trainer.optimizer.zero_grad(set_to_none=True)
    with AttentionRecorder(trainer.models.student, trainer.plan, grad=True) as recorder:
        recorder.start(index)
        out = trainer.models.student(**batch.inputs, logits_to_keep=positions)
        captured = recorder.collect()
    terms = trainer.objective.terms(batch, index, out.logits, captured, teacher, window, (), positions)
    flat = {}
    for term in terms:
        grads = torch.autograd.grad(term.value, params, retain_graph=True, materialize_grads=True)
        flat[term.name, term.capability] = torch.cat([g.flatten() for g in grads])
    capabilities = ("perception", "reasoning", "planning")
    pi = trainer.config.distill.pi
    sup = {c: flat["ce", c] for c in capabilities}
    distill = {
        c: sum(pi[i][j] * flat[t, c] for j, t in enumerate(capabilities)) for i, c in enumerate(capabilities)
    }
    update = agp(sup, distill, stage2_order(trainer.permutations, capabilities))
    offset = 0
    for p in params:
        p.grad = update[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    trainer.optimizer.step()


def run_worker(variant: str, cfg: StepBenchConfig, workdir: Path) -> dict[str, Any]:
    """Every variant measures the same ``periods x refresh`` optimizer steps, so all see the same batches.

    Batches differ in cost (answer lengths, kept logit positions), so comparing variants on different steps would
    compare batches, not methods; the amortised variant refreshes its coefficients on one step of every period.
    """
    torch.manual_seed(0)
    trainer = _trainer(variant, cfg, workdir)
    step = (lambda: _naive_step(trainer)) if variant == "naive" else trainer._optimizer_step
    step()  # warm-up (a refresh step for agp_amortised, so the measured periods each hold one refresh)
    results = [measure(step, trainer.device) for _ in range(cfg.periods * cfg.refresh)]
    return {
        "variant": variant,
        "seconds": sum(r.seconds for r in results) / len(results),
        "peak_bytes": max(r.peak_bytes for r in results),
        "step_seconds": [r.seconds for r in results],
    }


def prepare(cfg: StepBenchConfig, workdir: Path) -> dict[str, Any]:
    """Synthetic data and the teacher-signal cache shared by the worker processes."""
    from drivekd.data.collate import VLMCollator
    from drivekd.data.schema import read_jsonl
    from drivekd.data.synthetic import generate_split
    from drivekd.signals.cache import write_cache
    from drivekd.training.config import load_config
    from drivekd.training.recipes import Recipe, resolve_layers, teacher_needs

    split = generate_split(workdir / "data", n_scenes=4, seed=0, views="single", image_size=cfg.image_size)
    samples = list(read_jsonl(split.path))
    pair = _pair(cfg)
    config = load_config()
    s_depth, t_depth = cfg.student[1], cfg.teacher[1]
    layers = resolve_layers(config.layers, s_depth, t_depth)
    needs = teacher_needs(Recipe.of(config.distill), layers, config.distill, t_depth, s_depth)
    collate = VLMCollator(
        pair.teacher_processor, pair.family.image_token_id(pair.teacher), image_root=split.path.parent
    )
    report = write_cache(
        pair.teacher.to(getattr(torch, cfg.dtype)),
        samples,
        collate,
        workdir / "cache",
        needs=needs,
        batch_size=4,
        teacher_name="bench-teacher",
        dtype=getattr(torch, cfg.dtype),
    )
    first = collate(samples[:1])
    return {
        "samples": len(samples),
        "cache_bytes": report.bytes_total,
        "length": int(first.inputs["input_ids"].shape[1]),
        "vision_tokens": int(first.roles.vision.sum()),
    }


def run(cfg: StepBenchConfig, variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="drivekd-bench-step-") as tmp:
        workdir = Path(tmp)
        setup = prepare(cfg, workdir)
        results = run_variants("drivekd.bench.step", variants, json.dumps(asdict(cfg)), str(workdir))
    checks = {}
    if {"none", "agp", "naive", "agp_amortised"} <= results.keys():
        plain = results["none"]
        checks = {
            "agp_memory_vs_plain_multi": results["agp"]["peak_bytes"] / plain["peak_bytes"],
            "agp_faster_than_naive": results["agp"]["seconds"] < results["naive"]["seconds"],
            "amortised_time_vs_plain_multi": results["agp_amortised"]["seconds"] / plain["seconds"],
        }
    return {
        "config": asdict(cfg),
        "setup": setup,
        "results": results,
        "ratios": ratios(results),
        "checks": checks,
        "torch": torch.__version__,
    }


def config_for(quick: bool, **overrides: Any) -> StepBenchConfig:
    cfg = QUICK if quick else StepBenchConfig()
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


if __name__ == "__main__":
    raw = json.loads(sys.argv[2])
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    print(json.dumps(run_worker(sys.argv[1], StepBenchConfig(**raw), Path(sys.argv[3]))))
