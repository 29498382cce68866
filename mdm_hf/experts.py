"""Experts for MDM's mixed teacher: LoRA (or full) fine-tunes of one anchor, kept per epoch in an *expert bank*.

MDM (arXiv 2605.23482, docs/method.md §2) merges, per distillation iteration, k experts -- models fine-tuned independently
(different seeds / data order) from the same pretrained anchor ``w0``, each kept at several epochs. Here an expert
is a ``peft`` LoRA adapter on the **vision tower** with the projections trained in full (``modules_to_save``) and
the text tower frozen, so a whole bank is megabytes instead of the peers' full-weight trajectory buffers.

The bank format -- manifest, card, per-epoch adapters -- and how a bank is read back as anchor-relative offsets are
:mod:`mdm_hf.bank`.
"""

from __future__ import annotations

import copy
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

from . import __version__
from .bank import (
    BANK_FORMAT_VERSION,
    MANIFEST_NAME,
    anchor_entry,
    owns_bank_entry,
    read_manifest,
    write_bank_card,
)
from .checkpointing import prepare_output_dir, write_json_atomic
from .config import (
    REPORT_TO_HELP,
    DatasetArguments,
    ModelArguments,
    check_field_types,
    check_values,
    deprecated_alias,
    deprecated_aliases,
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
    evaluate_recall,
    finish_trackers,
    run_contrastive_training,
    start_trackers,
)

logger = logging.getLogger(__name__)

# Leaf names of the attention projections LoRA targets by default. peft ships no defaults for CLIP / SigLIP.
ATTENTION_LEAVES = (
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # CLIP, SigLIP
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # ViT and other towers in transformers 5
    ("query", "key", "value"),  # ViT / BERT-style towers in transformers 4
)
PROJECTION_MODULES = {"clip": ["visual_projection", "text_projection"], "siglip": ["text_model.head"]}
# The tracker run of a bank (--report_to): its name, and the folder inside the bank where TensorBoard writes it.
TRACKER_PROJECT = "mdm-experts"


