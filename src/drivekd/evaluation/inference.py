"""`drivekd bench inference`: deployment metrics of a teacher and a student side by side (appendix D.2).

Each model runs in a fresh process on the same requests (DriveBench-like six-camera samples, batch size 1):

* peak memory: the memory in use when the run starts (weights, buffers) plus the peak growth measured by
  :func:`drivekd.bench.measure.measure` over the generation run; on GPU ``max_memory_allocated`` summed over
  devices (tensor memory, not the CUDA context), on CPU the peak resident set size;
* average generation throughput, eq. 27: new tokens (prompt tokens excluded) / total generation time, with every
  request generating exactly ``max_new_tokens`` greedy tokens so the models do the same work;
* median time to first token, eq. 28: the median over repeated ``generate(max_new_tokens=1)`` calls.

Ratios are oriented so that > 1 favours the student: teacher/student memory, student/teacher throughput,
teacher/student TTFT. ``--quick`` runs a tiny random pair on CPU; presets build random-weight models of the
paper's sizes (InternVL3-1B/8B-like, Qwen2.5-VL-3B/7B-like) for GPU runs. A vLLM back end (GPU, when installed)
measures throughput and TTFT of the same requests; its memory is its pre-allocated pool, so none is reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import psutil
import torch
from transformers import PreTrainedModel, ProcessorMixin

from drivekd.bench.measure import WORKER_ENV, measure
from drivekd.data.collate import VLMCollator
from drivekd.data.header import image_root_for
from drivekd.data.schema import Sample, read_jsonl
from drivekd.evaluation.generate import (
    checkpoint_family,
    count_new_tokens,
    eos_token_ids,
    load_model,
    vllm_available,
    vllm_request,
)
from drivekd.models.families import FamilyAdapter, TinySize, family_of, get_family
from drivekd.models.pair import build_tiny_pair

GB = 1e9


@dataclass(frozen=True)
class Preset:
    """A random-weight model with a paper model's decoder, vocabulary and vision-tower sizes."""

    family: str
    text: TinySize
    vocab: int
    tie_embeddings: bool
    vision: dict[str, Any]
    image_size: tuple[int, int]


