"""The trajectory buffer: expert training trajectories ``θ*_0 = anchor, θ*_1, ..., θ*_E`` that trajectory matching
aims at, recorded as LoRS records them and read back from a **full** expert bank (:mod:`mdm_hf.bank`).

Experts are full fine-tunes of the anchor on the real train split with a checkpoint after every epoch (MTT,
arXiv 2203.11932, §3; LoRS' ``buffer.py``, arXiv 2406.03793) -- or, for RepBlend (NeurIPS 2025), SGD on the image
and text projections alone over the frozen encoders (``trainable="projections"``: a buffer of two small matrices
per checkpoint). The student matches two trajectories at once (MTT-VL, arXiv 2308.07545): :func:`branch_of` says
which one a trained tensor belongs to.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ... import __version__
from ...bank import (
    BANK_FORMAT_VERSION,
    MANIFEST_NAME,
    anchor_entry,
    check_anchor,
    owns_bank_entry,
    read_manifest,
    resolve_bank_dir,
)
from ...checkpointing import prepare_output_dir
from ...data import cached_text_features, preprocess_split_images
from ...experts import full_finetune_parameters
from ...models import DualEncoder
from ...training import CaptionedImages, ContrastiveObjective, evaluate_recall
from .tracking import start_trackers

logger = logging.getLogger(__name__)

__all__ = [
    "TEXT_PROJECTION_PREFIXES",
    "TrajectoryBuffer",
    "branch_of",
    "record_trajectory_buffer",
    "trained_parameters",
]

TEXT_PROJECTION_PREFIXES = ("text_projection.", "text_model.head.")
TRACKER_PROJECT = "tm-buffer"  # the trackers' project name, and the folder tensorboard writes in the buffer


def branch_of(name: str) -> str:
    """LoRS' two trajectories: ``"text"`` for the text projection, ``"image"`` for everything else trained."""
    return "text" if name.startswith(TEXT_PROJECTION_PREFIXES) else "image"


def _projections(anchor: DualEncoder) -> list[str]:
    """The image and text projections' tensors (the logit scale and bias stay frozen, as in a full expert)."""
    return [n for n in anchor.parameter_groups().projections if n not in ("logit_scale", "logit_bias")]


def trained_parameters(anchor: DualEncoder, trainable: str = "full") -> list[str]:
    """What an expert of ``trainable`` trains: ``"full"``, the vision tower and both projections
    (:func:`mdm_hf.experts.full_finetune_parameters`); ``"projections"``, the image and text projections only
    (RepBlend), which needs an anchor with an image projection (CLIP, VisionTextDualEncoder; not SigLIP)."""
    if trainable == "full":
        return full_finetune_parameters(anchor)
    if trainable != "projections":
        raise ValueError(f"trainable must be 'full' or 'projections', got {trainable!r}.")
    names = _projections(anchor)
    if not any(branch_of(n) == "image" for n in names):
        raise ValueError(
            f"A {anchor.family} anchor has no image projection (its image embedding is the vision tower's pooled "
            "output), so projection-only trajectories (RepBlend) would have no image branch. Use trainable='full' "
            "(--trainable full) or a CLIP / VisionTextDualEncoder anchor."
        )
    return names


