"""The demo's stages, in order, with progress on the console and every stage's time in ``logs/timings.jsonl``.

1. data: the synthetic train / val / test splits (three capabilities, single- and six-view);
2. teacher: the shipped (or given) teacher, checked against the student's token layout;
3. DriveLM: the shared DriveLM sample converted to Drive-KD JSONL, when present;
4. train + evaluate: one job per method and seed in parallel worker processes (:mod:`drivekd.demo.jobs`), graded
   by the offline judge this process serves on 127.0.0.1;
5. deployment: teacher vs distilled student with :mod:`drivekd.evaluation.inference`;
6. pre-study: :func:`drivekd.analysis.runner.analyze` on the teacher and the val split;
7. report: :func:`drivekd.demo.publish.publish`.

Each stage reuses what an earlier run with the same settings finished (see :mod:`drivekd.demo.workspace`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from drivekd.analysis.cli import analyze_and_write
from drivekd.analysis.dataset import load_prestudy
from drivekd.analysis.runner import AnalysisOptions
from drivekd.data.drivelm import import_drivelm
from drivekd.data.schema import read_jsonl, write_jsonl
from drivekd.data.synthetic import generate_split
from drivekd.demo.config import DemoConfig
from drivekd.demo.evaluate import offline_judge
from drivekd.demo.jobs import Job, final_checkpoint, init_worker, run_job
from drivekd.demo.methods import DRIVELM_METHODS, METHODS, MULTI_AGP, TEACHER, Method
from drivekd.demo.publish import publish
from drivekd.demo.teacher import check_teacher, fingerprint, shipped_teacher
from drivekd.demo.workspace import Workspace, WorkspaceError, write_json
from drivekd.evaluation.generate import load_model
from drivekd.evaluation.inference import InferenceBenchConfig, ModelSpec
from drivekd.evaluation.inference import run as bench_inference
from drivekd.models.families import family_of

REPO_SHARED_DRIVELM = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "drivelm-sample"


@dataclass(frozen=True)
class DemoResult:
    report: Path
    statement: str
    seconds: float


class Stages:
    """Announce each stage, time it, and append ``{"stage", "seconds", ...}`` lines to the timing log."""

    def __init__(self, console: Console, log: Path) -> None:
        self.console = console
        self.log = log
        self.entries: list[dict[str, Any]] = []
        log.parent.mkdir(parents=True, exist_ok=True)

    def record(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        with self.log.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.console.rule(f"[bold]{name}[/bold]: {escape(what)}", align="left")
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.record({"stage": name, "seconds": round(seconds, 2)})
        self.console.print(f"[green]done[/green] {name} in {seconds:.1f} s")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def find_drivelm(explicit: Path | None) -> Path | None:
    """``--drivelm`` (must hold test_eval.json), else ``<repo>/../shared/data/drivelm-sample`` when present."""
    if explicit is not None:
        if not (explicit / "test_eval.json").is_file():
            raise WorkspaceError(
                f"--drivelm {explicit} has no test_eval.json (expected the DriveLM sample folder)"
            )
        return explicit.resolve()
    return REPO_SHARED_DRIVELM if (REPO_SHARED_DRIVELM / "test_eval.json").is_file() else None


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _make_data(ws: Workspace, config: DemoConfig) -> None:
    for split, scenes in (
        ("train", config.train_scenes),
        ("val", config.val_scenes),
        ("test", config.test_scenes),
    ):
        if not ws.split(split).is_file():
            generate_split(
                ws.data, n_scenes=scenes, seed=config.data_seed, image_size=config.image_size, split=split
            )


def _convert_drivelm(ws: Workspace, folder: Path, frames: int) -> int:
    """The first ``frames`` key frames of DriveLM's test_eval.json as Drive-KD JSONL; returns the sample count."""
    if not ws.drivelm.is_file():
        samples = import_drivelm(folder / "test_eval.json", folder).samples
        keep = list(dict.fromkeys((s.scene_id, s.frame_id) for s in samples))[:frames]
        write_jsonl([s for s in samples if (s.scene_id, s.frame_id) in keep], ws.drivelm)
    return sum(1 for _ in read_jsonl(ws.drivelm, check_files=False))


def _jobs(ws: Workspace, config: DemoConfig, teacher: Path, url: str, drivelm: Path | None) -> list[Job]:
    """Every (method, seed) to train and/or evaluate, the longest first."""

    def job(method: Method, seed: int | None) -> Job:
        wants_drivelm = method.name in DRIVELM_METHODS and seed in (None, config.seeds[0])
        return Job(method.name, seed, ws.root, config, teacher, url, drivelm if wants_drivelm else None)

    jobs = [job(m, seed) for m in METHODS if m is not TEACHER for seed in config.seeds] + [job(TEACHER, None)]
    cost = {m.name: m.step_cost for m in METHODS}
    return sorted(jobs, key=lambda j: -cost[j.method])


