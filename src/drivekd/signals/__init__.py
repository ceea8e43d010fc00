"""Teacher signals as a typed value that comes from a live teacher or from a cache on disk.

The names below load their module on first use, so importing ``drivekd.signals.cli`` to list the command (``drivekd
--help``) does not import torch.
"""

from importlib import import_module
from typing import Any

_HOMES = {
    "CachedTeacher": "cache",
    "write_cache": "cache",
    "LiveTeacher": "live",
    "SignalNeeds": "types",
    "TeacherSignals": "types",
    "TeacherSource": "types",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
