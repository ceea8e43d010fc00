"""`drivekd bench capture`: the cost of attention capture against a plain SFT step, one fresh process per variant.

Variants (all on the same Qwen2.5-VL-architecture student, the same batch and the same CE loss on the answer span):

* ``sft``: SDPA attention, CE only;
* ``eager``: eager attention with ``output_attentions=True``, CE + the t-v losses at layers 1 and pen + full-map
  losses at layers 1..N-1 (what one would write without capture);
* ``tv``: capture of the text-to-vision block at layers 1 and pen, CE + t-v losses (perception + planning signals);
* ``full``: capture of full maps at layers 1..N-1 (query-chunked, chunks checkpointed), CE + full-map loss (reasoning).

Teacher targets are fixed tensors made before measuring. Ratios are each variant's wall time and peak-memory growth
of one forward+backward step divided by the ``sft`` figures measured in the same run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from drivekd.bench.measure import measure
from drivekd.bench.options import check_device_and_dtype
from drivekd.bench.workers import ratios, run_variants
from drivekd.capture.recorder import AttentionRecorder, CapturePlan, use_capture_attention
from drivekd.data.roles import TVIndex
from drivekd.losses import full_attention_mse, head_mean, supervised_loss, text_to_vision_mse_blocks
from drivekd.models.families import mrope_section

VARIANTS = ("sft", "eager", "tv", "full")


@dataclass(frozen=True)
class CaptureBenchConfig:
    """Decoder shape and token layout. The default is a Qwen2.5-0.5B-sized decoder at L ~ 1209."""

    hidden: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    vocab: int = 151936
    grid: tuple[int, int] = (56, 72)  # patch grid of the one image: 56 x 72 / 2x2 merge = 1008 vision tokens
    text_before: int = 16
    text_after: int = 120
    answer: int = 62
    steps: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    chunk_size: int = 256

    @property
    def vision_tokens(self) -> int:
        return self.grid[0] * self.grid[1] // 4

    @property
    def special_ids(self) -> dict[str, int]:
        """Image, vision-start/end, eos and pad ids at the top of the vocabulary, as in Qwen's tokenizer."""
        names = ("vision_start", "vision_end", "image", "eos", "pad")
        return {name: self.vocab - len(names) + k for k, name in enumerate(names)}

    @property
    def length(self) -> int:
        return self.text_before + 2 + self.vision_tokens + self.text_after + self.answer


QUICK = CaptureBenchConfig(
    hidden=256,
    layers=8,
    heads=8,
    kv_heads=2,
    intermediate=768,
    vocab=32000,
    grid=(32, 40),
    text_before=16,
    text_after=80,
    answer=32,
    steps=2,
)


