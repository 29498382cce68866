"""A paper-regime anchor: the vision tower pre-trained as an image *classifier*, the text tower frozen, fresh
projections.

MDM's anchor (arXiv 2605.23482, docs/method.md §2 and §5) is an ImageNet-pretrained NFNet with a frozen BERT and
*untrained* projections: the anchor alone aligns nothing, and only the experts, fine-tuned on the target data,
make a useful teacher. The contrastive anchor of :mod:`mdm_hf.anchor` is instead already aligned (CLIP-like), so
there the anchor alone is a good teacher. This module builds the paper's regime on any labelled image-caption set:

* the vision tower of :func:`mdm_hf.anchor.build_anchor` (same ViT, same image processor) plus a linear head is
  trained with cross-entropy on a label column (EmojiCaps: ``concept`` of the P split -- the ImageNet analogue; no
  text is used);
* the head is dropped; the text tower is the pretrained text encoder, untouched; the projections and the
  temperature keep :func:`~mdm_hf.anchor.build_anchor`'s fresh initialisation.

The result is a ``VisionTextDualEncoderModel`` directory that :meth:`mdm_hf.models.DualEncoder.from_pretrained`
loads and :mod:`mdm_hf.experts` fine-tunes like any anchor::

    from mdm_hf.classifier_anchor import ClassifierAnchorConfig, pretrain_classifier_anchor
    result = pretrain_classifier_anchor(ClassifierAnchorConfig(dataset_name="emojicaps/", train_split="pretrain"))
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from . import __version__
from .anchor import (
    ANCHOR_RECORD,
    AnchorPretrainingConfig,
    AnchorPretrainingResult,
    StyleAugment,
    build_anchor,
    owns_anchor_file,
)
from .checkpointing import prepare_output_dir
from .config import config_field as _f
from .config import trackers
from .data import load_split, preprocess_split_images
from .models import DualEncoder
from .training import TrainingLog, finish_trackers, run_contrastive_training, start_trackers

__all__ = ["ClassifierAnchorConfig", "LabelledImages", "pretrain_classifier_anchor"]


@dataclass
class ClassifierAnchorConfig(AnchorPretrainingConfig):
    """:class:`~mdm_hf.anchor.AnchorPretrainingConfig` (tower sizes, optimisation, style augmentation, output),
    trained as a classifier on ``label_column``. ``projection_dim`` and ``logit_scale_init`` only shape the fresh
    projections; ``validation_split`` is not used (a classifier's labels need not exist in another split)."""

    label_column: str = _f(
        "concept", "Column of the train split holding each image's class (EmojiCaps: concept)."
    )
    label_smoothing: float = _f(0.1, "Label smoothing of the cross-entropy.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1).")


class LabelledImages(torch.utils.data.Dataset):
    """Item ``i``: pre-processed image ``i`` and its class id. The keys are the ones
    :func:`~mdm_hf.training.run_contrastive_training` hands its objective (``text_features`` carries the label)."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixels, self.labels = pixels, labels

    def set_epoch(self, epoch: int) -> None:
        """Nothing changes per epoch (the loader reshuffles)."""

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "text_features": self.labels[i]}


class _ClassifierObjective(nn.Module):
    """``forward(pixels, labels) -> cross-entropy`` of a linear head on the vision tower's pooled output -- the
    feature ``E_v(x)`` the dual encoder projects (:meth:`mdm_hf.models.DualEncoder.image_features`)."""

    def __init__(self, encoder: DualEncoder, num_classes: int, augment: nn.Module | None, smoothing: float):
        super().__init__()
        self.vision_model = encoder.model.vision_model
        self.head = nn.Linear(encoder.model.config.vision_config.hidden_size, num_classes)
        self.augment, self.smoothing = augment, smoothing

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.vision_model(pixel_values=pixel_values).pooler_output)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.augment is not None:
            pixel_values = self.augment(pixel_values)
        return F.cross_entropy(self.logits(pixel_values), labels, label_smoothing=self.smoothing)


@torch.no_grad()
def _accuracy(
    objective: _ClassifierObjective, pixels: torch.Tensor, labels: torch.Tensor, batch: int
) -> float:
    """Top-1 accuracy (%) in eval mode, fixed batches, no augmentation."""
    objective.eval()
    device = next(objective.parameters()).device
    hits = sum(
        int((objective.logits(p.to(device)).argmax(-1).cpu() == y).sum())
        for p, y in zip(pixels.split(batch), labels.split(batch))
    )
    return 100.0 * hits / len(labels)


def pretrain_classifier_anchor(config: ClassifierAnchorConfig, accelerator=None) -> AnchorPretrainingResult:
    """Train the vision tower as a classifier, then save the dual encoder with its pretrained text tower and fresh
    projections to ``config.output_dir``. ``initial_loss`` / ``final_loss`` of the result are the top-1 *error*
    (%) on the train images before and after (eval mode), so lower is better as for the contrastive anchor."""
    acc = accelerator or Accelerator(log_with=trackers(config.report_to), project_dir=config.output_dir)
    out = Path(config.output_dir)
    prepare_output_dir(out, owned=owns_anchor_file, overwrite=config.overwrite_output_dir, accelerator=acc)
    set_seed(config.seed)
    encoder = build_anchor(config)  # fresh vision tower and projections, pretrained text tower
    encoder.requires_grad_(False)
    train = load_split(config)
    if config.label_column not in train.dataset.column_names:
        raise ValueError(
            f"Split '{train.split}' of {train.name} has no column '{config.label_column}' (columns: "
            f"{train.dataset.column_names}); pass --label_column with the column holding each image's class."
        )
    names = [str(v) for v in train.dataset[config.label_column]]
    classes = sorted(set(names))
    if len(classes) < 2:
        raise ValueError(
            f"Column '{config.label_column}' has {len(classes)} class; a classifier needs at least 2."
        )
    class_id = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([class_id[n] for n in names], dtype=torch.long)
    pixels = preprocess_split_images(encoder, train)
    augment = None
    if config.grayscale_p > 0 or config.blur_p > 0:
        augment = StyleAugment(encoder.image_mean, encoder.image_std, config.grayscale_p, config.blur_p,
                               config.blur_sigma_max)  # fmt: skip
    objective = _ClassifierObjective(encoder, len(classes), augment, config.label_smoothing)
    objective.vision_model.requires_grad_(True)
    objective.to(acc.device)
    batch = config.per_device_train_batch_size
    initial = 100.0 - _accuracy(objective, pixels, labels, batch)
    training_log = TrainingLog(acc, description="classifier anchor", logging_steps=config.logging_steps,
                               disable_tqdm=config.disable_tqdm)  # fmt: skip
    start_trackers(acc, config.report_to, "mdm-classifier-anchor", asdict(config))
    losses = run_contrastive_training(
        acc, objective, LabelledImages(pixels, labels), learning_rate=config.learning_rate, batch_size=batch,
        num_train_epochs=config.num_train_epochs, weight_decay=config.weight_decay, max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler_type, warmup_ratio=config.warmup_ratio,
        max_grad_norm=config.max_grad_norm, training_log=training_log,
    )  # fmt: skip
    finish_trackers(acc)
    final = 100.0 - _accuracy(objective, pixels, labels, batch)
    if acc.is_main_process:
        encoder.save_pretrained(out)
        record = {
            "created_with": f"mdm-hf {__version__}",
            "kind": "classifier",
            "text_model": encoder.name_or_path,
            "config": asdict(config),
            "num_classes": len(classes),
            "train_top1_error": {"initial": initial, "final": final},
            "epoch_losses": losses,
        }
        (out / ANCHOR_RECORD).write_text(json.dumps(record, indent=2))
    acc.wait_for_everyone()
    return AnchorPretrainingResult(out, initial, final, losses, [])