PRESETS: dict[str, Preset] = {
    "internvl3-1b": Preset(
        "internvl",
        TinySize(896, 24, 14, 2, 4864, 1024, 24, 16),
        151674,
        False,  # InternVL3-1B keeps an untied output head (0.94B parameters)
        {"intermediate_size": 4096},
        (448, 448),
    ),
    "internvl3-8b": Preset(
        "internvl",
        TinySize(3584, 28, 28, 4, 18944, 1024, 24, 16),
        151674,
        False,
        {"intermediate_size": 4096},
        (448, 448),
    ),
    "qwen2.5-vl-3b": Preset(
        "qwen2_5_vl",
        TinySize(2048, 36, 16, 2, 11008, 1280, 32, 16),
        151936,
        True,
        {"intermediate_size": 3420, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
        (448, 252),
    ),
    "qwen2.5-vl-7b": Preset(
        "qwen2_5_vl",
        TinySize(3584, 28, 28, 4, 18944, 1280, 32, 16),
        152064,
        False,
        {"intermediate_size": 3420, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
        (448, 252),
    ),
}
PRESET_PAIRS = {
    "internvl3": ("internvl3-8b", "internvl3-1b"),
    "qwen2.5-vl": ("qwen2.5-vl-7b", "qwen2.5-vl-3b"),
}


def preset_config(name: str) -> tuple[FamilyAdapter, Any, ProcessorMixin]:
    """The family, config and processor of a preset (the offline tokenizer; token ids are what matter here)."""
    preset = PRESETS[name]
    family = get_family(preset.family)
    tokenizer = family.tiny_tokenizer()
    config = family.tiny_config(preset.text, tokenizer, preset.image_size)
    text = config.get_text_config()
    text.vocab_size = preset.vocab
    text.max_position_embeddings = 32768
    text.tie_word_embeddings = config.tie_word_embeddings = preset.tie_embeddings
    for key, value in preset.vision.items():
        setattr(config.vision_config, key, value)
    return family, config, family.tiny_processor(tokenizer, preset.image_size)


def build_preset(name: str, *, device: str, dtype: torch.dtype) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A preset with random weights, created directly on ``device`` in ``dtype``."""
    family, config, processor = preset_config(name)
    with torch.device(device):
        model = family.model_cls._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.eval(), processor


@dataclass(frozen=True)
class ModelSpec:
    """Which model to measure: a tiny pair member, a preset, or a checkpoint (hub id or folder)."""

    name: str
    kind: Literal["tiny", "preset", "path"]
    family: str | None = None
    role: Literal["teacher", "student"] = "student"
    preset: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class InferenceBenchConfig:
    samples: str | None = None  # a Drive-KD JSONL; None: a synthetic six-camera split made for the run
    n_samples: int = 8
    max_new_tokens: int = 64
    ttft_runs: int = 10
    device: str = "cpu"
    dtype: str = "float32"
    backend: Literal["hf", "vllm"] = "hf"
    threads: int | None = None  # CPU threads of each worker (None: torch's default)


QUICK = InferenceBenchConfig(n_samples=3, max_new_tokens=16, ttft_runs=5)


def throughput(new_tokens: Sequence[int], seconds: Sequence[float]) -> float:
    """Eq. 27: total generated tokens (prompt excluded) / total generation time."""
    total = sum(seconds)
    return sum(new_tokens) / total if total > 0 else 0.0


def median_ttft(times: Sequence[float]) -> float:
    """Eq. 28: the median of the times of repeated one-token generations."""
    return float(statistics.median(times))


def _build(spec: ModelSpec, device: str, dtype: torch.dtype) -> tuple[PreTrainedModel, ProcessorMixin]:
    if spec.kind == "tiny":
        pair = build_tiny_pair(spec.family or "qwen2_5_vl")
        model = pair.teacher if spec.role == "teacher" else pair.student
        return model.to(device=device, dtype=dtype).eval(), pair.student_processor
    if spec.kind == "preset":
        return build_preset(spec.preset or "", device=device, dtype=dtype)
    return load_model(spec.path or "", device=device, dtype=str(dtype).removeprefix("torch."))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _in_use(device: torch.device) -> int:
    if device.type == "cuda":
        return sum(torch.cuda.memory_allocated(d) for d in range(torch.cuda.device_count()))
    return psutil.Process().memory_info().rss


def _hf_worker(
    spec: ModelSpec, cfg: InferenceBenchConfig, samples: list[Sample], root: Path
) -> dict[str, Any]:
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    model, processor = _build(spec, cfg.device, dtype)
    image_token = family_of(model).image_token_id(model)
    collate = VLMCollator(processor, image_token, image_root=root, padding_side="left", with_answer=False)
    requests = []
    for sample in samples:
        inputs = collate([sample]).inputs
        requests.append(
            {
                k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device)
                for k, v in inputs.items()
            }
        )
    eos_ids = eos_token_ids(model)

    def generate(inputs: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.no_grad():
        generate(requests[0], 2)  # warm-up: kernels, allocator, caches
        tokens: list[int] = []
        seconds: list[float] = []

        def run() -> None:
            for inputs in requests:
                _sync(device)
                start = time.perf_counter()
                out = generate(inputs, cfg.max_new_tokens)
                _sync(device)
                seconds.append(time.perf_counter() - start)
                tokens.extend(count_new_tokens(out[:, inputs["input_ids"].shape[1] :].cpu(), eos_ids))

        before = _in_use(device)
        measured = measure(run, device)
        ttft = []
        for k in range(cfg.ttft_runs):
            inputs = requests[k % len(requests)]
            _sync(device)
            start = time.perf_counter()
            generate(inputs, 1)
            _sync(device)
            ttft.append(time.perf_counter() - start)
    return {
        "name": spec.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "peak_memory_bytes": before + measured.peak_bytes,
        "peak_memory_gb": (before + measured.peak_bytes) / GB,
        "prompt_tokens_mean": statistics.mean(int(r["input_ids"].shape[1]) for r in requests),
        "gen_tokens": sum(tokens),
        "gen_seconds": sum(seconds),
        "throughput_tok_s": throughput(tokens, seconds),
        "ttft_s_median": median_ttft(ttft),
        "ttft_runs_s": ttft,
    }


def _vllm_worker(
    spec: ModelSpec, cfg: InferenceBenchConfig, samples: list[Sample], root: Path
) -> dict[str, Any]:
    """Throughput and TTFT with vLLM (untested on the CPU-only project machine). A preset is served with random
    (``load_format="dummy"``) weights from its saved config and processor."""
    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as folder:
        if spec.kind == "preset":
            family, config, processor = preset_config(spec.preset or "")
            config.architectures = [family.model_cls.__name__]
            config.save_pretrained(folder)
            processor.save_pretrained(folder)
            llm = LLM(model=folder, load_format="dummy", dtype=cfg.dtype, limit_mm_per_prompt={"image": 6})
        elif spec.kind == "path":
            processor = checkpoint_family(spec.path or "").load_processor(spec.path or "")
            llm = LLM(model=spec.path, dtype=cfg.dtype, limit_mm_per_prompt={"image": 6})
        else:
            raise ValueError("the vLLM back end measures presets and checkpoints, not tiny in-memory models")
        prompts = [vllm_request(s, processor, root) for s in samples]
        full = SamplingParams(max_tokens=cfg.max_new_tokens, min_tokens=cfg.max_new_tokens, temperature=0.0)
        one = SamplingParams(max_tokens=1, temperature=0.0)
        llm.generate(prompts[:1], one, use_tqdm=False)
        tokens, seconds = [], []
        for prompt in prompts:
            start = time.perf_counter()
            out = llm.generate([prompt], full, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
            tokens.append(len(out[0].outputs[0].token_ids))
        ttft = []
        for k in range(cfg.ttft_runs):
            start = time.perf_counter()
            llm.generate([prompts[k % len(prompts)]], one, use_tqdm=False)
            ttft.append(time.perf_counter() - start)
    return {
        "name": spec.name,
        "peak_memory_bytes": None,
        "peak_memory_gb": None,
        "gen_tokens": sum(tokens),
        "gen_seconds": sum(seconds),
        "throughput_tok_s": throughput(tokens, seconds),
        "ttft_s_median": median_ttft(ttft),
        "ttft_runs_s": ttft,
    }


def run_worker(spec: ModelSpec, cfg: InferenceBenchConfig) -> dict[str, Any]:
    """Measure one model in this process."""
    if cfg.samples is None:
        raise ValueError("the worker needs a samples file")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    samples = list(read_jsonl(cfg.samples))[: cfg.n_samples]
    root = image_root_for(cfg.samples)
    worker = _vllm_worker if cfg.backend == "vllm" else _hf_worker
    result = worker(spec, cfg, samples, root)
    return {**result, "backend": cfg.backend, "device": cfg.device, "dtype": cfg.dtype}


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def run(teacher: ModelSpec, student: ModelSpec, cfg: InferenceBenchConfig) -> dict[str, Any]:
    """Measure teacher and student, each in a fresh process, and compute the ratios."""
    if cfg.backend == "vllm" and not vllm_available():
        raise RuntimeError("the vLLM back end needs the vllm package (pip install vllm) and a GPU")
    with tempfile.TemporaryDirectory() as folder:
        if cfg.samples is None:
            from drivekd.data.synthetic import generate_split

            split = generate_split(
                folder, n_scenes=max(1, cfg.n_samples), seed=0, views="multi", split="bench"
            )
            work = InferenceBenchConfig(**{**asdict(cfg), "samples": str(split.path)})
        else:
            work = cfg
        results = {}
        for role, spec in (("teacher", teacher), ("student", student)):
            cmd = [
                sys.executable,
                "-m",
                "drivekd.evaluation.inference",
                json.dumps(asdict(spec)),
                json.dumps(asdict(work)),
            ]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, **WORKER_ENV}, check=False
            )
            if proc.returncode != 0:
                raise RuntimeError(
                    f"inference benchmark of the {role} ({spec.name}) failed:\n{proc.stderr[-4000:]}"
                )
            results[role] = json.loads(proc.stdout.strip().splitlines()[-1])
    t, s = results["teacher"], results["student"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    return {
        "config": asdict(cfg),
        "results": results,
        "ratios": {
            "memory_teacher_over_student": ratio(t["peak_memory_bytes"], s["peak_memory_bytes"]),
            "throughput_student_over_teacher": ratio(s["throughput_tok_s"], t["throughput_tok_s"]),
            "ttft_teacher_over_student": ratio(t["ttft_s_median"], s["ttft_s_median"]),
        },
        "device": _device_name(cfg.device),
        "torch": torch.__version__,
    }


def table_markdown(report: dict[str, Any]) -> str:
    """Teacher and student side by side with the ratios (> 1 favours the student)."""
    t, s = report["results"]["teacher"], report["results"]["student"]
    ratios = report["ratios"]

    def fmt(value: float | None, digits: int) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    rows = [
        ("Peak memory (GB)", "peak_memory_gb", 3, ratios["memory_teacher_over_student"]),
        ("Throughput (tok/s)", "throughput_tok_s", 2, ratios["throughput_student_over_teacher"]),
        ("Median TTFT (s)", "ttft_s_median", 4, ratios["ttft_teacher_over_student"]),
    ]
    lines = [f"| metric | teacher ({t['name']}) | student ({s['name']}) | ratio |", "|---|---|---|---|"]
    for label, key, digits, r in rows:
        lines.append(f"| {label} | {fmt(t[key], digits)} | {fmt(s[key], digits)} | {fmt(r, 2)}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    spec_raw, cfg_raw = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    print(json.dumps(run_worker(ModelSpec(**spec_raw), InferenceBenchConfig(**cfg_raw))))
