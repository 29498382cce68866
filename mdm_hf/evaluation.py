"""Students and retrieval evaluation: how much a distilled set teaches (MDM.md §5, arXiv 2605.23482).

The students themselves -- a vision tower trained in full, a frozen text tower, a fresh cross-modal head -- and the
pixel spaces they read are in :mod:`mdm_hf.students`.

Training runs on the ``transformers.Trainer`` (:class:`StudentTrainer`: symmetric InfoNCE with the student's
temperature, differentiable DSA augmentation of the pixels, SGD/AdamW with the paper's step schedule). A callback
scores retrieval on the **validation** split every ``eval_steps`` (including step 0) and keeps the best state;
after training the selected state is scored ONCE on the test split. Nothing is ever selected on test.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .config import DatasetArguments, check_values, parse_dataclass_args
from .config import config_field as _f
from .data import load_split
from .retrieval import retrieval_metric_path, retrieval_metrics
from .students import (
    FrozenTextEncoder,
    PixelSpace,
    StudentModel,
    backbone_feature_dim,
    convert_pixels,
    load_vision_backbone,
)

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "METRIC_NAMES",
    "PRESETS",
    "PixelSpace",
    "StudentConfig",
    "StudentEvaluator",
    "StudentModel",
    "StudentTrainer",
    "ValidationSelectionCallback",
    "compare_methods",
    "convert_pixels",
    "evaluate_main",
    "evaluate_split",
    "evaluate_student",
    "card_results",
    "format_results_table",
    "retrieval_metric_path",
    "retrieval_metrics",
    "student_validation_fn",
]

METRIC_NAMES = ("ir@1", "ir@5", "ir@10", "tr@1", "tr@5", "tr@10", "mean")
METHODS = ("mdm", "random", "herding", "kcenter", "kmeans", "full")
METHOD_LABELS = {
    "mdm": "MDM",
    "random": "Random",
    "herding": "Herding",
    "kcenter": "K-Center",
    "kmeans": "K-Means (joint)",
    "full": "Full train set",
}

# Student recipes. "paper": MDM.md §5 (100 epochs, SGD 0.1 / 0.9 / 5e-4, lr x0.1 from epoch 51, batch 256,
# tau = 0.07 fixed). "small": measured on EmojiCaps on 2 CPU cores (BENCHMARKS.md: AdamW 1e-3, 100 steps for 100
# pairs, 200 x 128 for the full set; 100-pair students peak after 10-20 steps, hence evaluation every 5 steps).
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


@dataclass
class StudentConfig(DatasetArguments):
    """One student protocol: what to train on, which student, how, and how it is scored.

    Optimisation fields left at ``None`` take their value from ``preset`` (see :data:`PRESETS`); any value given
    explicitly wins. Field help doubles as ``--help`` of ``recipes/evaluate_student.py`` / ``mdm-hf evaluate``.
    """

    # ---- teacher: text space, pixel space, coreset features, default vision tower
    model_name_or_path: str = _f(
        "openai/clip-vit-base-patch32",
        "Hub id or dir of the teacher (anchor) dual encoder: its frozen text tower "
        "gives the text features, its processor the pixel space, its joint space the coreset selection.",
    )
    model_revision: str | None = _f(None, "Revision of the teacher on the Hub.")
    text_pooling: str = _f("auto", "Text feature pooling of the teacher: auto | pooler | mean | last.")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the Hub.")

    # ---- data: the DatasetArguments fields (train_split: what coresets and the full-data student train on), and
    validation_split: str = _f("validation", "Split used to select the student's step (never test).")
    test_split: str = _f("test", "Split scored once, with the selected student.")
    max_eval_images: int | None = _f(None, "Use only the first N validation / test images (quick runs).")

    # ---- what the student trains on
    synthetic: str | None = _f(
        None, "Synthetic set to evaluate (dir or Hub id of a SyntheticSet), method 'mdm'."
    )
    synthetic_revision: str | None = _f(None, "Revision of the synthetic set on the Hub.")
    method: str = _f(
        "mdm", "Training data: mdm (the synthetic set) | random | herding | kcenter | kmeans | full."
    )
    methods: list[str] | None = _f(
        None, "Compare several methods under one protocol (e.g. mdm random herding kcenter full)."
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
    learn_temperature: bool | None = _f(None, "Train the temperature (preset: small yes, paper no).")

    # ---- optimisation (None: from the preset)
    preset: str = _f("paper", "paper (MDM.md §5) | small (EmojiCaps on 2 CPU cores, BENCHMARKS.md).")
    optimizer: str | None = _f(None, "sgd | adamw | adam.")
    learning_rate: float | None = _f(None, "Learning rate.")
    momentum: float | None = _f(None, "SGD momentum.")
    weight_decay: float | None = _f(None, "Weight decay (not applied to the temperature).")
    lr_scheduler: str | None = _f(
        None, "constant | step (x lr_decay_factor after each lr_decay_epochs) | cosine."
    )
    lr_decay_epochs: list[float] | None = _f(
        None, "Epochs after which the lr is multiplied by lr_decay_factor."
    )
    lr_decay_factor: float = _f(0.1, "Step-schedule factor.")
    num_train_epochs: float | None = _f(None, "Epochs (used when max_steps <= 0).")
    max_steps: int | None = _f(None, "Training steps (> 0 overrides num_train_epochs).")
    full_max_steps: int | None = _f(None, "Training steps for method 'full' (<= 0: same as the others).")
    batch_size: int | None = _f(None, "Training batch size (capped at the number of pairs).")
    max_grad_norm: float = _f(0.0, "Gradient clipping (0: none, as in the paper).")
    augment: str = _f(
        "color_crop_cutout_flip_scale_rotate", "DSA ops joined by '_' (mdm_hf.augment), or 'none'."
    )
    augment_mode: str = _f("single", "single: one op per batch (DSA default) | all: every op.")

    # ---- selection and reporting
    eval_steps: int | None = _f(None, "Score validation every N steps (and at step 0).")
    eval_epochs: float | None = _f(None, "Score validation every N epochs (used when eval_steps is None).")
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
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}.")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, copy.deepcopy(value))
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
        }
        check_values(self, checks, choices)
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


# ============================================================================================ data
class LazyImages:
    """Images of a large split, preprocessed (teacher) and converted (student) on access."""

    def __init__(self, data, teacher, source: PixelSpace, target: PixelSpace) -> None:
        self.data, self.teacher, self.source, self.target = data, teacher, source, target

    def __len__(self) -> int:
        return self.data.num_images

    def __getitem__(self, index: int) -> torch.Tensor:
        pixels = self.teacher.preprocess_images([self.data.image(int(index))])
        return convert_pixels(pixels, self.source, self.target)[0]


def _rows(images, start: int, stop: int) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[start:stop]
    return torch.stack([images[i] for i in range(start, stop)])


@dataclass
class EvalSplit:
    """A split ready for scoring: student-space pixels, student-space text features, caption owners."""

    name: str
    images: Any  # Tensor [N_img, C, H, W] or LazyImages
    text_features: torch.Tensor
    text_to_image: torch.Tensor

    @property
    def num_images(self) -> int:
        return len(self.images)


class PairDataset(torch.utils.data.Dataset):
    """Training pairs: item ``i`` is image ``image_index[i]`` with text feature ``text_features[i]``."""

    def __init__(self, images, image_index: torch.Tensor, text_features: torch.Tensor) -> None:
        if len(image_index) != len(text_features):
            raise ValueError(f"{len(image_index)} image indices but {len(text_features)} text features.")
        self.images, self.image_index, self.text_features = images, image_index.long(), text_features.float()

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[int(self.image_index[i])], "text_features": self.text_features[i]}


@torch.no_grad()
def evaluate_split(model: StudentModel, split: EvalSplit, batch_size: int = 256) -> dict[str, float]:
    """Retrieval metrics (percent) of ``model`` on one split. The ONLY place students are scored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    image_embeds = torch.cat(
        [
            model.encode_image(_rows(split.images, s, min(s + batch_size, split.num_images)).to(device))
            .float()
            .cpu()
            for s in range(0, split.num_images, batch_size)
        ]
    )
    text_embeds = torch.cat(
        [
            model.encode_text(split.text_features[s : s + 4096].to(device)).float().cpu()
            for s in range(0, len(split.text_features), 4096)
        ]
    )
    model.train(was_training)
    return {k: float(v) for k, v in retrieval_metrics(image_embeds, text_embeds, split.text_to_image).items()}


