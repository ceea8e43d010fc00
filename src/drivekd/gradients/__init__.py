"""Gradient combination of Drive-KD (section 3.4, appendices B.1 and D.1).

``agp``, ``g2`` and ``pcgrad`` are the explicit-vector references on flat gradients; ``agp_weights``,
``g2_weights``, ``pcgrad_weights``, ``none_weights`` and ``combine_weights`` give the same updates as coefficients
over the loss gradients from their Gramian alone; ``drivekd.gradients.mixing`` builds the rows they act on (eqs. 17,
26); ``LossReweighter`` is the online loss reweighting of eq. 25.
"""

from drivekd.gradients.explicit import (
    agp,
    agp_merge,
    agp_teacher_grouped,
    g2,
    g2_merge,
    g2_teacher_grouped,
    pcgrad,
    project_out,
)
from drivekd.gradients.gramian import (
    METHODS,
    ProjectionStats,
    agp_weights,
    combine_teacher_weights,
    combine_weights,
    g2_weights,
    none_weights,
    pcgrad_weights,
    stage2_order,
    teacher_grouped_weights,
)
from drivekd.gradients.mixing import (
    DEFAULT_PI,
    PROJECTION_EPS,
    Combination,
    TeacherCombination,
    atomic_coefficients,
    combination_gramian,
    combination_matrix,
    group_matrix,
    group_norms,
    pi_matrix,
    row_norms,
    teacher_matrix,
)
from drivekd.gradients.reweight import LossReweighter, ReweightStep

__all__ = [
    "DEFAULT_PI",
    "METHODS",
    "PROJECTION_EPS",
    "Combination",
    "LossReweighter",
    "ProjectionStats",
    "ReweightStep",
    "TeacherCombination",
    "agp",
    "agp_merge",
    "agp_teacher_grouped",
    "agp_weights",
    "atomic_coefficients",
    "combination_gramian",
    "combination_matrix",
    "combine_teacher_weights",
    "combine_weights",
    "g2",
    "g2_merge",
    "g2_teacher_grouped",
    "g2_weights",
    "group_matrix",
    "group_norms",
    "none_weights",
    "pcgrad",
    "pcgrad_weights",
    "pi_matrix",
    "project_out",
    "row_norms",
    "stage2_order",
    "teacher_grouped_weights",
    "teacher_matrix",
]
