"""Layer numbering and the student-to-teacher layer-group matching of section 3.3.2.

Numbering. The paper counts decoder layers 1..N and calls the embeddings layer 0, so the penultimate layer is
l_pen = N - 1 (eq. 16). In a Hugging Face model:

* the attention map of paper layer l is the one computed inside decoder layer index l - 1
  (``model.layers[l - 1]``, ``outputs.attentions[l - 1]``);
* ``outputs.hidden_states[l]`` is the output of decoder layer index l - 1, i.e. of paper layer l, and
  ``hidden_states[0]`` is the embeddings. HF language models overwrite ``hidden_states[N]`` with the
  final-normed output, one more reason every selection here stops at l_pen.

Every function takes and returns paper numbers except ``paper_layer_to_index``, which gives the 0-based index.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch


def paper_layer_to_index(layer: int, num_layers: int) -> int:
    """0-based decoder-layer index of paper layer ``layer`` (1..N) for a model of ``num_layers`` = N."""
    if not 1 <= layer <= num_layers:
        raise ValueError(f"paper layer must be in 1..{num_layers} (0 is the embeddings), got {layer}")
    return layer - 1


def penultimate_layer(num_layers: int) -> int:
    """l_pen = N - 1 in paper numbering (eq. 16); needs N >= 2."""
    if num_layers < 2:
        raise ValueError(f"a penultimate layer needs at least 2 decoder layers, got {num_layers}")
    return num_layers - 1


def reasoning_layers(num_layers: int) -> list[int]:
    """Paper layers 1..l_pen, the reasoning range of section 3.3.2."""
    return list(range(1, penultimate_layer(num_layers) + 1))


def mid_layers(num_layers: int) -> list[int]:
    """Paper layers 2..l_pen - 1, the appendix-E "mid (2 -> l_pen - 1)" range; needs N >= 4."""
    if num_layers < 4:
        raise ValueError(f"the mid range 2..N-2 needs at least 4 decoder layers, got {num_layers}")
    return list(range(2, num_layers - 1))


def teacher_layer_groups(student_layers: Sequence[int], teacher_layers: Sequence[int]) -> list[list[int]]:
    """Teacher layers whose mean is the target of each student layer (section 3.3.2).

    With K student and M teacher layers, g = max(1, M - K + 1) and student layer l_i (1-based i) gets the
    sliding window [k_{s_i+1}, ..., k_{s_i+g}] with s_i = min(i - 1, M - g): K == M pairs layers one to one,
    K < M widens the windows so that they cover every teacher layer, and K > M clamps later student layers to
    the last teacher layer.
    """
    _check_layers("student_layers", student_layers)
    _check_layers("teacher_layers", teacher_layers)
    k, m = len(student_layers), len(teacher_layers)
    g = max(1, m - k + 1)
    starts = (min(i, m - g) for i in range(k))  # s_i, with i counted from 0 here
    return [list(teacher_layers[s : s + g]) for s in starts]


def group_targets(
    teacher_maps: Mapping[int, torch.Tensor], groups: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Mean of the teacher tensors over each group (eqs. 15, 32); keys are the layer numbers of ``groups``.

    Works for attention maps and hidden states alike. Accumulates instead of stacking so that at most two
    map-sized temporaries are alive per group, and returns a group of one as is (no copy).
    """
    targets = []
    for group in groups:
        if not group:
            raise ValueError("a teacher layer group must not be empty")
        missing = [layer for layer in group if layer not in teacher_maps]
        if missing:
            raise KeyError(
                f"teacher layers {missing} are in a group but not in teacher_maps "
                f"(available: {sorted(teacher_maps)})"
            )
        total = teacher_maps[group[0]]
        for layer in group[1:]:
            total = total + teacher_maps[layer]
        targets.append(total if len(group) == 1 else total / len(group))
    return targets


def _check_layers(name: str, layers: Sequence[int]) -> None:
    if len(layers) == 0:
        raise ValueError(f"{name} must not be empty")
    if any(b <= a for a, b in itertools.pairwise(layers)):
        raise ValueError(f"{name} must be strictly increasing, got {list(layers)}")
