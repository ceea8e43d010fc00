"""`drivekd bench step`: the cost of a multi-teacher Drive-KD optimizer step, one fresh process per variant.

Every variant runs full optimizer steps of the same student. Capability grouping (one sample per capability in one
micro-step, gradient accumulation 1) and teacher grouping (the mixed sampler: one sample per micro-step,
accumulation 3, the same three samples per step for every teacher-grouping variant); both read the teacher from the
cache unless marked live:

* ``sft``: CE only; ``none``: the multi-teacher loss (eq. 17) with no projection (capability grouping);
* ``agp``: exact AGP in Gramian form (one vmapped backward for the Gramian, one backward of sum c_k L_k);
* ``agp_amortised``: AGP whose coefficients are refreshed every ``refresh`` steps;
* ``naive``: AGP from K flattened per-term gradient copies (K backward passes, explicit vectors);
* ``agp_live``: exact AGP with the teacher run live instead of read from the cache;
* ``none_teacher``, ``agp_teacher``, ``agp_teacher_ckpt``: the teacher grouping's plain step, exact AGP, and exact
  AGP under gradient checkpointing (the presets' setting);
* ``naive_teacher``: the released code's algorithm as it runs it: per sample a live teacher forward per teacher,
  K = 1 + teachers backward passes with the graph retained, K full gradient copies, AGP on the copies.

Ratios are wall time and peak-memory growth of one step over the ``sft`` figures; ``checks`` compares each exact
method with its grouping's plain step and naive reference. ``--size large`` is a student as large as the capture
benchmark's (hidden 896, 24 layers, L >= 1200) with one warm-up and two timed steps, the first of which
is also measured for peak memory.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from drivekd.bench.measure import measure
from drivekd.bench.options import check_device_and_dtype
from drivekd.bench.workers import ratios, run_variants, step_time

CAPABILITIES = ("perception", "reasoning", "planning")


@dataclass(frozen=True)
class Variant:
    recipe: str = "multi"
    method: str = "agp"
    grouping: str = "capability"
    amortised: bool = False
    live: bool = False
    checkpointing: bool = False
    naive: bool = False


VARIANT_SETTINGS = {
    "sft": Variant(recipe="sft", method="none"),
    "none": Variant(method="none"),
    "agp": Variant(),
    "agp_amortised": Variant(amortised=True),
    "naive": Variant(method="none", naive=True),
    "agp_live": Variant(live=True),
    "none_teacher": Variant(method="none", grouping="teacher"),
    "agp_teacher": Variant(grouping="teacher"),
    "agp_teacher_ckpt": Variant(grouping="teacher", checkpointing=True),
    "naive_teacher": Variant(method="none", grouping="teacher", naive=True, live=True),
}
VARIANTS = tuple(VARIANT_SETTINGS)


@dataclass(frozen=True)
class StepBenchConfig:
    family: str = "qwen2_5_vl"
    student: tuple[int, int, int, int, int] = (256, 8, 8, 2, 768)  # hidden, layers, heads, kv heads, MLP
    teacher: tuple[int, int, int, int, int] = (384, 12, 12, 4, 1152)
    image_size: tuple[int, int] = (448, 252)  # 144 vision tokens per image
    periods: int = 1  # measured steps = periods x refresh, the same for every variant
    refresh: int = 8
    device: str = "cpu"
    dtype: str = (
        "float32"  # bfloat16 / float16: fp32 student weights under that autocast (the presets' setting)
    )
    samples_per_capability: int | None = None  # cache only this many samples of each capability (large runs)
    measured_steps: int | None = None  # measured steps when not periods x refresh (large runs)
    memory_steps: int | None = (
        None  # the first of the measured steps also measured for peak memory (default: all)
    )
    micro_steps: int = 3  # micro-steps (one sample each) of a teacher-grouping optimizer step
    mixed_only: bool = False  # every variant, SFT included, draws one sample per micro-step (the large size)
    variants: tuple[str, ...] | None = None  # the variants a run measures (default: all)


QUICK = StepBenchConfig(
    student=(64, 4, 4, 2, 128), teacher=(96, 6, 6, 2, 192), image_size=(224, 126), periods=1, refresh=2
)
# As large as the capture benchmark's decoder (Qwen2.5-0.5B-sized), L = 1008 vision tokens + text >= 1200 with one
# 1008 x 784 view. On 2 CPU cores one plain step of one sample takes about half a minute, so the large size measures
# one sample per step, in the teacher grouping (the presets') only, within about 20 minutes.
LARGE = StepBenchConfig(
    student=(896, 24, 14, 2, 4864),
    teacher=(1024, 28, 16, 2, 2816),
    image_size=(1008, 784),
    refresh=8,
    samples_per_capability=1,
    measured_steps=2,
    memory_steps=1,
    micro_steps=1,
    mixed_only=True,
    variants=("sft", "none_teacher", "agp_teacher", "agp_teacher_ckpt", "naive_teacher"),
)
SIZES = {"quick": QUICK, "default": StepBenchConfig(), "large": LARGE}


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
    from drivekd.signals.live import LiveTeacher
    from drivekd.training.config import load_config
    from drivekd.training.models import Models
    from drivekd.training.trainer import Trainer

    settings = VARIANT_SETTINGS[variant]
    pair = _pair(cfg)
    dtype = getattr(torch, cfg.dtype)
    autocast = {"bfloat16": "bf16", "float16": "fp16"}.get(cfg.dtype, "no")
    # Low precision is the compute dtype: the student keeps fp32 master weights, as the presets train it.
    student = pair.student.to(cfg.device, torch.float32 if autocast != "no" else dtype).train()
    models = Models(pair.family, student, pair.student_processor)
    if settings.recipe == "multi":
        if settings.live:
            teacher = pair.teacher.to(cfg.device, dtype).requires_grad_(False)
            # The released code runs the teacher once per teacher term: one source per capability.
            count = 3 if settings.naive else 1
            sources = [LiveTeacher(teacher) for _ in range(count)]
            models.sources = {c: sources[k % count] for k, c in enumerate(CAPABILITIES)}
        else:
            models.sources = dict.fromkeys(
                CAPABILITIES, CachedTeacher(workdir / "cache")
            )  # no teacher in memory
        models.teacher_depth = cfg.teacher[1]
    pair.teacher = None
    mixed = settings.grouping == "teacher" or cfg.mixed_only
    overrides = [
        f"data.train={workdir / 'data' / 'train.jsonl'}",
        f"run.output_dir={workdir / variant}",
        f"distill.recipe={settings.recipe}",
        f"optim.grad_accum={cfg.micro_steps if mixed else 1}",
        f"data.sampler={'mixed' if mixed else 'per_capability'}",
        f"gradients.grouping={'teacher' if cfg.mixed_only else settings.grouping}",
        "run.report_to=[]",
        "run.resume=false",
        "reweight.enabled=false",
        f"gradients.refresh_every={cfg.refresh if settings.amortised else 1}",
        f"model.gradient_checkpointing={str(settings.checkpointing).lower()}",
        f"optim.mixed_precision={autocast}",
    ]
    if settings.recipe == "multi":
        overrides.append(f"gradients.method={settings.method}")
    config = load_config(overrides=overrides)
    samples = list(read_jsonl(workdir / "data" / "train.jsonl"))
    return Trainer(config, samples=samples, models=models)


def _flat_grads(value: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """One backward with the graph kept, and a full flattened copy of the gradient (what the naive code holds)."""
    grads = torch.autograd.grad(value, params, retain_graph=True, materialize_grads=True)
    return torch.cat([g.flatten() for g in grads])


def _apply(trainer: Any, update: torch.Tensor) -> None:
    params = [p for p in trainer.models.student.parameters() if p.requires_grad]
    offset = 0
    for p in params:
        p.grad = update[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    trainer.optimizer.step()


def _naive_step(trainer: Any) -> None:
    """Capability-grouped AGP from explicit per-term gradients: K backward passes, K flattened copies."""
    from drivekd.gradients import agp, stage2_order

    batches = trainer.next_window()
    window = trainer.window_counts(batches)
    params = [p for p in trainer.models.student.parameters() if p.requires_grad]
    trainer.optimizer.zero_grad(set_to_none=True)
    terms = trainer.forward_terms(batches[0], window)
    flat = {(t.name, t.capability): _flat_grads(t.value, params) for t in terms}
    pi = trainer.config.distill.pi
    sup = {c: flat["ce", c] for c in CAPABILITIES}
    distill = {
        c: sum(pi[i][j] * flat[t, c] for j, t in enumerate(CAPABILITIES)) for i, c in enumerate(CAPABILITIES)
    }
    _apply(trainer, agp(sup, distill, stage2_order(trainer.permutations, CAPABILITIES)))


def _naive_teacher_step(trainer: Any) -> None:
    """The released code's step: per sample (micro-step) a live teacher forward per teacher, 1 + teachers
    backward passes with the graph retained, as many full gradient copies, AGP of the teacher grouping on them; the
    projected updates accumulated over the window."""
    from drivekd.gradients import agp_teacher_grouped, stage2_order

    batches = trainer.next_window()
    window = trainer.window_counts(batches)
    params = [p for p in trainer.models.student.parameters() if p.requires_grad]
    trainer.optimizer.zero_grad(set_to_none=True)
    pi = trainer.config.distill.pi
    total = None
    for batch in batches:
        terms = trainer.forward_terms(batch, window)
        flat = {t.name: _flat_grads(t.value, params) for t in terms}
        row = CAPABILITIES.index(terms[0].capability)  # one sample: one capability
        followers = {t: pi[row][j] * flat[t] for j, t in enumerate(CAPABILITIES)}
        update = agp_teacher_grouped(flat["ce"], followers, stage2_order(trainer.permutations, CAPABILITIES))
        total = update if total is None else total + update
    _apply(trainer, total)


NAIVE_MARGIN = 1.25  # headroom over the naive reference's estimated vectors


def _naive_fits(trainer: Any, grouping: str) -> bool:
    """Whether the naive reference's vectors fit in the free memory (an estimate, in copies of the trainable
    parameters): one flattened gradient per term (1 + teachers per sample, for each capability in the capability
    grouping), as many weighted or merged copies, the update and the running total, plus the gradients and the two
    AdamW moments the first optimizer step allocates. The weights and a live teacher are already resident; the
    activations of the backward passes and the allocator's slack are not counted, hence the margin (at the large
    size an estimate of 17.4 GiB let the run start beside another benchmark, and the whole benchmark process was
    gone without output while it ran, most likely killed for memory)."""
    params = sum(p.numel() * p.element_size() for p in trainer.models.student.parameters() if p.requires_grad)
    terms = (1 + len(CAPABILITIES)) * (1 if grouping == "teacher" else len(CAPABILITIES))
    return NAIVE_MARGIN * (2 * terms + 2 + 3) * params < psutil.virtual_memory().available


def run_worker(variant: str, cfg: StepBenchConfig, workdir: Path, mode: str) -> dict[str, Any]:
    """Measure one variant in this process: a warm-up step, then its time (``mode`` time) or peak memory (memory).

    Every variant measures the same optimizer steps, so all variants of a grouping see the same batches. Batches
    differ in cost (answer lengths, kept logit positions), so comparing variants on different steps would compare
    batches, not methods; the amortised variant refreshes its coefficients on one step of every period.
    """
    torch.manual_seed(0)
    trainer = _trainer(variant, cfg, workdir)
    settings = VARIANT_SETTINGS[variant]
    if settings.naive and not _naive_fits(trainer, settings.grouping):
        return {"variant": variant, "measurable": False, "why": "K full gradient copies do not fit in memory"}
    if settings.naive:
        step = _naive_teacher_step if settings.grouping == "teacher" else _naive_step
        work = lambda: step(trainer)  # noqa: E731
    else:
        work = trainer.train_step
    work()  # warm-up (a refresh step for agp_amortised, so the measured periods each hold one refresh)
    count = cfg.measured_steps or cfg.periods * cfg.refresh
    if mode == "memory":
        peaks = [measure(work, trainer.device).peak_bytes for _ in range(cfg.memory_steps or count)]
        return {"variant": variant, "peak_bytes": max(peaks), "step_peak_bytes": peaks}
    results = [measure(work, trainer.device) for _ in range(count)]
    cpu = [r.cpu_seconds for r in results if r.cpu_seconds is not None]
    return {
        "variant": variant,
        "seconds": sum(r.seconds for r in results) / len(results),
        "cpu_seconds": sum(cpu) / len(cpu) if cpu else None,
        "step_seconds": [r.seconds for r in results],
        "step_cpu_seconds": cpu or None,
    }


def prepare(cfg: StepBenchConfig, workdir: Path) -> dict[str, Any]:
    """Synthetic data and the teacher-signal cache shared by the worker processes."""
    from drivekd.data.collate import VLMCollator
    from drivekd.data.header import image_root_for
    from drivekd.data.schema import read_jsonl, write_jsonl
    from drivekd.data.synthetic import generate_split
    from drivekd.signals.cache import write_cache
    from drivekd.training.config import load_config
    from drivekd.training.recipes import attention_needs

    split = generate_split(workdir / "data", n_scenes=4, seed=0, views="single", image_size=cfg.image_size)
    samples = list(read_jsonl(split.path))
    if cfg.samples_per_capability is not None:  # a large run caches (and trains on) only what it measures
        samples = [
            s
            for c in CAPABILITIES
            for s in [x for x in samples if x.capability == c][: cfg.samples_per_capability]
        ]
        write_jsonl(samples, split.path)
    pair = _pair(cfg)
    config = load_config()
    s_depth, t_depth = cfg.student[1], cfg.teacher[1]
    needs = attention_needs(config.distill, config.layers, s_depth, t_depth)
    collate = VLMCollator(
        pair.teacher_processor,
        pair.family.image_token_id(pair.teacher),
        image_root=image_root_for(split.path),
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


def _checks(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The targets: exact AGP vs its grouping's plain step and naive reference, amortised AGP, plain vs SFT."""

    def have(*names: str) -> bool:
        return all(n in results and results[n].get("measurable", True) for n in names)

    def memory(a: str, b: str) -> float:
        return results[a]["peak_bytes"] / results[b]["peak_bytes"]

    def time(a: str, b: str) -> float:
        return step_time(results[a]) / step_time(results[b])

    checks: dict[str, Any] = {}
    plain = "none" if have("none") else "none_teacher"  # the large size measures the teacher grouping only
    if have(plain, "sft"):
        checks["plain_multi_time_vs_sft"] = time(plain, "sft")
        checks["plain_multi_memory_vs_sft"] = memory(plain, "sft")
    if have("agp", "none"):
        checks["agp_memory_vs_plain_multi"] = memory("agp", "none")
    if have("agp", "naive"):
        checks["agp_faster_than_naive"] = step_time(results["agp"]) < step_time(results["naive"])
    if have("agp_amortised", "none"):
        checks["amortised_time_vs_plain_multi"] = time("agp_amortised", "none")
    if have("agp_teacher", "none_teacher"):
        checks["agp_teacher_memory_vs_plain_multi"] = memory("agp_teacher", "none_teacher")
    if have("agp_teacher", "naive_teacher"):
        checks["agp_teacher_faster_than_naive"] = step_time(results["agp_teacher"]) < step_time(
            results["naive_teacher"]
        )
    if have("agp_teacher_ckpt", "none_teacher"):
        checks["agp_teacher_ckpt_memory_vs_plain_multi"] = memory("agp_teacher_ckpt", "none_teacher")
    return checks


