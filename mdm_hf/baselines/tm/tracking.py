"""``--report_to`` for the trajectory-matching commands: accelerate trackers, read the way
:class:`~mdm_hf.distill.MDMDistiller` reads them (:func:`mdm_hf.config.trackers`).

``mdm-hf tm`` and ``mdm-hf tm-buffer`` run in one process on a device of their own choosing, so the
``Accelerator`` built here only logs: nothing is prepared with it.
"""

from __future__ import annotations

import os
from typing import Any

from ...config import trackers

__all__ = ["start_trackers"]


def start_trackers(
    report_to: str | None, project_dir: str | os.PathLike, project_name: str, config: dict[str, Any]
):
    """An ``Accelerator`` whose trackers (``report_to``) are initialised as ``project_name`` with the run's
    ``config`` (None values left out, as trackers refuse them); None for ``report_to="none"``.

    Use it as ``accelerator.log(values, step=step)`` and close it with ``accelerator.end_training()``; file-based
    trackers (tensorboard) write under ``project_dir / project_name``.
    """
    log_with = trackers(report_to)
    if log_with is None:
        return None
    from accelerate import Accelerator  # only when something is logged

    accelerator = Accelerator(log_with=log_with, project_dir=str(project_dir))
    accelerator.init_trackers(project_name, config={k: v for k, v in config.items() if v is not None})
    return accelerator
