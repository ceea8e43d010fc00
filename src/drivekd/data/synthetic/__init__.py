"""Procedural synthetic driving scenes (and a plain-shapes "general" domain) rendered with PIL, with
rule-derived questions of the paper's eight types; deterministic by seed.

``scene`` samples a scene, ``render`` draws it into the nuScenes cameras, ``questions`` derives answers and
rationales, ``generate`` writes splits.
"""

from drivekd.data.synthetic.generate import SplitSummary, generate_dataset, generate_split
from drivekd.data.synthetic.questions import QUESTION_TYPES

__all__ = ["QUESTION_TYPES", "SplitSummary", "generate_dataset", "generate_split"]
