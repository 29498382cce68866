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
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import DatasetArguments, ModelArguments, check_field_types, check_values
from ..config import config_field as _f

__all__ = ["METHODS", "METHOD_ALIASES", "PRESETS", "StudentConfig", "canonical_method", "check_methods"]

METHODS = ("synthetic", "random", "herding", "kcenter", "kmeans", "full")
# Deprecated spellings accepted on input (config files, --method / --methods, library calls).
METHOD_ALIASES = {"mdm": "synthetic"}

# Student recipes. "paper": docs/method.md §5 (100 epochs, SGD 0.1 / 0.9 / 5e-4, lr x0.1 from epoch 51, batch 256,
# tau = 0.07 fixed). "small": measured on EmojiCaps on 2 CPU cores (docs/benchmarks.md: AdamW 1e-3, 100 steps for
# 100 pairs, 200 x 128 for the full set; 100-pair students peak after 10-20 steps, hence evaluation every 5 steps).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4, lr_scheduler="step",
        lr_decay_epochs=[50.0], num_train_epochs=100.0, max_steps=-1, full_max_steps=-1, batch_size=256,
        learn_temperature=False, eval_steps=None, eval_epochs=5.0,
    ),
    "small": dict(
        optimizer="adamw", learning_rate=1e-3, momentum=0.9, weight_decay=0.0, lr_scheduler="constant",
        lr_decay_epochs=[], num_train_epochs=1.0, max_steps=100, full_max_steps=200, batch_size=128,
        learn_temperature=True, eval_steps=5, eval_epochs=None,
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
        "saved by mdm-hf); push it with SyntheticSet.push_to_hub or `mdm-hf distill --push_to_hub`.",
    )
    method: str = _f(
        "synthetic",
        "Training data: synthetic (the distilled set; 'mdm' is a deprecated alias) | random | herding | kcenter | "
        "kmeans | full.",
    )
    methods: list[str] | None = _f(
        None, "Compare several methods under one protocol (e.g. synthetic random herding kcenter full)."
    )
    num_pairs: int | None = _f(None, "K real pairs for coresets (None: the synthetic set's size).")
    text_source: str = _f(
        "auto",
        "Synthetic text: features (learned features, the teacher's text space) | captions (nearest real "
        "captions encoded by the student's text tower) | auto (features unless the student has its own text tower).",
    )

    # ---- the student
    track: str = _f("clip", "clip: vision tower of a dual encoder + its frozen text tower. paper: an image "
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
    text_model_pooling: str = _f("cls", "Pooling of a separate text encoder: cls | mean | pooler.")
    keep_pretrained_head: bool = _f(
        False,
        "Keep the checkpoint's own projections and temperature (not the paper's protocol; report apart).",
    )
    visual_projection: bool | None = _f(
        None,
        "Give the student a fresh visual projection (default: yes on the clip track, no on the paper track).",
    )
    text_head: str | None = _f(
        None,
        "Text projection: linear | mlp (Linear-GELU-Linear-dropout + residual, LayerNorm; the paper track's "
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
    preset: str = _f(
        "paper", "paper (docs/method.md §5) | small (EmojiCaps on 2 CPU cores, docs/benchmarks.md)."
    )
    optimizer: str | None = _from_preset("optimizer", "sgd | adamw | adam.")
    learning_rate: float | None = _from_preset("learning_rate", "Learning rate.")
    momentum: float | None = _from_preset("momentum", "SGD momentum.")
    weight_decay: float | None = _from_preset(
        "weight_decay", "Weight decay (not applied to the temperature)."
    )
    lr_scheduler: str | None = _from_preset(
        "lr_scheduler", "constant | step (x lr_decay_factor after each lr_decay_epochs) | cosine."
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
    batch_size: int | None = _from_preset(
        "batch_size", "Training batch size (capped at the number of pairs)."
    )
    max_grad_norm: float = _f(0.0, "Gradient clipping (0: none, as in the paper).")
    augment: str = _f(
        "color_crop_cutout_flip_scale_rotate", "DSA ops joined by '_' (mdm_hf.augment), or 'none'."
    )
    augment_mode: str = _f("single", "single: one op per batch (DSA default) | all: every op.")

    # ---- selection and reporting
    eval_steps: int | None = _from_preset("eval_steps", "Score validation every N steps (and at step 0).")
    eval_epochs: float | None = _from_preset(
        "eval_epochs", "Score validation every N epochs (used when eval_steps is None)."
    )
    early_stopping_patience: int | None = _f(None, "Stop after N validation scores without improvement.")
    eval_batch_size: int = _f(256, "Images per forward pass when scoring.")
    seed: int = _f(0, "First seed; students use seed, seed+1, ...")
    num_seeds: int = _f(3, "Students per method (paper: 5); results are mean +- std over them.")
    output_dir: str | None = _f(
        "student_eval", "Where JSON results and the table are written (None: nowhere)."
    )
    save_students: bool = _f(False, "Save each selected student (safetensors) under output_dir/students/.")
    num_workers: int = _f(0, "DataLoader workers (only useful when images are decoded lazily).")
    use_cpu: bool | None = _f(None, "Force CPU (default: CPU when no CUDA device is present).")
    logging_steps: int = _f(10, "Log the training loss every N steps.")
    progress: bool = _f(False, "Show the Trainer's progress bar.")

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}.")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, copy.deepcopy(value))
        self.method = canonical_method(self.method)
        if self.methods:
            self.methods = [canonical_method(m) for m in self.methods]
        choices = {
            "track": ("clip", "paper"),
            "method": METHODS,
            "text_source": ("auto", "features", "captions"),
            "text_model_pooling": ("cls", "mean", "pooler"),
            "optimizer": ("sgd", "adamw", "adam"),
            "lr_scheduler": ("constant", "step", "cosine"),
            "augment_mode": ("single", "all"),
            "text_head": ("linear", "mlp", None),
        }
        for method in self.methods or []:
            if method not in METHODS:
                raise ValueError(f"methods contains {method!r}; choose from {list(METHODS)}.")
        checks = {
            "temperature": self.temperature > 0,
            "batch_size": self.batch_size > 0,
            "num_seeds": self.num_seeds >= 1,
            "learning_rate": self.learning_rate > 0,
            "eval_batch_size": self.eval_batch_size > 0,
            "num_pairs": self.num_pairs is None or self.num_pairs > 0,
            "max_steps/num_train_epochs": self.max_steps > 0 or self.num_train_epochs > 0,
            "eval_steps/eval_epochs": (self.eval_steps or 0) > 0 or (self.eval_epochs or 0) > 0,
            "weight_decay": self.weight_decay >= 0,
            "momentum": 0 <= self.momentum < 1,
            "max_eval_images": self.max_eval_images is None or self.max_eval_images >= 1,
            "max_cached_images": self.max_cached_images >= 0,
        }
        check_values(self, checks, choices)
        if self.update_card and not (self.synthetic and os.path.isdir(self.synthetic)):
            raise ValueError(
                "--update_card needs --synthetic to be a local folder holding the synthetic set."
            )
        if self.save_students and not self.output_dir:
            raise ValueError("save_students=True needs an output_dir to save the students in.")
        own_towers = self.vision_model_name_or_path in (None, self.model_name_or_path)
        if self.keep_pretrained_head and (
            self.track != "clip" or self.text_model_name_or_path is not None or not own_towers
        ):
            raise ValueError(
                "keep_pretrained_head=True needs the clip track with the teacher's own vision and text towers (a "
                "head only fits the towers it was trained with). Drop --vision_model_name_or_path / "
                "--text_model_name_or_path, or the flag."
            )

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.num_seeds))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
