"""Model-family adapters: how to load a real VLM, build a tiny one offline, and find its decoder layers.

Each adapter knows one transformers-native family. Real checkpoints load with ``from_pretrained`` from a hub id or a
local path; tiny models are built from configs with an offline tokenizer and PIL image processor, so tests and the
demo exercise the same model classes as real runs.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoProcessor,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.utils import is_torchvision_available

from drivekd.errors import ModelSourceError
from drivekd.models.tokenizer import build_tokenizer


@dataclass(frozen=True)
class TinySize:
    """Shape of a tiny decoder and vision tower. Teacher and student differ in depth, width and heads."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_hidden: int = 32
    vision_depth: int = 1
    vision_heads: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Both keep head_dim 16 (Qwen's mrope sections must sum to head_dim / 2) and use grouped-query attention.
TINY_TEACHER = TinySize(
    hidden=64, layers=6, heads=4, kv_heads=2, intermediate=128, vision_hidden=48, vision_depth=2
)
TINY_STUDENT = TinySize(hidden=32, layers=4, heads=2, kv_heads=1, intermediate=64)


def mrope_section(head_dim: int) -> list[int]:
    """Qwen's multimodal-rope split of head_dim / 2 rotary pairs over (time, height, width)."""
    half = head_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]


VIDEO_CONFIG = "video_preprocessor_config.json"
# Image processor settings a family's video processor shares (the rest of its settings keep their defaults).
_VIDEO_KEYS = (
    "size",
    "resample",
    "do_resize",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
    "patch_size",
    "temporal_patch_size",
    "merge_size",
)


def _without_video(processor_cls: type[ProcessorMixin], video_processor_type: str) -> type[ProcessorMixin]:
    """A processor subclass that accepts ``video_processor=None`` and still saves a complete processor folder.

    The Qwen and InternVL processors type-check every slot, and their video processors need torchvision, which is
    not importable beside the CPU torch wheel; tiny models never see video. Saving writes the family's video
    processor config too (``video_processor_type`` and the image settings it shares), so that the folder loads
    with ``AutoProcessor.from_pretrained`` wherever transformers can build that video processor.
    """

    class ImageOnly(processor_cls):  # type: ignore[misc, valid-type]
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [name for name in super().get_attributes() if name != "video_processor"]

        def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
            saved = super().save_pretrained(save_directory, *args, **kwargs)
            image = self.image_processor.to_dict()
            video = {k: image[k] for k in _VIDEO_KEYS if k in image}
            video["video_processor_type"] = video_processor_type
            (Path(save_directory) / VIDEO_CONFIG).write_text(
                json.dumps(video, indent=2, sort_keys=True) + "\n"
            )
            return saved

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_cls.__name__
    return ImageOnly


