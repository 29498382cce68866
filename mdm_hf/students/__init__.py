"""Students and their evaluation: how much a distilled set teaches (docs/method.md §5, arXiv 2605.23482).

=====================  =====================================================================================
module                 what it holds
=====================  =====================================================================================
``students.config``    :class:`StudentConfig` (the protocol), presets, method names
``students.model``     pixel spaces (:class:`PixelSpace`, :func:`convert_pixels`), :class:`StudentModel`, vision
                       backbones, :class:`FrozenTextEncoder`
``students.trainer``   :class:`StudentTrainer`, :class:`ValidationSelectionCallback`, :class:`FeaturePairDataset`
``students.evaluator`` :class:`StudentEvaluator`, :func:`evaluate_student`, :func:`compare_methods`,
                       :func:`student_validation_fn`
``students.results``   typed results (:class:`StudentRecord`, :class:`ResultRow`, :class:`StudentResult`,
                       :class:`Comparison`) and the one table renderer :func:`format_results_table`
``students.cli``       :func:`evaluate_main` (``mdm-hf evaluate``)
=====================  =====================================================================================

Every name is importable from ``mdm_hf.students`` directly. Submodules load on first use, so importing
``mdm_hf.students.results`` (e.g. for a dataset card's table) does not import the trainer or the evaluator.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> submodule. Loaded lazily (PEP 562): the evaluator imports mdm_hf.synthetic, and a card renderer there
# may import students.results; an eager package __init__ would turn that into an import cycle.
_EXPORTS = {
    "config": (
        "METHODS", "METHOD_ALIASES", "PRESETS", "StudentConfig", "canonical_method", "check_methods",
    ),
    "model": (
        "FrozenTextEncoder", "PixelSpace", "PretrainedHead", "ProjectionHead", "StudentModel", "VisionBackbone",
        "backbone_feature_dim", "convert_pixels", "load_vision_backbone",
    ),
    "trainer": (
        "FeaturePairDataset", "LazyImages", "StudentRun", "StudentTrainer", "ValidationSelectionCallback",
        "fit_student",
    ),
    "evaluator": (
        "DEFAULT_METHODS", "EvalSplit", "StudentEvaluator", "compare_methods", "environment", "evaluate_split",
        "evaluate_student", "student_validation_fn",
    ),
    "results": (
        "METHOD_LABELS", "METRIC_NAMES", "Comparison", "ResultRow", "StudentRecord", "StudentResult",
        "card_results", "format_results_table", "method_label", "save_results",
    ),
    "cli": ("evaluate_main",),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "Comparison",
    "DEFAULT_METHODS",
    "EvalSplit",
    "FeaturePairDataset",
    "FrozenTextEncoder",
    "LazyImages",
    "METHODS",
    "METHOD_ALIASES",
    "METHOD_LABELS",
    "METRIC_NAMES",
    "PRESETS",
    "PixelSpace",
    "PretrainedHead",
    "ProjectionHead",
    "ResultRow",
    "StudentConfig",
    "StudentEvaluator",
    "StudentModel",
    "StudentRecord",
    "StudentResult",
    "StudentRun",
    "StudentTrainer",
    "ValidationSelectionCallback",
    "VisionBackbone",
    "backbone_feature_dim",
    "canonical_method",
    "card_results",
    "check_methods",
    "compare_methods",
    "convert_pixels",
    "environment",
    "evaluate_main",
    "evaluate_split",
    "evaluate_student",
    "fit_student",
    "format_results_table",
    "load_vision_backbone",
    "method_label",
    "save_results",
    "student_validation_fn",
]

if TYPE_CHECKING:
    from .cli import evaluate_main
    from .config import METHOD_ALIASES, METHODS, PRESETS, StudentConfig, canonical_method, check_methods
    from .evaluator import (
        DEFAULT_METHODS,
        EvalSplit,
        StudentEvaluator,
        compare_methods,
        environment,
        evaluate_split,
        evaluate_student,
        student_validation_fn,
    )
    from .model import (
        FrozenTextEncoder,
        PixelSpace,
        PretrainedHead,
        ProjectionHead,
        StudentModel,
        VisionBackbone,
        backbone_feature_dim,
        convert_pixels,
        load_vision_backbone,
    )
    from .results import (
        METHOD_LABELS,
        METRIC_NAMES,
        Comparison,
        ResultRow,
        StudentRecord,
        StudentResult,
        card_results,
        format_results_table,
        method_label,
        save_results,
    )
    from .trainer import (
        FeaturePairDataset,
        LazyImages,
        StudentRun,
        StudentTrainer,
        ValidationSelectionCallback,
        fit_student,
    )


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
