"""Write ``<out>/report/``: README.md, results.csv, summary.json, the PNGs and ``logs/``, from what is on disk.

Everything printed comes from the score files, the training logs, the deployment and pre-study outputs and the
teacher's manifest; the settings come from the demo config. Nothing is typed in by hand.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from drivekd.data.schema import read_jsonl
from drivekd.demo import intervals
from drivekd.demo.attention import attention_figure, pick_questions
from drivekd.demo.config import DemoConfig
from drivekd.demo.evaluate import PREDICTIONS, SCORES
from drivekd.demo.jobs import final_checkpoint
from drivekd.demo.methods import (
    ABLATION,
    DRIVELM_METHODS,
    METHODS,
    MULTI_AGP,
    SFT,
    SINGLE_TEACHER,
    SINGLE_TEACHER_PARTS,
    TABLE1,
    TEACHER,
    Method,
    by_name,
)
from drivekd.demo.plots import scores_figure, training_figure
from drivekd.demo.report import (
    AVG,
    METRIC_TITLES,
    by_capability,
    markdown_table,
    method_rows,
    row_stat,
    run_scores,
    verdict,
)
from drivekd.demo.workspace import Workspace, write_json
from drivekd.evaluation.generate import load_model
from drivekd.evaluation.inference import table_markdown
from drivekd.evaluation.predictions import read_predictions
from drivekd.evaluation.report import rows_csv
from drivekd.training.config import DistillConfig, OptimConfig

PRESTUDY_FIGURE = "fig2_summary.png"


@dataclass(frozen=True)
class Published:
    folder: Path
    statement: str  # multi-teacher (AGP) vs SFT on the average judge score
    mcq_statement: str  # the same on the average MCQ accuracy
    headline: (
        str  # the paired-bootstrap sentence: did multi-teacher AGP beat SFT, by how much, with its interval
    )


def _scores(path: Path) -> dict[str, Any]:
    return json.loads((path / SCORES).read_text(encoding="utf-8"))


def _seeds(method: Method, config: DemoConfig) -> Sequence[int | None]:
    return (None,) if method is TEACHER else config.seeds


def _split_summary(path: Path) -> dict[str, Any]:
    samples = list(read_jsonl(path, check_files=False))
    return {
        "samples": len(samples),
        "by_capability": dict(Counter(s.capability for s in samples)),
        "by_views": dict(Counter("six-view" if s.multi_view else "single-view" for s in samples)),
        "by_kind": dict(Counter(s.kind for s in samples)),
    }


def _training_logs(
    ws: Workspace, config: DemoConfig, logs_dir: Path
) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Every run's log (copied to ``logs_dir``), by seed then method."""
    logs: dict[int, dict[str, list[dict[str, Any]]]] = {seed: {} for seed in config.seeds}
    for method in (m for m in METHODS if m.trained):
        for seed in config.seeds:
            source = ws.run_dir(method, seed) / "log.jsonl"
            shutil.copyfile(source, logs_dir / f"{method.slug}-seed-{seed}.jsonl")
            lines = source.read_text(encoding="utf-8").splitlines()
            logs[seed][method.name] = [json.loads(line) for line in lines if line.strip()]
    return logs


