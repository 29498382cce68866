"""The contrastive training every model of the package shares: anchor pre-training, LoRA / full experts and the
trajectory-matching baseline's SGD buffers all train a :class:`~mdm_hf.models.DualEncoder` on (image, frozen text
feature) pairs with the loss its family was trained with, through one loop on ``accelerate``.

The loop reports like the distiller and ``transformers.Trainer``: a progress bar on the main process, a log line
every ``logging_steps`` optimiser steps, and the same values (loss, learning rate, epoch, per-epoch loss and
validation recall) in the accelerate trackers that ``--report_to`` names (:class:`TrainingLog`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from .config import trackers
from .losses import clip_contrastive_loss, sigmoid_contrastive_loss
from .models import DualEncoder
from .retrieval import retrieval_metrics

logger = logging.getLogger(__name__)

# transformers schedulers that need nothing but (warm-up steps, total steps): the choices of --lr_scheduler_type.
LRSchedulerType = Literal[
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
]
LR_SCHEDULER_HELP = "Learning-rate schedule (transformers.get_scheduler); warm-up: warmup_ratio."


def check_warmup(lr_scheduler_type: str, warmup_ratio: float) -> None:
    """Refuse a warm-up the schedule would ignore (``transformers``' ``constant`` has none) instead of dropping it."""
    if warmup_ratio > 0 and lr_scheduler_type == "constant":
        raise ValueError(
            f"warmup_ratio={warmup_ratio} with lr_scheduler_type='constant': the constant schedule has no warm-up. "
            "Use --lr_scheduler_type constant_with_warmup, or --warmup_ratio 0."
        )


def tracker_config(values: dict) -> dict:
    """A config as tracker hyperparameters: ``None`` left out, lists as strings (TensorBoard's ``add_hparams``
    takes only scalars and strings)."""
    return {k: str(v) if isinstance(v, (list, tuple)) else v for k, v in values.items() if v is not None}


def start_trackers(accelerator, report_to: str, project_name: str, config: dict) -> None:
    """Open the tracker run ``report_to`` asks for (none for ``none``), with ``config`` as its hyperparameters."""
    if not trackers(report_to):
        return
    if not accelerator.log_with:
        logger.warning(
            "report_to=%r, but the accelerator given was built without log_with=trackers(report_to): nothing "
            "is tracked.",
            report_to,
        )
    accelerator.init_trackers(project_name, config=tracker_config(config))


def finish_trackers(accelerator) -> None:
    """Close the trackers of a run. Not ``Accelerator.end_training``: that also destroys the process group, and
    the caller of a bank or anchor run may go on using its accelerator."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


@dataclass
class TrainingLog:
    """Where a run of :func:`run_contrastive_training` reports: progress bar, log lines, trackers.

    Several runs can share one tracker run: ``prefix`` names the metrics of this one (``"expert-1/"``) and
    ``run_index`` places its steps after the runs before it (run ``i`` logs its step ``s`` at ``i * total + s``,
    ``total`` the steps of a run), so the tracker's step only grows -- W&B drops a smaller one -- and a resumed
    bank's curves land where an uninterrupted bank's do.
    """

    accelerator: object
    description: str = "training"
    prefix: str = ""
    run_index: int = 0
    logging_steps: int = 10
    disable_tqdm: bool = False
    step: int = 0  # the tracker step of the latest optimiser step, set by the loop

    def log(self, values: dict[str, float]) -> None:
        """``values`` to the trackers (prefixed, at :attr:`step`) and to the log line (floats to 4 digits)."""
        self.accelerator.log({f"{self.prefix}{k}": v for k, v in values.items()}, step=self.step)
        if self.accelerator.is_main_process:
            shown = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
            )
            logger.info("%s step %d: %s", self.description, self.step, shown)


def contrastive_loss(
    encoder: DualEncoder, image_embeds: torch.Tensor, text_embeds: torch.Tensor
) -> torch.Tensor:
    """The loss the family was trained with on unit-norm embeddings: CLIP softmax or SigLIP sigmoid.

    Uses the model's own (exponentiated) logit scale and, for SigLIP, its bias.
    """

    if encoder.contrastive_loss_type == "siglip":
        return sigmoid_contrastive_loss(image_embeds, text_embeds, encoder.logit_scale, encoder.logit_bias)
    return clip_contrastive_loss(image_embeds, text_embeds, encoder.logit_scale)


class ContrastiveObjective(nn.Module):
    """``forward(pixel_values, text_features) -> loss``: one module, so DDP sees every trainable parameter used.

    ``augment`` (optional) maps normalised pixels to augmented normalised pixels in training mode.
    """

    def __init__(
        self, encoder: DualEncoder, augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.augment = augment

    def forward(self, pixel_values: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        if self.training and self.augment is not None:
            pixel_values = self.augment(pixel_values)
        image_embeds, text_embeds = self.encoder(pixel_values, text_features)
        return contrastive_loss(self.encoder, image_embeds, text_embeds)


class CaptionedImages(torch.utils.data.Dataset):
    """Item ``i``: image ``i`` with the frozen text feature of one of its captions, redrawn every epoch.

    One caption per image keeps each batch free of duplicate images (a duplicate would be a false negative of the
    contrastive loss). The caption choice depends only on (seed, epoch, i), so every process agrees on it.
    """

    def __init__(
        self, data, encoder: DualEncoder, text_features: torch.Tensor, pixels: torch.Tensor | None, seed: int
    ):
        self.data, self.encoder, self.text_features, self.pixels, self.seed = (
            data,
            encoder,
            text_features,
            pixels,
            seed,
        )
        self.captions_of: list[list[int]] = [[] for _ in range(data.num_images)]
        for j, image in enumerate(data.caption_to_image.tolist()):
            self.captions_of[image].append(j)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.data.num_images

    def __getitem__(self, i: int) -> dict:
        caps = self.captions_of[i]
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + i)
        j = caps[int(torch.randint(len(caps), (1,), generator=gen))]
        pixels = (
            self.pixels[i]
            if self.pixels is not None
            else self.encoder.preprocess_images([self.data.image(i)])[0]
        )
        return {"pixel_values": pixels, "text_features": self.text_features[j]}


@torch.no_grad()
def evaluate_recall(
    encoder: DualEncoder, pixels: torch.Tensor, text_features: torch.Tensor, caption_to_image: torch.Tensor,
    batch_size: int = 256,
) -> dict:  # fmt: skip
    """IR@1, TR@1 and their mean (%) of ``encoder`` on pre-processed images and frozen text features (eval mode,
    no gradient), by :func:`mdm_hf.retrieval.retrieval_metrics` -- the package's one recall, ties against the
    model."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    zv = torch.cat([encoder.image_embeds(p.to(device)).cpu() for p in pixels.split(batch_size)])
    zt = torch.cat([encoder.project_text(t.to(device)).cpu() for t in text_features.split(batch_size)])
    encoder.train(was_training)
    return retrieval_metrics(zv, zt, caption_to_image, ks=(1,))


def run_contrastive_training(
    accelerator,
    objective: ContrastiveObjective,
    dataset: CaptionedImages,
    *,
    learning_rate: float,
    batch_size: int,
    num_train_epochs: int,
    weight_decay: float = 0.0,
    max_steps: int | None = None,
    lr_scheduler_type: LRSchedulerType = "constant",
    warmup_ratio: float = 0.0,
    max_grad_norm: float | None = 1.0,
    num_workers: int = 0,
    on_epoch_end: Callable[[int, float], None] | None = None,
    training_log: TrainingLog | None = None,
) -> list[float]:
    """AdamW over the trainable parameters of ``objective``, data parallel through ``accelerator``.

    Each process computes the contrastive loss over its own batch (its negatives are the local batch) and DDP
    averages the gradients. ``on_epoch_end(epoch, mean_loss)`` runs on every process after each epoch (1-based),
    with the loss averaged over processes; it may add values with ``training_log.log``. Every
    ``training_log.logging_steps`` steps the loss since the last log (averaged over processes), the learning rate
    and the (fractional) epoch are logged as ``train/loss``, ``train/learning_rate``, ``train/epoch``; after each
    epoch ``train/epoch_loss``. Logging reads no random state, so it never changes the result. Returns the
    per-epoch mean losses.
    """

    params = [p for p in objective.parameters() if p.requires_grad]
    if not params:
        raise ValueError("Nothing to train: no parameter of the model requires a gradient.")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers
    )
    model, optimizer, loader = accelerator.prepare(objective, optimizer, loader)
    total = len(loader) * num_train_epochs
    total = total if max_steps is None else min(max_steps, total)
    # Stepped once per optimiser step on every process (not prepared: accelerate would step it num_processes times).
    scheduler = get_scheduler(lr_scheduler_type, optimizer, int(warmup_ratio * total), total)
    log = training_log or TrainingLog(accelerator)
    bar = tqdm(total=total, desc=log.description, disable=log.disable_tqdm or not accelerator.is_main_process)
    since_log = torch.zeros((), device=accelerator.device)
    epoch_losses, step = [], 0
    for epoch in range(num_train_epochs):
        dataset.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        model.train()
        running, count = torch.zeros((), device=accelerator.device), 0
        for batch in loader:
            loss = model(batch["pixel_values"], batch["text_features"])
            accelerator.backward(loss)
            if max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            since_log += loss.detach()
            count += 1
            step += 1
            log.step = log.run_index * total + step
            bar.update(1)
            if log.logging_steps and step % log.logging_steps == 0:  # every process: reduce is collective
                mean_since = accelerator.reduce(since_log / log.logging_steps, reduction="mean").item()
                since_log.zero_()
                bar.set_postfix(loss=f"{mean_since:.4f}")
                last_lr = scheduler.get_last_lr()[0]
                log.log(
                    {
                        "train/loss": mean_since,
                        "train/learning_rate": last_lr,
                        "train/epoch": step / len(loader),
                    }
                )
            if step >= total:
                break
        mean = accelerator.reduce(running / max(count, 1), reduction="mean").item()
        epoch_losses.append(mean)
        log.log({"train/epoch_loss": mean})
        model.eval()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, mean)
        if step >= total:
            break
    bar.close()
    accelerator.free_memory()
    return epoch_losses