# ============================================================================================== configuration
@dataclass
class ExpertTrainingConfig(ModelArguments, DatasetArguments):
    """How to fine-tune the experts of a bank. Field help doubles as ``--help`` of ``mdm-hf experts``.

    LoRA goes on the vision tower's attention projections (``target_modules``, scoped to ``vision_model``'s encoder
    layers), the projections are trained in full (``modules_to_save``), the text tower and the logit scale / bias
    stay frozen, so the experts differ from the anchor exactly where MDM merges them.
    """

    # ---- anchor: the ModelArguments fields; data: the DatasetArguments fields (train_split: what the experts are
    # fine-tuned on), and
    validation_split: str | None = _f(
        "validation", "Split for the per-epoch recall in the manifest (None: skip)."
    )
    max_validation_images: int | None = _f(1000, "Score recall on at most N validation images.")

    # ---- experts
    num_experts: int = _f(4, "N: independently fine-tuned experts (MDM needs N >= 2 or several epochs).")
    seeds: list[int] | None = _f(
        None, "One seed per expert (LoRA init + data order); None: seed, seed+1, ..."
    )
    seed: int = _f(0, "First seed when seeds is None.")
    num_train_epochs: int = _f(5, "Epochs per expert; an adapter is saved at the end of every epoch.")
    full_finetune: bool = _f(
        False, "Train the whole vision tower + projections instead of LoRA (kind 'full')."
    )

    # ---- LoRA
    lora_r: int = _f(16, "LoRA rank r.")
    lora_alpha: float = _f(32.0, "LoRA alpha; the update is (alpha / r) * B @ A.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input.")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA: scale alpha / sqrt(r).")
    target_modules: list[str] | None = _f(
        None,
        "Leaf names of vision-tower Linear layers that get LoRA (scoped to the vision_model encoder layers). None: "
        "the attention projections, read from the model's own module names (q_proj k_proj v_proj out_proj for "
        "CLIP / SigLIP; q_proj k_proj v_proj o_proj for ViT in transformers 5; query key value before); a tower "
        "with none of these is refused with its Linear names listed. Add fc1 fc2 for the MLPs.",
    )
    modules_to_save: list[str] | None = _f(
        None,
        "Modules trained in full. None: the projections (visual_projection text_projection; SigLIP: "
        "text_model.head).",
    )

    # ---- optimisation
    learning_rate: float = _f(1e-4, "AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    lr_scheduler_type: LRSchedulerType = _f("constant", LR_SCHEDULER_HELP)
    warmup_ratio: float = _f(0.0, "Fraction of each expert's steps used for linear warm-up.")
    per_device_train_batch_size: int = _f(64, "Images per batch and process (one caption each).")
    max_grad_norm: float | None = _f(1.0, "Clip the gradient norm (None: no clipping).")
    num_workers: int = _f(0, "DataLoader workers for images that are not cached.")

    # ---- logging
    logging_steps: int = _f(
        10, "Log the loss, learning rate and epoch every N optimiser steps (0: per epoch only)."
    )
    report_to: str = _f("none", REPORT_TO_HELP)
    disable_tqdm: bool = _f(False, "Hide the progress bar (it shows on the main process only).")

    # ---- output
    output_dir: str = _f("expert_bank", "Directory of the bank.")
    overwrite_output_dir: bool = _f(False, "Replace an existing, non-empty output_dir.")
    resume: bool = _f(
        False,
        "Continue the bank in output_dir: experts its manifest lists are kept, the others are trained (one cut off "
        "mid-way restarts at epoch 1; each expert has its own seed, so the bank equals an uninterrupted one). "
        "Raising num_experts extends a finished bank. Anchor, data and training settings must match.",
    )
    push_to_hub: bool = _f(False, "Push the bank to the Hub at the end (needs hub_model_id).")
    hub_model_id: str | None = _f(None, "namespace/name of the model repo to push the bank to.")
    hub_private: bool | None = _f(
        False, "Create the Hub repo as private (default: the Hub's default, public)."
    )

    # ---- earlier names (one name per concept across commands, as in TrainingArguments)
    revision: str | None = deprecated_alias("model_revision")
    num_epochs: int | None = deprecated_alias("num_train_epochs")

    def __post_init__(self) -> None:
        check_field_types(self)  # moves the deprecated names' values to their fields first
        self.validation_split = optional_split(self.validation_split)
        checks = {
            "num_experts": self.num_experts >= 1,
            "num_train_epochs": self.num_train_epochs >= 1,
            "lora_r": self.lora_r >= 1,
            "lora_alpha": self.lora_alpha > 0,
            "learning_rate": self.learning_rate > 0,
            "per_device_train_batch_size": self.per_device_train_batch_size >= 1,
            "lora_dropout": 0.0 <= self.lora_dropout < 1.0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio <= 1,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "num_workers": self.num_workers >= 0,
            "max_validation_images": self.max_validation_images is None or self.max_validation_images >= 1,
            "max_cached_images": self.max_cached_images >= 0,
            "logging_steps": self.logging_steps >= 0,
        }
        check_values(self, checks)
        check_warmup(self.lr_scheduler_type, self.warmup_ratio)
        if self.seeds is not None and len(self.seeds) != self.num_experts:
            raise ValueError(
                f"seeds has {len(self.seeds)} entries but num_experts={self.num_experts}: give one seed per expert "
                "or leave seeds unset (then seed, seed+1, ... are used)."
            )
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub=True needs hub_model_id (namespace/name of the model repo).")

    @property
    def expert_seeds(self) -> list[int]:
        return (
            list(self.seeds) if self.seeds is not None else [self.seed + i for i in range(self.num_experts)]
        )

    @property
    def kind(self) -> str:
        return "full" if self.full_finetune else "lora"

    def to_dict(self) -> dict:
        """The settings under their current names (what the manifest records; deprecated aliases left out)."""
        return {k: v for k, v in asdict(self).items() if k not in DEPRECATED_NAMES}


# Deprecated field -> the field it is an alias of.
DEPRECATED_NAMES = deprecated_aliases(ExpertTrainingConfig)


# ============================================================================================== anchor identity


# ============================================================================================== LoRA set-up
def _vision_linear_leaves(model: nn.Module) -> set[str]:
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("vision_model.")
    }


def lora_target_regex(model: nn.Module, leaves: Sequence[str] | None = None) -> str:
    """The peft ``target_modules`` regex: the given Linear leaf names inside ``vision_model``'s encoder layers.

    Scoping to ``...layers.<i>...`` keeps LoRA off the text tower and off SigLIP's attention-pooling head (an
    ``nn.MultiheadAttention`` whose ``out_proj`` weight is used without calling the module, so LoRA there would do
    nothing).
    """
    available = _vision_linear_leaves(model)
    if leaves is None:
        leaves = next((list(group) for group in ATTENTION_LEAVES if set(group) <= available), None)
        if leaves is None:
            raise ValueError(
                f"No default LoRA targets for this vision tower; its Linear layers are named {sorted(available)}. "
                "Pass --target_modules with some of them."
            )
    unknown = sorted(set(leaves) - available)
    if unknown:
        raise ValueError(
            f"target_modules {unknown} name no Linear layer of the vision tower; available: {sorted(available)}."
        )
    names = "|".join(re.escape(leaf) for leaf in leaves)
    return rf"^vision_model\.(?:.*\.)?layers?\.\d+\.(?:.*\.)?(?:{names})$"


