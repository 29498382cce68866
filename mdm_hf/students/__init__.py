"""Students and their evaluation: how much a distilled set teaches (docs/method.md §5, arXiv 2605.23482).

=====================  =====================================================================================
module                 what it holds
=====================  =====================================================================================
``students.config``    :class:`StudentConfig` (the protocol), presets, method names
``students.model``     pixel spaces (:class:`PixelSpace`, :func:`convert_pixels`), :class:`StudentModel`, vision
                       backbones, :class:`FrozenTextEncoder`
``students.trainer``   :class:`StudentTrainer`, :class:`ValidationSelectionCallback`, :class:`FeaturePairDataset`
``students.saving``    :func:`save_student` (``--save_students``): a student as the CLIPModel / SiglipModel /
                       VisionTextDualEncoderModel that ``AutoModel`` loads (:func:`student_to_transformers`)
``students.evaluator`` :class:`StudentEvaluator`, :func:`evaluate_student`, :func:`compare_methods`,
                       :func:`student_validation_fn`
``students.results``   typed results (:class:`StudentRecord`, :class:`ResultRow`, :class:`StudentResult`,
                       :class:`Comparison`) and the one table renderer :func:`format_results_table`
=====================  =====================================================================================

Every name is importable from ``mdm_hf.students`` directly. ``mdm-hf evaluate`` is :func:`mdm_hf.cli.evaluate_main`.
"""

from __future__ import annotations

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
    validation_hook,
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
from .saving import NoTransformersLayout, save_student, student_to_transformers
from .trainer import (
    FeaturePairDataset,
    LazyImages,
    StudentRun,
    StudentTrainer,
    ValidationSelectionCallback,
    fit_student,
)

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
    "NoTransformersLayout",
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
    "evaluate_split",
    "evaluate_student",
    "fit_student",
    "format_results_table",
    "load_vision_backbone",
    "method_label",
    "save_results",
    "save_student",
    "student_to_transformers",
    "student_validation_fn",
    "validation_hook",
]
