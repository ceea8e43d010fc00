"""The ``drivekd`` command line: data preparation, tiny models and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from drivekd.errors import DataError, DriveKDError, OutputExistsError

if TYPE_CHECKING:
    from drivekd.training.config import TrainConfig


class _OneLineErrors(TyperGroup):
    """The top command group: an error this package raises on purpose (bad input, config, model source) that a
    command did not report itself ends as one ``error:`` line and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DriveKDError as err:
            raise _fail(err) from None


app = typer.Typer(
    help="Drive-KD: distil driving VLMs with capability-specific attention signals.",
    no_args_is_help=True,
    cls=_OneLineErrors,
)
models_app = typer.Typer(help="Build tiny teacher/student pairs.", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks that print ratios measured side by side in one run.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"drivekd {version('drivekd')}")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the installed version and exit."
        ),
    ] = False,
) -> None:
    """Global options. Command modules import torch only when a command runs, so `drivekd --help` is fast."""


# Options shared by the benchmarks.
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")]
Device = Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available, else cpu)")]
DType = Annotated[str | None, typer.Option(help="float32 or bfloat16 (default: float32)")]


Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --json file.")]


def check_json_out(path: Path | None, overwrite: bool) -> None:
    """Refuse an existing --json file before a benchmark runs for minutes (unless --overwrite)."""
    from drivekd.fileio import refuse_overwrite

    if path is not None:
        try:
            refuse_overwrite(path, overwrite=overwrite, option="--json")
        except OutputExistsError as err:
            raise _fail(err) from None


def _write_json(report: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


@bench_app.command("step")
def bench_step_cmd(
    quick: Annotated[
        bool,
        typer.Option("--quick", help="Tiny models; a couple of minutes on 2 CPU cores (= --size quick)."),
    ] = False,
    size: Annotated[
        str,
        typer.Option(
            "--size",
            help="quick | default | large (a hidden-896, 24-layer student, L >= 1200, one warm-up, two timed steps "
            "and one for memory; about 45 minutes on one CPU core; run it in bf16 on a GPU).",
        ),
    ] = "default",
    json_path: JsonOut = None,
    overwrite: Overwrite = False,
    device: Device = None,
    dtype: DType = None,
) -> None:
    """Cost of a multi-teacher step in both gradient groupings (plain, exact AGP, amortised, naive references, live
    teacher, checkpointing) vs plain SFT."""
    check_json_out(json_path, overwrite)
    from drivekd.bench.step import config_for, run
    from drivekd.devices import default_device

    try:
        cfg = config_for("quick" if quick else size, device=device or default_device(), dtype=dtype)
    except ValueError as err:
        raise _fail(err) from None
    report = run(cfg)
    _write_json(report, json_path)  # first: the figures of a long run are kept whatever the printing does
    setup = report["setup"]
    console.print(
        f"student {cfg.student}, teacher {cfg.teacher} (hidden, layers, heads, kv heads, MLP); L = {setup['length']} "
        f"with {setup['vision_tokens']} vision tokens; cache {setup['cache_bytes'] / 2**20:.1f} MB; {cfg.device} "
        f"{cfg.dtype}"
    )
    _print_ratios(report, "multi-teacher optimizer step vs plain SFT step (same run)")
    for variant, why in report["not_measured"].items():
        console.print(f"{variant}: not measurable here ({why})")
    for name, value in report["checks"].items():
        console.print(f"{name}: {value if isinstance(value, bool) else f'{value:.3f}x'}")


def _register_subcommands() -> None:
    """Commands that live beside the stage they drive (data, evaluation, teacher cache)."""
    from drivekd.analysis.cli import analyze_cmd, figures_cmd
    from drivekd.data.cli import data_app
    from drivekd.demo.cli import demo_app
    from drivekd.evaluation.cli import bench_inference_cmd, eval_app, judge_app
    from drivekd.signals.cli import cache_teacher_cmd
    from drivekd.training.cli import migrate_checkpoint_cmd

    app.add_typer(data_app, name="data")
    app.add_typer(eval_app, name="eval")
    app.add_typer(judge_app, name="judge")
    bench_app.command("inference")(bench_inference_cmd)
    app.command("cache-teacher")(cache_teacher_cmd)
    app.command("migrate-checkpoint")(migrate_checkpoint_cmd)
    app.command("analyze")(analyze_cmd)
    app.command("analyze-figures")(figures_cmd)
    app.add_typer(demo_app, name="demo")


_register_subcommands()
console = Console(stderr=True, soft_wrap=True)


def _print_ratios(report: dict, title: str) -> None:
    """A benchmark's per-variant figures and ratios as a table."""
    table = Table(title=title)
    columns = (
        "variant",
        "wall time (s)",
        "CPU time (s)",
        "peak memory growth (MB)",
        "time ratio",
        "memory ratio",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for variant, ratio in report["ratios"].items():  # measured variants; not_measured ones have no figures
        result = report["results"][variant]
        cpu = result.get("cpu_seconds")
        table.add_row(
            variant,
            f"{result['seconds']:.2f}",
            "–" if cpu is None else f"{cpu:.2f}",
            f"{result['peak_bytes'] / 2**20:.0f}",
            f"{ratio['time_ratio']:.3f}x",
            f"{ratio['memory_ratio']:.3f}x",
        )
    Console().print(table)
    Console().print(
        "time ratio: of CPU time where it was measured (CPU workers; other jobs do not inflate it), else wall time"
    )


def _fail(err: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(err))}")
    return typer.Exit(code=2)


@models_app.command("tiny")
def tiny_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for teacher/ and student/.")],
    family: Annotated[str, typer.Option(help="qwen2_5_vl | internvl | qwen3_vl")] = "qwen2_5_vl",
    seed: int = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a pair already saved in --out.")
    ] = False,
) -> None:
    """Build a tiny random teacher/student pair offline and save it in Hugging Face format."""
    from drivekd.models.families import get_family
    from drivekd.models.pair import build_tiny_pair

    try:
        get_family(family)
    except ValueError as err:
        raise _fail(err) from None
    existing = [out / role for role in ("teacher", "student") if (out / role).exists()]
    if existing and not overwrite:
        raise _fail(
            OutputExistsError(f"{existing[0]} exists; pass --overwrite to replace it or choose another --out")
        )
    build_tiny_pair(family, seed=seed).save(out)
    console.print(f"saved {family} teacher and student under {out}")