def default_modules_to_save(encoder: DualEncoder) -> list[str]:
    """The projections, trained in full: ``visual_projection``/``text_projection``; SigLIP: ``text_model.head``."""
    return list(PROJECTION_MODULES.get(encoder.family, PROJECTION_MODULES["clip"]))


def full_finetune_parameters(encoder: DualEncoder) -> list[str]:
    """What a full expert trains: the vision tower and the projections (logit scale / bias stay frozen)."""
    groups = encoder.parameter_groups()
    return groups.vision + [n for n in groups.projections if n not in ("logit_scale", "logit_bias")]


# ============================================================================================== bank training


def train_expert(
    config: ExpertTrainingConfig,
    index: int,
    anchor: DualEncoder,
    train_data,
    train_features: torch.Tensor,
    train_pixels: torch.Tensor | None,
    accelerator,
    bank_dir: Path,
    validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict, DualEncoder]:
    """Fine-tune expert ``index`` (seed ``config.expert_seeds[index]``) from a copy of ``anchor``.

    Saves ``bank_dir/expert-<index>/epoch-<e>/`` after every epoch (main process) and returns the manifest record
    ``{"name", "seed", "epochs": [{"epoch", "path", "train_loss", "validation"}]}`` with the trained encoder.
    ``validation`` is ``(pixels, text_features, caption_to_image)``. Progress and metrics (``expert-<index>/...``)
    go to a progress bar, the log and ``accelerator``'s trackers (:class:`~mdm_hf.training.TrainingLog`).
    """

    seed = config.expert_seeds[index]
    set_seed(seed)  # LoRA init and data order; identical on every process
    model = copy.deepcopy(anchor.model)
    encoder = DualEncoder(model, anchor.tokenizer, anchor.image_processor, anchor.name_or_path, anchor.revision,
                          anchor.text_pooling)  # fmt: skip
    encoder.to(accelerator.device)
    peft_model = None
    if config.full_finetune:
        trainable = set(full_finetune_parameters(encoder))
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
    else:
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora, target_modules=lora_target_regex(model, config.target_modules),
            modules_to_save=config.modules_to_save or default_modules_to_save(encoder), bias="none",
            base_model_name_or_path=anchor.name_or_path, revision=anchor.revision,
        )  # fmt: skip
        peft_model = get_peft_model(model, lora)  # injects LoRA into ``model`` in place; freezes the rest
    dataset = CaptionedImages(train_data, encoder, train_features, train_pixels, seed)
    name = f"expert-{index}"
    record = {"name": name, "seed": seed, "epochs": []}
    training_log = TrainingLog(accelerator, description=name, prefix=f"{name}/", run_index=index,
                               logging_steps=config.logging_steps, disable_tqdm=config.disable_tqdm)  # fmt: skip

    def on_epoch_end(epoch: int, loss: float) -> None:
        path = bank_dir / name / f"epoch-{epoch}"
        entry = {"epoch": epoch, "path": f"{name}/epoch-{epoch}", "train_loss": loss}
        if accelerator.is_main_process:
            if peft_model is not None:
                _save_lora_epoch(peft_model, path, anchor)
            else:
                _save_full_epoch(model, path, full_finetune_parameters(anchor), anchor)
            if validation is not None:
                entry["validation"] = evaluate_recall(encoder, *validation)
                training_log.log({f"eval/{k}": v for k, v in entry["validation"].items()})
            logger.info("%s epoch %d: loss %.4f %s", name, epoch, loss, entry.get("validation", ""))
        record["epochs"].append(entry)
        accelerator.wait_for_everyone()

    run_contrastive_training(
        accelerator, ContrastiveObjective(encoder), dataset, learning_rate=config.learning_rate,
        batch_size=config.per_device_train_batch_size, num_train_epochs=config.num_train_epochs,
        weight_decay=config.weight_decay, lr_scheduler_type=config.lr_scheduler_type,
        warmup_ratio=config.warmup_ratio, max_grad_norm=config.max_grad_norm, num_workers=config.num_workers,
        on_epoch_end=on_epoch_end, training_log=training_log,
    )  # fmt: skip
    return record, encoder