def _model(cfg: CaptureBenchConfig) -> Qwen2_5_VLForConditionalGeneration:
    ids = cfg.special_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": cfg.vocab,
            "hidden_size": cfg.hidden,
            "intermediate_size": cfg.intermediate,
            "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads,
            "num_key_value_heads": cfg.kv_heads,
            "max_position_embeddings": 32768,
            "bos_token_id": None,
            "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"],
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": mrope_section(cfg.hidden // cfg.heads),
            },
        },
        vision_config={
            "depth": 1,
            "hidden_size": 64,
            "num_heads": 2,
            "intermediate_size": 128,
            "out_hidden_size": cfg.hidden,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["image"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config)


def _batch(cfg: CaptureBenchConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    special = cfg.special_ids
    text = lambda n: torch.randint(0, min(special.values()), (n,), generator=gen)  # noqa: E731
    ids = torch.cat(
        [
            text(cfg.text_before),
            torch.tensor([special["vision_start"]]),
            torch.full((cfg.vision_tokens,), special["image"]),
            torch.tensor([special["vision_end"]]),
            text(cfg.text_after + cfg.answer),
        ]
    ).unsqueeze(0)
    labels = torch.full_like(ids, -100)
    labels[0, -cfg.answer :] = ids[0, -cfg.answer :]
    vision = ids == special["image"]
    textual = ~vision & (ids != special["vision_start"]) & (ids != special["vision_end"])
    patches = cfg.grid[0] * cfg.grid[1]
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": vision.long(),
        "pixel_values": torch.randn(patches, 3 * 2 * 14 * 14, generator=gen).to(dtype),
        "image_grid_thw": torch.tensor([[1, *cfg.grid]]),
    }
    return {
        "inputs": {k: v.to(device) for k, v in inputs.items()},
        "labels": labels.to(device),
        "index": TVIndex.from_masks(textual, vision).to(device),
        "valid": torch.ones_like(ids, dtype=torch.bool).to(device),
    }


def _targets(cfg: CaptureBenchConfig, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Fixed teacher targets: random causal row-stochastic maps and their t-v blocks."""
    gen = torch.Generator().manual_seed(2)
    length = cfg.length
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    full = {}
    for layer in range(cfg.layers - 1):
        scores = torch.randn(1, length, length, generator=gen).masked_fill(~causal, float("-inf"))
        full[layer] = scores.softmax(-1).to(device)
    index: TVIndex = batch["index"]
    return {"full": full, "tv": {layer: index.gather(full[layer]) for layer in (0, cfg.layers - 2)}}


def _step(
    variant: str, model: Any, cfg: CaptureBenchConfig, batch: dict[str, Any], targets: dict[str, Any]
) -> None:
    keep = cfg.answer + 1  # logits only where the answer is predicted, as an efficient SFT step computes them
    labels = batch["labels"][:, -keep:]
    tv_layers, full_layers = (0, cfg.layers - 2), range(cfg.layers - 1)
    if variant == "sft":
        loss = supervised_loss(model(**batch["inputs"], logits_to_keep=keep).logits, labels)
    elif variant == "eager":
        out = model(**batch["inputs"], logits_to_keep=keep, output_attentions=True)
        maps = [head_mean(a) for a in out.attentions]
        loss = supervised_loss(out.logits, labels)
        for layer in tv_layers:
            block = batch["index"].gather(maps[layer])
            loss = loss + text_to_vision_mse_blocks(block, targets["tv"][layer], batch["index"])
        for layer in full_layers:
            loss = loss + full_attention_mse(maps[layer], targets["full"][layer], batch["valid"])
    else:
        plan = (
            CapturePlan.of(tv=tv_layers, chunk_size=cfg.chunk_size)
            if variant == "tv"
            else CapturePlan.of(full=full_layers, chunk_size=cfg.chunk_size)
        )
        with AttentionRecorder(model, plan, grad=True) as recorder:
            recorder.start(batch["index"])
            out = model(**batch["inputs"], logits_to_keep=keep)
            captured = recorder.collect()
        loss = supervised_loss(out.logits, labels)
        for layer, block in captured.tv.items():
            loss = loss + text_to_vision_mse_blocks(block, targets["tv"][layer], batch["index"])
        for layer, full in captured.full.items():
            loss = loss + full_attention_mse(full, targets["full"][layer], batch["valid"])
    loss.backward()


def run_worker(variant: str, cfg: CaptureBenchConfig, mode: str) -> dict[str, Any]:
    """Measure one variant in this process: a warm-up step, then ``cfg.steps`` steps for time (``mode`` time) or for
    peak memory (memory)."""
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = _model(cfg).to(device=device, dtype=dtype).train()
    if variant == "eager":
        model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    elif variant in ("tv", "full"):
        use_capture_attention(model)
    batch = _batch(cfg, device, dtype)
    targets = _targets(cfg, batch, device) if variant != "sft" else {}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        _step(variant, model, cfg, batch, targets)

    step()  # warms up allocators and kernels
    runs = [measure(step, device) for _ in range(cfg.steps)]
    figures = (
        {"peak_bytes": max(r.peak_bytes for r in runs)}
        if mode == "memory"
        else {"seconds": min(r.seconds for r in runs)}
    )
    return {
        "variant": variant,
        **figures,
        "length": cfg.length,
        "vision_tokens": cfg.vision_tokens,
        "text_queries": int(batch["index"].text_count.sum()),
    }


def run(cfg: CaptureBenchConfig, variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Run every variant in a fresh process and compute ratios against ``sft``."""
    results = run_variants("drivekd.bench.capture", variants, json.dumps(asdict(cfg)))
    return {"config": asdict(cfg), "results": results, "ratios": ratios(results), "torch": torch.__version__}


def config_for(quick: bool, **overrides: Any) -> CaptureBenchConfig:
    check_device_and_dtype(overrides.get("device"), overrides.get("dtype"))
    cfg = QUICK if quick else CaptureBenchConfig()
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


if __name__ == "__main__":
    variant_name, mode, raw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    raw["grid"] = tuple(raw["grid"])
    print(json.dumps(run_worker(variant_name, CaptureBenchConfig(**raw), mode)))
