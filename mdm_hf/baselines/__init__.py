"""Baselines MDM is measured against, under the same data, teacher, student protocol and machine.

* :mod:`mdm_hf.baselines.tm` -- bi-trajectory matching of MTT-VL (Wu et al., TMLR 2024, arXiv 2308.07545) and
  LoRS (Xu et al., ICML 2024, arXiv 2406.03793): unrolled SGD on the synthetic set matched to expert training
  trajectories, optionally with LoRS' learned low-rank similarity matrix. (``mdm_hf.baselines.trajectory_matching``
  is its deprecated former name.)

Importing this package is cheap: the modules load on first attribute access.
"""

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "TrajectoryMatchingConfig": "mdm_hf.baselines.tm",
    "TrajectoryMatchingDistiller": "mdm_hf.baselines.tm",
    "TrajectoryBuffer": "mdm_hf.baselines.tm",
    "record_trajectory_buffer": "mdm_hf.baselines.tm",
    "tm_main": "mdm_hf.baselines.tm",
}

__all__ = [
    "TrajectoryBuffer",
    "TrajectoryMatchingConfig",
    "TrajectoryMatchingDistiller",
    "record_trajectory_buffer",
    "tm_main",
]

if TYPE_CHECKING:
    from .tm import (
        TrajectoryBuffer,
        TrajectoryMatchingConfig,
        TrajectoryMatchingDistiller,
        record_trajectory_buffer,
        tm_main,
    )


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mdm_hf.baselines' has no attribute {name!r}")
