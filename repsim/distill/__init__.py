"""Knowledge distillation with feature losses: configuration, students, teacher cache, training, grids, evaluation.

Modules: :mod:`~repsim.distill.config` (settings and results), :mod:`~repsim.distill.students` (loading and model
surgery), :mod:`~repsim.distill.data` (tokenised data and splits), :mod:`~repsim.distill.teacher_cache`,
:mod:`~repsim.distill.trainer` (the loss and the loop), :mod:`~repsim.distill.massive` (first-token
masking), :mod:`~repsim.distill.grid` (runs and grids),
:mod:`~repsim.distill.evaluation` (scores, tests, tables). Layer maps come from :mod:`repsim.activations.layers`,
model loading from :mod:`repsim.activations.models`, atomic writes from :mod:`repsim.system.files`.
"""

from repsim.activations.layers import layer_map_pairs, num_layers, parse_layer_map, uniform_layer_map  # noqa: F401
from repsim.activations.models import hidden_width  # noqa: F401
from repsim.distill.config import (  # noqa: F401
    FEATURE_LOSSES,
    FEATURE_MODES,
    FIRST_TOKEN_MODES,
    TASKS,
    DistillConfig,
    DistillResult,
    resolve_device,
    teacher_finetune_config,
)
from repsim.distill.data import (  # noqa: F401
    Encoded,
    check_same_tokenization,
    collate,
    encode,
    load_split,
    load_train_validation,
    pooled_mean,
)
from repsim.distill.evaluation import evaluate, perplexity, predict  # noqa: F401
from repsim.distill.grid import distill, distill_command, finetune, finetune_command, run_grid  # noqa: F401
from repsim.distill.massive import (  # noqa: F401
    MASSIVE_RATIO,
    drop_first_token,
    first_token_norm_ratios,
    massive_layers,
    resolve_first_token,
)
from repsim.distill.students import drop_layers, has_trained_head, load, make_student, narrow_model  # noqa: F401
from repsim.distill.teacher_cache import teacher_outputs  # noqa: F401
from repsim.distill.trainer import DistillTrainer, seed_everything  # noqa: F401
