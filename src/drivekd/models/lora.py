"""LoRA checkpoints: a folder that holds a PEFT adapter names its base model and loads as base + adapter, merged.

A LoRA student's checkpoint (``checkpoint-N/student``) holds the adapter only. PEFT records the base model's
``name_or_path`` in ``adapter_config.json`` (``base_model_name_or_path``): a hub id, the absolute path of a local
folder (:meth:`~drivekd.models.families.FamilyAdapter.load` makes it absolute), or the ``tiny:`` spec of an offline
tiny model (:func:`~drivekd.models.pair.build_tiny_pair` names its models). Loaders merge the adapter into the base,
so every command sees a plain transformers model of the base's class.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedModel

from drivekd.errors import ModelSourceError

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` is a local folder holding a PEFT adapter (and no full model)."""
    folder = Path(name_or_path).expanduser()
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def adapter_base(folder: str | Path) -> str:
    """The base model an adapter folder records; a :class:`ModelSourceError` when it records none."""
    config_file = Path(folder).expanduser() / ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"cannot read the LoRA adapter config {config_file}: {err}") from None
    if not base:
        raise ModelSourceError(
            f"LoRA adapter {folder} does not name its base model (base_model_name_or_path is empty in "
            f"{config_file}): set it to the hub id or model folder the adapter was trained on"
        )
    return str(base)


def merge_adapter(base: PreTrainedModel, folder: str | Path) -> PreTrainedModel:
    """``base`` with the adapter in ``folder`` merged into its weights (a plain model of the base's class)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(Path(folder).expanduser())).merge_and_unload()
