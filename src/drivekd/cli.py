"""The ``drivekd`` command line: data preparation, tiny models and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from drivekd.errors import DriveKDError

app = typer.Typer(
    help="Drive-KD: distil driving VLMs with capability-specific attention signals.", no_args_is_help=True
)
data_app = typer.Typer(help="Import, generate and validate driving VQA data (JSONL).", no_args_is_help=True)
models_app = typer.Typer(help="Build tiny teacher/student pairs.", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks that print ratios measured side by side in one run.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")


# Options shared by the benchmarks.
JsonOut = Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")]
Device = Annotated[str | None, typer.Option(help="cpu or cuda (default: cpu)")]
DType = Annotated[str | None, typer.Option(help="float32 or bfloat16 (default: float32)")]


def _write_json(report: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


@bench_app.command("step")
def bench_step_cmd(
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny models; a couple of minutes on 2 CPU cores.")
    ] = False,
    json_path: JsonOut = None,
    device: Device = None,
    dtype: DType = None,
) -> None:
    """Cost of a multi-teacher step (none, exact AGP, amortised AGP, naive AGP, live teacher) vs plain SFT."""
    from drivekd.bench.step import config_for, run

    cfg = config_for(quick, device=device, dtype=dtype)
    report = run(cfg)
    setup = report["setup"]
    console.print(
        f"student {cfg.student}, teacher {cfg.teacher} (hidden, layers, heads, kv heads, MLP); L = {setup['length']} "
        f"with {setup['vision_tokens']} vision tokens; cache {setup['cache_bytes'] / 2**20:.1f} MB; {cfg.device} "
        f"{cfg.dtype}"
    )
    _print_ratios(report, "multi-teacher optimizer step vs plain SFT step (same run)")
    for name, value in report["checks"].items():
        console.print(f"{name}: {value if isinstance(value, bool) else f'{value:.3f}x'}")
    _write_json(report, json_path)


def _register_subcommands() -> None:
    """Commands that live beside the stage they drive (evaluation, teacher cache)."""
    from drivekd.analysis.cli import analyze_cmd, figures_cmd
    from drivekd.demo.cli import demo_app
    from drivekd.evaluation.cli import bench_inference_cmd, eval_app, judge_app
    from drivekd.signals.cli import cache_teacher_cmd

    app.add_typer(eval_app, name="eval")
    app.add_typer(judge_app, name="judge")
    bench_app.command("inference")(bench_inference_cmd)
    app.command("cache-teacher")(cache_teacher_cmd)
    app.command("analyze")(analyze_cmd)
    app.command("analyze-figures")(figures_cmd)
    app.add_typer(demo_app, name="demo")


_register_subcommands()
console = Console(stderr=True, soft_wrap=True)

SkipInvalid = Annotated[
    bool, typer.Option("--skip-invalid", help="Report and skip bad rows instead of stopping.")
]
ImageRoot = Annotated[Path, typer.Option("--image-root", help="Folder that image paths are relative to.")]


def _print_ratios(report: dict, title: str) -> None:
    """A benchmark's per-variant figures and ratios as a table."""
    table = Table(title=title)
    for column in ("variant", "step time (s)", "peak memory growth (MB)", "time ratio", "memory ratio"):
        table.add_column(column, justify="right")
    for variant, result in report["results"].items():
        ratio = report["ratios"][variant]
        table.add_row(
            variant,
            f"{result['seconds']:.2f}",
            f"{result['peak_bytes'] / 2**20:.0f}",
            f"{ratio['time_ratio']:.3f}x",
            f"{ratio['memory_ratio']:.3f}x",
        )
    Console().print(table)


def _fail(err: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(err))}")
    return typer.Exit(code=2)


def _import(fmt: str, path: Path, out: Path, image_root: Path, skip_invalid: bool) -> None:
    from drivekd.data.drivebench import import_drivebench
    from drivekd.data.drivelm import import_drivelm
    from drivekd.data.schema import write_jsonl

    importer = import_drivelm if fmt == "drivelm" else import_drivebench
    try:
        result = importer(path, image_root, skip_invalid=skip_invalid)
    except DriveKDError as err:
        raise _fail(err) from None
    count = write_jsonl(result.samples, out)
    for err in result.errors:
        console.print(f"[yellow]skipped[/yellow] {escape(str(err))}")
    console.print(f"wrote {count} samples to {out} ({len(result.errors)} skipped)")


Out = Annotated[Path, typer.Option("--out", help="Drive-KD JSONL to write.")]


@data_app.command("import-drivelm")
def import_drivelm_cmd(
    path: Path, out: Out, image_root: ImageRoot, skip_invalid: SkipInvalid = False
) -> None:
    """Convert a DriveLM challenge file (test_eval.json, train_sample.json) to Drive-KD JSONL."""
    _import("drivelm", path, out, image_root, skip_invalid)


@data_app.command("import-drivebench")
def import_drivebench_cmd(
    path: Path, out: Out, image_root: ImageRoot, skip_invalid: SkipInvalid = False
) -> None:
    """Convert a DriveBench QA file (flat JSON list) to Drive-KD JSONL."""
    _import("drivebench", path, out, image_root, skip_invalid)


