"""Trajectory matching for vision-language distillation (MTT-VL / LoRS), the baseline MDM is measured against.

MTT (Cazenavette et al., CVPR 2022, arXiv 2203.11932), its bi-trajectory vision-language form MTT-VL (Wu et al.,
TMLR 2024, arXiv 2308.07545) and LoRS (Xu et al., ICML 2024, arXiv 2406.03793) distil by matching *training
trajectories*. Experts are full fine-tunes of the anchor on the real train split with a checkpoint ``θ*_e`` after
every epoch (``θ*_0`` = the anchor): the *trajectory buffer*. Each iteration:

1. draw an expert and a start epoch ``s`` uniform in ``{0, ..., max_start_epoch − 1}``; the student starts at
   ``θ_0 = θ*_s`` and aims at ``θ*_{s+M}``, ``M = expert_epochs``;
2. take ``N = syn_steps`` SGD steps on synthetic mini-batches ``B_i`` of the pairs ``(x~, e~)``, with a learnable
   step size per branch ``b`` (image: vision tower + visual projection; text: text projection)::

       θ_{i+1} = θ_i − η_b ∇_θ ℓ(θ_i; B_i)

   ``ℓ`` is a contrastive loss of the embeddings of ``B_i`` against targets ``T`` (the identity, or LoRS' learned
   similarity matrix ``S[B_i, B_i]``);
3. minimise over ``x~``, ``e~``, ``η`` (and ``S``) the normalised parameter distance, per branch::

       L = Σ_b ||θ_N^b − θ*_{s+M}^b||² / ||θ*_s^b − θ*_{s+M}^b||²        (merge_branches: Σ_b num / Σ_b den)

LoRS' low-rank similarity (arXiv 2406.03793, §4): ``S = diag(a) + (α / r) L Rᵀ`` with ``a = 1``,
``L ~ N(0, 1)``, ``R = 0`` at the start (so ``S = I``); LoRS' released scripts train it with a weighted binary
cross-entropy (``inner_loss="wbce"``).

Unrolling. ``unroll="full"`` back-propagates through all ``N`` steps (MTT; exact; the graph grows with ``N``).
``unroll="tesla"`` is the constant-memory scheme of LoRS' released code (TESLA, Cui et al., ICML 2023,
arXiv 2211.10586): run the trajectory without a graph, then recompute and differentiate each step's gradient once.
It drops the dependence of later steps' gradients on earlier mini-batches through ``θ`` (second-order cross terms);
with ``N = 1`` the two agree exactly. Both evaluate the teacher with ``torch.func.functional_call`` on a dict of the
trained tensors: the module is never copied or modified.

Output: the same :class:`~mdm_hf.synthetic.SyntheticSet` as MDM, so one student protocol scores both. LoRS' learned
similarity matrix and step sizes are written next to the checkpoints (``tm_extras.safetensors``); the common student
protocol trains on the pairs with plain InfoNCE and does not use them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import __version__
from ..bank import (
    BANK_FORMAT_VERSION,
    MANIFEST_NAME,
    anchor_fingerprint,
    check_anchor,
    owns_bank_entry,
    read_manifest,
    resolve_bank_dir,
)
from ..checkpointing import prepare_output_dir
from ..config import DatasetArguments, DistillRunArguments, check_values, optional_split, parse_dataclass_args
from ..config import config_field as _f
from ..data import cached_text_features, load_split, preprocess_split_images
from ..distill_loop import SyntheticSetDistiller, ValidationFn
from ..experts import full_finetune_parameters
from ..models import DualEncoder
from ..training import CaptionedImages, ContrastiveObjective, evaluate_recall

logger = logging.getLogger(__name__)

__all__ = [
    "TrajectoryMatchingConfig",
    "TrajectoryMatchingDistiller",
    "TrajectoryBuffer",
    "LowRankSimilarity",
    "FullSimilarity",
    "TMStepTimings",
    "soft_contrastive_loss",
    "normalized_parameter_distance",
    "sgd_unroll",
    "unrolled_matching_gradients",
    "record_trajectory_buffer",
    "TrajectoryBufferConfig",
    "buffer_main",
    "branch_of",
    "tm_main",
]

EXTRAS_FILE = "tm_extras.safetensors"
TEXT_PROJECTION_PREFIXES = ("text_projection.", "text_model.head.")
LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


# ============================================================================================== configuration
@dataclass
class TrajectoryMatchingConfig(DistillRunArguments):
    """One trajectory-matching run. Field help doubles as ``--help``.

    Defaults are MTT-VL's (no similarity matrix, InfoNCE); LoRS' Flickr30k-100 script is ``similarity="lowrank"``,
    ``inner_loss="wbce"``, ``sim_rank=10``, ``sim_alpha=3``, ``lr_sim=10``, ``unroll="tesla"`` with the step counts
    given here (``syn_steps=8``, ``expert_epochs=1``, ``max_start_epoch=2``, ``mini_batch_size=20``, ``lr_pixels
    = lr_text = 100``, ``lr_lr=1e-2``, momentum 0.5 everywhere).
    """

    # ---- teacher and buffer
    model_name_or_path: str = _f(
        "openai/clip-vit-base-patch32", "Hub id or local dir of the anchor the trajectories start from."
    )
    model_revision: str | None = _f(None, "Revision of the anchor on the Hub.")
    text_pooling: str = _f("auto", "Text feature pooling: auto | pooler | mean | last (see mdm_hf.models).")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the Hub.")
    trajectory_buffer: str | None = _f(
        None,
        "Dir or Hub id of a FULL expert bank (per-epoch checkpoints of the trained tensors): "
        "record_trajectory_buffer (SGD, as LoRS) or `mdm-hf experts --full_finetune true`.",
    )
    trajectory_buffer_revision: str | None = _f(None, "Revision of the trajectory buffer on the Hub.")
    cache_trajectories: bool = _f(True, "Keep every loaded checkpoint in memory (else re-read from disk).")

    # ---- data: the DatasetArguments fields

    # ---- synthetic set
    init: str = _f(
        "random", "Initial real pairs: random (LoRS) | kmeans (MDM's joint k-means) | herding | kcenter."
    )

    # ---- trajectory matching
    syn_steps: int = _f(8, "N: differentiable SGD steps on synthetic mini-batches per iteration.")
    expert_epochs: int = _f(1, "M: the target is the expert M epochs after the start.")
    max_start_epoch: int = _f(
        2, "Start epochs are drawn uniformly from 0 .. max_start_epoch - 1 (0: the anchor)."
    )
    mini_batch_size: int = _f(20, "Synthetic pairs per inner SGD step.")
    unroll: str = _f(
        "full", "full: back-propagate through all steps (MTT, exact) | tesla: constant memory (LoRS)."
    )
    syn_lr_init: float | None = _f(
        None, "Initial learnable inner step size (both branches). None: the buffer's SGD learning rate."
    )
    merge_branches: bool = _f(
        False, "One normalisation for image + text parameters (LoRS COCO) instead of one per branch."
    )
    inner_loss: str = _f("infonce", "Inner contrastive loss: infonce (soft-target InfoNCE) | wbce (LoRS).")
    temperature: float | None = _f(
        None, "Inner-loss temperature; None: the anchor's own logit scale (what the experts trained with)."
    )
    similarity: str = _f(
        "none", "Learned similarity targets: none (identity, MTT-VL) | lowrank (LoRS) | full."
    )
    sim_rank: int = _f(10, "Rank r of LoRS' low-rank similarity matrix.")
    sim_alpha: float = _f(3.0, "alpha of LoRS' low-rank similarity matrix: S = diag(a) + (alpha / r) L R^T.")

    # ---- outer optimisation (SGD with momentum, as LoRS)
    lr_pixels: float = _f(100.0, "Learning rate of the synthetic pixels.")
    lr_text: float = _f(100.0, "Learning rate of the synthetic text features.")
    lr_lr: float = _f(1e-2, "Learning rate of the learnable inner step sizes.")
    lr_sim: float = _f(10.0, "Learning rate of the similarity-matrix parameters.")
    momentum: float = _f(0.5, "SGD momentum of pixels and text features.")
    momentum_lr: float = _f(0.5, "SGD momentum of the step sizes.")
    momentum_sim: float = _f(0.5, "SGD momentum of the similarity parameters.")
    max_grad_norm: float | None = _f(
        None, "Clip the gradient norm of pixels + text features (None: LoRS, none)."
    )
    min_syn_lr: float | None = _f(
        None, "Clamp the learned step sizes from below (LoRS' clamp_lr; None: no clamp)."
    )

    # ---- budget, loop, validation, checkpoints: DistillRunArguments, with
    output_dir: str = _f("out-tm", "Where checkpoints, extras and the synthetic set are written.")
    device: str | None = _f(None, "cpu | cuda | cuda:1 ... (None: cuda when available).")

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "syn_steps": self.syn_steps >= 1,
            "expert_epochs": self.expert_epochs >= 1,
            "max_start_epoch": self.max_start_epoch >= 1,
            "mini_batch_size": self.mini_batch_size >= 1,
            "sim_rank": self.sim_rank >= 1,
            "syn_lr_init": self.syn_lr_init is None or self.syn_lr_init > 0,
            "temperature": self.temperature is None or self.temperature > 0,
        }
        choices = {
            "unroll": ("full", "tesla"),
            "inner_loss": ("infonce", "wbce"),
            "similarity": ("none", "lowrank", "full"),
            "init": ("random", "kmeans", "herding", "kcenter"),
        }
        check_values(self, checks, choices)


# ============================================================================================== losses
def soft_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: torch.Tensor | float,
    kind: str = "infonce",
) -> torch.Tensor:
    """Contrastive loss of ``n`` pairs against a (learned) target matrix ``T`` ``[n, n]`` (LoRS, arXiv 2406.03793).

    ``logits = logit_scale · cos(image_i, text_j)`` (rows normalised inside; ``logit_scale`` already exponentiated).

    * ``"infonce"``: ``½ (−1/n Σ_i Σ_j T_ij log softmax_j(logits_i) − 1/n Σ_j Σ_i T_ij log softmax_i(logits_·j))``;
      with ``T = I`` this is the symmetric CLIP loss.
    * ``"wbce"``: element-wise BCE of ``σ(logits)`` against ``T``, averaged separately over the positives
      (``T > 0.5``) and the negatives and then halved, so the ``n`` positives weigh as much as the ``n² − n``
      negatives. (LoRS writes ``log(p + 1e-6)``; ``logsigmoid`` is the same without the clamp.)
    """
    if targets.shape != (image_embeds.shape[0], text_embeds.shape[0]):
        raise ValueError(
            f"targets must be [{image_embeds.shape[0]}, {text_embeds.shape[0]}] (one per image-text pair), got "
            f"{tuple(targets.shape)}."
        )
    zv, zt = F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)
    logits = logit_scale * (zv @ zt.T)
    targets = targets.to(logits.dtype)
    if kind == "infonce":
        image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
        text_to_image = -(targets.T * F.log_softmax(logits.T, dim=1)).sum(1).mean()
        return 0.5 * (image_to_text + text_to_image)
    if kind == "wbce":
        per_entry = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits))
        positive = (targets > 0.5).detach()
        pos = torch.where(positive, per_entry, torch.zeros_like(per_entry)).sum() / positive.sum().clamp_min(
            1
        )
        neg = torch.where(~positive, per_entry, torch.zeros_like(per_entry)).sum() / (
            ~positive
        ).sum().clamp_min(1)
        return 0.5 * (pos + neg)
    raise ValueError(f"kind must be 'infonce' or 'wbce', got {kind!r}.")


def normalized_parameter_distance(
    student_end: Mapping[str, torch.Tensor],
    expert_start: Mapping[str, torch.Tensor],
    expert_target: Mapping[str, torch.Tensor],
    groups: Mapping[str, Sequence[str]] | None = None,
    merge_groups: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MTT's loss ``||θ_N − θ*_{s+M}||² / ||θ*_s − θ*_{s+M}||²`` (arXiv 2203.11932, eq. 2), per group of tensors.

    Args:
        student_end / expert_start / expert_target: tensors by parameter name (the same names in all three).
        groups: ``{group: [names]}`` (LoRS' image / text branches); ``None``: one group of every name.
        merge_groups: ``Σ_g num_g / Σ_g den_g`` instead of ``Σ_g num_g / den_g``.

    Returns:
        ``(loss, {group: num_g / den_g})``. A group whose start equals its target (``den = 0``) raises a
        ``ValueError``: the normalisation is undefined there.
    """
    groups = {"all": list(student_end)} if groups is None else groups
    nums, dens = {}, {}
    for group, names in groups.items():
        if not names:
            continue
        nums[group] = sum(((student_end[n] - expert_target[n]) ** 2).sum() for n in names)
        dens[group] = sum(((expert_start[n] - expert_target[n]) ** 2).sum() for n in names).detach()
        if float(dens[group]) == 0.0:
            raise ValueError(
                f"The expert's start and target checkpoints are identical in the '{group}' parameters, so the "
                "normalised distance is undefined. Use a trajectory whose epochs differ (a higher learning rate, or "
                "larger expert_epochs)."
            )
    parts = {g: nums[g] / dens[g] for g in nums}
    loss = sum(nums.values()) / sum(dens.values()) if merge_groups else sum(parts.values())
    return loss, {g: p.detach() for g, p in parts.items()}


