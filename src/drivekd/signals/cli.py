"""``drivekd cache-teacher``: one teacher pass over a data set, writing its attention signals to a cache.

The default layers are what the Drive-KD recipes read from a teacher: text-to-vision blocks at paper layer 1
(perception, eq. 13) and l_pen (planning, eq. 16). ``--full`` adds the full maps of layers 1..l_pen for the
reasoning loss (eqs. 14-15); they are L^2 values per layer and sample, so the cache grows by orders of magnitude.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from drivekd.data.header import image_root_for
from drivekd.data.schema import ANSWER_ORDERS, AnswerOrder, Sample, read_jsonl
from drivekd.errors import DriveKDError

if TYPE_CHECKING:  # the teacher pass imports torch: loaded when the command runs, not for `drivekd --help`
    import torch

    from drivekd.data.collate import VLMCollator
    from drivekd.signals.cache import CacheReport
    from drivekd.signals.types import SignalNeeds

DEFAULT_LAYERS = "tv:1,pen"
FULL_LAYERS = "full:1-pen"
DTYPES = ("float16", "float32")
console = Console(stderr=True, soft_wrap=True)


def parse_layer_spec(spec: str, num_layers: int) -> SignalNeeds:
    """The layers named by ``spec`` for a teacher of ``num_layers`` decoder layers, as 0-based indices.

    ``spec`` is ``;``-separated parts ``kind:items`` with kind ``tv`` or ``full`` and comma-separated items in
    paper numbering: a layer 1..N, ``pen`` (l_pen = N - 1) or an inclusive range such as ``1-pen``. Example:
    ``"tv:1,pen;full:1-pen"``.
    """
    from drivekd.losses.groups import paper_layer_to_index, penultimate_layer
    from drivekd.signals.types import SignalNeeds

    pen = penultimate_layer(num_layers)

    def error(why: str) -> ValueError:
        return ValueError(
            f"bad layer spec {spec!r}: {why}; expected parts like 'tv:1,pen;full:1-pen' (paper layers "
            f"1..{num_layers}, pen = {pen})"
        )

    def paper_layer(token: str) -> int:
        token = token.strip()
        if token == "pen":
            return pen
        if not token.isdigit() or not 1 <= int(token) <= num_layers:
            raise error(f"{token!r} is not a layer")
        return int(token)

    chosen: dict[str, set[int]] = {"tv": set(), "full": set()}
    for part in filter(str.strip, spec.split(";")):
        kind, colon, items = (text.strip() for text in part.partition(":"))
        if not colon or kind not in chosen:
            raise error(f"{part.strip()!r} does not start with 'tv:' or 'full:'")
        for item in items.split(","):
            start, dash, end = item.partition("-")
            first = paper_layer(start)
            last = paper_layer(end) if dash else first
            if last < first:
                raise error(f"range {item.strip()!r} runs backwards")
            chosen[kind].update(range(first, last + 1))
    if not any(chosen.values()):
        raise error("no layers")
    tv, full = (
        frozenset(paper_layer_to_index(k, num_layers) for k in chosen[kind]) for kind in ("tv", "full")
    )
    return SignalNeeds(tv_layers=tv, full_layers=full)


def cache_teacher_cmd(
    teacher: Annotated[
        str,
        typer.Option(
            "--teacher",
            help="Saved model folder or hub id, or tiny:<family> for an offline tiny teacher. Tiny teachers have "
            "random weights (seed 0) and give meaningless signals: for real ones pass a trained folder.",
        ),
    ],
    data: Annotated[Path, typer.Option("--data", help="Drive-KD JSONL of the samples to cache.")],
    out: Annotated[Path, typer.Option("--out", help="Cache folder to write (shards and index.json).")],
    image_root: Annotated[
        Path | None,
        typer.Option(
            "--image-root",
            help="Folder that image paths are relative to (default: the one the JSONL records, else its folder).",
        ),
    ] = None,
    layers: Annotated[
        str,
        typer.Option(
            "--layers",
            help="Layers per kind in paper numbering, e.g. 'tv:1,pen;full:1-pen' (pen = N - 1). Default: the "
            "t-v blocks of the perception and planning recipes.",
        ),
    ] = DEFAULT_LAYERS,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help=f"Also cache full maps for reasoning ({FULL_LAYERS}); L^2 per layer and sample: large.",
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per teacher forward.")] = 8,
    dtype: Annotated[str, typer.Option("--dtype", help="float16 or float32 storage.")] = "float16",
    shard_samples: Annotated[int, typer.Option("--shard-samples", help="Samples per shard file.")] = 256,
    padding_side: Annotated[str, typer.Option("--padding-side", help="left or right.")] = "right",
    device: Annotated[
        str | None,
        typer.Option(
            "--device", help="Where the teacher runs: cpu, cuda, cuda:1, ... (default: cuda if available)"
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing cache in --out.")
    ] = False,
    tv_rows: Annotated[
        str,
        typer.Option(
            "--tv-rows",
            help="Text queries of the t-v blocks: 'text' (the paper's T_b, distill.normalisation=paper) or "
            "'non_image' (every non-vision token, distill.normalisation=reference).",
        ),
    ] = "text",
    max_length: Annotated[
        int | None,
        typer.Option(
            "--max-length", help="Tokens a sample may take (default: the teacher's max_position_embeddings)."
        ),
    ] = None,
    overlong: Annotated[
        str, typer.Option("--overlong", help="refuse | skip (and list) samples over --max-length.")
    ] = "refuse",
    answer_order: Annotated[
        str,
        typer.Option(
            "--answer-order",
            help="answer_first | rationale_first | rationale_option_first: the supervised text's layout; the "
            "training's data.answer_order.",
        ),
    ] = "answer_first",
) -> None:
    """One teacher pass over --data, writing its attention signals to safetensors shards with an index."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from drivekd.data.collate import VLMCollator
    from drivekd.data.lengths import limit_lengths, model_limit
    from drivekd.devices import default_device
    from drivekd.models.families import family_of
    from drivekd.models.pair import load_spec
    from drivekd.signals.cache import write_cache

    try:
        if (
            dtype not in DTYPES
            or padding_side not in ("left", "right")
            or tv_rows not in ("text", "non_image")
            or overlong not in ("refuse", "skip")
            or answer_order not in ANSWER_ORDERS
        ):
            raise ValueError(
                f"--dtype must be float16|float32, --padding-side left|right, --tv-rows text|non_image, "
                f"--overlong refuse|skip and --answer-order {'|'.join(ANSWER_ORDERS)}, got {dtype}, "
                f"{padding_side}, {tv_rows}, {overlong}, {answer_order}"
            )
        root = image_root_for(data, image_root)
        # Read first, so bad data is refused before the teacher loads.
        samples = list(read_jsonl(data, image_root=root))
        if not samples:
            raise ValueError(f"{data} has no samples")
        model, processor = load_spec(teacher, role="teacher")
        model.to(device or default_device())
        family = family_of(model)
        spec = f"{layers};{FULL_LAYERS}" if full else layers
        needs = parse_layer_spec(spec, len(family.decoder_layers(model)))
        side: Literal["left", "right"] = "left" if padding_side == "left" else "right"
        order = cast(AnswerOrder, answer_order)
        collator = VLMCollator(
            processor, family.image_token_id(model), image_root=root, padding_side=side, answer_order=order
        )
        samples, lengths = limit_lengths(
            samples,
            collator.token_length,
            max_length or model_limit(family.text_config(model)),
            "skip" if overlong == "skip" else "refuse",
            source=str(data),
            setting="--max-length",
            skip="--overlong skip",
        )
        if lengths.summary():
            console.print(f"[yellow]warning:[/yellow] {escape(lengths.summary() or '')} (not cached)")
        if not samples:
            raise ValueError(f"no sample of {data} is within {lengths.limit} tokens (--max-length)")
        if needs.full_layers:
            _warn_full_size(collator, samples, len(needs.full_layers), getattr(torch, dtype))
        columns = (
            TextColumn("caching teacher signals"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("cache", total=len(samples))
            report = write_cache(
                model,
                samples,
                collator,
                out,
                needs=needs,
                batch_size=batch_size,
                teacher_name=teacher,
                dtype=getattr(torch, dtype),
                shard_samples=shard_samples,
                overwrite=overwrite,
                progress=lambda n: progress.advance(task, n),
                tv_rows="non_image" if tv_rows == "non_image" else "text",
            )
    except (DriveKDError, ValueError, OSError) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(code=2) from None
    Console().print(_report_table(report))


SIZE_SAMPLES = 4  # samples per (images, task, kind) group whose token length the size estimate measures


def estimate_full_bytes(
    collator: VLMCollator, samples: Sequence[Sample], layers: int, dtype: torch.dtype
) -> tuple[int, dict[int, int]]:
    """Estimated bytes of the full maps of ``samples`` (``layers`` maps of L^2 values each), and the mean token
    length L per number of images.

    L depends mostly on the number of images (single-view and six-view data mix very different lengths) and then
    on the question form, so samples are grouped by (number of images, task, kind); in each group the mean L^2 of
    up to :data:`SIZE_SAMPLES` samples spread evenly over it scales to the group's size.
    """
    groups: dict[tuple[int, str, str], list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[(len(sample.images), sample.task, sample.kind)].append(sample)
    total = 0.0
    by_views: dict[int, list[int]] = defaultdict(list)
    for (views, _, _), group in sorted(groups.items()):
        k = min(SIZE_SAMPLES, len(group))
        picked = [group[round(i * (len(group) - 1) / max(k - 1, 1))] for i in range(k)]
        measured = [collator([s]).inputs["input_ids"].shape[1] for s in picked]
        total += len(group) * sum(n**2 for n in measured) / len(measured)
        by_views[views] += measured * len(group)  # weighted like the group it stands for
    lengths = {views: round(sum(ns) / len(ns)) for views, ns in sorted(by_views.items())}
    return round(total * layers * dtype.itemsize), lengths


def _warn_full_size(
    collator: VLMCollator, samples: Sequence[Sample], layers: int, dtype: torch.dtype
) -> None:
    size, lengths = estimate_full_bytes(collator, samples, layers, dtype)
    mix = ", ".join(f"{views} image{'s' * (views != 1)}: L ~ {n}" for views, n in lengths.items())
    console.print(
        f"[yellow]warning:[/yellow] full maps are L^2 values per layer and sample: about {_size(size)} for "
        f"{len(samples)} samples ({mix}; {layers} layers, {str(dtype).removeprefix('torch.')}), "
        f"about {_size(size / max(len(samples), 1))} per sample"
    )


def _size(count: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while count >= 1024 and len(units) > 1:
        count /= 1024
        units.pop(0)
    return f"{count:,.1f} {units[0]}"


def _report_table(report: CacheReport) -> Table:
    table = Table(title=f"teacher cache {report.path} ({report.dtype})")
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("samples", str(report.samples)),
        ("shards", str(report.shards)),
        ("tv layers (0-based)", str(report.layers.get("tv", []))),
        ("full layers (0-based)", str(report.layers.get("full", []))),
        ("bytes on disk (shards + index)", f"{report.bytes_total:,}"),
        ("bytes per sample, mean", f"{report.bytes_per_sample_mean:,.0f}"),
        ("bytes per sample, max", f"{report.bytes_per_sample_max:,}"),
        *((f"{kind} bytes", f"{size:,}") for kind, size in report.bytes_by_kind.items()),
    ]
    for row in rows:
        table.add_row(*row)
    return table
