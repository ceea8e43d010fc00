"""``drivekd analyze``: run the section-3.2 pre-study on one model and recommend its distillation layers.

Writes ``OUT/metrics.json``, ``OUT/layers.yaml`` (the config fragment ``drivekd train`` accepts) and the PNG
figures; an existing ``metrics.json`` is only replaced with ``--overwrite``, and every file is written whole
(temporary file, then rename). :func:`figures_cmd` redraws the figures of several runs side by side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from drivekd.errors import DriveKDError
from drivekd.fileio import write_text_atomically

if TYPE_CHECKING:  # the analysis imports torch: loaded when a command runs, not for `drivekd --help`
    from transformers import PreTrainedModel, ProcessorMixin

    from drivekd.analysis.dataset import PrestudySet
    from drivekd.analysis.runner import AnalysisOptions
    from drivekd.models.families import FamilyAdapter

console = Console(stderr=True, soft_wrap=True)
DTYPES = ("float32", "bfloat16", "float16")


def analyze_cmd(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="A saved model folder or hub id (any supported family), or tiny:<family> for a random tiny model "
            "built offline (smoke runs).",
        ),
    ],
    data: Annotated[Path, typer.Option("--data", help="Driving pre-study JSONL (Drive-KD samples).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (metrics.json, layers.yaml, figures).")],
    image_root: Annotated[
        Path | None,
        typer.Option(
            "--image-root",
            help="Folder the data's image paths are relative to (default: the one it records, else its folder).",
        ),
    ] = None,
    general_data: Annotated[
        Path | None,
        typer.Option("--general-data", help="General (non-driving) VQA JSONL for the confidence comparison."),
    ] = None,
    general_image_root: Annotated[
        Path | None, typer.Option("--general-image-root", help="Image root of --general-data.")
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", help="Analyse at most this many samples of each file.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per forward.")] = 2,
    family: Annotated[
        str | None,
        typer.Option("--family", help="qwen2_5_vl | internvl | qwen3_vl (default: from the config)"),
    ] = None,
    role: Annotated[
        str, typer.Option("--role", help="teacher or student: the block layers.yaml fills.")
    ] = "student",
    device: Annotated[
        str | None, typer.Option("--device", help="cpu or cuda (default: cuda if available)")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16")] = "auto",
    temperatures: Annotated[
        str | None,
        typer.Option(
            "--temperatures", help="Comma-separated softmax temperatures (eqs. 6-8; default: 0.7,1,2)."
        ),
    ] = None,
    bins: Annotated[int, typer.Option("--bins", help="Position bins along the answer.")] = 10,
    dispersion_questions: Annotated[
        int, typer.Option("--dispersion-questions", help="Questions per image entering the dispersion pairs.")
    ] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of a tiny:<family> model.")] = 0,
    max_length: Annotated[
        int | None,
        typer.Option(
            "--max-length", help="Tokens a sample may take (default: the model's max_position_embeddings)."
        ),
    ] = None,
    overlong: Annotated[
        str,
        typer.Option(
            "--overlong", help="refuse | skip (and list in metrics.json) samples over --max-length."
        ),
    ] = "refuse",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the results already in --out.")
    ] = False,
) -> None:
    """Pre-study analyses of section 3.2 (eqs. 1-8) and the adaptive layer recommendation for one model."""
    from drivekd.analysis.confidence import TEMPERATURES
    from drivekd.analysis.dataset import load_prestudy
    from drivekd.analysis.runner import AnalysisOptions
    from drivekd.analysis.selection import ROLES

    try:
        options = AnalysisOptions(
            batch_size=batch_size,
            temperatures=_temperatures(temperatures) if temperatures is not None else TEMPERATURES,
            bins=bins,
            dispersion_questions=dispersion_questions,
            max_length=max_length,
            overlong=overlong,  # type: ignore[arg-type]  # AnalysisOptions checks it
        )
        if role not in ROLES:
            raise ValueError(f"--role must be teacher or student, got {role!r}")
        if (out / "metrics.json").exists() and not overwrite:
            raise ValueError(
                f"{out / 'metrics.json'} exists; pass --overwrite to replace it or choose another --out"
            )
        pre = load_prestudy(data, image_root=image_root, max_samples=max_samples)
        general = (
            load_prestudy(
                general_data, image_root=general_image_root, max_samples=max_samples, domain="general"
            )
            if general_data is not None
            else None
        )
        loaded, processor, adapter = load_model(
            model, family=family, role=role, dtype=dtype, device=device, seed=seed
        )
        console.print(
            f"analysing {escape(model)} ({adapter.name}, {len(adapter.decoder_layers(loaded))} decoder layers) on "
            f"{len(pre.samples)} samples" + (f" + {len(general.samples)} general" if general else "")
        )
        metrics, written = analyze_and_write(
            loaded,
            processor,
            adapter,
            pre,
            general,
            options,
            out,
            name=model,
            role=role,
            progress=_progress(),
        )
    except (DriveKDError, ValueError, OSError) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(code=2) from None
    for key in ("lengths", "general_lengths"):
        skipped = metrics["data"].get(key, {}).get("overlong_skipped", [])
        if skipped:
            shown = ", ".join(f"{row['id']} ({row['tokens']} tokens)" for row in skipped[:10])
            console.print(
                f"[yellow]warning:[/yellow] skipped {len(skipped)} samples over --max-length: {escape(shown)}"
            )
    _print_summary(metrics, written)


def figures_cmd(
    metrics: Annotated[
        list[Path], typer.Argument(help="metrics.json files of `drivekd analyze` runs, in order.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNG figures.")],
    labels: Annotated[
        str | None,
        typer.Option("--labels", help="Comma-separated run labels (default: each run's model name)."),
    ] = None,
) -> None:
    """Draw figures 2 and 4-8 for several analysed models side by side (e.g. one family at several scales)."""
    from drivekd.analysis.figures import write_figures

    try:
        runs = [json.loads(path.read_text(encoding="utf-8")) for path in metrics]
        names = (
            labels.split(",")
            if labels
            else [run.get("model", {}).get("name", str(p)) for run, p in zip(runs, metrics, strict=True)]
        )
        if len(names) != len(runs):
            raise ValueError(f"--labels names {len(names)} runs, but {len(runs)} metrics files were given")
    except (OSError, ValueError) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(code=2) from None
    for path in write_figures(list(zip(names, runs, strict=True)), out).values():
        console.print(f"wrote {escape(str(path))}")


def load_model(
    spec: str, *, family: str | None, role: str, dtype: str, device: str | None, seed: int = 0
) -> tuple[PreTrainedModel, ProcessorMixin, FamilyAdapter]:
    """``tiny:<family>`` builds the tiny teacher or student (by ``role``) offline; a LoRA checkpoint loads its base
    with the adapter merged; anything else is loaded with ``from_pretrained`` (the family read from the config unless
    given) (:func:`~drivekd.models.pair.load_spec`). ``device`` defaults to CUDA when there is one."""
    import torch

    from drivekd.devices import default_device
    from drivekd.models.families import family_of
    from drivekd.models.pair import load_spec

    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model, processor = load_spec(spec, role=role, family=family, dtype=torch_dtype, seed=seed)
    return model.to(device or default_device()), processor, family_of(model)


def analyze_and_write(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    adapter: FamilyAdapter,
    data: PrestudySet,
    general: PrestudySet | None,
    options: AnalysisOptions,
    out: Path,
    *,
    name: str,
    role: str,
    progress: Any = None,
) -> tuple[dict[str, Any], list[Path]]:
    """:func:`analyze` one model, recommend its ``role``'s layers and write the results to ``out``."""
    from drivekd.analysis.runner import analyze
    from drivekd.analysis.selection import recommend

    metrics = analyze(model, processor, adapter, data, general, options, progress=progress)
    metrics["model"] |= {"name": name, "role": role}
    metrics["recommended_layers"] = recommend(metrics, role)  # type: ignore[arg-type]
    return metrics, write_results(metrics, out, label=name)