# ============================================================================================== unrolling
def _grads(
    loss: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool
) -> tuple[torch.Tensor, ...]:
    # An unused tensor (e.g. a pooler no loss reaches) gets a zero gradient instead of None.
    return torch.autograd.grad(
        loss, list(params), create_graph=create_graph, allow_unused=True, materialize_grads=True
    )


def _math_attention():
    """Scaled-dot-product attention from differentiable primitives: the fused CPU / CUDA kernels have no double
    backward, which the unrolled steps (gradients of gradients) need. Forward values are the same up to rounding."""

    return sdpa_kernel(SDPBackend.MATH)


def sgd_unroll(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    step_sizes: Mapping[str, torch.Tensor],
    batches: Sequence[torch.Tensor],
    create_graph: bool = True,
) -> dict[str, torch.Tensor]:
    """``len(batches)`` SGD steps ``θ_{i+1} = θ_i − η_n ∇_θ loss_fn(θ_i, batches[i])``, differentiable end to end.

    Args:
        loss_fn: ``(params_by_name, batch_indices) -> scalar``; closes over the synthetic data.
        params: the start ``θ_0`` by name (made leaves that require grad; the inputs are not modified).
        step_sizes: a scalar tensor per name (tensors shared by a branch may be the same object).
        create_graph: keep the graph of every step (MTT); ``False`` runs the trajectory without one.

    Returns the end parameters. With ``create_graph`` they depend on the synthetic data and the step sizes, so
    ``autograd.grad`` of any function of them reaches both; only one set of tensors per step is kept, by the graph.
    """
    names = list(params)
    current = {n: params[n].detach().requires_grad_(True) for n in names}
    for batch in batches:
        with _math_attention():
            loss = loss_fn(current, batch)
        grads = _grads(loss, [current[n] for n in names], create_graph)
        if create_graph:
            current = {n: current[n] - step_sizes[n] * g for n, g in zip(names, grads)}
        else:
            with torch.no_grad():
                current = {n: current[n] - step_sizes[n] * g for n, g in zip(names, grads)}
            current = {n: t.requires_grad_(True) for n, t in current.items()}
    return current