class FamilyAdapter(ABC):
    """What the rest of Drive-KD needs to know about one VLM family."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    model_cls: ClassVar[type[PreTrainedModel]]
    processor_cls: ClassVar[type[ProcessorMixin]]
    # The transformers class of the family's video processor (named in a saved folder's video config).
    video_processor_type: ClassVar[str]
    # Named special tokens the family's processor reads from its tokenizer.
    special_tokens: ClassVar[dict[str, str]]
    chat_tokens: ClassVar[tuple[str, ...]] = ("<|im_start|>", "<|im_end|>")
    pad_token: ClassVar[str] = "<|endoftext|>"
    eos_token: ClassVar[str] = "<|im_end|>"
    # The image placeholder the chat template writes for each image (the processor expands it).
    chat_template: ClassVar[str]
    # Submodules on the vision side of the model: they see the images of batch row 0, then row 1, ... along dim 0.
    vision_modules: ClassVar[tuple[str, ...]]
    # The vision encoder's submodules (without the projector): what model.freeze's alias vision_tower freezes.
    vision_tower: ClassVar[tuple[str, ...]]

    def load(
        self, name_or_path: str | Path, *, dtype: torch.dtype | str = "auto", **kwargs: Any
    ) -> tuple[PreTrainedModel, ProcessorMixin]:
        """Load a real checkpoint and its processor (hub id or local folder); one that cannot be found or fetched
        is a :class:`ModelSourceError` saying what to pass instead. A local folder's absolute path becomes the
        model's ``name_or_path``, which a LoRA adapter trained on it records as its base."""
        check_model_source(name_or_path)
        folder = Path(name_or_path).expanduser()
        source = str(folder.resolve()) if folder.is_dir() else str(name_or_path)
        with _named_source(name_or_path):
            model = self.model_cls.from_pretrained(source, dtype=dtype, **kwargs)
            return model, self.load_processor(source)

    def load_processor(self, name_or_path: str | Path) -> ProcessorMixin:
        """The family's processor. Without a usable torchvision, or from a folder saved without a video processor
        config, it loads image-only (the video processor needs torchvision; Drive-KD never feeds video)."""
        folder = Path(name_or_path)
        no_video = folder.is_dir() and not (folder / VIDEO_CONFIG).exists()
        if no_video or not is_torchvision_available():
            return _without_video(self.processor_cls, self.video_processor_type).from_pretrained(name_or_path)
        return AutoProcessor.from_pretrained(name_or_path)

    # The image-budget options of model.processor this family takes (the rest are refused by name).
    processor_options: ClassVar[tuple[str, ...]]

    def configure_processor(self, processor: ProcessorMixin, options: dict[str, int]) -> None:
        """Apply image resolution / token-budget ``options`` (``model.processor``'s set keys) to ``processor``."""
        other = sorted(set(options) - set(self.processor_options))
        if other:
            raise ModelSourceError(
                f"model.processor.{other[0]} does not apply to {self.name} processors; {self.name} takes "
                f"{', '.join(self.processor_options)}"
            )
        self._apply_options(processor.image_processor, options)

    def _apply_options(self, image_processor: Any, options: dict[str, int]) -> None:
        for key, value in options.items():
            setattr(image_processor, key, value)

    def tiny_tokenizer(self) -> Any:
        return build_tokenizer(
            self.special_tokens,
            chat_tokens=self.chat_tokens,
            pad_token=self.pad_token,
            eos_token=self.eos_token,
            chat_template=self.chat_template,
        )

    @abstractmethod
    def tiny_processor(self, tokenizer: Any, image_size: tuple[int, int]) -> ProcessorMixin:
        """A processor over ``tokenizer`` that turns an image of ``image_size`` (W, H) into a few vision tokens."""

    @abstractmethod
    def tiny_config(self, size: TinySize, tokenizer: Any, image_size: tuple[int, int]) -> PretrainedConfig:
        """A config of the family's real class with the given shape."""

    def tiny_model(
        self, size: TinySize, tokenizer: Any, image_size: tuple[int, int], *, seed: int
    ) -> PreTrainedModel:
        torch.manual_seed(seed)
        model = self.model_cls(self.tiny_config(size, tokenizer, image_size))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model.eval()

    def is_vision_module(self, name: str) -> bool:
        """Whether the module at dotted path ``name`` is on the vision side (encoder or projector)."""
        return any(part in self.vision_modules for part in name.split("."))

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language model's decoder layers, in order (index 0 is the paper's layer 1)."""
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        return inner.model.language_model.layers

    def text_config(self, model: PreTrainedModel) -> PretrainedConfig:
        return model.config.get_text_config()

    def image_token_id(self, model: PreTrainedModel) -> int:
        return int(model.config.image_token_id)

    def _text_kwargs(self, size: TinySize, tokenizer: Any) -> dict[str, Any]:
        return {
            "vocab_size": len(tokenizer),
            "hidden_size": size.hidden,
            "intermediate_size": size.intermediate,
            "num_hidden_layers": size.layers,
            "num_attention_heads": size.heads,
            "num_key_value_heads": size.kv_heads,
            "max_position_embeddings": 4096,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": None,
        }


_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class _QwenAdapter(FamilyAdapter):
    special_tokens: ClassVar[dict[str, str]] = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    }
    chat_template = _QWEN_TEMPLATE
    vision_modules = ("visual",)
    vision_tower = ("visual",)  # Qwen's merger (its projector) lives inside visual
    patch_size: ClassVar[int] = 14
    processor_options = ("min_pixels", "max_pixels")

    def _apply_options(self, image_processor: Any, options: dict[str, int]) -> None:
        """Qwen's image processor reads its pixel budget from ``size`` (shortest_edge: min_pixels, longest_edge:
        max_pixels); a max_pixels below the processor's minimum lowers that minimum too."""
        size = dict(image_processor.size)
        low = options.get("min_pixels", size["shortest_edge"])
        high = options.get("max_pixels", size["longest_edge"])
        if "min_pixels" not in options:
            low = min(low, high)
        image_processor.size = {**size, "shortest_edge": low, "longest_edge": high}

    def tiny_processor(self, tokenizer: Any, image_size: tuple[int, int]) -> ProcessorMixin:
        pixels = image_size[0] * image_size[1]
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=self.patch_size,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": pixels, "longest_edge": pixels},
        )
        return _without_video(self.processor_cls, self.video_processor_type)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=self.chat_template,
        )

    def _rope(self, size: TinySize, **extra: Any) -> dict[str, Any]:
        section = mrope_section(size.head_dim)
        return {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": section,
                **extra,
            }
        }

    def _vision(self, size: TinySize, **extra: Any) -> dict[str, Any]:
        return {
            "depth": size.vision_depth,
            "hidden_size": size.vision_hidden,
            "num_heads": size.vision_heads,
            "intermediate_size": 2 * size.vision_hidden,
            "out_hidden_size": size.hidden,
            "patch_size": self.patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            **extra,
        }

    def _vision_token_ids(self, tokenizer: Any) -> dict[str, int]:
        return {
            "image_token_id": tokenizer.image_token_id,
            "video_token_id": tokenizer.video_token_id,
            "vision_start_token_id": tokenizer.vision_start_token_id,
            "vision_end_token_id": tokenizer.vision_end_token_id,
        }


