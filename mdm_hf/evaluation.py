"""Compatibility module: student training and evaluation now live in :mod:`mdm_hf.students` (docs/method.md §5).

``from mdm_hf.evaluation import retrieval_metrics`` stays the documented way to import the recall metric, and every
name this module exported before the split is re-exported from its new home:

* config -- :mod:`mdm_hf.students.config` (:class:`StudentConfig`, :data:`PRESETS`, :data:`METHODS`);
* students and pixel spaces -- :mod:`mdm_hf.students.model`;
* training -- :mod:`mdm_hf.students.trainer`; evaluation -- :mod:`mdm_hf.students.evaluator`;
* typed results and the results table -- :mod:`mdm_hf.students.results`;

``PairDataset`` (the student's feature pairs) is deprecated: it is :class:`~mdm_hf.students.FeaturePairDataset`
(:class:`mdm_hf.data.PairDataset` is the real pairs by caption index).
"""

from __future__ import annotations

import warnings

from .retrieval import retrieval_metric_path, retrieval_metrics
from .students.config import METHODS, PRESETS, StudentConfig
from .students.evaluator import (
    EvalSplit,
    StudentEvaluator,
    compare_methods,
    evaluate_split,
    evaluate_student,
    student_validation_fn,
)
from .students.model import PixelSpace, StudentModel, convert_pixels
from .students.results import (
    METHOD_LABELS,
    METRIC_NAMES,
    Comparison,
    ResultRow,
    StudentRecord,
    StudentResult,
    card_results,
    format_results_table,
)
from .students.trainer import (
    FeaturePairDataset,
    LazyImages,
    StudentRun,
    StudentTrainer,
    ValidationSelectionCallback,
)

__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "METRIC_NAMES",
    "PRESETS",
    "Comparison",
    "EvalSplit",
    "FeaturePairDataset",
    "LazyImages",
    "PixelSpace",
    "ResultRow",
    "StudentConfig",
    "StudentEvaluator",
    "StudentModel",
    "StudentRecord",
    "StudentResult",
    "StudentRun",
    "StudentTrainer",
    "ValidationSelectionCallback",
    "card_results",
    "compare_methods",
    "convert_pixels",
    "evaluate_split",
    "evaluate_student",
    "format_results_table",
    "retrieval_metric_path",
    "retrieval_metrics",
    "student_validation_fn",
]


def __getattr__(name: str):
    if name == "PairDataset":
        warnings.warn(
            "mdm_hf.evaluation.PairDataset is deprecated: use mdm_hf.students.FeaturePairDataset.",
            DeprecationWarning,
            stacklevel=2,
        )
        return FeaturePairDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
