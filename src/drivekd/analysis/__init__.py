"""Pre-study analyses of section 3.2 / appendix A and the adaptive layer selection built on them.

``metrics`` (eqs. 1-5, dispersion), ``confidence`` (eqs. 6-8), ``dataset`` (the pre-study set, grouped by image),
``runner`` (model + data -> metrics), ``selection`` (the layer rule), ``figures`` (figures 2, 4-8) and ``cli``
(``drivekd analyze``). See docs/analysis.md.

The names below load their module on first use, so importing ``drivekd.analysis.cli`` to list the command (``drivekd
--help``) does not import torch.
"""

from importlib import import_module
from typing import Any

_HOMES = {
    "PrestudySet": "dataset",
    "image_key": "dataset",
    "load_prestudy": "dataset",
    "AnalysisOptions": "runner",
    "analyze": "runner",
    "Curves": "selection",
    "LayerChoice": "selection",
    "fragment_yaml": "selection",
    "recommend": "selection",
    "select_layers": "selection",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
