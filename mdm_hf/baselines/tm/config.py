"""Configuration of the trajectory-matching baseline: the run, the buffer recorder, and the LoRS / RepBlend presets.

Defaults are MTT-VL's (Wu et al., TMLR 2024, arXiv 2308.07545): no similarity matrix, InfoNCE, exact unrolling.
``preset="lors"`` takes LoRS' released Flickr30k settings (Xu et al., ICML 2024, arXiv 2406.03793) for the budget
nearest ``num_pairs``, with the stability changes this project needed at EmojiCaps scale (:data:`TM_STABILITY`,
measured in ``benchmarks/tm_vs_mdm.py``; ``docs/benchmarks.md``); ``preset="lors_faithful"`` takes them unmodified.
``preset="repblend"`` / ``"repblend_faithful"`` do the same with RepBlend's released Flickr30k settings (Zhang et al.,
"Beyond Modality Collapse: Representations Blending for Multimodal Dataset Distillation", NeurIPS 2025): LoRS'
loss and similarity on projection-only trajectories, with representation blending (``docs/method.md`` §7).

The preset rule (the one :class:`~mdm_hf.evaluation.StudentConfig` follows for its presets): every field named in
:data:`MTT_VL_DEFAULTS` defaults to ``None``, and ``__post_init__`` fills each one still ``None`` from the preset
(``preset=None``: :data:`MTT_VL_DEFAULTS`). A value given explicitly -- keyword, YAML key or command-line flag --
is never ``None``, so it always wins over the preset. The values are resolved once, at construction: the saved
config holds them, and ``dataclasses.replace(config, num_pairs=...)`` keeps them rather than re-picking a budget.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ...config import (
    REPORT_TO_HELP,
    DatasetArguments,
    DistillRunArguments,
    InitMethod,
    ModelArguments,
    check_field_types,
    check_values,
    deprecated_alias,
    optional_split,
)
from ...config import config_field as _f

__all__ = [
    "LORS_COMMON",
    "LORS_PRESETS",
    "MTT_VL_DEFAULTS",
    "REPBLEND_COMMON",
    "REPBLEND_PRESETS",
    "TM_PRESETS",
    "TM_STABILITY",
    "TrajectoryBufferConfig",
    "TrajectoryMatchingConfig",
    "lors_budget",
    "lors_preset",
    "preset_values",
    "repblend_preset",
]

# "none" is what a command line writes for no preset (it becomes None).
TMPreset = Literal["none", "lors", "lors_faithful", "repblend", "repblend_faithful"]
# What the trajectories cover: the vision tower and both projections (MTT-VL, LoRS), or only the image and text
# projections on the anchor's frozen image features (RepBlend).
Trainable = Literal["full", "projections"]

# What a TrajectoryMatchingConfig field left at None becomes without a preset: MTT-VL's settings, with the step
# counts of LoRS' Flickr30k-100 script. These are the fields a preset may set.
MTT_VL_DEFAULTS: dict[str, Any] = dict(
    init="random", syn_steps=8, expert_epochs=1, max_start_epoch=2, mini_batch_size=20, unroll="full",
    inner_loss="infonce", similarity="none", sim_rank=10, sim_alpha=3.0, lr_pixels=100.0, lr_text=100.0,
    lr_lr=1e-2, lr_sim=10.0, momentum=0.5, momentum_lr=0.5, momentum_sim=0.5, min_syn_lr=None,
    trainable="full", blend_alpha=0.0,
)  # fmt: skip

# LoRS' released Flickr30k scripts (sh/distill_flickr_lors_{100,200,500}.sh): what differs between budgets ...
LORS_PRESETS: dict[int, dict[str, Any]] = {
    100: dict(lr_pixels=100.0, lr_text=100.0, lr_sim=10.0, sim_rank=10, sim_alpha=3.0, mini_batch_size=20,
              max_start_epoch=2),
    200: dict(lr_pixels=1000.0, lr_text=1000.0, lr_sim=10.0, sim_rank=5, sim_alpha=1.0, mini_batch_size=20,
              max_start_epoch=2),
    500: dict(lr_pixels=1000.0, lr_text=1000.0, lr_sim=100.0, sim_rank=20, sim_alpha=0.01, mini_batch_size=40,
              max_start_epoch=3),
}  # fmt: skip
# ... and what they share: syn_steps 8, expert_epochs 1, lr_lr 1e-2 (lr_teacher 0.1), weighted BCE against a
# low-rank similarity matrix, momentum 0.5, random real pairs as the start, TESLA unrolling.
LORS_COMMON: dict[str, Any] = dict(
    syn_steps=8, expert_epochs=1, lr_lr=1e-2, similarity="lowrank", inner_loss="wbce", momentum=0.5,
    momentum_lr=0.5, momentum_sim=0.5, init="random", unroll="tesla",
)  # fmt: skip

# LoRS' preset diverges at EmojiCaps scale (measured, K = 20, 32 px anchor, 2 x 2-epoch SGD buffer at lr 0.1): the
# step size went 0.1 -> 0.02 -> -0.30 -> 4.2 and max |S| 7 -> 1742 in three iterations, then NaN. Its step-size
# gradient scales like 1 / (lr_teacher x SGD steps per expert epoch), and an EmojiCaps epoch has ~10x fewer steps
# than a Flickr30k one. These changes keep it stable (preset "lors"; "lors_faithful" leaves them out).
TM_STABILITY: dict[str, float] = dict(lr_lr_factor=1e-2, lr_sim_factor=1e-2, min_syn_lr=1e-3)

# RepBlend's released Flickr30k scripts (scripts/distill_flickr_repblend.sh): per budget, LoRS' values (the same
# lr_img = lr_txt, lr_sim, sim_rank, alpha and max_start_epoch) except the mini-batch, 20 at every budget ...
REPBLEND_PRESETS: dict[int, dict[str, Any]] = {
    budget: {**values, "mini_batch_size": 20} for budget, values in LORS_PRESETS.items()
}
# ... and what they share: LoRS' common settings (syn_steps 8, expert_epochs 1, lr_lr 1e-2, lr_teacher 0.1, WBCE,
# low-rank similarity, momentum 0.5, random real pairs, TESLA-style unrolling), trajectories of the two projections
# only (its buffer.py trains image_projection and text_projection on frozen encoders) and blending with
# lambda ~ Beta(1, 1) (distill_repblend.py's alpha_2 default; the scripts leave it).
REPBLEND_COMMON: dict[str, Any] = {**LORS_COMMON, "trainable": "projections", "blend_alpha": 1.0}

TM_PRESETS: tuple[str, ...] = tuple(p for p in typing.get_args(TMPreset) if p != "none")


def lors_budget(num_pairs: int) -> int:
    """The budget of :data:`LORS_PRESETS` nearest ``num_pairs`` (a tie goes to the smaller budget); RepBlend's
    scripts have the same budgets."""
    return min(LORS_PRESETS, key=lambda budget: (abs(budget - num_pairs), budget))


def _with_stability(values: dict[str, Any], faithful: bool) -> dict[str, Any]:
    """``values`` with :data:`TM_STABILITY` applied unless ``faithful``."""
    if not faithful:
        values["lr_lr"] *= TM_STABILITY["lr_lr_factor"]
        values["lr_sim"] *= TM_STABILITY["lr_sim_factor"]
        values["min_syn_lr"] = TM_STABILITY["min_syn_lr"]
    return values


def lors_preset(num_pairs: int, faithful: bool = False) -> dict[str, Any]:
    """LoRS' field values for the budget nearest ``num_pairs``, with :data:`TM_STABILITY` unless ``faithful``."""
    return _with_stability({**LORS_COMMON, **LORS_PRESETS[lors_budget(num_pairs)]}, faithful)