def _save_lora_epoch(peft_model, path: Path, anchor: DualEncoder) -> None:
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path, config.revision = anchor.name_or_path, anchor.revision
    peft_model.save_pretrained(str(path), safe_serialization=True)
    (path / "README.md").unlink(missing_ok=True)  # peft's placeholder card; the bank has one card at the top


def _save_full_epoch(model: nn.Module, path: Path, names: list[str], anchor: DualEncoder) -> None:

    path.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().cpu().contiguous() for n in names}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_json_atomic(
        path / "expert_config.json",
        {"kind": "full", "base_model_name_or_path": anchor.name_or_path, "revision": anchor.revision,
         "num_tensors": len(tensors)},
    )  # fmt: skip


def train_expert_bank(
    config: ExpertTrainingConfig, accelerator=None, anchor: DualEncoder | None = None
) -> Path:
    """Train ``config.num_experts`` experts from the anchor and write the bank to ``config.output_dir``.

    Works under ``accelerate launch`` (multi-process data parallel): every process trains on its shard, the main
    process writes the checkpoints, the manifest and the card. Returns the bank directory.

    With ``config.report_to``, the whole bank is one tracker run (:data:`TRACKER_PROJECT`; TensorBoard writes it
    in ``output_dir/mdm-experts``): metric names carry the expert (``expert-1/train/loss``) and expert ``i``'s
    steps follow expert ``i - 1``'s, as the steps of one long run. One run per bank rather than per expert
    because an accelerator holds one set of trackers, and because a resumed bank then logs where an
    uninterrupted one would. A given ``accelerator`` needs ``log_with=trackers(config.report_to)`` for that.
    """

    acc = accelerator or Accelerator(log_with=trackers(config.report_to), project_dir=config.output_dir)
    out = Path(config.output_dir)
    previous = read_manifest(out) if config.resume and (out / MANIFEST_NAME).is_file() else None
    if previous is None:
        _clear_unfinished_experts(out, config.resume, acc)  # a first expert cut off leaves no manifest
        prepare_output_dir(
            out, owned=owns_bank_output, overwrite=config.overwrite_output_dir, accelerator=acc
        )
    if anchor is None:
        anchor = DualEncoder.from_pretrained(
            config.model_name_or_path, config.model_revision, config.text_pooling, config.trust_remote_code
        )
    anchor.requires_grad_(False)
    train, train_features, train_pixels, validation = _training_data(config, anchor, acc)
    manifest = _new_manifest(config, anchor, train, validation is not None)
    if previous is not None:
        manifest["experts"] = _resumable_experts(previous, manifest, config)
        logger.info("Resuming the bank in %s: %d expert(s) kept.", out, len(manifest["experts"]))
    start_trackers(acc, config.report_to, TRACKER_PROJECT, config.to_dict())
    for index in range(len(manifest["experts"]), config.num_experts):
        if acc.is_main_process:
            shutil.rmtree(out / f"expert-{index}", ignore_errors=True)  # epochs of a run that was cut off
        acc.wait_for_everyone()
        record, _ = train_expert(
            config, index, anchor, train, train_features, train_pixels, acc, out, validation
        )
        manifest["experts"].append(record)
        if acc.is_main_process:  # after every expert: a crash leaves a readable, partial bank
            write_json_atomic(out / MANIFEST_NAME, manifest)
    if acc.is_main_process:
        write_bank_card(out, manifest)
    finish_trackers(acc)
    acc.wait_for_everyone()
    return out


def _training_data(config: ExpertTrainingConfig, anchor: DualEncoder, acc):
    """Train split, its cached text features and (small splits) pixels, and the validation triple or None."""
    train = load_split(config)
    with acc.main_process_first():  # rank 0 fills the text-feature cache, the others read it
        train_features = cached_text_features(anchor, train, config.cache_dir)
    train_pixels = (
        preprocess_split_images(anchor, train) if train.num_images <= config.max_cached_images else None
    )
    validation = None
    if config.validation_split:
        val = load_split(config, config.validation_split, config.max_validation_images)
        with acc.main_process_first():
            val_features = cached_text_features(anchor, val, config.cache_dir)
        validation = (preprocess_split_images(anchor, val), val_features, val.caption_to_image)
    return train, train_features, train_pixels, validation