class TrajectoryBuffer:
    """Expert trajectories read from a **full** expert bank: ``checkpoint(i, 0)`` is the anchor, ``checkpoint(i, e)``
    the trained tensors of expert ``i`` after epoch ``e`` (``<bank>/expert-<i>/epoch-<e>/model.safetensors``).

    The bank must belong to ``anchor`` (checked with :func:`mdm_hf.bank.check_anchor`). Loading is lazy; with
    ``cache=True`` every checkpoint read stays in memory. :attr:`trainable` says what the trajectories cover:
    ``"projections"`` when every trained tensor is one of the two projections (RepBlend), else ``"full"``.
    """

    def __init__(
        self,
        bank_dir: str | os.PathLike,
        anchor: DualEncoder,
        revision: str | None = None,
        cache: bool = True,
    ) -> None:
        self.directory = resolve_bank_dir(bank_dir, revision)
        manifest = read_manifest(self.directory)
        if manifest.get("kind") != "full":
            raise ValueError(
                f"'{bank_dir}' is a {manifest.get('kind')!r} expert bank; trajectory matching needs full per-epoch "
                "checkpoints. Record one with mdm_hf.baselines.tm.record_trajectory_buffer or "
                "`mdm-hf experts --full_finetune true`."
            )
        check_anchor(manifest["anchor"], anchor)
        self.manifest = manifest
        training = manifest.get("training") or {}
        self.optimizer = str(training.get("optimizer", "adamw"))  # experts.py trains with AdamW
        self.learning_rate = training.get("learning_rate")
        anchor_params = dict(anchor.model.named_parameters())
        self._paths: list[list[Path]] = []
        self.expert_names: list[str] = []
        names: list[str] | None = None
        for expert in manifest["experts"]:
            paths = self._epoch_paths(expert, bank_dir)
            for path in paths:
                names = self._check_checkpoint(path, anchor_params, names)
            self._paths.append(paths)
            self.expert_names.append(expert["name"])
        if not self._paths or names is None:
            raise ValueError(
                f"'{bank_dir}' holds no expert checkpoints (an interrupted run?). Record it again."
            )
        self.names: list[str] = names
        self.trainable = "projections" if set(names) <= set(_projections(anchor)) else "full"
        self._anchor = {n: anchor_params[n].detach().float().cpu().clone() for n in names}
        self.cache = cache
        self._cache: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def _epoch_paths(self, expert: dict, bank_dir) -> list[Path]:
        """The checkpoint files of one manifest entry, epoch 1, 2, ... (every epoch must be there)."""
        epochs = sorted(expert["epochs"], key=lambda e: e["epoch"])
        numbers = [int(e["epoch"]) for e in epochs]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(
                f"Expert {expert['name']} of '{bank_dir}' has epochs {numbers}; a trajectory needs every epoch "
                "1, 2, ... (an interrupted run?)."
            )
        paths = [self.directory / e["path"] / "model.safetensors" for e in epochs]
        for path in paths:
            if not path.is_file():
                raise ValueError(f"{path} is missing: the trajectory of {expert['name']} is incomplete.")
        return paths

    @staticmethod
    def _check_checkpoint(
        path: Path, anchor_params: dict[str, torch.Tensor], names: list[str] | None
    ) -> list[str]:
        """Check one checkpoint's tensors against the anchor (and the first checkpoint's ``names``, when given);
        returns the trained names in the anchor's order. Reads only the headers."""
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            for key in keys:
                shape = tuple(f.get_slice(key).get_shape())
                if key not in anchor_params or tuple(anchor_params[key].shape) != shape:
                    raise ValueError(
                        f"{path}: tensor '{key}' {shape} matches no anchor parameter of that shape."
                    )
        if names is None:
            return [n for n in anchor_params if n in set(keys)]  # the anchor's order
        if set(keys) != set(names):
            raise ValueError(
                f"{path} holds other tensors than the first checkpoint; the bank is inconsistent."
            )
        return names

    @property
    def num_experts(self) -> int:
        return len(self._paths)

    def num_epochs(self, expert: int) -> int:
        """Epochs trained by ``expert`` (its trajectory has ``num_epochs + 1`` points, epoch 0 the anchor)."""
        return len(self._paths[expert])

    def checkpoint(self, expert: int, epoch: int) -> dict[str, torch.Tensor]:
        """The trained tensors of ``expert`` after ``epoch`` (0: the anchor), float32 on CPU."""
        if epoch == 0:
            return self._anchor
        if not 1 <= epoch <= self.num_epochs(expert):
            raise ValueError(f"Expert {expert} has epochs 0..{self.num_epochs(expert)}, not {epoch}.")
        key = (expert, epoch)
        if key in self._cache:
            return self._cache[key]
        tensors = load_file(str(self._paths[expert][epoch - 1]))
        out = {n: tensors[n].float() for n in self.names}
        if self.cache:
            self._cache[key] = out
        return out

    def size_bytes(self) -> int:
        """Bytes of every file of the buffer (weights, configs, manifest)."""
        return sum(p.stat().st_size for p in Path(self.directory).rglob("*") if p.is_file())


