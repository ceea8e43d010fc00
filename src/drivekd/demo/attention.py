"""Where each model looks: text-to-vision attention over the image, teacher vs SFT vs distilled student.

The map of one sample is the head-mean text-to-vision block (eq. 12) that :mod:`drivekd.capture` records at one
decoder layer, averaged over the *answer's* query tokens (the reference answer, teacher-forced): those are the
rows the planning and perception signals supervise and the ones that decide what the model says. Each answer row
is a distribution over all keys, so its vision part sums to at most 1; the averaged row is renormalised over the
vision tokens so that the heat map shows where the answer looks on the image, not how much it looks at images at
all. The default layer is paper layer 1, where the paper distils perception.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from drivekd.capture.recorder import AttentionRecorder, CapturePlan, use_capture_attention
from drivekd.data.collate import VLMCollator
from drivekd.data.images import open_image
from drivekd.data.roles import TVIndex
from drivekd.data.schema import Sample
from drivekd.losses.groups import paper_layer_to_index
from drivekd.models.families import family_of

QUESTION_CHARS = 70


def vision_grid(
    block: torch.Tensor, query_rows: torch.Tensor, image_grid_thw: torch.Tensor, merge_size: int
) -> torch.Tensor:
    """(rows, cols) heat map of one single-image sample on its merged vision-token grid, summing to 1.

    ``block`` is the sample's (Tq, Vk) text-to-vision block, ``query_rows`` (Tq,) bool marks the rows averaged
    (the answer's queries), ``image_grid_thw`` the processor's (1, 3) patch grid and ``merge_size`` its spatial
    merge (Qwen2.5-VL: 2, so one vision token covers 2 x 2 patches of 14 px). Vision tokens are in row-major order
    of the merged grid. Several images (six cameras) are refused: their tokens do not form one picture.
    """
    if image_grid_thw.shape[0] != 1:
        raise ValueError(
            f"a heat map needs a single-image sample, got {image_grid_thw.shape[0]} images (six-camera samples "
            "are not drawn)"
        )
    t, h, w = (int(v) for v in image_grid_thw[0])
    rows, cols = h // merge_size, w // merge_size
    if t * rows * cols != block.shape[1]:
        raise ValueError(f"the block has {block.shape[1]} vision keys, the grid {t}x{rows}x{cols}")
    if not bool(query_rows.any()):
        raise ValueError("no query rows selected")
    mean = block[query_rows].float().mean(dim=0).view(t, rows, cols).sum(dim=0)
    return mean / mean.sum().clamp_min(torch.finfo(mean.dtype).tiny)


@torch.no_grad()
def sample_heatmap(
    model: PreTrainedModel, processor: ProcessorMixin, sample: Sample, image_root: Path, *, layer: int = 1
) -> np.ndarray:
    """The answer queries' heat map of ``sample`` at paper layer ``layer``, captured with the eager-exact maps."""
    adapter = family_of(model)
    collate = VLMCollator(processor, adapter.image_token_id(model), image_root=image_root)
    batch = collate([sample])
    index = TVIndex.of_roles(batch.roles)
    decoder = paper_layer_to_index(layer, len(adapter.decoder_layers(model)))
    use_capture_attention(model)
    with AttentionRecorder(model.eval(), CapturePlan.of(tv=[decoder]), grad=False) as recorder:
        recorder.start(index)
        model(**batch.inputs)
        block = recorder.collect().tv[decoder][0]
    answer = torch.gather(batch.roles.answer[0], 0, index.query_index[0]) & index.query_valid[0]
    merge = processor.image_processor.merge_size
    grid = vision_grid(block[:, index.key_valid[0]], answer, batch.inputs["image_grid_thw"], merge)
    return grid.numpy()


def pick_questions(samples: Sequence[Sample], per_capability: int = 2) -> list[Sample]:
    """The first front-view questions of perception, then of planning: MCQs first, then in file order."""
    picked: list[Sample] = []
    for capability in ("perception", "planning"):
        pool = [s for s in samples if s.capability == capability and not s.multi_view]
        picked += sorted(pool, key=lambda s: s.kind != "mcq")[:per_capability]
    return picked


def attention_figure(
    models: Mapping[str, tuple[PreTrainedModel, ProcessorMixin]],
    samples: Sequence[Sample],
    image_root: Path,
    path: Path,
    *,
    layer: int = 1,
) -> Path:
    """Draw one row per sample: its image, then each model's heat map blended over it; saved as PNG at ``path``."""
    if not samples:
        raise ValueError("no questions to draw")
    maps = {
        name: [sample_heatmap(m, p, s, image_root, layer=layer) for s in samples]
        for name, (m, p) in models.items()
    }
    fig = Figure(figsize=(2.6 * (len(models) + 1), 2.0 * len(samples)))
    axes = fig.subplots(len(samples), len(models) + 1, squeeze=False)
    for row, sample in enumerate(samples):
        image = np.asarray(open_image(sample.shown_images[0].resolve(image_root)).convert("RGB"))
        size = (image.shape[1], image.shape[0])
        axes[row][0].imshow(image)
        axes[row][0].set_title(textwrap.shorten(sample.question, QUESTION_CHARS), fontsize=6, loc="left")
        for col, name in enumerate(models, start=1):
            heat = Image.fromarray(maps[name][row] / maps[name][row].max()).resize(
                size, Image.Resampling.NEAREST
            )
            axes[row][col].imshow(image)
            axes[row][col].imshow(np.asarray(heat), cmap="inferno", alpha=0.55, vmin=0.0, vmax=1.0)
            if row == 0:
                axes[row][col].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(
        f"text-to-vision attention of the answer tokens, paper layer {layer} (head mean)", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
