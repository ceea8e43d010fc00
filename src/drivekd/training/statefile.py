"""A nested state (optimizer, scheduler, RNG, sampler, ...) as one safetensors file plus one JSON file, no pickle.

The JSON file holds the structure; every tensor and numpy array in it is stored in the safetensors file under a
running key and referenced by that key. Reading the pair back needs no code from the files: the JSON is parsed and
the tensors are loaded by safetensors. Dicts with string keys are JSON objects; the other containers are tagged
objects with one reserved key (``__tuple__``, ``__items__`` for dicts with other keys, ``__tensor__``,
``__ndarray__``), so that tuples, integer keys (optimizer states) and numpy arrays (numpy's RNG state) come back as
they went in. A value of any other type is refused at save.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

_TAGS = ("__tuple__", "__items__", "__tensor__", "__ndarray__")


class StateFormatError(ValueError):
    """The JSON structure is not one this module wrote (a tag with the wrong shape, a missing tensor)."""


def save_state(state: Any, tensors_path: Path, json_path: Path) -> None:
    """Write ``state`` as ``json_path`` (structure) and ``tensors_path`` (tensors and arrays)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    save_file(tensors, str(tensors_path))
    json_path.write_text(json.dumps(tree, indent=1) + "\n")


def load_state(tensors_path: Path, json_path: Path) -> Any:
    """Read a state written by :func:`save_state`."""
    from safetensors.torch import load_file

    return _decode(json.loads(json_path.read_text()), load_file(str(tensors_path)))


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).view(np.uint8).reshape(-1).copy())
        return {"__ndarray__": key, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(
        f"cannot store a {type(value).__name__} in a trainer state (tensors, arrays, containers only)"
    )


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    tag = next((t for t in _TAGS if t in node), None)
    if tag is None:
        return {k: _decode(v, tensors) for k, v in node.items()}
    try:
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in node[tag])
        if tag == "__items__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in node[tag]}
        if tag == "__tensor__":
            return tensors[node[tag]]
        dtype = np.dtype(node["dtype"])
        if dtype.hasobject:  # object arrays hold pointers: never read them from a file
            raise ValueError(f"object dtype {dtype}")
        return tensors[node[tag]].numpy().view(dtype).reshape(node["shape"]).copy()
    except (KeyError, TypeError, ValueError) as err:
        raise StateFormatError(f"malformed {tag} entry: {err}") from None