def run(cfg: StepBenchConfig, variants: tuple[str, ...] | None = None) -> dict[str, Any]:
    variants = variants or cfg.variants or VARIANTS
    with tempfile.TemporaryDirectory(prefix="drivekd-bench-step-") as tmp:
        workdir = Path(tmp)
        setup = prepare(cfg, workdir)
        results = run_variants(
            "drivekd.bench.step",
            variants,
            json.dumps(asdict(cfg)),
            str(workdir),
            may_not_fit={v for v in variants if VARIANT_SETTINGS[v].naive},
        )
    measured = {v: r for v, r in results.items() if r.get("measurable", True)}
    return {
        "config": asdict(cfg),
        "setup": setup,
        "results": results,
        "ratios": ratios(measured),
        "checks": _checks(results),
        "not_measured": {v: r["why"] for v, r in results.items() if not r.get("measurable", True)},
        "torch": torch.__version__,
    }


def config_for(size: str, **overrides: Any) -> StepBenchConfig:
    """The config of ``size`` (quick | default | large) with the given overrides."""
    if size not in SIZES:
        raise ValueError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    check_device_and_dtype(overrides.get("device"), overrides.get("dtype"))
    return replace(SIZES[size], **{k: v for k, v in overrides.items() if v is not None})


if __name__ == "__main__":
    raw = json.loads(sys.argv[3])
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    print(json.dumps(run_worker(sys.argv[1], StepBenchConfig(**raw), Path(sys.argv[4]), sys.argv[2])))