def unrolled_matching_gradients(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    step_sizes: Mapping[str, torch.Tensor],
    batches: Sequence[torch.Tensor],
    meta_loss: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    mode: str = "full",
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """Gradients of ``meta_loss(θ_N)`` w.r.t. ``inputs`` (synthetic data, step sizes, similarity parameters).

    ``mode="full"``: exact, through the whole unrolled graph (:func:`sgd_unroll`).

    ``mode="tesla"`` (arXiv 2211.10586, as LoRS' released code): ``θ_N = θ_0 − Σ_i η ⊙ g_i`` with
    ``g_i = ∇ℓ(θ_i; B_i)`` evaluated along the trajectory and each ``g_i`` treated as depending only on its own
    mini-batch, so with ``c = −η ⊙ ∂L/∂θ_N``::

        dL/dinput = Σ_i ∂<c, g_i(θ_i; B_i)>/∂input          dL/dη_n = <∂L/∂θ_N[n], −Σ_i g_i[n]>

    Memory stays that of one step (plus the ``N`` parameter vectors of the trajectory).

    Returns ``(meta loss (detached), θ_N (detached), [gradient per input, zeros where unused])``.
    """
    if mode == "full":
        end = sgd_unroll(loss_fn, params, step_sizes, batches, create_graph=True)
        loss = meta_loss(end)
        grads = _grads(loss, inputs, create_graph=False)
        return loss.detach(), {n: t.detach() for n, t in end.items()}, list(grads)
    if mode != "tesla":
        raise ValueError(f"mode must be 'full' or 'tesla', got {mode!r}.")
    names = list(params)
    trajectory, grad_sum = [], {n: torch.zeros_like(params[n]) for n in names}
    current = {n: params[n].detach() for n in names}
    for batch in batches:  # the trajectory, without a graph
        trajectory.append(current)
        leaves = {n: current[n].detach().requires_grad_(True) for n in names}
        grads = _grads(loss_fn(leaves, batch), [leaves[n] for n in names], create_graph=False)
        with torch.no_grad():
            current = {n: current[n] - step_sizes[n].detach() * g for n, g in zip(names, grads)}
            for n, g in zip(names, grads):
                grad_sum[n] += g
    end = {n: t.detach().requires_grad_(True) for n, t in current.items()}
    loss = meta_loss(end)
    d_end = dict(zip(names, _grads(loss, [end[n] for n in names], create_graph=False)))
    total = [torch.zeros_like(t) for t in inputs]
    # dL/dη through θ_N = θ_0 − η Σ g (a linear form in the step-size tensors, constants detached).
    lr_form = sum(step_sizes[n] * (d_end[n] * -grad_sum[n]).sum() for n in names)
    if isinstance(lr_form, torch.Tensor) and lr_form.requires_grad:
        for acc, g in zip(total, _grads(lr_form, inputs, create_graph=False)):
            acc += g
    coeff = {n: -step_sizes[n].detach() * d_end[n] for n in names}
    for theta, batch in zip(trajectory, batches):  # one step's graph at a time
        leaves = {n: theta[n].detach().requires_grad_(True) for n in names}
        with _math_attention():
            step_loss = loss_fn(leaves, batch)
        step_grads = _grads(step_loss, [leaves[n] for n in names], create_graph=True)
        inner = sum((coeff[n] * g).sum() for n, g in zip(names, step_grads))
        for acc, g in zip(total, _grads(inner, inputs, create_graph=False)):
            acc += g
    return loss.detach(), {n: t.detach() for n, t in end.items()}, total


# ============================================================================================== similarity (LoRS)
class LowRankSimilarity(nn.Module):
    """LoRS' similarity matrix ``S = diag(a) + (alpha / r) · L Rᵀ`` over ``K`` pairs (arXiv 2406.03793, §4).

    ``a = 1``, ``L ~ N(0, 1)``, ``R = 0`` at the start, so ``S = I``. ``forward(idx)`` is ``S[idx][:, idx]``,
    computed from the indexed factors (``O(b·r)`` per mini-batch, no ``K × K`` matrix).
    """

    def __init__(
        self, num_pairs: int, rank: int, alpha: float, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.rank, self.alpha = int(rank), float(alpha)
        self.diag = nn.Parameter(torch.ones(num_pairs))
        self.left = nn.Parameter(torch.randn(num_pairs, rank, generator=generator))
        self.right = nn.Parameter(torch.zeros(num_pairs, rank))

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        a, left, right = self.diag, self.left, self.right
        if indices is not None:
            a, left, right = a[indices], left[indices], right[indices]
        return torch.diag(a) + (self.alpha / self.rank) * left @ right.T


class FullSimilarity(nn.Module):
    """A free ``K × K`` similarity matrix, initialised to the identity (LoRS' ``sim_type="full"``)."""

    def __init__(self, num_pairs: int) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.eye(num_pairs))

    def forward(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.matrix if indices is None else self.matrix[indices][:, indices]


# ============================================================================================== the buffer
def branch_of(name: str) -> str:
    """LoRS' two trajectories: ``"text"`` for the text projection, ``"image"`` for everything else trained."""
    return "text" if name.startswith(TEXT_PROJECTION_PREFIXES) else "image"


class TrajectoryBuffer:
    """Expert trajectories read from a **full** expert bank: ``checkpoint(i, 0)`` is the anchor, ``checkpoint(i, e)``
    the trained tensors of expert ``i`` after epoch ``e`` (``<bank>/expert-<i>/epoch-<e>/model.safetensors``).

    The bank must belong to ``anchor`` (checked with :func:`mdm_hf.bank.check_anchor`). Loading is lazy; with
    ``cache=True`` every checkpoint read stays in memory.
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
                "checkpoints. Record one with mdm_hf.baselines.trajectory_matching.record_trajectory_buffer or "
                "`mdm-hf experts --full_finetune true`."
            )
        check_anchor(manifest["anchor"], anchor)
        self.manifest = manifest
        training = manifest.get("training") or {}
        self.optimizer = str(training.get("optimizer", "adamw"))  # experts.py trains with AdamW
        self.learning_rate = training.get("learning_rate")
        anchor_params = {n: p for n, p in anchor.model.named_parameters()}
        self._paths: list[list[Path]] = []
        self.expert_names: list[str] = []
        names: list[str] | None = None
        for expert in manifest["experts"]:
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
                with safe_open(str(path), "pt") as f:
                    keys = list(f.keys())
                    for key in keys:
                        shape = tuple(f.get_slice(key).get_shape())
                        if key not in anchor_params or tuple(anchor_params[key].shape) != shape:
                            raise ValueError(
                                f"{path}: tensor '{key}' {shape} matches no anchor parameter of that shape."
                            )
                if names is None:
                    names = [n for n in anchor_params if n in set(keys)]  # the anchor's order
                elif set(keys) != set(names):
                    raise ValueError(
                        f"{path} holds other tensors than the first checkpoint; the bank is inconsistent."
                    )
            self._paths.append(paths)
            self.expert_names.append(expert["name"])
        if not self._paths or names is None:
            raise ValueError(
                f"'{bank_dir}' holds no expert checkpoints (an interrupted run?). Record it again."
            )
        self.names: list[str] = names
        self._anchor = {n: anchor_params[n].detach().float().cpu().clone() for n in names}
        self.cache = cache
        self._cache: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

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
) -> Path:
    """Expert trajectories as LoRS records them (``buffer.py``): SGD on the real train split, a snapshot per epoch.

    Trains the vision tower and the projections (:func:`mdm_hf.experts.full_finetune_parameters`; text tower and
    logit scale frozen) with the family's contrastive loss, one caption per image per epoch, and writes a **full**
    expert bank (``manifest.json`` + ``expert-<i>/epoch-<e>/model.safetensors``) that :class:`TrajectoryBuffer` and
    :func:`mdm_hf.bank.load_expert_bank` both read. ``validation`` = ``(pixels, text_features,
    caption_to_image)`` adds per-epoch recall@1 to the manifest. Single process.
    """

    out = prepare_output_dir(output_dir, owned=owns_bank_entry, overwrite=overwrite)
    if num_experts < 1 or num_epochs < 1 or learning_rate <= 0 or batch_size < 1:
        raise ValueError("num_experts, num_epochs and batch_size must be >= 1 and learning_rate > 0.")
    device = next(anchor.model.parameters()).device
    if text_features is None:
        text_features = cached_text_features(anchor, train_data, cache_dir)
    if pixels is None:
        pixels = preprocess_split_images(anchor, train_data)
    trained = full_finetune_parameters(anchor)
    manifest = {
        "format_version": BANK_FORMAT_VERSION,
        "created_with": f"mdm-hf {__version__} (trajectory buffer)",
        "kind": "full",
        "family": anchor.family,
        "anchor": {
            "name_or_path": anchor.name_or_path, "revision": anchor.revision, "family": anchor.family,
            "model_type": anchor.model.config.model_type, "text_pooling": anchor.text_pooling,
            **anchor_fingerprint(anchor.model),
        },
        "lora": None,
        "trained_parameters": trained,
        "seeds": [seed + i for i in range(num_experts)],
        "num_epochs": num_epochs,
        "dataset": {"name": train_data.name, "split": train_data.split, "num_images": train_data.num_images,
                    "num_captions": train_data.num_captions, "fingerprint": train_data.fingerprint,
                    "license": train_data.license, "validation_split": None, "revision": None},
        "validation_metric": "recall@1 (ir@1, tr@1, mean; %)" if validation else None,
        "training": {"optimizer": "sgd", "learning_rate": learning_rate, "momentum": momentum,
                     "weight_decay": weight_decay, "per_device_train_batch_size": batch_size,
                     "num_epochs": num_epochs, "num_experts": num_experts, "seed": seed,
                     "recipe": "LoRS buffer.py: SGD, constant lr, one snapshot per epoch"},
        "experts": [],
    }  # fmt: skip
    for index in range(num_experts):
        expert_seed = seed + index
        model = copy.deepcopy(anchor.model)  # once per expert, not per step
        encoder = DualEncoder(model, anchor.tokenizer, anchor.image_processor, anchor.name_or_path, anchor.revision,
                              anchor.text_pooling)  # fmt: skip
        params = dict(model.named_parameters())
        for name, param in params.items():
            param.requires_grad_(name in trained)
        optimizer = torch.optim.SGD(
            [params[n] for n in trained], lr=learning_rate, momentum=momentum, weight_decay=weight_decay
        )
        dataset = CaptionedImages(train_data, encoder, text_features, pixels, expert_seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(expert_seed)
        )
        objective = ContrastiveObjective(encoder)
        record = {"name": f"expert-{index}", "seed": expert_seed, "epochs": []}
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
            (out / rel).mkdir(parents=True, exist_ok=True)
            save_file({n: params[n].detach().cpu().contiguous() for n in trained}, str(out / rel / "model.safetensors"),
                      metadata={"format": "pt"})  # fmt: skip
            (out / rel / "expert_config.json").write_text(json.dumps(
                {"kind": "full", "base_model_name_or_path": anchor.name_or_path, "revision": anchor.revision,
                 "num_tensors": len(trained)}))  # fmt: skip
            entry = {"epoch": epoch, "path": rel, "train_loss": sum(losses) / max(len(losses), 1)}
            if validation is not None:
                entry["validation"] = evaluate_recall(encoder, *validation)
            record["epochs"].append(entry)
            logger.info("trajectory %s epoch %d: %s", record["name"], epoch, entry)
        manifest["experts"].append(record)
        # after every expert: a crash leaves a readable, partial buffer
        (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        del model, optimizer
    return out


# ============================================================================================== the distiller
@dataclass
class TMStepTimings:
    """Seconds spent in each part of one iteration (for the cost benchmark)."""

    load: float = 0.0  # reading the start / target checkpoints
    unroll: float = 0.0  # the inner SGD steps and the meta-gradient (one autograd pass; TESLA: both passes)
    update: float = 0.0  # the outer optimiser step
    total: float = 0.0


class TrajectoryMatchingDistiller(SyntheticSetDistiller):
    """Distil ``config.num_pairs`` synthetic pairs by matching expert trajectories (MTT-VL / LoRS).

    Args:
        config: the run's :class:`TrajectoryMatchingConfig`.
        validation_fn: ``validation_fn(synthetic_set, step) -> metrics`` with a ``"mean"`` (higher is better), every
            ``eval_steps``; it must score on a validation split (:func:`mdm_hf.evaluation.student_validation_fn`).
        teacher / train_data / buffer: pre-loaded pieces (tests, benchmarks); loaded from the config when None.

    Single process: the unrolled steps run on one device (``config.device``).
    """

    def __init__(
        self,
        config: TrajectoryMatchingConfig,
        validation_fn: ValidationFn | None = None,
        teacher: DualEncoder | None = None,
        train_data=None,
        buffer: TrajectoryBuffer | None = None,
    ) -> None:
        super().__init__(config, validation_fn, accelerator=None, teacher=teacher, train_data=train_data)
        self.buffer = buffer
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # ================================================================== set-up
    def setup(self) -> None:
        """Load teacher, data, cached text features and the trajectory buffer; check the schedule fits."""
        if self.is_set_up:
            return
        cfg = self.config
        self._load_teacher_and_data(self.device)
        if self.buffer is None:
            if cfg.trajectory_buffer is None:
                raise ValueError(
                    "trajectory_buffer is not set: trajectory matching needs expert trajectories. Record them with "
                    "record_trajectory_buffer(...) or `mdm-hf experts --full_finetune true` and pass the directory."
                )
            self.buffer = TrajectoryBuffer(
                cfg.trajectory_buffer,
                self.teacher,
                cfg.trajectory_buffer_revision,
                cache=cfg.cache_trajectories,
            )
        shortest = min(self.buffer.num_epochs(i) for i in range(self.buffer.num_experts))
        if cfg.max_start_epoch - 1 + cfg.expert_epochs > shortest:
            raise ValueError(
                f"max_start_epoch={cfg.max_start_epoch} and expert_epochs={cfg.expert_epochs} need trajectories of "
                f"at least {cfg.max_start_epoch - 1 + cfg.expert_epochs} epochs, but the shortest has {shortest}. "
                "Lower max_start_epoch / expert_epochs or record more epochs."
            )
        if self.buffer.optimizer != "sgd":
            logger.warning(
                "The trajectory buffer was trained with %s, not SGD: the student's SGD steps match it only up to a "
                "per-parameter scaling (MTT and LoRS record SGD experts).",
                self.buffer.optimizer,
            )
        self.names = list(self.buffer.names)
        self.groups: dict[str, list[str]] = {"image": [], "text": []}
        for name in self.names:
            self.groups[branch_of(name)].append(name)
        self.groups = {g: n for g, n in self.groups.items() if n}
        scale = (
            self.teacher.logit_scale.detach()
            if cfg.temperature is None
            else torch.tensor(1.0 / cfg.temperature)
        )
        self.logit_scale = scale.float().to(self.device)
        self.is_set_up = True

    # ================================================================== initialisation
    def initialize(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Start from ``indices`` (default: ``config.init`` under the anchor), set ``x~, e~``, the step sizes, the
        similarity matrix and the optimiser."""
        cfg = self.config
        self.setup()
        self.start_from(self.select_initial_pairs() if indices is None else indices)
        chosen = self.source_indices
        lr0 = cfg.syn_lr_init
        if lr0 is None:
            if self.buffer.optimizer != "sgd" or self.buffer.learning_rate is None:
                raise ValueError(
                    f"syn_lr_init is None, which means 'the buffer's SGD learning rate', but the buffer was trained "
                    f"with {self.buffer.optimizer}. Set syn_lr_init explicitly (LoRS: 0.1)."
                )
            lr0 = float(self.buffer.learning_rate)
        self.syn_lrs = {
            g: torch.tensor(float(lr0), device=self.device, requires_grad=True) for g in self.groups
        }
        gen = torch.Generator().manual_seed(cfg.seed + 104729)
        if cfg.similarity == "lowrank":
            self.similarity: nn.Module | None = LowRankSimilarity(
                cfg.num_pairs, cfg.sim_rank, cfg.sim_alpha, gen
            )
        elif cfg.similarity == "full":
            self.similarity = FullSimilarity(cfg.num_pairs)
        else:
            self.similarity = None
        if self.similarity is not None:
            self.similarity.to(self.device)
        groups = [
            {"params": [self.syn_pixels], "lr": cfg.lr_pixels, "momentum": cfg.momentum},
            {"params": [self.syn_text], "lr": cfg.lr_text, "momentum": cfg.momentum},
            {"params": list(self.syn_lrs.values()), "lr": cfg.lr_lr, "momentum": cfg.momentum_lr},
        ]
        if self.similarity is not None:
            groups.append(
                {"params": list(self.similarity.parameters()), "lr": cfg.lr_sim, "momentum": cfg.momentum_sim}
            )
        self.optimizer = torch.optim.SGD(groups, lr=0.0)
        self._generator = torch.Generator().manual_seed(cfg.seed + 1)  # expert / epoch / mini-batch draws
        return chosen

    @property
    def trainable(self) -> list[torch.Tensor]:
        """What the outer loop optimises: pixels, text features, step sizes, similarity parameters."""
        sim = list(self.similarity.parameters()) if self.similarity is not None else []
        return [self.syn_pixels, self.syn_text, *self.syn_lrs.values(), *sim]

    # ================================================================== one iteration
    def sample_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        """``syn_steps`` mini-batches: consecutive chunks of a permutation, reshuffled when it runs out (LoRS)."""
        k, b = self.config.num_pairs, min(self.config.mini_batch_size, self.config.num_pairs)
        perm, pos, out = torch.randperm(k, generator=generator), 0, []
        for _ in range(self.config.syn_steps):
            if pos + b > k:
                perm, pos = torch.randperm(k, generator=generator), 0
            out.append(perm[pos : pos + b].to(self.device))
            pos += b
        return out

    def sample_trajectory(self, generator: torch.Generator) -> tuple[int, int]:
        """``(expert, start_epoch)``: expert uniform, start uniform in ``0 .. max_start_epoch − 1``."""
        expert = int(torch.randint(self.buffer.num_experts, (1,), generator=generator))
        start = int(torch.randint(self.config.max_start_epoch, (1,), generator=generator))
        return expert, start

    def embed(
        self, params: Mapping[str, torch.Tensor], pixels: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_v, z_t)`` of the teacher with its trained tensors replaced by ``params`` (``functional_call``)."""

        return functional_call(
            self.teacher, {f"model.{n}": p for n, p in params.items()}, (pixels, text_features)
        )

    def inner_loss(self, params: Mapping[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        """``ℓ(θ; B)``: the contrastive loss of the synthetic mini-batch ``B`` under parameters ``θ``."""
        zv, zt = self.embed(params, self.syn_pixels[batch], self.syn_text[batch])
        if self.similarity is not None:
            targets = self.similarity(batch)
        else:
            targets = torch.eye(len(batch), device=zv.device, dtype=zv.dtype)
        return soft_contrastive_loss(zv, zt, targets, self.logit_scale, self.config.inner_loss)

    def step_sizes(self) -> dict[str, torch.Tensor]:
        """The learnable step size of each trained tensor (its branch's)."""
        return {n: self.syn_lrs[branch_of(n)] for n in self.names}

    def matching_loss(
        self,
        student_end: Mapping[str, torch.Tensor],
        expert_start: Mapping[str, torch.Tensor],
        expert_target: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The normalised parameter distance per branch (:func:`normalized_parameter_distance`)."""
        return normalized_parameter_distance(
            student_end, expert_start, expert_target, self.groups, self.config.merge_branches
        )

    def training_step(self, generator: torch.Generator) -> tuple[dict, TMStepTimings]:
        """Draw a trajectory segment, unroll ``syn_steps`` SGD steps, match, update the synthetic set."""
        cfg = self.config
        timings = TMStepTimings()
        t0 = time.perf_counter()
        expert, start = self.sample_trajectory(generator)
        batches = self.sample_batches(generator)
        start_params = {n: t.to(self.device) for n, t in self.buffer.checkpoint(expert, start).items()}
        target = {
            n: t.to(self.device) for n, t in self.buffer.checkpoint(expert, start + cfg.expert_epochs).items()
        }
        t1 = time.perf_counter()
        timings.load = t1 - t0
        parts: dict[str, torch.Tensor] = {}

        def meta(end: dict[str, torch.Tensor]) -> torch.Tensor:
            loss, branch_parts = self.matching_loss(end, start_params, target)
            parts.update(branch_parts)
            return loss

        loss, _, grads = unrolled_matching_gradients(
            self.inner_loss, start_params, self.step_sizes(), batches, meta, self.trainable, mode=cfg.unroll
        )
        t2 = time.perf_counter()
        timings.unroll = t2 - t1
        if not torch.isfinite(loss) or not all(bool(torch.isfinite(g).all()) for g in grads):
            path = self.save_checkpoint(self._generator)
            raise FloatingPointError(
                f"The matching loss or its gradient became non-finite at step {self.state.step} (loss={float(loss)}, "
                f"step sizes={ {g: float(v.detach()) for g, v in self.syn_lrs.items()} }). The last good state is in {path}. "
                "Lower lr_pixels / lr_text / lr_lr, set max_grad_norm or min_syn_lr, and resume."
            )
        for param, grad in zip(self.trainable, grads):
            param.grad = grad
        data_grads = [self.syn_pixels.grad, self.syn_text.grad]
        grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in data_grads]))
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([self.syn_pixels, self.syn_text], cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.min_syn_lr is not None:
            with torch.no_grad():
                for lr in self.syn_lrs.values():
                    lr.clamp_(min=cfg.min_syn_lr)
        timings.update = time.perf_counter() - t2
        timings.total = time.perf_counter() - t0
        logs = {
            "loss": float(loss),
            **{f"loss/{g}": float(v) for g, v in parts.items()},
            **{f"syn_lr/{g}": float(v.detach()) for g, v in self.syn_lrs.items()},
            "grad_norm": float(grad_norm),
            "expert": expert,
            "start_epoch": start,
            "time/iteration": timings.total,
        }
        return logs, timings

    # ================================================================== loop hooks
    progress_name = "TM"
    config_file = "tm_config.json"
    output_files = (EXTRAS_FILE,)

    def _after_loop(self) -> None:
        self.save_extras(Path(self.config.output_dir) / EXTRAS_FILE)

    # ================================================================== output
    def provenance(self) -> dict:
        """Where the set came from: ids, the buffer, the full config, the learned step sizes, library versions."""

        cfg = self.config
        lors = cfg.similarity != "none"
        out = self._common_provenance(
            "LoRS (trajectory matching + learned similarity)" if lors else "MTT-VL (trajectory matching)"
        )
        out.update(
            trajectory_buffer=str(cfg.trajectory_buffer or getattr(self.buffer, "directory", "")),
            syn_lrs={g: float(v.detach()) for g, v in self.syn_lrs.items()},
            created_with=f"mdm-hf {__version__}",
        )
        return out

    def save_extras(self, path: str | os.PathLike) -> Path:
        """LoRS' by-products the common student protocol does not use: the learned step sizes and similarity."""

        tensors = {f"syn_lr.{g}": v.detach().cpu().reshape(1) for g, v in self.syn_lrs.items()}
        if self.similarity is not None:
            tensors["similarity"] = self.similarity().detach().cpu().contiguous()
            for name, p in self.similarity.named_parameters():
                tensors[f"similarity.{name}"] = p.detach().cpu().contiguous()
        save_file(tensors, str(path), metadata={"similarity": self.config.similarity})
        return Path(path)

    # ================================================================== checkpoints
    def _checkpoint_extras(self) -> dict[str, torch.Tensor]:
        extras = {f"syn_lr.{g}": v.reshape(1) for g, v in self.syn_lrs.items()}
        if self.similarity is not None:
            extras.update({f"similarity.{n}": p for n, p in self.similarity.named_parameters()})
        return extras

    def _restore_extras(self, tensors: dict[str, torch.Tensor]) -> None:
        for g, v in self.syn_lrs.items():
            v.copy_(tensors[f"syn_lr.{g}"].reshape(()))
        if self.similarity is not None:
            for n, p in self.similarity.named_parameters():
                p.copy_(tensors[f"similarity.{n}"])


# ============================================================================================== CLI
@dataclass
class TrajectoryBufferConfig(DatasetArguments):
    """``mdm-hf tm-buffer``: record the SGD expert trajectories trajectory matching needs (LoRS' ``buffer.py``).
    Field help doubles as ``--help``."""

    model_name_or_path: str = _f("openai/clip-vit-base-patch32", "Hub id or local dir of the anchor.")
    model_revision: str | None = _f(None, "Revision of the anchor on the Hub.")
    text_pooling: str = _f("auto", "Text feature pooling: auto | pooler | mean | last (see mdm_hf.models).")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the Hub.")
    validation_split: str | None = _f(
        "validation", "Split for the per-epoch recall in the manifest (None: skip)."
    )
    max_validation_images: int | None = _f(1000, "Score recall on at most N validation images.")
    num_experts: int = _f(2, "Expert trajectories (LoRS: 20 on Flickr30k).")
    num_epochs: int = _f(3, "Epochs per trajectory, a snapshot after each (LoRS: 10).")
    learning_rate: float = _f(0.1, "Constant SGD learning rate (LoRS: 0.1).")
    momentum: float = _f(0.0, "SGD momentum (LoRS: 0).")
    weight_decay: float = _f(0.0, "SGD weight decay.")
    batch_size: int = _f(128, "Images per SGD step (one caption each).")
    seed: int = _f(0, "Seed of expert 0; expert i uses seed + i.")
    output_dir: str = _f("trajectory_buffer", "Directory of the buffer (a full expert bank).")
    overwrite_output_dir: bool = _f(False, "Replace an existing, non-empty output_dir.")

    def __post_init__(self) -> None:
        self.validation_split = optional_split(self.validation_split)
        check_values(self, {"num_experts": self.num_experts >= 1, "num_epochs": self.num_epochs >= 1,
                            "learning_rate": self.learning_rate > 0, "batch_size": self.batch_size >= 1})  # fmt: skip


def buffer_main(argv: Sequence[str] | None = None) -> int:
    """``mdm-hf tm-buffer --model_name_or_path ... --dataset_name ... --output_dir buffer/``."""

    config = parse_dataclass_args(TrajectoryBufferConfig, argv, prog="mdm-hf tm-buffer")
    anchor = DualEncoder.from_pretrained(
        config.model_name_or_path, config.model_revision, config.text_pooling, config.trust_remote_code
    )
    validation = None
    if config.validation_split:
        val = load_split(config, config.validation_split, config.max_validation_images)
        validation = (preprocess_split_images(anchor, val), cached_text_features(anchor, val, config.cache_dir),
                      val.caption_to_image)  # fmt: skip
    out = record_trajectory_buffer(
        anchor, load_split(config), config.output_dir, num_experts=config.num_experts,
        num_epochs=config.num_epochs, learning_rate=config.learning_rate, momentum=config.momentum,
        weight_decay=config.weight_decay, batch_size=config.batch_size, seed=config.seed,
        cache_dir=config.cache_dir, validation=validation, overwrite=config.overwrite_output_dir,
    )  # fmt: skip
    print(f"Trajectory buffer ({config.num_experts} experts x {config.num_epochs} epochs) written to {out}; "
          f"use it with `mdm-hf tm --trajectory_buffer {out}`.")  # fmt: skip
    return 0


def tm_main(argv: Sequence[str] | None = None) -> int:
    """``mdm-hf tm --config file.yaml [--field value ...]``: distil with trajectory matching, save the set."""

    config = parse_dataclass_args(TrajectoryMatchingConfig, argv, prog="mdm-hf tm")
    synthetic = TrajectoryMatchingDistiller(config).distill()
    out = Path(config.output_dir) / "synthetic"
    synthetic.save_pretrained(out, overwrite=True)
    print(f"Synthetic set ({len(synthetic)} pairs) written to {out}; load it with load_dataset('{out}').")
    return 0