def write_results(metrics: dict[str, Any], out: Path, *, label: str) -> list[Path]:
    """Write metrics.json, layers.yaml and the figures; returns the paths."""
    from drivekd.analysis.figures import write_figures
    from drivekd.analysis.selection import fragment_yaml

    out.mkdir(parents=True, exist_ok=True)
    metrics_path, layers_path = out / "metrics.json", out / "layers.yaml"
    write_text_atomically(metrics_path, json.dumps(json_safe(metrics), indent=1, allow_nan=False))
    write_text_atomically(layers_path, fragment_yaml(metrics["recommended_layers"]))
    figures = write_figures([(label, metrics)], out)
    return [metrics_path, layers_path, *figures.values()]


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--temperatures must be comma-separated numbers, got {text!r}") from None


def _progress() -> Any:
    shown: dict[str, int] = {}

    def report(file: str, done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done // step > shown.get(file, -1):
            shown[file] = done // step
            console.print(f"  {escape(file)}: {done}/{total} samples")

    return report


def _print_summary(metrics: dict[str, Any], written: list[Path]) -> None:
    from drivekd.analysis.selection import train_overrides

    recommended = metrics["recommended_layers"]
    block = recommended["layers"][recommended["role"]]
    evidence = recommended["evidence"]
    table = Table(
        title=f"recommended {recommended['role']} layers (paper numbering, N = {recommended['num_layers']})"
    )
    for column in ("capability", "layers", "decided by"):
        table.add_column(column)
    table.add_row("perception", str(block["perception"]), evidence["perception"]["decided_by"])
    table.add_row(
        "reasoning", f"{block['reasoning'][0]}..{block['reasoning'][1]}", evidence["reasoning"]["decided_by"]
    )
    table.add_row("planning", str(block["planning"]), evidence["planning"]["decided_by"])
    Console().print(table)
    for path in written:
        console.print(f"wrote {escape(str(path))}")
    console.print(f"train with these layers: drivekd train CONFIG {' '.join(train_overrides(recommended))}")
