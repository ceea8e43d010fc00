"""Pre-study analyses of section 3.2 / appendix A and the adaptive layer selection built on them.

``metrics`` (eqs. 1-5, dispersion), ``confidence`` (eqs. 6-8), ``dataset`` (the pre-study set, grouped by image),
``runner`` (model + data -> metrics), ``selection`` (the layer rule), ``figures`` (figures 2, 4-8) and ``cli``
(``drivekd analyze``). See docs/analysis.md.
"""

from drivekd.analysis.dataset import PrestudySet, image_key, load_prestudy
from drivekd.analysis.runner import AnalysisOptions, analyze
from drivekd.analysis.selection import Curves, LayerChoice, fragment_yaml, recommend, select_layers

__all__ = [
    "AnalysisOptions",
    "Curves",
    "LayerChoice",
    "PrestudySet",
    "analyze",
    "fragment_yaml",
    "image_key",
    "load_prestudy",
    "recommend",
    "select_layers",
]