class Qwen25VLAdapter(_QwenAdapter):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_cls = Qwen2_5_VLForConditionalGeneration
    processor_cls = Qwen2_5_VLProcessor
    video_processor_type = "Qwen2VLVideoProcessor"

    def tiny_config(self, size: TinySize, tokenizer: Any, image_size: tuple[int, int]) -> PretrainedConfig:
        text = self._text_kwargs(size, tokenizer) | self._rope(size)
        vision = self._vision(
            size, window_size=4 * self.patch_size, fullatt_block_indexes=[size.vision_depth - 1]
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **self._vision_token_ids(tokenizer))


class Qwen3VLAdapter(_QwenAdapter):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    model_cls = Qwen3VLForConditionalGeneration
    processor_cls = Qwen3VLProcessor
    video_processor_type = "Qwen3VLVideoProcessor"
    patch_size = 16

    def tiny_config(self, size: TinySize, tokenizer: Any, image_size: tuple[int, int]) -> PretrainedConfig:
        text = (
            self._text_kwargs(size, tokenizer)
            | {"head_dim": size.head_dim}
            | self._rope(size, mrope_interleaved=True)
        )
        vision = self._vision(size, num_position_embeddings=64, deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **self._vision_token_ids(tokenizer))


class InternVLAdapter(FamilyAdapter):
    name = "internvl"
    model_types = ("internvl",)
    model_cls = InternVLForConditionalGeneration
    processor_cls = InternVLProcessor
    video_processor_type = "InternVLVideoProcessor"
    special_tokens: ClassVar[dict[str, str]] = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    vision_modules = ("vision_tower", "multi_modal_projector")
    vision_tower = ("vision_tower",)
    processor_options = ("min_patches", "max_patches")  # tiles per image (GotOcr2 crop_to_patches)
    patch_size: ClassVar[int] = 14

    def _tile(self, image_size: tuple[int, int]) -> int:
        """Square tile side: InternVL resizes each image to one tile (a multiple of 2 patches)."""
        step = 2 * self.patch_size
        return max(step, round(min(image_size) / step) * step)

    def tiny_processor(self, tokenizer: Any, image_size: tuple[int, int]) -> ProcessorMixin:
        tile = self._tile(image_size)
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": tile, "width": tile}, crop_to_patches=True, max_patches=2
        )
        return _without_video(self.processor_cls, self.video_processor_type)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            image_seq_length=(tile // self.patch_size) ** 2 // 4,
            chat_template=self.chat_template,
        )

    def tiny_config(self, size: TinySize, tokenizer: Any, image_size: tuple[int, int]) -> PretrainedConfig:
        tile = self._tile(image_size)
        vision = {
            "hidden_size": size.vision_hidden,
            "num_hidden_layers": size.vision_depth,
            "num_attention_heads": size.vision_heads,
            "intermediate_size": 2 * size.vision_hidden,
            "image_size": [tile, tile],
            "patch_size": [self.patch_size, self.patch_size],
        }
        return InternVLConfig(
            text_config={"model_type": "qwen2", **self._text_kwargs(size, tokenizer)},
            vision_config=vision,
            image_token_id=tokenizer.context_image_token_id,
            image_seq_length=(tile // self.patch_size) ** 2 // 4,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
        )


FAMILIES: dict[str, FamilyAdapter] = {
    a.name: a for a in (Qwen25VLAdapter(), InternVLAdapter(), Qwen3VLAdapter())
}


def get_family(name: str) -> FamilyAdapter:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelSourceError(
            f"unknown model family {name!r}; supported: {', '.join(FAMILIES)} (set model.family / --family to one "
            "of them)"
        ) from None


def family_of(model_or_config: PreTrainedModel | PretrainedConfig) -> FamilyAdapter:
    """The adapter for a loaded model or config, by its ``model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in FAMILIES.values():
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(f"model type {model_type!r} is not supported; supported families: {', '.join(FAMILIES)}")


def load_pretrained(name_or_path: str | Path, **kwargs: Any) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load any supported VLM by reading its config first to pick the family."""
    return family_of(check_model_source(name_or_path)).load(name_or_path, **kwargs)


def _looks_like_folder(name: str) -> bool:
    """A name meant as a local folder rather than a hub id (``namespace/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


@contextmanager
def _named_source(name_or_path: str | Path) -> Iterator[None]:
    """Turn what ``from_pretrained`` raises for a model it cannot find or fetch into a :class:`ModelSourceError`."""
    try:
        yield
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelSourceError(
            f"cannot load model {str(name_or_path)!r}: {first} (pass a saved Hugging Face model folder, or a hub id "
            "that is reachable or already downloaded: huggingface-cli download <id> while online, HF_HUB_OFFLINE=1 "
            "after)"
        ) from None


def check_model_source(name_or_path: str | Path) -> PretrainedConfig:
    """The config of a model folder or hub id, read without loading weights, so a missing folder or an unreachable
    hub id is refused (as a :class:`ModelSourceError`) before any model is loaded."""
    name = str(name_or_path)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelSourceError(
                f"model folder {name} has no config.json: pass a folder saved by save_pretrained (or a hub id)"
            )
    elif folder.exists() or _looks_like_folder(name):
        raise ModelSourceError(
            f"model folder not found: {name} (pass an existing saved model folder or a hub id)"
        )
    with _named_source(name):
        return AutoConfig.from_pretrained(name)
