"""``drivekd data``: import, export, generate and validate driving VQA data (Drive-KD JSONL)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from drivekd.errors import DataError, DriveKDError, OutputExistsError
from drivekd.fileio import refuse_overwrite, write_text_atomically

data_app = typer.Typer(help="Import, generate and validate driving VQA data (JSONL).", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)

SkipInvalid = Annotated[
    bool, typer.Option("--skip-invalid", help="Report and skip bad rows instead of stopping.")
]
ImageRoot = Annotated[
    Path | None,
    typer.Option(
        "--image-root",
        help="Folder that image paths are relative to (not needed with --text-only); the written JSONL records it.",
    ),
]
ReadRoot = Annotated[
    Path | None,
    typer.Option(
        "--image-root",
        help="Folder the JSONL's image paths are relative to (default: the one it records, else its folder).",
    ),
]
TextOnly = Annotated[
    bool,
    typer.Option(
        "--text-only", help="Import without checking or loading images; the samples are asked without them."
    ),
]
VisualDescriptions = Annotated[
    Path | None,
    typer.Option(
        "--visual-descriptions",
        help="DriveBench's visual_description.json: ground-truth object descriptions for the judge.",
    ),
]
AllowOutsideRoot = Annotated[
    bool,
    typer.Option(
        "--allow-outside-root",
        help="Accept image paths that lead outside the image root (.., absolute paths, symlinks out of it).",
    ),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace --out when it exists (or is the input file).")
]
Out = Annotated[Path, typer.Option("--out", help="Drive-KD JSONL to write.")]
ExportOut = Annotated[Path, typer.Option("--out", help="JSON file to write.")]


IMAGE_HINT = "replace or regenerate the image, or remove the row"


def _fail(err: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(err))}")
    return typer.Exit(code=2)


def _import(
    importer: Callable[..., Any],
    path: Path,
    out: Path,
    skip_invalid: bool,
    overwrite: bool,
    inputs: tuple[Path | None, ...] = (),
    **options: Any,
) -> None:
    """Run an importer and write its samples, with a header recording the image root (none for a text-only
    import); a file of which nothing could be imported is a failure (exit 2), and so is an ``out`` that exists or
    is an input, unless ``overwrite``."""
    from drivekd.data.schema import write_jsonl

    try:
        refuse_overwrite(out, overwrite=overwrite, inputs=[p for p in (path, *inputs) if p is not None])
        result = importer(path, skip_invalid=skip_invalid, **options)
    except DriveKDError as err:
        raise _fail(err) from None
    for err in result.errors:
        console.print(f"[yellow]skipped[/yellow] {escape(str(err))}")
    if not result.samples:
        what = f"all {len(result.errors)} rows were invalid" if result.errors else "it holds no rows"
        raise _fail(ValueError(f"{path}: nothing to import, {what}; {out} was not written"))
    root = None if options.get("text_only") else options.get("image_root")
    count = write_jsonl(result.samples, out, image_root=root)
    console.print(f"wrote {count} samples to {out} ({len(result.errors)} skipped)")


@data_app.command("import-drivelm")
def import_drivelm_cmd(
    path: Path,
    out: Out,
    image_root: ImageRoot = None,
    text_only: TextOnly = False,
    skip_invalid: SkipInvalid = False,
    allow_outside_root: AllowOutsideRoot = False,
    overwrite: Overwrite = False,
) -> None:
    """Convert a DriveLM challenge file (test_eval.json, train_sample.json) to Drive-KD JSONL."""
    from drivekd.data.drivelm import import_drivelm

    _import(
        import_drivelm,
        path,
        out,
        skip_invalid,
        overwrite,
        image_root=image_root,
        text_only=text_only,
        allow_outside_root=allow_outside_root,
    )


@data_app.command("import-drivebench")
def import_drivebench_cmd(
    path: Path,
    out: Out,
    image_root: ImageRoot = None,
    text_only: TextOnly = False,
    visual_descriptions: VisualDescriptions = None,
    skip_invalid: SkipInvalid = False,
    allow_outside_root: AllowOutsideRoot = False,
    overwrite: Overwrite = False,
) -> None:
    """Convert a DriveBench file as released (test, corruption or prediction file) to Drive-KD JSONL.

    --image-root is the root of a DriveBench checkout (the rows' image paths start with data/nuscenes/).
    """
    from drivekd.data.drivebench import import_drivebench

    _import(
        import_drivebench,
        path,
        out,
        skip_invalid,
        overwrite,
        (visual_descriptions,),
        image_root=image_root,
        text_only=text_only,
        allow_outside_root=allow_outside_root,
        visual_descriptions=visual_descriptions,
    )


@data_app.command("import-drivekd")
def import_drivekd_cmd(
    path: Path,
    out: Out,
    image_root: ImageRoot = None,
    text_only: TextOnly = False,
    skip_invalid: SkipInvalid = False,
    allow_outside_root: AllowOutsideRoot = False,
    overwrite: Overwrite = False,
) -> None:
    """Convert a file in the Drive-KD release format (messages, images, question_type) to Drive-KD JSONL."""
    from drivekd.data.drivekd_format import import_drivekd

    _import(
        import_drivekd,
        path,
        out,
        skip_invalid,
        overwrite,
        image_root=image_root,
        text_only=text_only,
        allow_outside_root=allow_outside_root,
    )


def _write_rows(rows: list[dict[str, Any]], out: Path, what: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(rows, indent=2, ensure_ascii=False))
    console.print(f"wrote {len(rows)} {what} to {out}")


@data_app.command("export-drivebench")
def export_drivebench_cmd(
    path: Path,
    out: ExportOut,
    image_root: ReadRoot = None,
    predictions: Annotated[
        Path | None,
        typer.Option(
            "--predictions", help="Predictions JSONL (drivekd eval generate) to export the answers of."
        ),
    ] = None,
    fmt: Annotated[
        Literal["drivebench", "drivelm-submission"],
        typer.Option(
            "--format",
            help="drivebench: DriveBench rows (with 'pred' when --predictions is given, the official evaluator's "
            "input); drivelm-submission: the DriveLM challenge's [{id, question, answer}] (needs --predictions).",
        ),
    ] = "drivebench",
    allow_outside_root: AllowOutsideRoot = False,
    overwrite: Overwrite = False,
) -> None:
    """Write Drive-KD JSONL as a DriveBench file, or its predictions as a DriveLM challenge submission."""
    from drivekd.data.drivebench import to_drivebench
    from drivekd.data.drivelm import to_drivelm_submission
    from drivekd.data.schema import read_jsonl
    from drivekd.evaluation.predictions import read_predictions

    if fmt == "drivelm-submission" and predictions is None:
        raise _fail(ValueError("--format drivelm-submission needs --predictions PRED.jsonl"))
    try:
        refuse_overwrite(out, overwrite=overwrite, inputs=[p for p in (path, predictions) if p is not None])
        samples = list(read_jsonl(path, image_root=image_root, allow_outside_root=allow_outside_root))
        answers = (
            None
            if predictions is None
            else {key: record.prediction for key, record in read_predictions(predictions).items()}
        )
        if answers is not None and fmt == "drivelm-submission":
            rows = to_drivelm_submission(samples, answers)
        else:
            rows = to_drivebench(samples, answers)
    except DriveKDError as err:
        raise _fail(err) from None
    _write_rows(rows, out, "DriveLM submission entries" if fmt == "drivelm-submission" else "DriveBench rows")


@data_app.command("export-drivekd")
def export_drivekd_cmd(
    path: Path,
    out: ExportOut,
    image_root: ReadRoot = None,
    allow_outside_root: AllowOutsideRoot = False,
    overwrite: Overwrite = False,
) -> None:
    """Write Drive-KD JSONL in the Drive-KD release format (messages, images, question_type)."""
    from drivekd.data.drivekd_format import to_drivekd
    from drivekd.data.schema import read_jsonl

    try:
        refuse_overwrite(out, overwrite=overwrite, inputs=[path])
        rows = to_drivekd(read_jsonl(path, image_root=image_root, allow_outside_root=allow_outside_root))
    except DriveKDError as err:
        raise _fail(err) from None
    _write_rows(rows, out, "Drive-KD items")


@data_app.command("validate")
def validate_cmd(
    path: Path, image_root: ReadRoot = None, allow_outside_root: AllowOutsideRoot = False
) -> None:
    """Check every row of a JSONL file and summarise it: schema, ids, tags, cameras, and every image decoded
    (unless text-only). Exit 1 when a row is invalid (each is listed), 2 when the file is missing or empty."""
    from collections import Counter

    from drivekd.data.header import image_root_for
    from drivekd.data.images import ImageFileError, open_image
    from drivekd.data.schema import read_jsonl

    errors: list[DataError] = []
    samples: list[Any] = []
    try:
        root = image_root_for(path, image_root)
        rows = read_jsonl(
            path, image_root=root, skip_invalid=True, errors=errors, allow_outside_root=allow_outside_root
        )
        for sample in rows:
            for k, image in enumerate(sample.shown_images):
                try:
                    open_image(image.resolve(root, allow_outside_root=allow_outside_root)).close()
                except ImageFileError as err:
                    errors.append(DataError(str(path), sample.id, f"images.{k}.path", str(err), IMAGE_HINT))
                    break
            else:
                samples.append(sample)
    except DriveKDError as err:
        raise _fail(err) from None
    if not samples and not errors:
        raise _fail(ValueError(f"{path}: the file holds no rows (pass a Drive-KD JSONL file with samples)"))
    for err in errors:
        console.print(f"[yellow]invalid[/yellow] {escape(str(err))}")
    table = Table(
        title=f"{path}: {len(samples)} valid samples, {len(errors)} invalid", caption=f"image root: {root}"
    )
    for column in ("capability", "task", "kind", "views", "count"):
        table.add_column(column)

    def views(sample: Any) -> str:
        return "text only" if sample.text_only else "multi" if sample.multi_view else "single"

    counts = Counter((s.capability, s.task, s.kind, views(s)) for s in samples)
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
        str,
        typer.Option(
            help="driving, general (plain shapes, for the pre-study) or describe (open-ended descriptions of "
            "driving scenes: the demo's base student's pretraining task)"
        ),
    ] = "driving",
    # The demo teacher's training size (drivekd.data.synthetic.generate.DEFAULT_SIZE; not imported, to keep the
    # command line's start-up light).
    width: Annotated[int, typer.Option(help="Image width in pixels (default: the demo teacher's).")] = 224,
    height: Annotated[int, typer.Option(help="Image height in pixels (default: the demo teacher's).")] = 112,
    seed: int = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the data set already in --out.")
    ] = False,
) -> None:
    """Generate the procedural synthetic driving set (single front view and/or six nuScenes cameras)."""
    from drivekd.data.synthetic import generate_dataset

    counts = {"train": train, "val": val, "test": test}
    if views not in ("single", "multi", "both") or domain not in ("driving", "general", "describe"):
        raise _fail(
            ValueError(
                f"--views must be single|multi|both and --domain driving|general|describe, got {views}, {domain}"
            )
        )
    if min(counts.values()) < 0 or sum(counts.values()) == 0 or min(width, height) < 1:
        raise _fail(
            ValueError(
                f"--train, --val and --test must be >= 0 scenes (not all 0) and --width, --height >= 1 pixel, got "
                f"{train}, {val}, {test} scenes of {width}x{height}"
            )
        )
    written = [out / f"{split}.jsonl" for split in counts if (out / f"{split}.jsonl").exists()]
    if written and not overwrite:
        raise _fail(
            OutputExistsError(
                f"{out} already holds a data set ({', '.join(p.name for p in written)}); pass --overwrite to "
                "replace it or choose another --out"
            )
        )
    summaries = generate_dataset(
        out,
        n_scenes=counts,
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
