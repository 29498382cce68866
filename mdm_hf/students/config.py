"""The student protocol as one dataclass (docs/method.md §5): which student, trained how, on what, scored how.

:class:`StudentConfig` inherits the teacher fields from :class:`~mdm_hf.config.ModelArguments` (the teacher's frozen
text tower gives the text features, its processor the pixel space, its joint space the coreset selection) and the
dataset fields from :class:`~mdm_hf.config.DatasetArguments`.

Methods name what a student trains on: ``"synthetic"`` (a distilled set), a K-pair coreset of the train split
(``"random"``, ``"herding"``, ``"kcenter"``, ``"kmeans"``) or the whole train split (``"full"``). ``"mdm"`` is a
deprecated alias of ``"synthetic"``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from ..config import (
    REPORT_TO_HELP,
    DatasetArguments,
    ModelArguments,
    check_field_types,
    check_values,
    deprecated_alias,
    trackers,
)
from ..config import config_field as _f
from ..hub import check_repo_id

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "METHOD_ALIASES", "PRESETS", "StudentConfig", "canonical_method", "check_methods"]

# Choices as Literal types, so ``--help`` lists them and a wrong value is refused while the line is parsed.
Method = Literal["synthetic", "random", "herding", "kcenter", "kmeans", "full"]
METHODS: tuple[str, ...] = get_args(Method)
# Deprecated spellings accepted on input (config files, --method / --methods, library calls).
METHOD_ALIASES = {"mdm": "synthetic"}
Track = Literal["clip", "paper"]
TextSource = Literal["auto", "features", "captions"]
TextModelPooling = Literal["cls", "mean", "pooler"]
TextHead = Literal["linear", "mlp"]
Optimizer = Literal["sgd", "adamw", "adam"]
LRSchedulerType = Literal["constant", "step", "cosine"]
AugmentMode = Literal["single", "all"]
Preset = Literal["paper", "small"]

# Student recipes. "paper": docs/method.md §5 (100 epochs, SGD 0.1 / 0.9 / 5e-4, lr x0.1 from epoch 51, batch 256,
# tau = 0.07 fixed). "small": measured on EmojiCaps on 2 CPU cores (docs/benchmarks.md: AdamW 1e-3, 100 steps for
# 100 pairs, 200 x 128 for the full set; 100-pair students peak after 10-20 steps, hence evaluation every 5 steps).
# Keys are StudentConfig fields (the TrainingArguments names: per_device_train_batch_size, lr_scheduler_type).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4, lr_scheduler_type="step",
        lr_decay_epochs=[50.0], num_train_epochs=100.0, max_steps=-1, full_max_steps=-1,
        per_device_train_batch_size=256, learn_temperature=False, eval_steps=None, eval_epochs=5.0,
    ),
    "small": dict(
        optimizer="adamw", learning_rate=1e-3, momentum=0.9, weight_decay=0.0, lr_scheduler_type="constant",
        lr_decay_epochs=[], num_train_epochs=1.0, max_steps=100, full_max_steps=200,
        per_device_train_batch_size=128, learn_temperature=True, eval_steps=5, eval_epochs=None,
    ),
}  # fmt: skip


def _from_preset(key: str, help: str):  # noqa: A002 - mirrors config_field
    """A field left at None that its preset fills; ``--help`` shows what each preset gives it."""
    shown = "; ".join(f"{name}: {values[key]}" for name, values in PRESETS.items())
    return _f(None, f"{help} Default from --preset ({shown}).")


def canonical_method(method: str) -> str:
    """``method`` with a deprecated alias (``"mdm"``) replaced by its name (``"synthetic"``), with a warning."""
    if method in METHOD_ALIASES:
        new = METHOD_ALIASES[method]
        warnings.warn(
            f"Method {method!r} is deprecated; use {new!r} (the distilled set, whatever distilled it).",
            DeprecationWarning,
            stacklevel=3,
        )
        return new
    return method


def check_methods(methods: Sequence[str]) -> list[str]:
    """Canonical names of ``methods`` (aliases mapped); a ``ValueError`` names an unknown one."""
    names = [canonical_method(m) for m in methods]
    for method in names:
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}; choose from {list(METHODS)}.")
    return names


@dataclass
class StudentConfig(ModelArguments, DatasetArguments):
    """One student protocol: what to train on, which student, how, and how it is scored (docs/method.md §5).

    The teacher (``model_name_or_path``, from :class:`~mdm_hf.config.ModelArguments`) gives the frozen text features,
    the pixel space, the coreset selection features and, by default, the student's vision tower. Optimisation fields
    left at ``None`` take their value from ``preset`` (see :data:`PRESETS`); any value given explicitly wins. Field
    help doubles as ``--help`` of ``recipes/evaluate_student.py`` / ``mdm-hf evaluate``.

    Names follow ``transformers.TrainingArguments`` where the concept is the same (``per_device_train_batch_size``,
    ``per_device_eval_batch_size``, ``lr_scheduler_type``, ``logging_steps``, ``report_to``, ``disable_tqdm``); the
    old names (``batch_size``, ``eval_batch_size``, ``lr_scheduler``, ``progress``) still work, with a warning.
    There is no ``eval_strategy``: the Trainer's own evaluation computes a loss on an eval dataset, while a student is
    selected on the *retrieval* recall of the validation split (``eval_steps`` / ``eval_epochs``,
    ``early_stopping_patience``), scored by :class:`~mdm_hf.students.ValidationSelectionCallback`, which keeps the
    best state in memory (no checkpoints); the Trainer runs with ``eval_strategy="no"``.
    """

    # ---- data: the DatasetArguments fields (train_split: what coresets and the full-data student train on), and
    validation_split: str = _f("validation", "Split used to select the student's step (never test).")
    test_split: str = _f("test", "Split scored once, with the selected student.")
    max_eval_images: int | None = _f(None, "Use only the first N validation / test images (quick runs).")

    # ---- what the student trains on
    synthetic: str | None = _f(
        None, "Synthetic set to evaluate (dir or Hub id of a SyntheticSet), method 'synthetic'."
    )
    synthetic_revision: str | None = _f(None, "Revision of the synthetic set on the Hub.")
    update_card: bool = _f(
        False,
        "Write the results into the local synthetic set's card and metadata (--synthetic must be a local folder "
        "saved by mdm-hf); --push_to_hub also uploads them.",
    )
    method: Literal[Method, "mdm"] = _f(
        "synthetic",
        "Training data: the distilled set (synthetic; 'mdm' is a deprecated alias), a K-pair coreset of the train "
        "split (random, herding, kcenter, kmeans) or the whole train split (full).",
    )
    methods: list[str] | None = _f(
        None,
        f"Compare several methods under one protocol (e.g. synthetic random herding kcenter full); each one of "
        f"{', '.join(METHODS)}.",
    )
    num_pairs: int | None = _f(None, "K real pairs for coresets (None: the synthetic set's size).")
    text_source: TextSource = _f(
        "auto",
        "Synthetic text: features (learned features, the teacher's text space) | captions (nearest real "
        "captions encoded by the student's text tower) | auto (features unless the student has its own text tower).",
    )

    # ---- the student
    track: Track = _f("clip", "clip: vision tower of a dual encoder + its frozen text tower. paper: an image "
                      "backbone (AutoModel / timm) + a frozen BERT-family text encoder + a text projection.")  # fmt: skip
    vision_model_name_or_path: str | None = _f(
        None,
        "Student vision tower: a dual-encoder checkpoint (its vision tower), an AutoModel image backbone "
        "(e.g. microsoft/resnet-50) or timm/<name> (needs timm). None: the teacher's vision tower.",
    )
    vision_revision: str | None = _f(None, "Revision of the student's vision tower on the Hub.")
    vision_config: str | None = _f(
        None,
        "JSON file or inline JSON ({'model_type': 'resnet', ...}) of a randomly initialised vision backbone.",
    )
    student_image_size: int | None = _f(
        None, "Input side of the student (default: from its processor/config)."
    )
    student_image_mean: list[float] | None = _f(
        None, "Normalisation mean of the student (default: its processor)."
    )
    student_image_std: list[float] | None = _f(
        None, "Normalisation std of the student (default: its processor)."
    )
    text_model_name_or_path: str | None = _f(
        None, "Separate frozen text encoder (AutoModel, BERT family). None: the teacher's text tower."
    )
    text_model_pooling: TextModelPooling = _f("cls", "Pooling of a separate text encoder.")
    keep_pretrained_head: bool = _f(
        False,
        "Keep the checkpoint's own projections and temperature (not the paper's protocol; report apart).",
    )
    visual_projection: bool | None = _f(
        None,
        "Give the student a fresh visual projection (default: yes on the clip track, no on the paper track).",
    )
    text_head: TextHead | None = _f(
        None,
        "Text projection: linear, or mlp (Linear-GELU-Linear-dropout + residual, LayerNorm; the paper track's "
        "'projection head'). None: mlp on the paper track, linear on the clip track.",
    )
    projection_dim: int | None = _f(
        None, "Shared embedding size (default: teacher's, or the image feature size)."
    )
    temperature: float = _f(0.07, "Initial InfoNCE temperature tau (logit scale 1/tau).")
    learn_temperature: bool | None = _from_preset(
        "learn_temperature", "Train the temperature (preset: small yes, paper no)."
    )

    # ---- optimisation (None: from the preset)
    preset: Preset = _f(
        "paper", "paper (docs/method.md §5) or small (EmojiCaps on 2 CPU cores, docs/benchmarks.md)."
    )
    optimizer: Optimizer | None = _from_preset("optimizer", "Optimiser (sgd with momentum).")
    learning_rate: float | None = _from_preset("learning_rate", "Learning rate.")
    momentum: float | None = _from_preset("momentum", "SGD momentum.")
    weight_decay: float | None = _from_preset(
        "weight_decay", "Weight decay (not applied to the temperature)."
    )
    lr_scheduler_type: LRSchedulerType | None = _from_preset(
        "lr_scheduler_type", "Schedule: step multiplies the lr by lr_decay_factor after each lr_decay_epochs."
    )
    lr_decay_epochs: list[float] | None = _from_preset(
        "lr_decay_epochs", "Epochs after which the lr is multiplied by lr_decay_factor."
    )
    lr_decay_factor: float = _f(0.1, "Step-schedule factor.")
    num_train_epochs: float | None = _from_preset("num_train_epochs", "Epochs (used when max_steps <= 0).")
    max_steps: int | None = _from_preset("max_steps", "Training steps (> 0 overrides num_train_epochs).")
    full_max_steps: int | None = _from_preset(
        "full_max_steps", "Training steps for method 'full' (<= 0: same as the others)."
    )
    per_device_train_batch_size: int | None = _from_preset(
        "per_device_train_batch_size", "Training batch size (capped at the number of pairs; one device)."
    )
    max_grad_norm: float = _f(0.0, "Gradient clipping (0: none, as in the paper).")
    augment: str = _f(
        "color_crop_cutout_flip_scale_rotate", "DSA ops joined by '_' (mdm_hf.augment), or 'none'."
    )
    augment_mode: AugmentMode = _f("single", "single: one op per batch (DSA default) | all: every op.")

    # ---- selection and reporting
    eval_steps: int | None = _from_preset(
        "eval_steps",
        "Score validation retrieval every N steps (and at step 0) and keep the best state. This is the student's "
        "validation selection, not the Trainer's eval_strategy (which stays 'no': it would compute a loss, not "
        "recall).",
    )
    eval_epochs: float | None = _from_preset(
        "eval_epochs", "Score validation every N epochs (used when eval_steps is None)."
    )
    early_stopping_patience: int | None = _f(None, "Stop after N validation scores without improvement.")
    per_device_eval_batch_size: int = _f(256, "Images per forward pass when scoring.")
    seed: int = _f(0, "First seed; students use seed, seed+1, ...")
    num_seeds: int = _f(3, "Students per method (paper: 5); results are mean +- std over them.")
    output_dir: str | None = _f(
        "student_eval", "Where JSON results and the table are written (None: nowhere)."
    )
    save_students: bool = _f(
        False,
        "Save each selected student under output_dir/students/<method>-seed<seed>/ with save_pretrained "
        "(safetensors, no pickle), with its tokenizer and image processor: a CLIPModel, SiglipModel or "
        "VisionTextDualEncoderModel that transformers.AutoModel loads; a student none of them represents (e.g. "
        "the paper track's MLP text head) as its state dict, with a warning (mdm_hf.students.saving).",
    )
    num_workers: int = _f(0, "DataLoader workers (only useful when images are decoded lazily).")
    use_cpu: bool | None = _f(None, "Force CPU (default: CPU when no CUDA device is present).")
    logging_steps: int = _f(10, "Log the training loss every N steps (0: never).")
    report_to: str = _f(
        "none",
        REPORT_TO_HELP
        + " Each student is a run named <method>-seed<seed> that logs its training loss and its "
        "validation scores (eval/...); tensorboard writes under output_dir/students/<method>-seed<seed>/runs.",
    )
    disable_tqdm: bool | None = _f(
        None,
        "Hide the Trainer's progress bar (true) or show one per student (false). None: a single student shows "
        "the Trainer's bar (transformers' default, hidden when its verbosity is above warning); several show one "
        "bar over the students; the validation students of a distillation run show none (the distillation has "
        "its own bar).",
        nargs="?",  # a bare --disable_tqdm means true (argparse keywords, as HfArgumentParser gives bool fields)
        const=True,
    )

    # ---- the Hub
    push_to_hub: bool = _f(
        False,
        "After evaluating, push the synthetic set with the results in its card and metadata to the Hub as "
        "hub_dataset_id (implies --update_card for a local --synthetic).",
    )
    hub_dataset_id: str | None = _f(None, "namespace/name of the dataset repo to push the set to.")
    hub_private: bool = _f(False, "Create the Hub repo as private (default: the Hub's default, public).")

    # ---- deprecated names (one name per concept, following TrainingArguments)
    batch_size: int | None = deprecated_alias("per_device_train_batch_size")
    eval_batch_size: int | None = deprecated_alias("per_device_eval_batch_size")
    lr_scheduler: LRSchedulerType | None = deprecated_alias("lr_scheduler_type")
    progress: bool | None = _f(
        None,
        "Deprecated: --progress is --disable_tqdm false, --progress false is --disable_tqdm.",
        nargs="?",
        const=True,
    )

    # Old names: accepted on input, resolved in __post_init__, never written by to_dict().
    deprecated_fields: ClassVar[tuple[str, ...]] = (
        "batch_size",
        "eval_batch_size",
        "lr_scheduler",
        "progress",
    )

    def __post_init__(self) -> None:
        check_field_types(self)  # also moves the deprecated aliases' values to their fields
        self._resolve_progress()
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, copy.deepcopy(value))
        self.method = canonical_method(self.method)
        if self.methods:
            self.methods = [canonical_method(m) for m in self.methods]
        for method in self.methods or []:
            if method not in METHODS:
                raise ValueError(f"methods contains {method!r}; choose from {list(METHODS)}.")
        checks = {
            "temperature": self.temperature > 0,
            "per_device_train_batch_size": self.per_device_train_batch_size > 0,
            "num_seeds": self.num_seeds >= 1,
            "learning_rate": self.learning_rate > 0,
            "per_device_eval_batch_size": self.per_device_eval_batch_size > 0,
            "num_pairs": self.num_pairs is None or self.num_pairs > 0,
            "max_steps/num_train_epochs": self.max_steps > 0 or self.num_train_epochs > 0,
            "eval_steps/eval_epochs": (self.eval_steps or 0) > 0 or (self.eval_epochs or 0) > 0,
            "weight_decay": self.weight_decay >= 0,
            "momentum": 0 <= self.momentum < 1,
            "max_eval_images": self.max_eval_images is None or self.max_eval_images >= 1,
            "max_cached_images": self.max_cached_images >= 0,
            "logging_steps": self.logging_steps >= 0,
        }
        check_values(self, checks)  # the fields with fixed choices are Literal types, checked above
        local_set = bool(self.synthetic) and os.path.isdir(self.synthetic)
        if self.push_to_hub:
            if not self.hub_dataset_id:
                raise ValueError(
                    "--push_to_hub needs --hub_dataset_id (namespace/name of the dataset repo the set goes to)."
                )
            check_repo_id(self.hub_dataset_id)
            if not self.synthetic:
                raise ValueError(
                    "--push_to_hub uploads the evaluated synthetic set with its results: it needs --synthetic."
                )
            self.update_card = self.update_card or local_set
        if self.update_card and not local_set:
            raise ValueError(
                "--update_card needs --synthetic to be a local folder holding the synthetic set."
            )
        if self.save_students and not self.output_dir:
            raise ValueError("save_students=True needs an output_dir to save the students in.")
        if "tensorboard" in (trackers(self.report_to) or []) and not self.output_dir:
            raise ValueError("--report_to tensorboard writes under --output_dir: set one.")
        own_towers = self.vision_model_name_or_path in (None, self.model_name_or_path)
        if self.keep_pretrained_head and (
            self.track != "clip" or self.text_model_name_or_path is not None or not own_towers
        ):
            raise ValueError(
                "keep_pretrained_head=True needs the clip track with the teacher's own vision and text towers (a "
                "head only fits the towers it was trained with). Drop --vision_model_name_or_path / "
                "--text_model_name_or_path, or the flag."
            )

    def _resolve_progress(self) -> None:
        """The deprecated ``progress`` flag as ``disable_tqdm`` (its opposite), with a warning."""
        if self.progress is None:
            return
        wanted = not self.progress
        if self.disable_tqdm is not None and self.disable_tqdm != wanted:
            raise ValueError(
                f"--progress={self.progress} and --disable_tqdm={self.disable_tqdm} disagree: --progress is "
                "deprecated; give --disable_tqdm alone."
            )
        logger.warning(
            "--progress is deprecated; use --disable_tqdm %s (progress bars are shown by default now).",
            str(wanted).lower(),
        )
        self.disable_tqdm, self.progress = wanted, None

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.num_seeds))

    def to_dict(self) -> dict:
        """The config as plain values, under the current names only (deprecated aliases are resolved)."""
        values = dataclasses.asdict(self)
        for name in self.deprecated_fields:
            values.pop(name, None)
        return values