def repblend_preset(num_pairs: int, faithful: bool = False) -> dict[str, Any]:
    """RepBlend's field values for the budget nearest ``num_pairs``, with :data:`TM_STABILITY` unless ``faithful``
    (the same changes as ``lors``: RepBlend learns its step sizes and similarity with LoRS' rates)."""
    return _with_stability({**REPBLEND_COMMON, **REPBLEND_PRESETS[lors_budget(num_pairs)]}, faithful)


def preset_values(preset: str | None, num_pairs: int) -> dict[str, Any]:
    """Every field of :data:`MTT_VL_DEFAULTS` under ``preset`` (None or one of :data:`TM_PRESETS`) at
    ``num_pairs``."""
    if preset is None:
        return dict(MTT_VL_DEFAULTS)
    if preset not in TM_PRESETS:
        raise ValueError(f"TrajectoryMatchingConfig.preset={preset!r}; choose one of {(None, *TM_PRESETS)}.")
    build = repblend_preset if preset.startswith("repblend") else lors_preset
    return {**MTT_VL_DEFAULTS, **build(num_pairs, faithful=preset.endswith("_faithful"))}


def _preset_help(what: str, field: str) -> str:
    return f"{what} (None: the preset's; without one {MTT_VL_DEFAULTS[field]!r})."


