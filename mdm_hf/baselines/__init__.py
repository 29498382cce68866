"""Baselines MDM is measured against, under the same data, teacher, student protocol and machine.

* :mod:`mdm_hf.baselines.tm` -- bi-trajectory matching of MTT-VL (Wu et al., TMLR 2024, arXiv 2308.07545) and
  LoRS (Xu et al., ICML 2024, arXiv 2406.03793): unrolled SGD on the synthetic set matched to expert training
  trajectories, optionally with LoRS' learned low-rank similarity matrix. (``mdm_hf.baselines.trajectory_matching``
  is its deprecated former name.)
"""

from .tm import (
    TrajectoryBuffer,
    TrajectoryMatchingConfig,
    TrajectoryMatchingDistiller,
    record_trajectory_buffer,
)

__all__ = [
    "TrajectoryBuffer",
    "TrajectoryMatchingConfig",
    "TrajectoryMatchingDistiller",
    "record_trajectory_buffer",
]