def _new_manifest(config: ExpertTrainingConfig, anchor: DualEncoder, train, validated: bool) -> dict:
    """The manifest of a bank before its first expert (:mod:`mdm_hf.bank` documents the format)."""
    return {
        "format_version": BANK_FORMAT_VERSION,
        "created_with": f"mdm-hf {__version__}",
        "kind": config.kind,
        "family": anchor.family,
        "anchor": anchor_entry(anchor),
        "lora": None if config.full_finetune else {
            "r": config.lora_r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
            "lora_dropout": config.lora_dropout,
            "target_modules": lora_target_regex(anchor.model, config.target_modules),
            "modules_to_save": config.modules_to_save or default_modules_to_save(anchor),
        },
        "trained_parameters": full_finetune_parameters(anchor) if config.full_finetune else None,
        "seeds": config.expert_seeds,
        "num_epochs": config.num_train_epochs,  # the manifest's own key (a file format, not a flag)
        "dataset": {"name": config.dataset_name, "revision": config.dataset_revision, "split": config.train_split,
                    "validation_split": config.validation_split, "num_images": train.num_images,
                    "num_captions": train.num_captions, "fingerprint": train.fingerprint, "license": train.license},
        "validation_metric": "recall@1 (ir@1, tr@1, mean; %) on the validation split" if validated else None,
        "training": config.to_dict(),
        "experts": [],
    }  # fmt: skip


# settings that may change between an interrupted run and its resumption (they do not change the experts)
RESUME_FREE_SETTINGS = ("num_experts", "seeds", "resume", "overwrite_output_dir", "num_workers", "push_to_hub",
                        "hub_model_id", "hub_private", "cache_dir", "output_dir", "logging_steps", "report_to",
                        "disable_tqdm")  # fmt: skip


def owns_bank_output(path: Path) -> bool:
    """An entry of a bank folder written by :func:`train_expert_bank`: the bank's own files
    (:func:`~mdm_hf.bank.owns_bank_entry`) and its tracker logs."""
    return owns_bank_entry(path) or (path.name == TRACKER_PROJECT and path.is_dir())


def _current_setting_names(training: dict) -> dict:
    """A manifest's ``training`` settings under today's names: a bank made before a flag was renamed (``num_epochs``
    -> ``num_train_epochs``) resumes like one made after."""
    current = {k: v for k, v in training.items() if k not in DEPRECATED_NAMES}
    for old, new in DEPRECATED_NAMES.items():
        if training.get(old) is not None:
            current.setdefault(new, training[old])
    return current


def _clear_unfinished_experts(out: Path, resume: bool, accelerator) -> None:
    """With ``resume`` and no manifest yet, the folder can only hold the first expert's cut-off epochs (and the
    tracker logs of that run)."""
    if not resume or not out.is_dir():
        return
    if all(p.is_dir() and (p.name.startswith("expert-") or p.name == TRACKER_PROJECT) for p in out.iterdir()):
        if accelerator.is_main_process:
            for p in out.iterdir():  # the expert is redone from its first step, and so are its logs
                shutil.rmtree(p)
        accelerator.wait_for_everyone()


def _resumable_experts(previous: dict, manifest: dict, config: ExpertTrainingConfig) -> list[dict]:
    """The finished experts of ``previous`` when it was made the same way as ``manifest``; else a clear error."""
    differ = [k for k in ("kind", "lora", "trained_parameters", "num_epochs", "validation_metric")
              if previous.get(k) != manifest.get(k)]  # fmt: skip
    location = ("name_or_path",)  # the same anchor may be loaded from another folder
    if {k: v for k, v in previous["anchor"].items() if k not in location} != {
        k: v for k, v in manifest["anchor"].items() if k not in location
    }:
        differ.append("anchor")
    if previous["dataset"].get("fingerprint") != manifest["dataset"].get("fingerprint"):
        differ.append("dataset")
    before = _current_setting_names(previous.get("training", {}))
    now = _current_setting_names(manifest["training"])
    differ += [f"training.{k}" for k in sorted(set(before) | set(now))
               if k not in RESUME_FREE_SETTINGS and before.get(k) != now.get(k)]  # fmt: skip
    done = previous["experts"]
    if len(done) > config.num_experts:
        raise ValueError(
            f"The bank in '{config.output_dir}' already has {len(done)} experts, more than num_experts="
            f"{config.num_experts}. Raise num_experts or use another --output_dir."
        )
    seeds = config.expert_seeds
    if [e["seed"] for e in done] != seeds[: len(done)]:
        differ.append("seeds")
    if differ:
        raise ValueError(
            f"Cannot resume the expert bank in '{config.output_dir}': it was made with other {', '.join(differ)}. "
            "Resume with the settings in its manifest.json, or start over with --overwrite_output_dir true or "
            "another --output_dir."
        )
    return list(done)


# ============================================================================================== bank files


# ============================================================================================== loading


# ============================================================================================== CLI