@dataclass
class TrajectoryMatchingConfig(ModelArguments, DistillRunArguments):
    """One trajectory-matching run (MTT-VL / LoRS / RepBlend). Field help doubles as ``--help`` of ``mdm-hf tm``.

    ``model_name_or_path`` & co. (:class:`~mdm_hf.config.ModelArguments`) name the anchor the trajectories start
    from; the dataset, budget, loop, validation and checkpoint fields come from
    :class:`~mdm_hf.config.DistillRunArguments`. Fields left at ``None`` are filled from ``preset`` (module
    docstring: explicit values always win).
    """

    preset: TMPreset | None = _f(
        None,
        "none: MTT-VL defaults | lors: LoRS' Flickr30k script for the nearest budget (100 / 200 / 500) with the "
        "stability changes of TM_STABILITY | lors_faithful: the same without them | repblend / repblend_faithful: "
        "RepBlend's scripts likewise (projection-only trajectories + representation blending). Explicit values "
        "win.",
    )

    # ---- the trajectory buffer (the anchor: ModelArguments)
    trajectory_buffer: str | None = _f(
        None,
        "Dir or Hub id of a FULL expert bank (per-epoch checkpoints of the trained tensors): `mdm-hf tm-buffer` "
        "(SGD, as LoRS; --trainable projections for RepBlend) or `mdm-hf experts --full_finetune true`.",
    )
    trajectory_buffer_revision: str | None = _f(None, "Revision of the trajectory buffer on the Hub.")
    cache_trajectories: bool = _f(True, "Keep every loaded checkpoint in memory (else re-read from disk).")

    # ---- synthetic set (its size: num_pairs)
    init: InitMethod | None = _f(
        None,
        _preset_help("Initial real pairs: random (LoRS) | kmeans (docs/method.md §1, joint k-means) | herding | "
                     "kcenter", "init"),
    )  # fmt: skip

    # ---- trajectory matching
    syn_steps: int | None = _f(
        None, _preset_help("N: differentiable SGD steps on synthetic mini-batches per iteration", "syn_steps")
    )
    expert_epochs: int | None = _f(
        None, _preset_help("M: the target is the expert M epochs after the start", "expert_epochs")
    )
    max_start_epoch: int | None = _f(
        None,
        _preset_help("Start epochs are drawn uniformly from 0 .. max_start_epoch - 1 (0: the anchor)",
                     "max_start_epoch"),
    )  # fmt: skip
    mini_batch_size: int | None = _f(
        None, _preset_help("Synthetic pairs per inner SGD step", "mini_batch_size")
    )
    unroll: Literal["full", "tesla"] | None = _f(
        None,
        _preset_help("full: back-propagate through all steps (MTT, exact) | tesla: constant memory (LoRS)",
                     "unroll"),
    )  # fmt: skip
    syn_lr_init: float | None = _f(
        None, "Initial learnable inner step size (both branches). None: the buffer's SGD learning rate."
    )
    merge_branches: bool = _f(
        False, "One normalisation for image + text parameters (LoRS COCO) instead of one per branch."
    )
    inner_loss: Literal["infonce", "wbce"] | None = _f(
        None,
        _preset_help("Inner contrastive loss: infonce (soft-target InfoNCE) | wbce (LoRS)", "inner_loss"),
    )
    temperature: float | None = _f(
        None, "Inner-loss temperature; None: the anchor's own logit scale (what the experts trained with)."
    )
    similarity: Literal["none", "lowrank", "full"] | None = _f(
        None,
        _preset_help(
            "Learned similarity targets: none (identity, MTT-VL) | lowrank (LoRS) | full", "similarity"
        ),
    )
    sim_rank: int | None = _f(None, _preset_help("Rank r of LoRS' low-rank similarity matrix", "sim_rank"))
    sim_alpha: float | None = _f(
        None, _preset_help("alpha of LoRS' similarity matrix: S = diag(a) + (alpha / r) L R^T", "sim_alpha")
    )

    # ---- RepBlend
    trainable: Trainable | None = _f(
        None,
        _preset_help(
            "What the trajectories cover: full (vision tower + projections; MTT-VL, LoRS) | projections (the image "
            "and text projections on the anchor's frozen image features; RepBlend). Must match the buffer",
            "trainable",
        ),
    )
    blend_alpha: float | None = _f(
        None,
        _preset_help(
            "RepBlend's representation blending: every inner step mixes its mini-batch's (image feature, text "
            "feature) pairs with one permutation and lambda ~ Beta(a, a), the same in both unrolling passes; 0: off",
            "blend_alpha",
        ),
    )

    # ---- outer optimisation (SGD with momentum, as LoRS)
    lr_pixels: float | None = _f(None, _preset_help("Learning rate of the synthetic pixels", "lr_pixels"))
    lr_text: float | None = _f(None, _preset_help("Learning rate of the synthetic text features", "lr_text"))
    lr_lr: float | None = _f(None, _preset_help("Learning rate of the learnable inner step sizes", "lr_lr"))
    lr_sim: float | None = _f(
        None, _preset_help("Learning rate of the similarity-matrix parameters", "lr_sim")
    )
    momentum: float | None = _f(None, _preset_help("SGD momentum of pixels and text features", "momentum"))
    momentum_lr: float | None = _f(None, _preset_help("SGD momentum of the step sizes", "momentum_lr"))
    momentum_sim: float | None = _f(
        None, _preset_help("SGD momentum of the similarity parameters", "momentum_sim")
    )
    max_grad_norm: float | None = _f(
        None, "Clip the gradient norm of pixels + text features (None: LoRS, none)."
    )
    min_syn_lr: float | None = _f(
        None,
        "Clamp the learned step sizes from below (LoRS' clamp_lr). None: the preset's (lors: 1e-3), else no clamp.",
    )

    # ---- budget, loop, validation, checkpoints: DistillRunArguments, with
    output_dir: str = _f("out-tm", "Where checkpoints, extras and the synthetic set are written.")
    device: str | None = _f(None, "cpu | cuda | cuda:1 | mps ... (None: cuda when available).")

    # A preset only fills the other fields, which a resume compares; caching trajectories only costs memory.
    resume_free_fields: ClassVar[tuple[str, ...]] = (
        *DistillRunArguments.resume_free_fields, "preset", "cache_trajectories",
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        self.preset = optional_split(self.preset)  # "none" / "null" on a command line: no preset
        for key, value in preset_values(self.preset, self.num_pairs).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        checks = {
            "syn_steps": self.syn_steps >= 1,
            "expert_epochs": self.expert_epochs >= 1,
            "max_start_epoch": self.max_start_epoch >= 1,
            "mini_batch_size": self.mini_batch_size >= 1,
            "sim_rank": self.sim_rank >= 1,
            "syn_lr_init": self.syn_lr_init is None or self.syn_lr_init > 0,
            "temperature": self.temperature is None or self.temperature > 0,
            "lr_pixels": self.lr_pixels > 0,
            "lr_text": self.lr_text >= 0,  # 0 freezes the text features on purpose
            "lr_lr": self.lr_lr >= 0,  # 0 keeps the step sizes fixed
            "lr_sim": self.lr_sim >= 0,
            "momentum": 0 <= self.momentum < 1,
            "momentum_lr": 0 <= self.momentum_lr < 1,
            "momentum_sim": 0 <= self.momentum_sim < 1,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "min_syn_lr": self.min_syn_lr is None or self.min_syn_lr > 0,
            "blend_alpha": self.blend_alpha >= 0,
            "device": self.device is None or _is_device(self.device),
        }
        check_values(self, checks)


def _is_device(name: str) -> bool:
    """Whether ``name`` is a device torch can parse (``cpu``, ``cuda``, ``cuda:1``, ``mps`` ...)."""
    import torch

    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


@dataclass
class TrajectoryBufferConfig(ModelArguments, DatasetArguments):
    """``mdm-hf tm-buffer``: record the SGD expert trajectories trajectory matching needs (LoRS' / RepBlend's
    ``buffer.py``). The anchor: :class:`~mdm_hf.config.ModelArguments`. Field help doubles as ``--help``."""

    validation_split: str | None = _f(
        "validation", "Split for the per-epoch recall in the manifest (None: skip)."
    )
    max_validation_images: int | None = _f(1000, "Score recall on at most N validation images.")
    trainable: Trainable = _f(
        "full",
        "What the experts train and the buffer records: full (vision tower + projections; LoRS) | projections "
        "(the image and text projections on the frozen image encoder; RepBlend, a far smaller buffer).",
    )
    num_experts: int = _f(2, "Expert trajectories (LoRS, RepBlend: 20 on Flickr30k).")
    num_train_epochs: int = _f(3, "Epochs per trajectory, a snapshot after each (LoRS, RepBlend: 10).")
    learning_rate: float = _f(0.1, "Constant SGD learning rate (LoRS, RepBlend: 0.1).")
    momentum: float = _f(0.0, "SGD momentum (LoRS: 0).")
    weight_decay: float = _f(0.0, "SGD weight decay.")
    per_device_train_batch_size: int = _f(128, "Images per SGD step (one caption each).")
    seed: int = _f(0, "Seed of expert 0; expert i uses seed + i.")
    output_dir: str = _f("trajectory_buffer", "Directory of the buffer (a full expert bank).")
    overwrite_output_dir: bool = _f(False, "Replace an existing, non-empty output_dir.")
    report_to: str = _f("none", REPORT_TO_HELP + " Logs each epoch's train loss and validation recall.")
    # the names before issue 15 (one name per concept across commands)
    num_epochs: int | None = deprecated_alias("num_train_epochs")
    batch_size: int | None = deprecated_alias("per_device_train_batch_size")

    def __post_init__(self) -> None:
        check_field_types(self)
        self.validation_split = optional_split(self.validation_split)
        check_values(self, {
            "num_experts": self.num_experts >= 1, "num_train_epochs": self.num_train_epochs >= 1,
            "learning_rate": self.learning_rate > 0,
            "per_device_train_batch_size": self.per_device_train_batch_size >= 1,
            "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0,
            "max_validation_images": self.max_validation_images is None or self.max_validation_images >= 1,
        })  # fmt: skip
