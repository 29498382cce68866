"""Deprecated: the trajectory-matching baseline now lives in :mod:`mdm_hf.baselines.tm` (one module per part).

This module re-exports the names it used to define, so ``from mdm_hf.baselines.trajectory_matching import ...``
keeps working; import from ``mdm_hf.baselines.tm`` instead.
"""

import warnings

from .tm import (
    EXTRAS_FILE,
    TEXT_PROJECTION_PREFIXES,
    FullSimilarity,
    LossFn,
    LowRankSimilarity,
    TMStepTimings,
    TrajectoryBuffer,
    TrajectoryBufferConfig,
    TrajectoryMatchingConfig,
    TrajectoryMatchingDistiller,
    branch_of,
    normalized_parameter_distance,
    record_trajectory_buffer,
    sgd_unroll,
    soft_contrastive_loss,
    unrolled_matching_gradients,
)

warnings.warn(
    "mdm_hf.baselines.trajectory_matching is deprecated; import from mdm_hf.baselines.tm instead.",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "EXTRAS_FILE",
    "TEXT_PROJECTION_PREFIXES",
    "FullSimilarity",
    "LossFn",
    "LowRankSimilarity",
    "TMStepTimings",
    "TrajectoryBuffer",
    "TrajectoryBufferConfig",
    "TrajectoryMatchingConfig",
    "TrajectoryMatchingDistiller",
    "branch_of",
    "normalized_parameter_distance",
    "record_trajectory_buffer",
    "sgd_unroll",
    "soft_contrastive_loss",
    "unrolled_matching_gradients",
]
