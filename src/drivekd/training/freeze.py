"""Freeze student parameters by name (``model.freeze``) before the optimizer is built.

A pattern is an fnmatch pattern matched against a parameter's dotted name and every dotted suffix of it, so
``visual.*`` matches ``model.visual.blocks.0.attn.qkv.weight`` (and the same name under a LoRA wrapper). The alias
``vision_tower`` stands for the family's vision encoder (:attr:`FamilyAdapter.vision_tower`): ``visual.*`` for
Qwen2.5-VL / Qwen3-VL, ``vision_tower.*`` for InternVL. A pattern that matches no parameter is an error naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from drivekd.errors import DriveKDError
from drivekd.models.families import FamilyAdapter

ALIASES = ("vision_tower",)


class FreezeError(DriveKDError):
    """A ``model.freeze`` pattern matches no parameter of the student."""


@dataclass(frozen=True)
class Frozen:
    """What :func:`freeze` froze: tensor and element counts."""

    tensors: int
    parameters: int

    def summary(self, total: int) -> str:
        return f"model.freeze: {self.parameters:,} of {total:,} student parameters frozen ({self.tensors} tensors)"


def _expand(pattern: str, family: FamilyAdapter) -> tuple[str, ...]:
    if pattern == "vision_tower":
        return tuple(f"{name}.*" for name in family.vision_tower)
    return (pattern,)


def _matches(name: str, pattern: str) -> bool:
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def freeze(model: nn.Module, patterns: Sequence[str], family: FamilyAdapter) -> Frozen:
    """Set ``requires_grad=False`` on every parameter matching a pattern; raise :class:`FreezeError` for a pattern
    that matches none (a typo would otherwise train what was meant to stay fixed)."""
    named = list(model.named_parameters())
    hit: dict[str, nn.Parameter] = {}
    for pattern in patterns:
        expanded = _expand(pattern, family)
        matched = {n: p for n, p in named if any(_matches(n, e) for e in expanded)}
        if not matched:
            shown = f"{pattern!r} ({', '.join(expanded)})" if expanded != (pattern,) else repr(pattern)
            examples = ", ".join(n for n, _ in named[:2])
            raise FreezeError(
                f"model.freeze pattern {shown} matches no parameter of the {family.name} student (names look like "
                f"{examples}); use an fnmatch pattern on parameter names, such as 'visual.*', or the alias "
                f"{', '.join(ALIASES)}"
            )
        hit.update(matched)
    for param in hit.values():
        param.requires_grad_(False)
    return Frozen(len(hit), sum(p.numel() for p in hit.values()))