def _run_jobs(jobs: list[Job], workers: int, ws: Workspace, stages: Stages) -> None:
    """Run the jobs in ``workers`` spawned processes with a progress bar; stop at the first failure."""
    context = multiprocessing.get_context("spawn")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (
        Progress(*columns, console=stages.console) as progress,
        ProcessPoolExecutor(
            workers, mp_context=context, initializer=init_worker, initargs=(ws.logs / "workers.log",)
        ) as pool,
    ):
        task = progress.add_task(f"train + evaluate ({workers} workers)", total=len(jobs))
        futures = {pool.submit(run_job, job): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                result = future.result()
            except Exception as err:
                pool.shutdown(cancel_futures=True)
                raise RuntimeError(
                    f"{job.method} (seed {job.seed}) failed: {err} (worker output: {ws.logs / 'workers.log'})"
                ) from err
            stages.record({"stage": "job", **result})
            done = ", ".join(
                f"{k.removesuffix('_s')} {v:.1f} s" for k, v in result.items() if k.endswith("_s") and v
            )
            seed = "" if job.seed is None else f" seed {job.seed}"
            progress.console.print(f"  {escape(job.method)}{seed}: {done or 'reused'}")
            progress.advance(task)


def _deployment(ws: Workspace, config: DemoConfig, teacher: Path) -> dict[str, Any]:
    if ws.deployment.is_file():
        return json.loads(ws.deployment.read_text(encoding="utf-8"))
    student = final_checkpoint(ws, MULTI_AGP, config.seeds[0], config.steps)
    bench = bench_inference(
        ModelSpec("tiny teacher", "path", path=str(teacher)),
        ModelSpec(f"{MULTI_AGP.name}, seed {config.seeds[0]}", "path", path=str(student)),
        InferenceBenchConfig(
            n_samples=config.bench_requests,
            max_new_tokens=config.bench_tokens,
            ttft_runs=config.bench_ttft_runs,
            threads=1,
        ),
    )
    write_json(ws.deployment, bench)
    return bench


def _prestudy(ws: Workspace, config: DemoConfig, teacher: Path) -> None:
    if (ws.prestudy / "metrics.json").is_file():
        return
    model, processor = load_model(teacher, dtype="float32")
    data = load_prestudy(ws.split("val"), max_samples=config.prestudy_samples)
    analyze_and_write(
        model,
        processor,
        family_of(model),
        data,
        None,
        AnalysisOptions(batch_size=4),
        ws.prestudy,
        name="demo teacher",
        role="teacher",
    )


def run_demo(
    config: DemoConfig,
    out: Path,
    *,
    teacher: Path | None = None,
    drivelm: Path | None = None,
    workers: int | None = None,
) -> DemoResult:
    """Run (or resume) the demo into ``out``; returns the report folder and the multi-teacher vs SFT statement."""
    console = Console(stderr=True, record=True)
    started = time.perf_counter()
    ws = Workspace(out.resolve())
    teacher_dir = (teacher or shipped_teacher()).resolve()
    if not (teacher_dir / "model.safetensors").is_file():
        raise WorkspaceError(
            f"no teacher checkpoint in {teacher_dir} (make one with `drivekd demo make-teacher`)"
        )
    drivelm_dir = find_drivelm(drivelm) if config.drivelm_frames else None
    settings = {
        "config": config.to_json(),
        "teacher_sha256": fingerprint(teacher_dir),
        "drivelm": str(drivelm_dir) if drivelm_dir else None,
    }
    resumed = ws.claim(settings)
    console.print(
        f"Drive-KD demo ({config.preset}): {len(config.seeds)} seed(s), {config.steps} steps per run, "
        f"output {escape(str(ws.root))}" + (" (resuming: finished stages are reused)" if resumed else "")
    )
    stages = Stages(console, ws.logs / "timings.jsonl")
    try:
        with stages.stage("data", "synthetic train / val / test, three capabilities, single- and six-view"):
            _make_data(ws, config)
        with stages.stage("teacher", str(teacher_dir)):
            samples = list(read_jsonl(ws.split("test")))
            manifest = check_teacher(
                teacher_dir, config, samples[:16], ws.data
            )  # a scene, both view settings
            console.print(f"teacher made by: {escape(manifest['command'])}")
        if drivelm_dir is not None:
            with stages.stage("drivelm", f"first {config.drivelm_frames} key frames of {drivelm_dir}"):
                console.print(f"{_convert_drivelm(ws, drivelm_dir, config.drivelm_frames)} DriveLM questions")
        known = samples + (list(read_jsonl(ws.drivelm, check_files=False)) if drivelm_dir else [])
        with offline_judge(known) as url:
            jobs = _jobs(ws, config, teacher_dir, url, drivelm_dir)
            count = max(1, min(workers or available_cores(), len(jobs)))
            with stages.stage("train+evaluate", f"{len(jobs)} jobs, offline judge at {url}"):
                _run_jobs(jobs, count, ws, stages)
        with stages.stage("deployment", "teacher vs student, fresh process each"), torch_threads(1):
            deployment = _deployment(ws, config, teacher_dir)
        with (
            stages.stage("prestudy", "section 3.2 analyses of the teacher on the val split"),
            torch_threads(1),
        ):
            _prestudy(ws, config, teacher_dir)
        with stages.stage("report", str(ws.report)):
            published = publish(
                ws,
                config,
                teacher_manifest=manifest,
                teacher=teacher_dir,
                deployment=deployment,
                drivelm=drivelm_dir is not None,
                timings=stages.entries,
                wall_seconds=time.perf_counter() - started,
                resumed=resumed,
            )
    finally:
        ws.logs.mkdir(parents=True, exist_ok=True)
        console.save_text(str(ws.logs / "demo.log"))
    shutil.copyfile(ws.logs / "demo.log", ws.report / "logs" / "demo.log")
    return DemoResult(published.folder, published.headline, time.perf_counter() - started)