def _intervals(
    ws: Workspace, config: DemoConfig, per_run: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Judge and MCQ Avg. of every method with a 95% bootstrap interval and the paired difference from SFT."""
    samples = list(read_jsonl(ws.split("test"), check_files=False))
    capability = {s.id: s.capability for s in samples}
    judge = {name: [intervals.judge_per_question(r) for r in runs.values()] for name, runs in per_run.items()}
    mcq = {
        m.name: [
            intervals.mcq_per_question(
                samples,
                {k: r.prediction for k, r in read_predictions(ws.eval_dir(m, seed) / PREDICTIONS).items()},
            )
            for seed in _seeds(m, config)
        ]
        for m in METHODS
    }
    out = {}
    for metric, values in (("judge", judge), ("mcq", mcq)):
        parts = {c: values[m] for c, m in SINGLE_TEACHER_PARTS.items()}
        values[SINGLE_TEACHER] = intervals.by_capability(parts, capability)
        out[metric] = intervals.compare_with(values, capability, SFT.name, unpaired=(TEACHER.name,))
    return out


def _settings_table(config: DemoConfig) -> str:
    rows = [
        ("seeds", ", ".join(map(str, config.seeds))),
        (
            "optimizer",
            f"AdamW, lr {config.lr:g}, cosine schedule, {config.warmup_ratio:.0%} warm-up, min-lr ratio "
            f"{OptimConfig().min_lr_ratio:g}, gradient clipping {OptimConfig().max_grad_norm:g}",
        ),
        ("steps per run", f"{config.steps} (grad accumulation {config.grad_accum})"),
        ("batch", f"{config.micro_batch} sample(s) of each trained capability per micro-step"),
        (
            "distillation",
            f"defaults of `drivekd train`: {DistillConfig().metric.upper()}, Pi of eq. 26, paper layers "
            "(1, 1..pen, pen); online reweighting " + ("on" if config.reweight else "off"),
        ),
        ("generation", f"greedy, at most {config.max_new_tokens} new tokens, batch {config.eval_batch_size}"),
        (
            "judge",
            f"offline rubric grader over HTTP (`JudgeServer` + OpenAI client), {config.judge_runs} runs",
        ),
        ("images", f"{config.image_size[0]}x{config.image_size[1]} px per camera"),
    ]
    return "| setting | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def _data_table(splits: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        "| split | samples | perception | reasoning | planning | single-view | six-view |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in splits.items():
        caps = [str(s["by_capability"].get(c, 0)) for c in ("perception", "reasoning", "planning")]
        views = [str(s["by_views"].get(v, 0)) for v in ("single-view", "six-view")]
        lines.append(f"| {name} | {s['samples']} | {' | '.join(caps)} | {' | '.join(views)} |")
    return "\n".join(lines) + "\n"


def _methods_table() -> str:
    lines = ["| method | recipe | gradients | what |", "|---|---|---|---|"]
    for m in METHODS:
        lines.append(f"| {m.name} | {m.recipe or '–'} | {m.gradients or '–'} | {m.about} |")
    return "\n".join(lines) + "\n"


def _timings_table(timings: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {t['stage']} | {t['seconds']:.1f} |" for t in timings if "seconds" in t]
    return "\n".join(lines) + "\n"


def publish(
    ws: Workspace,
    config: DemoConfig,
    *,
    teacher_manifest: Mapping[str, Any],
    deployment: Mapping[str, Any],
    drivelm: bool,
    timings: Sequence[Mapping[str, Any]],
    wall_seconds: float,
    resumed: bool,
    teacher: Path,
) -> Published:
    """Write the report folder and return the statements; README.md renders summary.json.

    ``teacher`` is the teacher's folder (the shipped one or ``--teacher``), drawn in the attention figure."""
    out = ws.report
    logs_dir = out / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    per_run = {
        m.name: {str(seed): _scores(ws.eval_dir(m, seed)) for seed in _seeds(m, config)} for m in METHODS
    }
    numbers = {name: [run_scores(r) for r in runs.values()] for name, runs in per_run.items()}
    numbers[SINGLE_TEACHER] = by_capability({c: numbers[m] for c, m in SINGLE_TEACHER_PARTS.items()})
    rows = method_rows(numbers)
    by_method = {row["method"]: row for row in rows}
    multi, sft = by_method[MULTI_AGP.name], by_method[SFT.name]
    statement = verdict(
        row_stat(multi, "judge", AVG), row_stat(sft, "judge", AVG), what="average judge score"
    )
    mcq_statement = verdict(
        row_stat(multi, "mcq", AVG), row_stat(sft, "mcq", AVG), what="average MCQ accuracy"
    )
    cis = _intervals(ws, config, per_run)
    headline, mcq_headline = (
        intervals.headline(
            cis[metric][MULTI_AGP.name],
            label="Multi-teacher (AGP)",
            reference="SFT",
            what=what,
            unit="points",
        )
        for metric, what in (("judge", "the average judge score"), ("mcq", "the average MCQ accuracy"))
    )
    logs = _training_logs(ws, config, logs_dir)
    shutil.copyfile(ws.logs / "timings.jsonl", logs_dir / "timings.jsonl")
    scores_figure(rows, "judge", out / "scores.png")
    training_figure(logs[config.seeds[0]], out / "training_curves.png", seed=config.seeds[0])
    shutil.copyfile(ws.prestudy / PRESTUDY_FIGURE, out / "prestudy.png")
    attention = _attention(ws, config, teacher, out / ATTENTION_FIGURE)
    (out / "results.csv").write_text(rows_csv(rows, "method"), encoding="utf-8")
    prestudy = json.loads((ws.prestudy / "metrics.json").read_text(encoding="utf-8"))
    summary = {
        "headline": headline,
        "mcq_headline": mcq_headline,
        "statement": statement,
        "mcq_statement": mcq_statement,
        "intervals": cis,
        "config": config.to_json(),
        "made": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": wall_seconds,
        "resumed": resumed,
        "methods": rows,
        "per_run": {name: dict(zip(runs, numbers[name], strict=True)) for name, runs in per_run.items()},
        "single_teacher": {"row": SINGLE_TEACHER, "parts": SINGLE_TEACHER_PARTS},
        "drivelm": _drivelm_rows(ws, config) if drivelm else None,
        "deployment": deployment,
        "attention": attention,
        "prestudy": {"recommended_layers": prestudy["recommended_layers"], "data": prestudy["data"]},
        "teacher": dict(teacher_manifest),
        "data": {name: _split_summary(ws.split(name)) for name in ("train", "val", "test")},
        "timings": list(timings),
    }
    write_json(out / "summary.json", summary)
    (out / "README.md").write_text(_readme(config, summary), encoding="utf-8")
    return Published(out, statement, mcq_statement, headline)


ATTENTION_FIGURE = "attention.png"
ATTENTION_LAYER = 1


def _attention(ws: Workspace, config: DemoConfig, teacher: Path, path: Path) -> dict[str, Any]:
    """Draw the teacher's, SFT's and multi-AGP's (first seed) attention on a few test questions; what was drawn."""
    seed = config.seeds[0]
    folders = {
        TEACHER.name: teacher,
        f"{SFT.name} (seed {seed})": final_checkpoint(ws, SFT, seed, config.steps),
        f"{MULTI_AGP.name} (seed {seed})": final_checkpoint(ws, MULTI_AGP, seed, config.steps),
    }
    models = {name: load_model(folder, dtype="float32") for name, folder in folders.items()}
    questions = pick_questions(list(read_jsonl(ws.split("test"), check_files=False)))
    attention_figure(models, questions, ws.data, path, layer=ATTENTION_LAYER)
    return {
        "figure": path.name,
        "layer": ATTENTION_LAYER,
        "queries": "answer",
        "models": list(folders),
        "questions": [q.id for q in questions],
    }


def _drivelm_rows(ws: Workspace, config: DemoConfig) -> list[dict[str, Any]]:
    """Teacher, and SFT and multi-AGP of the first seed, on the DriveLM sample (one run each)."""
    first = config.seeds[0]
    runs = {}
    for name in DRIVELM_METHODS:
        method = by_name(name)
        seed = None if method is TEACHER else first
        label = name if seed is None else f"{name} (seed {seed})"
        runs[label] = [run_scores(_scores(ws.eval_dir(method, seed, "drivelm")))]
    return method_rows(runs)


def _readme(config: DemoConfig, summary: Mapping[str, Any]) -> str:
    rows = summary["methods"]
    deployment, teacher = summary["deployment"], summary["teacher"]
    ablation = [r for r in rows if r["method"] in (SFT.name, *ABLATION)]
    table1 = [next(r for r in rows if r["method"] == name) for name in TABLE1]
    others = [r for r in rows if r["method"] not in TABLE1]
    teacher_scores = teacher["test_scores"]
    recommended = summary["prestudy"]["recommended_layers"]
    wall = f"wall time {summary['wall_seconds'] / 60:.1f} min"
    if summary["resumed"]:
        wall += " for this invocation, which resumed an earlier one and reused its finished stages"
    parts = [
        f"# Drive-KD demo report ({config.preset})\n",
        f"**{summary['headline']}**\n",
        f"{summary['mcq_headline']}\n",
        f"Across seeds: {summary['statement']} {summary['mcq_statement']}\n",
        f"Made by `drivekd demo{' --quick' if config.preset == 'quick' else ''}` on {summary['made'][:10]} "
        f"({deployment['device']}, torch {deployment['torch']}); {wall}. Every number below is read from the "
        "files of this run.\n",
        "## What was run\n",
        "A tiny Qwen2.5-VL-architecture teacher (shipped, trained by `drivekd demo make-teacher`) and a randomly "
        "initialised tiny student of the same family, on the synthetic driving set (three capabilities, single "
        "front view and six cameras). Every trained method starts from the same student initialisation for a seed "
        "and gets the same optimiser, schedule, batch and step count.\n",
        _methods_table(),
        _settings_table(config),
        "\nData (synthetic generator, data seed "
        f"{config.data_seed}; the teacher was trained on a larger train split of the same seed, the test split is "
        "unseen by every model):\n",
        _data_table(summary["data"]),
        "## Table 1: scores per capability (mean ± sample std across seeds)\n",
        f"### {METRIC_TITLES['judge']}\n",
        "Each value is one run's mean over the judge's "
        f"{config.judge_runs} gradings; the offline grader is deterministic, so the run-to-run std of eq. 29 "
        "(`judge_run_std_mean` in results.csv) is 0 and the ± here is the spread across training seeds.\n",
        f"`{SINGLE_TEACHER}` is the paper's single-teacher row: each capability's score comes from the "
        "single-teacher recipe trained on that capability's split (perception, reasoning, planning below), and "
        "its Avg. is their mean.\n\n",
        markdown_table(table1, "judge", extra=("mcq",)),
        f"\n### {METRIC_TITLES['mcq']}\n",
        "Strict letter extraction; reasoning pools prediction and behavior; Avg. is the mean of the three. A model "
        "that always answers with the same letter scores the share of questions whose answer is that letter "
        "(about 25% for four options).\n",
        markdown_table(table1, "mcq"),
        f"\n### The other methods: {METRIC_TITLES['judge']}\n",
        "Every capability scored, whatever split the method trained on.\n\n",
        markdown_table(others, "judge", extra=("mcq",)),
        f"\n### The other methods: {METRIC_TITLES['mcq']}\n",
        markdown_table(others, "mcq"),
        "\n## 95% confidence intervals and paired comparisons with SFT\n",
        "Bootstrap over test questions (resampled within each capability) and training seeds "
        "(`drivekd.evaluation.bootstrap`); each method is compared with SFT on the same questions and seeds "
        "(paired), with the two-sided p-value of no difference. The teacher has no training seed, so it is not "
        "paired.\n",
        f"\n### {METRIC_TITLES['judge']}\n",
        intervals.markdown(summary["intervals"]["judge"], "SFT", "points"),
        f"\n### {METRIC_TITLES['mcq']}\n",
        intervals.markdown(summary["intervals"]["mcq"], "SFT", "points"),
        "\n## Table 4: multi-teacher gradient combination (ablation)\n",
        markdown_table(ablation, "judge", extra=("mcq",)),
        "\n![judge scores per method](scores.png)\n",
        "\n## Training curves\n\n![training curves](training_curves.png)\n",
        "\n## Deployment: teacher vs student\n",
        f"`drivekd.evaluation.inference`, CPU, {config.bench_requests} six-camera requests x {config.bench_tokens} "
        "tokens, one thread per model; ratios > 1 favour the student.\n\n",
        table_markdown(deployment),
        "| Parameters | "
        + " | ".join(f"{deployment['results'][r]['parameters']:,}" for r in ("teacher", "student"))
        + " | – |\n",
    ]
    if summary["drivelm"]:
        parts += [
            "\n## DriveLM sample (real nuScenes frames)\n",
            "Graded by the same offline grader, which has no structured ground truth for DriveLM and falls back to "
            "the letter and the share of the reference's content words: these numbers check the pipeline on real "
            "data and are **not** comparable with LLM-judge scores. DriveLM data: CC BY-NC-SA 4.0.\n\n",
            markdown_table(summary["drivelm"], "judge", extra=("mcq",)),
        ]
    parts += [
        "\n## Where the models look\n",
        f"Head-mean text-to-vision attention at paper layer {summary['attention']['layer']} (where perception is "
        "distilled), averaged over the reference answer's tokens (teacher forcing) and normalised over the image's "
        "vision tokens (the processor's merged grid: one cell per vision token), for the first front-view perception and "
        "planning questions of the test split (MCQs first); brighter is more attention. Captured with the "
        "project's exact maps (`drivekd.capture`), drawn by `drivekd.demo.attention`.\n\n"
        f"![text-to-vision attention]({summary['attention']['figure']})\n",
        "\n## Pre-study (teacher, val split)\n",
        f"`drivekd.analysis.runner.analyze` on {summary['prestudy']['data']['samples']} val samples; recommended "
        f"teacher layers (paper numbering): {recommended['layers']['teacher']}.\n\n"
        "![pre-study summary](prestudy.png)\n",
        "\n## The teacher\n",
        f"Made with `{teacher['command']}` ({teacher['recipe']['steps']} steps, {teacher['parameters']:,} "
        f"parameters). Its manifest records, on the synthetic test split of its data seed "
        f"({teacher['data']['test']['scenes']} scenes, {teacher['data']['test']['samples']} samples): strict MCQ "
        f"accuracy {teacher_scores['mcq_strict_accuracy']:.1f}% (pooled over questions), judge average "
        f"{teacher_scores['judge_overall']:.1f}. The `teacher` row above is measured again in this run.\n",
        "\n## Files and timings\n",
        "`results.csv` (one row per method, mean and std per capability and average), `summary.json` (every "
        "number, per run and aggregated, settings, timings), `logs/` (each run's `log.jsonl`, the demo's "
        "`timings.jsonl` and `demo.log`). Predictions and score files are under `../eval/`, checkpoints under "
        "`../runs/`.\n\n",
        _timings_table(summary["timings"]),
    ]
    return "\n".join(parts)
