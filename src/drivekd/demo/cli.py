"""`drivekd demo [--quick] [--out DIR]`, `drivekd demo make-teacher --out DIR` and
`drivekd demo make-student-base --out DIR`."""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from drivekd.errors import DriveKDError

console = Console(stderr=True, soft_wrap=True)
demo_app = typer.Typer(
    help="The paper's experiment in miniature on CPU: synthetic data, a tiny teacher, every method, a report.",
    invoke_without_command=True,
)


def _fail(err: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(err))}")
    return typer.Exit(code=2)


@demo_app.callback()
def demo_cmd(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option("--quick", help="One seed, fewer steps and samples (about a minute on 2 cores).")
    ] = False,
    out: Annotated[
        Path, typer.Option("--out", help="Output folder: new, empty, or an earlier demo's (resumed).")
    ] = Path("runs/demo"),
    teacher: Annotated[
        Path | None,
        typer.Option("--teacher", help="A teacher made by `drivekd demo make-teacher` (default: shipped)."),
    ] = None,
    drivelm: Annotated[
        Path | None,
        typer.Option(
            "--drivelm", help="DriveLM sample folder (default: ../shared/data/drivelm-sample if present)."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="Parallel training/evaluation processes (default: CPU cores)."),
    ] = None,
) -> None:
    """Run the demo (train and evaluate every method, write the report under OUT/report)."""
    if ctx.invoked_subcommand is not None:
        return
    from drivekd.demo.config import FULL, QUICK
    from drivekd.demo.runner import run_demo

    try:
        result = run_demo(QUICK if quick else FULL, out, teacher=teacher, drivelm=drivelm, workers=workers)
    except (DriveKDError, ValueError, OSError) as err:
        raise _fail(err) from None
    console.print(f"[bold]{escape(result.statement)}[/bold]")
    console.print(f"report: {escape(str(result.report))}")


@demo_app.command("make-teacher")
def make_teacher_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="New folder for the teacher checkpoint and its MANIFEST.json.")
    ],
    steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (default: the shipped teacher's).")
    ] = None,
    train_scenes: Annotated[
        int | None, typer.Option(help="Synthetic train scenes (16 samples each).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Initialisation and sampling seed.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    micro_batch: Annotated[int | None, typer.Option(help="Samples per optimizer step.")] = None,
    train_minutes: Annotated[
        float | None, typer.Option(help="Stop (keeping that step's checkpoint) past this much training time.")
    ] = None,
    dense_steps: Annotated[
        int | None,
        typer.Option(help="Steps of the dense vision stage before the SFT (0: none; docs/demo.md)."),
    ] = None,
    device: Annotated[
        str, typer.Option(help="cpu or cuda (a GPU trains the same recipe far faster).")
    ] = "cpu",
    work: Annotated[
        Path | None,
        typer.Option(help="Keep the data, training run and evaluation here (default: a temp folder)."),
    ] = None,
) -> None:
    """Train and measure the demo's teacher (the shipped one was made with the defaults: see its MANIFEST.json)."""
    from dataclasses import replace

    from drivekd.demo.teacher import TeacherRecipe, make_teacher

    chosen = {
        "steps": steps,
        "train_scenes": train_scenes,
        "seed": seed,
        "lr": lr,
        "micro_batch": micro_batch,
        "train_minutes": train_minutes,
        "dense_steps": dense_steps,
    }
    recipe = replace(TeacherRecipe(), **{k: v for k, v in chosen.items() if v is not None})
    command = shlex.join(["drivekd", *sys.argv[1:]])
    try:
        with tempfile.TemporaryDirectory() as scratch:
            manifest = make_teacher(out, work or Path(scratch), recipe, command=command, device=device)
    except (DriveKDError, ValueError, OSError) as err:
        raise _fail(err) from None
    scores = manifest["test_scores"]
    console.print(
        f"teacher written to {escape(str(out))}: test MCQ accuracy (strict) {scores['mcq_strict_accuracy']:.1f}%, "
        f"judge average {scores['judge_overall']:.1f}"
    )


@demo_app.command("make-student-base")
def make_student_base_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="New folder for the base student checkpoint and its MANIFEST.json.")
    ],
    steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (default: the shipped base student's).")
    ] = None,
    pretrain_scenes: Annotated[
        int | None, typer.Option(help="Synthetic describe scenes to pretrain on (4 samples each).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Initialisation and sampling seed.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    work: Annotated[
        Path | None,
        typer.Option(
            help="Keep the data and training run here, resumed on a rerun (default: a temp folder)."
        ),
    ] = None,
) -> None:
    """Pretrain the demo's base student on scene descriptions (the shipped one was made with the defaults: see
    its MANIFEST.json)."""
    from dataclasses import replace

    from drivekd.demo.student_base import StudentBaseRecipe, make_student_base

    chosen = {"steps": steps, "pretrain_scenes": pretrain_scenes, "seed": seed}
    recipe = replace(StudentBaseRecipe(), **{k: v for k, v in chosen.items() if v is not None})
    command = shlex.join(["drivekd", *sys.argv[1:]])
    try:
        with tempfile.TemporaryDirectory() as scratch:
            manifest = make_student_base(out, work or Path(scratch), recipe, command=command, device=device)
    except (DriveKDError, ValueError, OSError) as err:
        raise _fail(err) from None
    before, after = manifest["heldout_before"], manifest["heldout_after"]
    console.print(
        f"base student written to {escape(str(out))}: {manifest['parameters']} parameters (the teacher has "
        f"{manifest['teacher_ratio']}x); held-out description loss {before['loss']:.3f} -> {after['loss']:.3f}, "
        f"token accuracy {before['token_accuracy']:.1f}% -> {after['token_accuracy']:.1f}%"
    )
