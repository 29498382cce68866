"""Trajectory matching for vision-language distillation (MTT-VL / LoRS / RepBlend), the baselines MDM is measured
against.

MTT (Cazenavette et al., CVPR 2022, arXiv 2203.11932), its bi-trajectory vision-language form MTT-VL (Wu et al.,
TMLR 2024, arXiv 2308.07545) and LoRS (Xu et al., ICML 2024, arXiv 2406.03793) distil by matching *training
trajectories*: a student starts from an expert's checkpoint, takes a few SGD steps on the synthetic pairs, and the
synthetic pairs are moved so that it lands where the expert landed after training on the real data
(``docs/method.md`` §7 places it among MDM's peers). RepBlend (Zhang et al., NeurIPS 2025) matches trajectories of
the two projections alone and blends the synthetic pairs' features in every inner step.

One module per part, read in this order:

* :mod:`.config` -- :class:`TrajectoryMatchingConfig` (MTT-VL defaults; ``preset="lors"`` / ``"repblend"`` for
  LoRS' / RepBlend's settings), :class:`TrajectoryBufferConfig`, the presets;
* :mod:`.losses` -- the inner contrastive loss, the normalised parameter distance, LoRS' similarity matrices;
* :mod:`.blending` -- RepBlend's representation blending, drawn with each mini-batch and replayed in every pass;
* :mod:`.unroll` -- the student's differentiable SGD steps, exact (MTT) or constant-memory (TESLA);
* :mod:`.buffer` -- recording and reading the expert trajectories (a full expert bank, :mod:`mdm_hf.bank`), of the
  whole trained network or of the projections only;
* :mod:`.tracking` -- ``--report_to`` (accelerate trackers) for both commands;
* :mod:`.distiller` -- :class:`TrajectoryMatchingDistiller`, one iteration on the loop MDM shares;
* ``mdm-hf tm-buffer`` and ``mdm-hf tm`` are :func:`mdm_hf.cli.tm_buffer_main` and :func:`mdm_hf.cli.tm_main`.
"""

from .blending import Blend, BlendedDualEncoder, SyntheticMiniBatch, draw_blend
from .buffer import (
    TEXT_PROJECTION_PREFIXES,
    TrajectoryBuffer,
    branch_of,
    record_trajectory_buffer,
    trained_parameters,
)
from .config import (
    LORS_COMMON,
    LORS_PRESETS,
    MTT_VL_DEFAULTS,
    REPBLEND_COMMON,
    REPBLEND_PRESETS,
    TM_PRESETS,
    TM_STABILITY,
    TrajectoryBufferConfig,
    TrajectoryMatchingConfig,
    lors_budget,
    lors_preset,
    preset_values,
    repblend_preset,
)
from .distiller import EXTRAS_FILE, TMStepTimings, TrajectoryMatchingDistiller
from .losses import FullSimilarity, LowRankSimilarity, normalized_parameter_distance, soft_contrastive_loss
from .unroll import LossFn, sgd_unroll, unrolled_matching_gradients

__all__ = [
    "EXTRAS_FILE",
    "LORS_COMMON",
    "LORS_PRESETS",
    "MTT_VL_DEFAULTS",
    "REPBLEND_COMMON",
    "REPBLEND_PRESETS",
    "TEXT_PROJECTION_PREFIXES",
    "TM_PRESETS",
    "TM_STABILITY",
    "Blend",
    "BlendedDualEncoder",
    "FullSimilarity",
    "LossFn",
    "LowRankSimilarity",
    "SyntheticMiniBatch",
    "TMStepTimings",
    "TrajectoryBuffer",
    "TrajectoryBufferConfig",
    "TrajectoryMatchingConfig",
    "TrajectoryMatchingDistiller",
    "branch_of",
    "draw_blend",
    "lors_budget",
    "lors_preset",
    "normalized_parameter_distance",
    "preset_values",
    "record_trajectory_buffer",
    "repblend_preset",
    "sgd_unroll",
    "soft_contrastive_loss",
    "trained_parameters",
    "unrolled_matching_gradients",
]