def check_train_inputs(cfg: TrainConfig) -> None:
    """What ``train`` needs that can be checked before any model loads: a known family, every model folder or hub
    id findable (its config read, no weights), and a data file with samples of the capabilities trained."""
    from drivekd.data.schema import read_jsonl
    from drivekd.models.families import check_model_source, get_family

    model = cfg.model
    get_family(model.family)
    names = {"model.student": model.student, "model.teacher": model.teacher}
    names |= {f"model.teachers.{k}": v for k, v in (model.teachers or {}).items()}
    for name in names.values():
        if name and name != "tiny" and not (name == model.teacher and model.cache):
            check_model_source(name)
    if not cfg.data.train:
        return  # the trainer names the missing key
    root = Path(cfg.data.image_root) if cfg.data.image_root else None
    wanted = set(cfg.capabilities)
    if not any(s.capability in wanted for s in read_jsonl(cfg.data.train, image_root=root)):
        raise DataError(
            cfg.data.train,
            None,
            "data.train",
            f"no samples of the trained capabilities ({', '.join(sorted(wanted))})",
            hint="pass a Drive-KD JSONL file with samples (drivekd data synth / import-...), or change "
            "data.capabilities",
        )


@app.command("train", context_settings={"allow_extra_args": False})
def train_cmd(
    config: Annotated[Path | None, typer.Argument(help="YAML config; omit for the defaults.")] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides, e.g. optim.lr=1e-4.")
    ] = None,
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config", help="Print the resolved config (YAML, every key) and exit without training."
        ),
    ] = False,
) -> None:
    """Distil a student (single- or multi-teacher, AGP, reweighting); resumes from the newest checkpoint."""
    from drivekd.training.config import ConfigError, load_config

    if config is not None and "=" in str(config) and not config.exists():
        overrides, config = [str(config), *(overrides or [])], None
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as err:
        raise _fail(err) from None
    if print_config:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return
    from drivekd.training.distributed import rank_and_world
    from drivekd.training.trainer import train

    try:
        check_train_inputs(cfg)
        result = train(cfg)
    except (ConfigError, DriveKDError) as err:
        raise _fail(err) from None
    if rank_and_world()[0] == 0:  # under torchrun every rank returns here
        console.print(
            f"trained {result.steps} steps ({result.skipped_steps} skipped as non-finite); "
            f"student in {result.checkpoint}/student, log in {result.output_dir}/log.jsonl"
        )


@bench_app.command("capture")
def bench_capture_cmd(
    quick: Annotated[
        bool, typer.Option("--quick", help="A smaller decoder that finishes in about a minute.")
    ] = False,
    json_path: JsonOut = None,
    overwrite: Overwrite = False,
    device: Device = None,
    dtype: DType = None,
) -> None:
    """Cost of attention capture vs a plain SDPA SFT step (one fresh process per variant)."""
    check_json_out(json_path, overwrite)
    from drivekd.bench.capture import config_for, run
    from drivekd.devices import default_device

    try:
        cfg = config_for(quick, device=device or default_device(), dtype=dtype)
    except ValueError as err:
        raise _fail(err) from None
    console.print(
        f"decoder hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads}/{cfg.kv_heads} heads; L = {cfg.length} with "
        f"{cfg.vision_tokens} vision tokens; {cfg.device} {cfg.dtype}"
    )
    report = run(cfg)
    _print_ratios(report, "attention capture vs plain SFT step (same run)")
    _write_json(report, json_path)


if __name__ == "__main__":
    app()