@data_app.command("export-drivebench")
def export_drivebench_cmd(
    path: Path, out: Annotated[Path, typer.Option("--out")], image_root: ImageRoot | None = None
) -> None:
    """Write Drive-KD JSONL as a DriveBench QA file."""
    from drivekd.data.drivebench import to_drivebench
    from drivekd.data.schema import read_jsonl

    try:
        rows = to_drivebench(read_jsonl(path, image_root=image_root))
    except DriveKDError as err:
        raise _fail(err) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    console.print(f"wrote {len(rows)} DriveBench rows to {out}")


@data_app.command("validate")
def validate_cmd(path: Path, image_root: ImageRoot | None = None, skip_invalid: SkipInvalid = False) -> None:
    """Check every row of a JSONL file (schema, tags, cameras, images on disk) and summarise it."""
    from collections import Counter

    from drivekd.data.schema import read_jsonl

    errors: list = []
    try:
        samples = list(read_jsonl(path, image_root=image_root, skip_invalid=skip_invalid, errors=errors))
    except DriveKDError as err:
        raise _fail(err) from None
    for err in errors:
        console.print(f"[yellow]invalid[/yellow] {escape(str(err))}")
    table = Table(title=f"{path}: {len(samples)} valid samples, {len(errors)} invalid")
    for column in ("capability", "task", "kind", "views", "count"):
        table.add_column(column)
    counts = Counter((s.capability, s.task, s.kind, "multi" if s.multi_view else "single") for s in samples)
    for key, count in sorted(counts.items()):
        table.add_row(*key, str(count))
    Console().print(table)
    if errors:
        raise typer.Exit(code=1)


@data_app.command("synth")
def synth_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output folder (JSONL per split + images).")],
    train: Annotated[int, typer.Option(help="Scenes in the train split.")] = 200,
    val: Annotated[int, typer.Option(help="Scenes in the val split.")] = 40,
    test: Annotated[int, typer.Option(help="Scenes in the test split.")] = 40,
    views: Annotated[str, typer.Option(help="single (front view), multi (six cameras) or both")] = "both",
    domain: Annotated[
        str, typer.Option(help="driving, or general (plain shapes, for the pre-study)")
    ] = "driving",
    width: Annotated[int, typer.Option(help="Image width in pixels.")] = 256,
    height: Annotated[int, typer.Option(help="Image height in pixels.")] = 144,
    seed: int = 0,
) -> None:
    """Generate the procedural synthetic driving set (single front view and/or six nuScenes cameras)."""
    from drivekd.data.synthetic import generate_dataset

    if views not in ("single", "multi", "both") or domain not in ("driving", "general"):
        raise _fail(
            ValueError(
                f"--views must be single|multi|both and --domain driving|general, got {views}, {domain}"
            )
        )
    summaries = generate_dataset(
        out,
        n_scenes={"train": train, "val": val, "test": test},
        seed=seed,
        views=views,  # type: ignore[arg-type]
        image_size=(width, height),
        domain=domain,  # type: ignore[arg-type]
    )
    table = Table(title=f"synthetic {domain} data under {out}")
    for column in ("split", "scenes", "images", "samples", "perception", "reasoning", "planning", "file"):
        table.add_column(column)
    for summary in summaries.values():
        caps = summary.by_capability
        table.add_row(
            summary.split,
            str(summary.scenes),
            str(summary.images),
            str(summary.samples),
            str(caps["perception"]),
            str(caps["reasoning"]),
            str(caps["planning"]),
            str(summary.path),
        )
    Console().print(table)


@models_app.command("tiny")
def tiny_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for teacher/ and student/.")],
    family: Annotated[str, typer.Option(help="qwen2_5_vl | internvl | qwen3_vl")] = "qwen2_5_vl",
    seed: int = 0,
) -> None:
    """Build a tiny random teacher/student pair offline and save it in Hugging Face format."""
    from drivekd.models.pair import build_tiny_pair

    try:
        pair = build_tiny_pair(family, seed=seed)
    except ValueError as err:
        raise _fail(err) from None
    pair.save(out)
    console.print(f"saved {family} teacher and student under {out}")


@app.command("train", context_settings={"allow_extra_args": False})
def train_cmd(
    config: Annotated[Path | None, typer.Argument(help="YAML config; omit for the defaults.")] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides, e.g. optim.lr=1e-4.")
    ] = None,
) -> None:
    """Distil a student (single- or multi-teacher, AGP, reweighting); resumes from the newest checkpoint."""
    from drivekd.training.config import ConfigError, load_config
    from drivekd.training.trainer import train

    if config is not None and "=" in str(config) and not config.exists():
        overrides, config = [str(config), *(overrides or [])], None
    try:
        cfg = load_config(config, overrides or [])
        result = train(cfg)
    except (ConfigError, DriveKDError) as err:
        raise _fail(err) from None
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
    device: Device = None,
    dtype: DType = None,
) -> None:
    """Cost of attention capture vs a plain SDPA SFT step (one fresh process per variant)."""
    from drivekd.bench.capture import config_for, run

    cfg = config_for(quick, device=device, dtype=dtype)
    console.print(
        f"decoder hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads}/{cfg.kv_heads} heads; L = {cfg.length} with "
        f"{cfg.vision_tokens} vision tokens; {cfg.device} {cfg.dtype}"
    )
    report = run(cfg)
    _print_ratios(report, "attention capture vs plain SFT step (same run)")
    _write_json(report, json_path)


if __name__ == "__main__":
    app()