def record_trajectory_buffer(
    anchor: DualEncoder,
    train_data,
    output_dir: str | os.PathLike,
    *,
    num_experts: int = 2,
    num_epochs: int = 3,
    learning_rate: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    seed: int = 0,
    text_features: torch.Tensor | None = None,
    pixels: torch.Tensor | None = None,
    cache_dir: str | None = None,
    validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    overwrite: bool = False,
    trainable: str = "full",
    report_to: str | None = "none",
) -> Path:
    """Expert trajectories as LoRS records them (``buffer.py``): SGD on the real train split, a snapshot per epoch.

    Trains :func:`trained_parameters` of ``trainable`` -- the vision tower and the projections, or (RepBlend) the
    projections alone; text tower and logit scale frozen -- with the family's contrastive loss, one caption per image
    per epoch, and writes a **full** expert bank (``manifest.json`` + ``expert-<i>/epoch-<e>/model.safetensors``)
    that :class:`TrajectoryBuffer` and :func:`mdm_hf.bank.load_expert_bank` both read. ``validation`` =
    ``(pixels, text_features, caption_to_image)`` adds per-epoch recall@1 to the manifest. ``report_to``
    (:func:`mdm_hf.config.trackers`) also logs each epoch's train loss and recall, at step ``expert x num_epochs +
    epoch``. Single process.
    """
    if num_experts < 1 or num_epochs < 1 or learning_rate <= 0 or batch_size < 1:
        raise ValueError("num_experts, num_epochs and batch_size must be >= 1 and learning_rate > 0.")
    # before anything is written: refusing a SigLIP anchor leaves no folder behind
    trained = trained_parameters(anchor, trainable)
    out = prepare_output_dir(output_dir, owned=_owns_buffer_entry, overwrite=overwrite)
    if text_features is None:
        text_features = cached_text_features(anchor, train_data, cache_dir)
    if pixels is None:
        pixels = preprocess_split_images(anchor, train_data)
    sgd = {"lr": learning_rate, "momentum": momentum, "weight_decay": weight_decay}
    manifest = _buffer_manifest(anchor, train_data, trained, sgd, num_experts, num_epochs, batch_size, seed,
                                validation is not None, trainable)  # fmt: skip
    tracking = start_trackers(report_to, out, TRACKER_PROJECT, manifest["training"])
    for index in range(num_experts):
        # pixels are preprocessed once, so the dataset never needs the expert's own copy of the encoder
        dataset = CaptionedImages(train_data, anchor, text_features, pixels, seed + index)
        record = _record_trajectory(
            anchor, dataset, trained, sgd, num_epochs, batch_size, out, index, validation, tracking
        )
        manifest["experts"].append(record)
        # after every expert: a crash leaves a readable, partial buffer
        (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    if tracking is not None:
        tracking.end_training()
    return out


def _owns_buffer_entry(path: Path) -> bool:
    """A bank's own entries, and the tracker logs a buffer run writes next to them."""
    return owns_bank_entry(path) or (path.name == TRACKER_PROJECT and path.is_dir())


def _buffer_manifest(
    anchor: DualEncoder, train_data, trained: list[str], sgd: dict, num_experts: int, num_epochs: int,
    batch_size: int, seed: int, validated: bool, trainable: str = "full",
) -> dict:  # fmt: skip
    """The manifest of a full expert bank (:mod:`mdm_hf.bank`'s format) for an SGD trajectory buffer, no experts."""
    return {
        "format_version": BANK_FORMAT_VERSION,
        "created_with": f"mdm-hf {__version__} (trajectory buffer)",
        "kind": "full",
        "family": anchor.family,
        "anchor": anchor_entry(anchor),
        "lora": None,
        "trained_parameters": trained,
        "seeds": [seed + i for i in range(num_experts)],
        "num_epochs": num_epochs,
        "dataset": {"name": train_data.name, "split": train_data.split, "num_images": train_data.num_images,
                    "num_captions": train_data.num_captions, "fingerprint": train_data.fingerprint,
                    "license": train_data.license, "validation_split": None, "revision": None},
        "validation_metric": "recall@1 (ir@1, tr@1, mean; %)" if validated else None,
        "training": {"optimizer": "sgd", "learning_rate": sgd["lr"], "momentum": sgd["momentum"],
                     "weight_decay": sgd["weight_decay"], "per_device_train_batch_size": batch_size,
                     "num_epochs": num_epochs, "num_experts": num_experts, "seed": seed, "trainable": trainable,
                     "recipe": _RECIPES[trainable]},
        "experts": [],
    }  # fmt: skip


_RECIPES = {
    "full": "LoRS buffer.py: SGD, constant lr, one snapshot per epoch",
    "projections": "RepBlend buffer.py: SGD on the image and text projections (frozen encoders), constant lr, one "
    "snapshot per epoch",
}


def _record_trajectory(
    anchor: DualEncoder, dataset: CaptionedImages, trained: list[str], sgd: dict, num_epochs: int,
    batch_size: int, out: Path, index: int, validation, tracking=None,
) -> dict:  # fmt: skip
    """Train expert ``index`` (seed ``dataset.seed``) from a copy of the anchor with constant-lr SGD, saving the
    trained tensors after every epoch; returns its manifest entry."""
    device = next(anchor.model.parameters()).device
    model = copy.deepcopy(anchor.model)  # once per expert, not per step
    encoder = DualEncoder(model, anchor.tokenizer, anchor.image_processor, anchor.name_or_path, anchor.revision,
                          anchor.text_pooling)  # fmt: skip
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in trained)
    optimizer = torch.optim.SGD([params[n] for n in trained], **sgd)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(dataset.seed)
    )
    objective = ContrastiveObjective(encoder)
    record = {"name": f"expert-{index}", "seed": dataset.seed, "epochs": []}
    for epoch in range(1, num_epochs + 1):
        dataset.set_epoch(epoch - 1)
        model.train()
        losses = []
        for batch in loader:
            loss = objective(batch["pixel_values"].to(device), batch["text_features"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        rel = f"expert-{index}/epoch-{epoch}"
        _save_epoch(params, trained, anchor, out / rel)
        entry = {"epoch": epoch, "path": rel, "train_loss": sum(losses) / max(len(losses), 1)}
        if validation is not None:
            entry["validation"] = evaluate_recall(encoder, *validation)
        record["epochs"].append(entry)
        logger.info("trajectory %s epoch %d: %s", record["name"], epoch, entry)
        if tracking is not None:
            metrics = {f"validation/{k}": v for k, v in entry.get("validation", {}).items()}
            tracking.log({"train_loss": entry["train_loss"], "expert": index, **metrics},
                         step=index * num_epochs + epoch)  # fmt: skip
    return record


def _save_epoch(params: dict[str, torch.Tensor], trained: list[str], anchor: DualEncoder, path: Path) -> None:
    """One trajectory point in the full-bank layout: ``model.safetensors`` + ``expert_config.json``."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: params[n].detach().cpu().contiguous() for n in trained}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "expert_config.json").write_text(json.dumps(
        {"kind": "full", "base_model_name_or_path": anchor.name_or_path, "revision": anchor.revision,
         "num_tensors": len(trained)}))  # fmt: skip
