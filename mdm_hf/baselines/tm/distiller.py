"""The trajectory-matching distiller (MTT-VL / LoRS / RepBlend): what one iteration does, on the shared loop.

Each iteration (MTT, arXiv 2203.11932, §3; MTT-VL, arXiv 2308.07545; LoRS, arXiv 2406.03793, §4):

1. draw an expert and a start epoch ``s`` uniform in ``{0, ..., max_start_epoch − 1}``; the student starts at
   ``θ_0 = θ*_s`` and aims at ``θ*_{s+M}``, ``M = expert_epochs``;
2. take ``N = syn_steps`` SGD steps on synthetic mini-batches ``B_i`` of the pairs ``(x~, e~)``, with a learnable
   step size per branch ``b`` (image: vision tower + visual projection; text: text projection)::

       θ_{i+1} = θ_i − η_b ∇_θ ℓ(θ_i; B_i)

   ``ℓ`` is a contrastive loss of the embeddings of ``B_i`` against targets ``T`` (the identity, or LoRS' learned
   similarity matrix ``S[B_i, B_i]``). RepBlend (``trainable="projections"``, ``blend_alpha > 0``): ``θ`` is the two
   projections alone, on the anchor's frozen image features of ``x~`` (the gradient reaches the pixels through the
   frozen encoder, as in RepBlend's released code), and the features of ``B_i`` are blended before the projections
   (:mod:`.blending`);
3. minimise over ``x~``, ``e~``, ``η`` (and ``S``) the normalised parameter distance, per branch::

       L = Σ_b ||θ_N^b − θ*_{s+M}^b||² / ||θ*_s^b − θ*_{s+M}^b||²        (merge_branches: Σ_b num / Σ_b den)

The loop, validation, checkpoints and output are :class:`~mdm_hf.distill_loop.SyntheticSetDistiller`'s, the same
as MDM's (``docs/method.md`` §4), so the two are measured on equal terms. The output is the same
:class:`~mdm_hf.synthetic.SyntheticSet`; LoRS' learned similarity matrix and step sizes are written next to the
checkpoints (``tm_extras.safetensors``) -- the common student protocol (``docs/method.md`` §5) trains on the pairs
with plain InfoNCE and does not use them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from ... import __version__
from ...distill_loop import SyntheticSetDistiller, ValidationFn
from ...models import DualEncoder
from .blending import Blend, BlendedDualEncoder, SyntheticMiniBatch, draw_blend
from .buffer import TrajectoryBuffer, branch_of
from .config import TrajectoryMatchingConfig
from .losses import FullSimilarity, LowRankSimilarity, normalized_parameter_distance, soft_contrastive_loss
from .tracking import start_trackers
from .unroll import unrolled_matching_gradients

logger = logging.getLogger(__name__)

__all__ = ["EXTRAS_FILE", "TMStepTimings", "TrajectoryMatchingDistiller"]

EXTRAS_FILE = "tm_extras.safetensors"
# What each kind of trajectory covers, in the words of the error that refuses a buffer of the other kind.
_COVERS = {
    "full": "the vision tower and both projections (MTT-VL / LoRS)",
    "projections": "the image and text projections only (RepBlend)",
}


@dataclass
class TMStepTimings:
    """Seconds spent in each part of one iteration (for the cost benchmark)."""

    load: float = 0.0  # reading the start / target checkpoints
    unroll: float = 0.0  # the inner SGD steps and the meta-gradient (one autograd pass; TESLA: both passes)
    update: float = 0.0  # the outer optimiser step
    total: float = 0.0


class TrajectoryMatchingDistiller(SyntheticSetDistiller):
    """Distil ``config.num_pairs`` synthetic pairs by matching expert trajectories (MTT-VL / LoRS / RepBlend).

    Args:
        config: the run's :class:`~mdm_hf.baselines.tm.TrajectoryMatchingConfig`.
        validation_fn: ``validation_fn(synthetic_set, step) -> metrics`` with a ``"mean"`` (higher is better), every
            ``eval_steps``; it must score on a validation split (:func:`mdm_hf.evaluation.student_validation_fn`).
        teacher / train_data / buffer / text_features / pixel_cache: pre-loaded pieces (tests, benchmarks); loaded
            from the config when None.

    Single process: the unrolled steps run on one device (``config.device``); ``config.report_to`` logs through
    accelerate's trackers (:mod:`.tracking`).
    """

    progress_name = "TM"
    config_file = "tm_config.json"
    output_files = (EXTRAS_FILE,)

    def __init__(
        self,
        config: TrajectoryMatchingConfig,
        validation_fn: ValidationFn | None = None,
        teacher: DualEncoder | None = None,
        train_data=None,
        buffer: TrajectoryBuffer | None = None,
        *,
        text_features: torch.Tensor | None = None,
        pixel_cache: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            config, validation_fn, accelerator=None, teacher=teacher, train_data=train_data,
            text_features=text_features, pixel_cache=pixel_cache,
        )  # fmt: skip
        self.buffer = buffer
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tracking = None  # an Accelerator that only logs (report_to), started in _before_loop

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
        self._check_buffer()
        self.names = list(self.buffer.names)
        self.groups: dict[str, list[str]] = {"image": [], "text": []}
        for name in self.names:
            self.groups[branch_of(name)].append(name)
        self.groups = {g: n for g, n in self.groups.items() if n}
        self.student = BlendedDualEncoder(self.teacher)  # once: the unrolled steps create no module
        scale = (
            self.teacher.logit_scale.detach()
            if cfg.temperature is None
            else torch.tensor(1.0 / cfg.temperature)
        )
        self.logit_scale = scale.float().to(self.device)
        self.is_set_up = True

    def _check_buffer(self) -> None:
        """The buffer must cover what the run matches (``trainable``) and the schedule must fit its shortest
        trajectory; a non-SGD buffer only warns."""
        cfg = self.config
        if self.buffer.trainable != cfg.trainable:
            fix = (
                "Record one with `mdm-hf tm-buffer --trainable projections`, or run a full-network preset (lors)."
                if cfg.trainable == "projections"
                else "Use it with --preset repblend (or --trainable projections), or record a full buffer with "
                "`mdm-hf tm-buffer --trainable full`."
            )
            where = getattr(self.buffer, "directory", cfg.trajectory_buffer)
            raise ValueError(
                f"The trajectory buffer '{where}' records {_COVERS[self.buffer.trainable]}, but this run "
                f"(preset={cfg.preset!r}, trainable={cfg.trainable!r}) matches trajectories of "
                f"{_COVERS[cfg.trainable]}. {fix}"
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

    # ================================================================== initialisation
    def initialize(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Start from ``indices`` (default: ``config.init`` under the anchor), set ``x~, e~``, the step sizes, the
        similarity matrix and the optimiser."""
        cfg = self.config
        self.setup()
        self.start_from(self.select_initial_pairs() if indices is None else indices)
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
        self.similarity = self._build_similarity(torch.Generator().manual_seed(cfg.seed + 104729))
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
        return self.source_indices

    def _build_similarity(self, generator: torch.Generator) -> nn.Module | None:
        """LoRS' similarity matrix of ``config.similarity`` on ``device`` (None: identity targets, MTT-VL)."""
        cfg = self.config
        if cfg.similarity == "lowrank":
            similarity: nn.Module = LowRankSimilarity(cfg.num_pairs, cfg.sim_rank, cfg.sim_alpha, generator)
        elif cfg.similarity == "full":
            similarity = FullSimilarity(cfg.num_pairs)
        else:
            return None
        return similarity.to(self.device)

    @property
    def trainable(self) -> list[torch.Tensor]:
        """What the outer loop optimises: pixels, text features, step sizes, similarity parameters."""
        sim = list(self.similarity.parameters()) if self.similarity is not None else []
        return [self.syn_pixels, self.syn_text, *self.syn_lrs.values(), *sim]

    # ================================================================== one iteration
    def sample_batches(self, generator: torch.Generator) -> list[SyntheticMiniBatch]:
        """``syn_steps`` mini-batches: consecutive chunks of a permutation, reshuffled when it runs out (LoRS), each
        with its blend when ``blend_alpha > 0`` (RepBlend: one ``λ`` and permutation per step)."""
        cfg = self.config
        k, b = cfg.num_pairs, min(cfg.mini_batch_size, cfg.num_pairs)
        perm, pos, out = torch.randperm(k, generator=generator), 0, []
        for _ in range(cfg.syn_steps):
            if pos + b > k:
                perm, pos = torch.randperm(k, generator=generator), 0
            blend = draw_blend(b, cfg.blend_alpha, generator)
            out.append(SyntheticMiniBatch(perm[pos : pos + b].to(self.device), blend))
            pos += b
        return out

    def sample_trajectory(self, generator: torch.Generator) -> tuple[int, int]:
        """``(expert, start_epoch)``: expert uniform, start uniform in ``0 .. max_start_epoch − 1``."""
        expert = int(torch.randint(self.buffer.num_experts, (1,), generator=generator))
        start = int(torch.randint(self.config.max_start_epoch, (1,), generator=generator))
        return expert, start

    def segment(self, expert: int, start: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(θ*_s, θ*_{s+M})`` of ``expert`` on ``device``: where the student starts and what it aims at."""
        end = start + self.config.expert_epochs
        return (
            {n: t.to(self.device) for n, t in self.buffer.checkpoint(expert, start).items()},
            {n: t.to(self.device) for n, t in self.buffer.checkpoint(expert, end).items()},
        )

    def embed(
        self,
        params: Mapping[str, torch.Tensor],
        pixels: torch.Tensor,
        text_features: torch.Tensor,
        blend: Blend | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_v, z_t)`` of the teacher with its trained tensors replaced by ``params`` (``functional_call``), the
        features blended by ``blend`` (a :class:`~.blending.Blend`) before the projections when one is given."""
        return functional_call(
            self.student, {f"encoder.model.{n}": p for n, p in params.items()}, (pixels, text_features, blend)
        )

    def inner_loss(
        self, params: Mapping[str, torch.Tensor], batch: SyntheticMiniBatch | torch.Tensor
    ) -> torch.Tensor:
        """``ℓ(θ; B)``: the contrastive loss of the synthetic mini-batch ``B`` under parameters ``θ``, blended by the
        batch's own blend (a bare index tensor: no blend)."""
        if isinstance(batch, torch.Tensor):
            batch = SyntheticMiniBatch(batch)
        idx = batch.indices
        zv, zt = self.embed(params, self.syn_pixels[idx], self.syn_text[idx], batch.blend)
        if self.similarity is not None:
            targets = self.similarity(idx)
        else:
            targets = torch.eye(len(idx), device=zv.device, dtype=zv.dtype)
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
        """The normalised parameter distance per branch (:func:`~.losses.normalized_parameter_distance`)."""
        return normalized_parameter_distance(
            student_end, expert_start, expert_target, self.groups, self.config.merge_branches
        )

    def training_step(self, generator: torch.Generator) -> tuple[dict, TMStepTimings]:
        """Draw a trajectory segment, unroll ``syn_steps`` SGD steps, match, update the synthetic set."""
        timings = TMStepTimings()
        t0 = time.perf_counter()
        expert, start = self.sample_trajectory(generator)
        batches = self.sample_batches(generator)
        start_params, target = self.segment(expert, start)
        t1 = time.perf_counter()
        timings.load = t1 - t0
        parts: dict[str, torch.Tensor] = {}

        def meta(end: dict[str, torch.Tensor]) -> torch.Tensor:
            loss, branch_parts = self.matching_loss(end, start_params, target)
            parts.update(branch_parts)
            return loss

        loss, _, grads = unrolled_matching_gradients(
            self.inner_loss,
            start_params,
            self.step_sizes(),
            batches,
            meta,
            self.trainable,
            mode=self.config.unroll,
        )
        t2 = time.perf_counter()
        timings.unroll = t2 - t1
        self._raise_if_non_finite(loss, grads)
        grad_norm = self._apply_gradients(grads)
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

    def _raise_if_non_finite(self, loss: torch.Tensor, grads: list[torch.Tensor]) -> None:
        """Stop with the last good state checkpointed when the matching loss or a gradient is not finite."""
        if torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads):
            return
        path = self.save_checkpoint(self._generator)
        raise FloatingPointError(
            f"The matching loss or its gradient became non-finite at step {self.state.step} (loss={float(loss)}, "
            f"step sizes={ {g: float(v.detach()) for g, v in self.syn_lrs.items()} }). The last good state is in {path}. "
            "Lower lr_pixels / lr_text / lr_lr, set max_grad_norm or min_syn_lr, and resume."
        )

    def _apply_gradients(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """One outer SGD step (clip, step, clamp the step sizes); returns the data gradients' norm before clipping."""
        cfg = self.config
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
        return grad_norm

    # ================================================================== loop hooks and output
    def _before_loop(self) -> None:
        cfg = self.config
        self.tracking = start_trackers(
            cfg.report_to, cfg.output_dir, self.progress_name.lower(), cfg.to_dict()
        )

    def _log(self, logs: dict, step: int) -> None:
        super()._log(logs, step)
        if self.tracking is not None:
            self.tracking.log(logs, step=step)

    def _after_loop(self) -> None:
        self.save_extras(Path(self.config.output_dir) / EXTRAS_FILE)
        if self.tracking is not None:
            self.tracking.end_training()

    def method_name(self) -> str:
        """What made the set, as provenance and the students' tables name it."""
        cfg = self.config
        if cfg.blend_alpha > 0:
            name = "RepBlend (trajectory matching + representation blending)"
        elif cfg.similarity != "none":
            name = "LoRS (trajectory matching + learned similarity)"
        else:
            name = "MTT-VL (trajectory matching)"
        if cfg.blend_alpha == 0 and cfg.trainable == "projections":
            name += " on projection trajectories"
        return name

    def provenance(self) -> dict:
        """Where the set came from: ids, the buffer, the full config, the learned step sizes, library versions."""
        cfg = self.config
        out = self._common_provenance(self.method_name())
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