# ============================================================================================ Trainer
class ValidationSelectionCallback(TrainerCallback):
    """Scores the student on the validation split at step 0, every ``eval_steps`` and at the end; keeps the best.

    The best state (by ``metric``, ties keep the earlier step) is a CPU copy of the full ``state_dict`` (buffers
    such as BatchNorm statistics included).
    """

    def __init__(
        self,
        score: Callable[[nn.Module], dict],
        eval_steps: int,
        metric: str = "mean",
        patience: int | None = None,
    ) -> None:
        self.score, self.metric, self.patience = score, metric, patience
        self.eval_steps = max(1, int(eval_steps))
        self.history: list[dict] = []
        self.best_state: dict | None = None
        self.best_step: int | None = None
        self.best_metrics: dict | None = None
        self.losses: list[dict] = []
        self._since_best = 0

    def _evaluate(self, model: nn.Module, step: int) -> None:
        if self.history and self.history[-1]["step"] == step:
            return
        metrics = self.score(model)
        self.history.append({"step": step, **metrics})
        if self.best_metrics is None or metrics[self.metric] > self.best_metrics[self.metric]:
            self.best_metrics, self.best_step, self._since_best = dict(metrics), step, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            self._since_best += 1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._evaluate(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.eval_steps == 0 or step >= state.max_steps:
            self._evaluate(model, step)
            if self.patience is not None and self._since_best >= self.patience:
                control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._evaluate(model, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            entry = {"step": state.global_step, "loss": float(logs["loss"])}
            if "learning_rate" in logs:
                entry["learning_rate"] = float(logs["learning_rate"])
            self.losses.append(entry)


class StudentTrainer(Trainer):
    """``Trainer`` with the student loss, DSA augmentation, and SGD / AdamW + step / cosine schedules.

    ``compute_loss``: symmetric InfoNCE ``(CE(s·Z_v Z_t^T, I) + CE(s·Z_t Z_v^T, I)) / 2`` with the student's
    exponentiated logit scale ``s`` (CLIP, arXiv 2103.00020; MDM.md §5 uses tau = 0.07).
    """

    def __init__(self, *args, augment=None, student_config: StudentConfig, steps_per_epoch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.augment, self.student_config, self.steps_per_epoch = augment, student_config, steps_per_epoch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from .losses import clip_contrastive_loss

        pixels = inputs["pixel_values"]
        if self.augment is not None and model.training:
            pixels = self.augment(pixels)
        image_embeds, text_embeds = model(pixels, inputs["text_features"])
        loss = clip_contrastive_loss(image_embeds, text_embeds, model.logit_scale)
        return (loss, {"image_embeds": image_embeds, "text_embeds": text_embeds}) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            cfg = self.student_config
            model = self.model if model is None else model
            decay, no_decay = [], []
            for name, p in model.named_parameters():
                if p.requires_grad:
                    (no_decay if name == "log_logit_scale" else decay).append(p)
            groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
            if no_decay:
                groups.append({"params": no_decay, "weight_decay": 0.0})
            if cfg.optimizer == "sgd":
                self.optimizer = torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum)
            elif cfg.optimizer == "adamw":
                self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
            else:
                self.optimizer = torch.optim.Adam(groups, lr=cfg.learning_rate)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            cfg = self.student_config
            optimizer = optimizer or self.optimizer
            if cfg.lr_scheduler == "step":
                milestones = sorted(round(e * self.steps_per_epoch) for e in cfg.lr_decay_epochs)

                def factor(step: int) -> float:  # lr x decay after each milestone (paper: x0.1 at epoch 51)
                    return cfg.lr_decay_factor ** sum(step >= m for m in milestones)

            elif cfg.lr_scheduler == "cosine":

                def factor(step: int) -> float:
                    return 0.5 * (
                        1.0 + math.cos(math.pi * min(step, num_training_steps) / num_training_steps)
                    )

            else:

                def factor(step: int) -> float:
                    return 1.0

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return self.lr_scheduler


# ============================================================================================ the evaluator
@dataclass
class StudentRun:
    """One trained student: the selected state is loaded into ``model``."""

    model: StudentModel
    best_step: int
    validation: dict
    history: list
    losses: list
    steps: int
    seconds: float


class StudentEvaluator:
    """Everything shared by the students of one protocol, prepared once: teacher, vision tower template, frozen
    text features and pixels of the validation (and, on first use, test and train) splits, coreset features.

    Args:
        config: the protocol.
        teacher: an already loaded :class:`~mdm_hf.models.DualEncoder` (e.g. the distiller's, before it
            distills: the vision tower is copied at construction); loaded from ``config`` when None.
        validation_only: refuse to touch the test split (the distiller's validation hook).
    """

    def __init__(self, config: StudentConfig, teacher=None, validation_only: bool = False) -> None:
        from .models import DualEncoder

        self.config = config
        self.validation_only = validation_only
        if teacher is None:
            teacher = DualEncoder.from_pretrained(
                config.model_name_or_path,
                config.model_revision,
                config.text_pooling,
                config.trust_remote_code,
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_space = PixelSpace.make(teacher.image_mean, teacher.image_std, teacher.image_size)
        if (
            config.track == "paper"
            and config.vision_model_name_or_path is None
            and config.vision_config is None
        ):
            raise ValueError(
                "The paper track trains an image backbone of its own: set --vision_model_name_or_path (e.g. "
                "microsoft/resnet-50, timm/nfnet_l0.ra2_in1k) or --vision_config. For the teacher's own vision "
                "tower use --track clip."
            )
        self.vision_template, self.student_space, self.pretrained_head = load_vision_backbone(config, teacher)
        self.vision_dim = backbone_feature_dim(self.vision_template, self.student_space)
        if config.text_model_name_or_path is None:
            self.text_encoder = teacher
            self.text_dim = teacher.text_feature_dim
        else:
            self.text_encoder = FrozenTextEncoder.from_pretrained(
                config.text_model_name_or_path, pooling=config.text_model_pooling
            )
            self.text_dim = self.text_encoder.text_feature_dim
        self.validation = self._eval_split(config.validation_split)
        self._test: EvalSplit | None = None
        self._train: dict | None = None
        self._synthetic = None

    # ------------------------------------------------------------------ data
    def _load(self, split: str, max_images: int | None):
        return load_split(self.config, split, max_images)

    def _text_features(self, data) -> torch.Tensor:
        from .data import cached_text_features

        return cached_text_features(self.text_encoder, data, self.config.cache_dir).float()

    def _pixels(self, data) -> tuple[Any, torch.Tensor | None]:
        """(student-space images, teacher-space tensor or None) of a split; lazy when the split is large."""
        from .data import preprocess_split_images

        if data.num_images > self.config.max_cached_images:
            return LazyImages(data, self.teacher, self.teacher_space, self.student_space), None
        teacher_pixels = preprocess_split_images(self.teacher, data)
        return convert_pixels(teacher_pixels, self.teacher_space, self.student_space), teacher_pixels

    def _eval_split(self, split: str) -> EvalSplit:
        data = self._load(split, self.config.max_eval_images)
        images, _ = self._pixels(data)
        return EvalSplit(split, images, self._text_features(data), data.caption_to_image.clone())

    @property
    def test(self) -> EvalSplit:
        """The test split, loaded on first use (never by a validation-only evaluator)."""
        if self.validation_only:
            raise RuntimeError(
                "This evaluator is validation-only (a distillation hook); it never loads test."
            )
        if self._test is None:
            self._test = self._eval_split(self.config.test_split)
        return self._test

    def train_split(self) -> dict:
        """Train split: student images, student text features, caption owners, teacher joint features (lazy)."""
        if self._train is None:
            data = self._load(self.config.train_split, self.config.max_train_images)
            images, teacher_pixels = self._pixels(data)
            self._train = {
                "data": data,
                "images": images,
                "teacher_pixels": teacher_pixels,
                "text_features": self._text_features(data),
                "caption_to_image": data.caption_to_image.clone(),
                "joint": None,
            }
        return self._train

    @torch.no_grad()
    def joint_features(self) -> torch.Tensor:
        """Teacher joint features ``normalize([z_v, z_t])`` of every train pair (coreset selection; MDM §1)."""
        from .data import cached_text_features
        from .selection import joint_features

        train = self.train_split()
        if train["joint"] is None:
            teacher, bs = self.teacher, self.config.eval_batch_size
            device = next(teacher.parameters()).device
            data, pixels = train["data"], train["teacher_pixels"]
            chunks = []
            for s in range(0, data.num_images, bs):
                stop = min(s + bs, data.num_images)
                batch = (
                    pixels[s:stop]
                    if pixels is not None
                    else teacher.preprocess_images(data.images(range(s, stop)))
                )
                chunks.append(teacher.image_embeds(batch.to(device)).float().cpu())
            zv = torch.cat(chunks)[train["caption_to_image"]]
            e = (
                train["text_features"]
                if self.text_encoder is teacher
                else cached_text_features(teacher, data, self.config.cache_dir)
            )
            zt = teacher.project_text(e.to(device)).float().cpu()
            train["joint"] = joint_features(zv, zt)
        return train["joint"]

    def load_synthetic(self):
        """The configured synthetic set (``config.synthetic``), loaded once."""
        from .synthetic import SyntheticSet

        if self._synthetic is None:
            if self.config.synthetic is None:
                raise ValueError(
                    "Method 'mdm' needs a synthetic set: pass --synthetic <dir or Hub id> (a SyntheticSet saved with "
                    "save_pretrained / push_to_hub)."
                )
            self._synthetic = SyntheticSet.from_pretrained(
                self.config.synthetic, self.config.synthetic_revision
            )
        return self._synthetic

    def synthetic_pairs(self, synthetic) -> PairDataset:
        """Training pairs from a :class:`~mdm_hf.synthetic.SyntheticSet` in the student's pixel and text spaces."""
        pixels = synthetic.pixel_values.float()
        source = PixelSpace.make(synthetic.image_mean, synthetic.image_std, tuple(pixels.shape[-2:]))
        images = convert_pixels(pixels, source, self.student_space)
        source_mode = self.config.text_source
        if source_mode == "auto":
            source_mode = "features" if self.text_encoder is self.teacher else "captions"
        if source_mode == "features":
            text = synthetic.text_features.float()
            if text.shape[-1] != self.text_dim:
                raise ValueError(
                    f"The synthetic text features are {text.shape[-1]}-d but the student's frozen text tower gives "
                    f"{self.text_dim}-d features: the set was distilled in another text space. Evaluate with the "
                    "teacher it was distilled with (--model_name_or_path) or use --text_source captions."
                )
        else:
            if not synthetic.captions or any(not c for c in synthetic.captions):
                raise ValueError(
                    "text_source='captions' needs a nearest real caption for every synthetic pair."
                )
            text = self.text_encoder.encode_text_features([caps[0] for caps in synthetic.captions]).float()
        return PairDataset(images, torch.arange(len(images)), text)

    def pairs(self, method: str, seed: int, synthetic=None) -> PairDataset:
        """Training pairs of a method: the synthetic set, a K-pair coreset (seeded) or the full train split."""
        if method == "mdm":
            synthetic = synthetic if synthetic is not None else self.load_synthetic()
            if self.config.num_pairs is not None and self.config.num_pairs != len(synthetic):
                raise ValueError(
                    f"num_pairs={self.config.num_pairs} but the synthetic set has {len(synthetic)} pairs: methods "
                    "are only comparable at the same K. Drop --num_pairs (the set's size is used) or match it."
                )
            return self.synthetic_pairs(synthetic)
        train = self.train_split()
        if method == "full":
            return PairDataset(train["images"], train["caption_to_image"], train["text_features"])
        from .selection import select_pairs

        k = self.budget(synthetic)
        idx = select_pairs(method, self.joint_features(), k, seed=seed)
        return PairDataset(train["images"], train["caption_to_image"][idx], train["text_features"][idx])

    def budget(self, synthetic=None) -> int:
        """K for the coresets: ``num_pairs``, else the synthetic set's size."""
        if self.config.num_pairs is not None:
            return self.config.num_pairs
        if synthetic is not None or self.config.synthetic is not None:
            return len((synthetic if synthetic is not None else self.load_synthetic()).pixel_values)
        raise ValueError(
            "Coreset methods need a budget: pass --num_pairs K (or --synthetic to use its size)."
        )

    # ------------------------------------------------------------------ students
    def build_student(self) -> StudentModel:
        """A fresh student (call after seeding: the head initialisation draws from the global RNG)."""
        cfg = self.config
        head = self.pretrained_head if cfg.keep_pretrained_head else None
        if cfg.keep_pretrained_head and head is None:
            raise ValueError(
                "keep_pretrained_head=True needs a dual-encoder vision tower (CLIP / SigLIP / VTDE)."
            )
        visual = cfg.visual_projection if cfg.visual_projection is not None else cfg.track == "clip"
        projection_dim = cfg.projection_dim
        if projection_dim is None and visual:
            projection_dim = int(getattr(self.teacher.model.config, "projection_dim", 0) or self.vision_dim)
        return StudentModel(
            copy.deepcopy(self.vision_template),
            self.vision_dim,
            self.text_dim,
            projection_dim,
            visual_projection=visual,
            temperature=cfg.temperature,
            learn_temperature=cfg.learn_temperature,
            head=head,
            text_head=cfg.text_head or ("mlp" if cfg.track == "paper" else "linear"),
        )

    def train_student(
        self, pairs: PairDataset, seed: int, method: str = "mdm", max_steps: int | None = None
    ) -> StudentRun:
        """Train one student on ``pairs``; validation picks the step; the selected state is loaded."""
        from transformers import TrainingArguments, default_data_collator, set_seed
        from transformers.trainer_callback import PrinterCallback

        from .augment import DiffAugment

        cfg = self.config
        set_seed(seed)
        model = self.build_student()
        batch = min(cfg.batch_size, len(pairs))
        steps_per_epoch = math.ceil(len(pairs) / batch)
        if max_steps is None:
            max_steps = cfg.full_max_steps if method == "full" and cfg.full_max_steps > 0 else cfg.max_steps
        total = max_steps if max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
        eval_steps = cfg.eval_steps if cfg.eval_steps else max(1, round(cfg.eval_epochs * steps_per_epoch))
        augment = (
            None
            if cfg.augment in ("none", "", None)
            else DiffAugment(cfg.augment, cfg.augment_mode, seed=seed)
        )
        use_cpu = cfg.use_cpu if cfg.use_cpu is not None else not torch.cuda.is_available()
        save_dir = Path(cfg.output_dir) / "students" / f"{method}-seed{seed}" if cfg.save_students else None
        callback = ValidationSelectionCallback(
            lambda m: evaluate_split(m, self.validation, cfg.eval_batch_size),
            eval_steps,
            patience=cfg.early_stopping_patience,
        )
        # The Trainer wants an output_dir even when it saves nothing: a scratch dir unless students are kept.
        with tempfile.TemporaryDirectory(prefix="mdm-student-") as scratch:
            args = TrainingArguments(
                output_dir=str(save_dir or scratch),
                per_device_train_batch_size=batch,
                max_steps=total,
                learning_rate=cfg.learning_rate,
                weight_decay=cfg.weight_decay,
                max_grad_norm=cfg.max_grad_norm,
                seed=seed,
                data_seed=seed,
                report_to="none",
                save_strategy="no",
                eval_strategy="no",
                logging_strategy="steps" if cfg.logging_steps > 0 else "no",
                logging_steps=max(1, cfg.logging_steps),
                use_cpu=use_cpu,
                dataloader_num_workers=cfg.num_workers,
                dataloader_pin_memory=not use_cpu,
                remove_unused_columns=False,
                disable_tqdm=not cfg.progress,
            )
            trainer = StudentTrainer(
                model=model,
                args=args,
                train_dataset=pairs,
                data_collator=default_data_collator,
                callbacks=[callback],
                augment=augment,
                student_config=cfg,
                steps_per_epoch=steps_per_epoch,
            )
            trainer.remove_callback(PrinterCallback)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            model.load_state_dict(callback.best_state)
            if save_dir is not None:
                trainer.save_model(str(save_dir))
        return StudentRun(
            model, callback.best_step, callback.best_metrics, callback.history, callback.losses,
            trainer.state.global_step, seconds,
        )  # fmt: skip

    def run(self, method: str, seed: int, synthetic=None) -> dict:
        """Train, select on validation, score the selected student ONCE on test; a JSON-ready record."""
        pairs = self.pairs(method, seed, synthetic)
        run = self.train_student(pairs, seed, method)
        test = evaluate_split(run.model, self.test, self.config.eval_batch_size)
        logger.info(
            "%s seed %d: best validation step %d, test mean %.2f", method, seed, run.best_step, test["mean"]
        )
        return {
            "method": method,
            "seed": seed,
            "pairs": len(pairs),
            "best_step": run.best_step,
            "steps": run.steps,
            "train_seconds": run.seconds,
            "validation": run.validation,
            "test": test,
            "validation_history": run.history,
            "train_loss": run.losses,
        }

    def protocol(self) -> str:
        """One sentence describing the student protocol (for the card and the JSON)."""
        cfg = self.config
        vision = cfg.vision_model_name_or_path or (
            "config-built backbone" if cfg.vision_config else "the teacher"
        )
        text = cfg.text_model_name_or_path or f"the teacher ({cfg.model_name_or_path})"
        head = "pretrained head kept" if cfg.keep_pretrained_head else "fresh projections and temperature"
        tau = f"tau init {cfg.temperature}, {'learned' if cfg.learn_temperature else 'fixed'}"
        length = f"{cfg.max_steps} steps" if cfg.max_steps > 0 else f"{cfg.num_train_epochs:g} epochs"
        return (
            f"{cfg.track} track: vision tower from {vision} trained in full, frozen text tower of {text}, {head} "
            f"({tau}); {cfg.optimizer} lr {cfg.learning_rate:g} ({cfg.lr_scheduler}), {length}, batch "
            f"{cfg.batch_size}, augmentation {cfg.augment} ({cfg.augment_mode}); step selected on "
            f"'{cfg.validation_split}' mean recall, '{cfg.test_split}' scored once; mean ± std over "
            f"{cfg.num_seeds} seed(s) ({self.config.preset} preset)."
        )


# ============================================================================================ public API
def _summary(records: list[dict]) -> dict[str, float]:
    """Mean and sample std (0 for one seed) of the test metrics over seeds, in the card's row format."""
    row: dict[str, float] = {}
    for m in METRIC_NAMES:
        values = [r["test"][m] for r in records]
        row[m] = statistics.fmean(values)
        row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return row


def _row(method: str, records: list[dict]) -> dict:
    return {
        "method": METHOD_LABELS[method],
        "pairs": records[0]["pairs"],
        **_summary(records),
        "seeds": len(records),
    }


def _write(output_dir: str | None, name: str, payload: dict, table: str | None = None) -> None:
    if not output_dir:
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    if table is not None:
        (out / f"{name}.md").write_text(table + "\n")


def _environment() -> dict:
    import platform

    import transformers

    from . import __version__

    return {
        "mdm_hf": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def evaluate_student(config: StudentConfig, synthetic=None, teacher=None) -> dict:
    """Train ``config.num_seeds`` students on ``config.method``'s pairs; mean ± std of the test metrics.

    Each student is selected on the validation split and scored once on test. Returns (and writes to
    ``output_dir/student_<method>.json``) ``{"method", "row", "protocol", "runs", "config", "environment"}`` where
    ``row`` is one row of the card's results table.
    """
    evaluator = StudentEvaluator(config, teacher=teacher)
    records = [evaluator.run(config.method, seed, synthetic) for seed in config.seeds]
    result = {
        "method": config.method,
        "row": _row(config.method, records),
        "protocol": evaluator.protocol(),
        "runs": records,
        "config": config.to_dict(),
        "environment": _environment(),
    }
    table = format_results_table({"rows": [result["row"]], "metric_names": list(METRIC_NAMES)})
    _write(config.output_dir, f"student_{config.method}", result, table)
    return result


def compare_methods(
    config: StudentConfig,
    methods: Sequence[str] | None = None,
    synthetic=None,
    teacher=None,
) -> dict:
    """Every method under the SAME student protocol and seeds; the ``results`` a SyntheticSet card shows.

    Args:
        config: the protocol (``num_pairs`` or the synthetic set fixes K for the coresets).
        methods: default ``config.methods`` or ``["mdm", "random", "herding", "kcenter", "full"]`` ("mdm" is
            dropped when no synthetic set is given).
        synthetic: a :class:`~mdm_hf.synthetic.SyntheticSet` to use for "mdm" instead of ``config.synthetic``.

    Returns:
        ``{"protocol", "metric_names", "rows": [{"method", "pairs", "ir@1", "ir@1_std", ..., "mean", "mean_std",
        "seeds"}], "notes", "runs": {method: [per-seed records]}}``; also written to ``output_dir/comparison.json``
        with the markdown table in ``comparison.md``.
    """
    methods = list(methods or config.methods or ["mdm", "random", "herding", "kcenter", "full"])
    if synthetic is None and config.synthetic is None and "mdm" in methods:
        logger.warning("No synthetic set given: the comparison runs without the 'mdm' row.")
        methods.remove("mdm")
    if not methods:
        raise ValueError("compare_methods needs at least one method.")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"Unknown method {m!r}; choose from {list(METHODS)}.")
    evaluator = StudentEvaluator(config, teacher=teacher)
    runs = {m: [evaluator.run(m, seed, synthetic) for seed in config.seeds] for m in methods}
    results = {
        "protocol": evaluator.protocol(),
        "metric_names": list(METRIC_NAMES),
        "rows": [_row(m, runs[m]) for m in methods],
        "notes": (
            f"Test-split recall (%) of students whose step was selected on '{config.validation_split}'; each "
            f"selected student is scored once on '{config.test_split}'. Coresets are chosen on the teacher's joint "
            f"features of '{config.train_split}'; every method uses the same student protocol and seeds."
        ),
        "runs": runs,
    }
    table = format_results_table(results)
    _write(
        config.output_dir,
        "comparison",
        {**results, "config": config.to_dict(), "environment": _environment()},
        table,
    )
    return results


def card_results(results: dict) -> dict:
    """The part of :func:`compare_methods`' results a SyntheticSet card keeps (per-seed runs dropped)."""
    return {k: results[k] for k in ("protocol", "metric_names", "rows", "notes") if k in results}


def format_results_table(results: dict) -> str:
    """A markdown table of ``results["rows"]``: one row per method, ``mean ± std`` per metric."""
    names = list(results.get("metric_names") or METRIC_NAMES)
    header = ["Method", "Pairs", *(n.upper().replace("MEAN", "Mean") for n in names), "Seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in results["rows"]:
        cells = [str(row["method"]), str(row["pairs"])]
        for n in names:
            std = row.get(f"{n}_std")
            cells.append(f"{row[n]:.2f}" + (f" ± {std:.2f}" if std is not None else ""))
        cells.append(str(row.get("seeds", "")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def student_validation_fn(
    config: StudentConfig,
    teacher=None,
    max_steps: int | None = None,
    num_seeds: int = 1,
) -> Callable[[Any, int], dict]:
    """The distiller's validation hook: ``fn(synthetic_set, step) -> {"mean": ..., "ir@1": ..., ...}``.

    Each call trains a SHORT student run (``max_steps``, default the config's) on the current synthetic set and
    returns the validation metrics of its best validation step, averaged over ``num_seeds`` seeds. It never loads
    the test split. Build it before distilling: the student's vision tower is copied from ``teacher`` now.
    """
    evaluator = StudentEvaluator(config, teacher=teacher, validation_only=True)
    seeds = list(range(config.seed, config.seed + num_seeds))

    def validate(synthetic_set, step: int) -> dict:
        runs = [
            evaluator.train_student(evaluator.synthetic_pairs(synthetic_set), s, max_steps=max_steps)
            for s in seeds
        ]
        metrics = {m: statistics.fmean(r.validation[m] for r in runs) for m in METRIC_NAMES}
        metrics["student_step"] = statistics.fmean(r.best_step for r in runs)
        logger.info("distillation step %d: student validation mean %.2f", step, metrics["mean"])
        return metrics

    validate.evaluator = evaluator  # type: ignore[attr-defined]
    return validate


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``mdm-hf evaluate`` / ``recipes/evaluate_student.py``: one method, or ``--methods ...`` compared."""

    config = parse_dataclass_args(StudentConfig, argv, prog="mdm-hf evaluate")
    if config.methods:
        results = compare_methods(config)
        rows = results["rows"]
        protocol = results["protocol"]
    else:
        result = evaluate_student(config)
        rows, protocol = [result["row"]], result["protocol"]
    print(format_results_table({"rows": rows, "metric_names": list(METRIC_NAMES)}))
    print(f"\nProtocol: {protocol}")
    if config.output_dir:
        print(f"Results written to {os.path.abspath(config.output_dir)}")
    return 0
