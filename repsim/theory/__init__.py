"""The paper's constructions in closed form, the geometry check of real students, and the synthetic experiments.

Modules: :mod:`~repsim.theory.constructions` (Theorem 1, the projection and linear-map counterexamples, teacher-side
collapse, the bounds), :mod:`~repsim.theory.checks` (the geometry check, per model pair and before / after
distillation), :mod:`~repsim.theory.experiments` (synthetic distillation, tables, figures, the runner).
"""

from repsim.moved import moved_name
from repsim.theory.checks import (  # noqa: F401
    CheckResult,
    GeometryCheck,
    check,
    check_layers,
    check_min_rows,
    check_models,
    checks_table,
    compare_students,
    eps_orthogonal_preservation,
    geometry_before_after,
    parse_layer_map,
)
from repsim.theory.constructions import (  # noqa: F401
    METRIC_IDS,
    GeometryBounds,
    LinearMapCounterexample,
    ProjectionCounterexample,
    TeacherSideCollapse,
    Theorem1,
    cosine_matrix,
    geometry_bounds,
    least_squares_projection_loss,
    linear_map_counterexample,
    max_inner_product_error,
    near_orthogonal_sweep,
    projection_counterexample,
    teacher_side_collapse,
    theorem1,
    theorem1_closed_form,
    theorem1_sweep,
)
from repsim.theory.experiments import (  # noqa: F401
    DEFAULT_SIZES,
    SYNTHETIC_LOSSES,
    Counterexamples,
    counterexamples,
    plot_synthetic,
    plot_theorem1,
    projection_table,
    synthetic_distill,
    synthetic_experiment,
    synthetic_final_table,
    synthetic_teacher,
)


def __getattr__(name: str):  # noqa: ANN202
    """Names that moved out of the package still resolve, with a DeprecationWarning (repsim/moved.py)."""
    return moved_name(__name__, name)
