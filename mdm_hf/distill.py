"""MDMDistiller: the distillation loop of MDM (arXiv 2605.23482, docs/method.md §4) on ``accelerate``.

Per iteration:

1. a mixed teacher -- ``k`` expert checkpoints merged by Model Stock interpolation (:mod:`mdm_hf.merge`) -- is
   installed into the anchor in place (``teacher_mode="fresh"``), or one of a fixed pool of mixed teachers whose
   real-side embeddings were computed once is reused (``teacher_mode="pooled"``);
2. a real batch is embedded without gradient (each process embeds its shard, then all are gathered, so every
   process sees the same global real batch);
3. a synthetic mini-batch ``(x~, e~)`` is embedded with gradient and the hypersphere matching loss
   (:class:`mdm_hf.losses.MDMLoss`) is minimised w.r.t. the synthetic pixels and text features only.

Every process holds the same synthetic tensors and draws the same synthetic mini-batch and teacher, so the loss
and its gradients are identical on all ranks; no gradient all-reduce is needed and the synthetic state never
diverges. Checkpoints hold everything needed to continue bit-for-bit (tensors, optimiser state, RNG state, step).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import accelerate
import torch
from accelerate import Accelerator

from .bank import load_expert_bank
from .blending import blend, draw_blend
from .config import MDMConfig, trackers
from .data import ImageCaptionSplit
from .distill_loop import DistillState, SyntheticSetDistiller, ValidationFn
from .losses import MDMLoss
from .merge import ExpertBank
from .models import DualEncoder
from .students import validation_hook
from .support import SupportProjection
from .training import finish_trackers, start_trackers

logger = logging.getLogger(__name__)

__all__ = ["MDMDistiller", "NonFiniteLossError", "StepTimings", "DistillState", "ValidationFn"]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN / inf; the last good state was saved before raising."""


@dataclass
class StepTimings:
    """Seconds spent in each part of one iteration (for the cost benchmark)."""

    merge: float = 0.0
    real: float = 0.0
    synthetic: float = 0.0
    loss: float = 0.0
    backward: float = 0.0
    total: float = 0.0


@contextmanager
def _timer(timings: StepTimings, name: str):
    start = time.perf_counter()
    yield
    setattr(timings, name, getattr(timings, name) + time.perf_counter() - start)


LR_SEARCH_DIR = "lr-search"


def search_learning_rate(distiller: MDMDistiller) -> MDMConfig:
    """The config with the best of ``config.lr_search`` (pixel learning rates; the text rate keeps its ratio to the
    pixel rate): each candidate runs ``lr_search_steps`` iterations from the same start, with the same teacher
    draws, and is scored once by the validation hook. Candidates' outputs go to ``output_dir/lr-search/``."""
    cfg, hook = distiller.config, distiller.validation_fn
    if hook is None:
        raise ValueError(
            "--lr_search needs the validation hook: set --eval_steps > 0 and a --validation_split."
        )
    ratio = cfg.lr_text / cfg.lr_pixels
    scores = {}
    for lr in cfg.lr_search:
        trial = replace(
            cfg, lr_pixels=lr, lr_text=lr * ratio, lr_search=None, max_steps=cfg.lr_search_steps,
            eval_steps=cfg.lr_search_steps, eval_on_start=False, early_stopping_patience=None, save_steps=0,
            output_dir=str(Path(cfg.output_dir) / LR_SEARCH_DIR / f"lr-{lr:g}"), overwrite_output_dir=True,
            report_to="none",
        )  # fmt: skip
        run = MDMDistiller(
            trial, hook, distiller.accelerator, teacher=distiller.teacher, expert_bank=distiller.expert_bank,
            train_data=distiller.train_data, text_features=distiller.text_features, pixel_cache=distiller.pixel_cache,
        )  # fmt: skip
        run.distill()
        scores[lr] = run.state.history[-1]["mean"]
        logger.info("lr_search: lr_pixels=%g lr_text=%g -> validation mean %.2f", lr, lr * ratio, scores[lr])
    best = max(scores, key=scores.get)
    logger.info(
        "lr_search: continuing with lr_pixels=%g, lr_text=%g (scores %s)",
        best,
        best * ratio,
        {lr: round(s, 2) for lr, s in scores.items()},
    )
    return replace(cfg, lr_pixels=best, lr_text=best * ratio)


class MDMDistiller(SyntheticSetDistiller):
    """Distill an image-caption dataset into ``config.num_pairs`` synthetic pairs with MDM.

    Args:
        config: the run's :class:`~mdm_hf.config.MDMConfig`.
        validation_fn: called as ``validation_fn(synthetic_set, step)`` every ``eval_steps``; returns metrics with a
            ``"mean"`` entry (higher is better) used for early stopping and keeping the best state. It must score on
            a validation split, never test (:func:`mdm_hf.students.student_validation_fn` builds one; when None and ``eval_steps > 0``, the config's
            student fields build it (:func:`mdm_hf.students.validation_hook`)).
        accelerator: an ``accelerate.Accelerator``; one is built from the config when omitted.
        teacher / expert_bank / train_data / text_features / pixel_cache: pre-loaded pieces (tests, benchmarks);
            whatever is None is loaded from the config in :meth:`setup`.
    """

    def __init__(
        self,
        config: MDMConfig,
        validation_fn: ValidationFn | None = None,
        accelerator: Accelerator | None = None,
        teacher: DualEncoder | None = None,
        expert_bank: ExpertBank | None = None,
        train_data: ImageCaptionSplit | None = None,
        text_features: torch.Tensor | None = None,
        pixel_cache: torch.Tensor | None = None,
    ) -> None:
        accelerator = accelerator or Accelerator(
            log_with=trackers(config.report_to), project_dir=config.output_dir
        )
        super().__init__(
            config, validation_fn, accelerator, teacher=teacher, train_data=train_data,
            text_features=text_features, pixel_cache=pixel_cache,
        )  # fmt: skip
        self.expert_bank = expert_bank

    # ================================================================== set-up
    def setup(self) -> None:
        """Load teacher, data, cached text features and experts; everything the loop needs."""
        if self.is_set_up:
            return
        cfg, acc = self.config, self.accelerator
        self._load_teacher_and_data(acc.device)
        if self.expert_bank is None and cfg.expert_bank is not None:
            self.expert_bank = load_expert_bank(
                cfg.expert_bank, self.teacher, revision=cfg.expert_bank_revision
            )
        if self.expert_bank is not None:
            self.expert_bank = self.expert_bank.to(acc.device)
        contrastive = self.teacher.contrastive_loss_type if cfg.contrastive == "auto" else cfg.contrastive
        self.loss_fn = MDMLoss(
            lambda_contrastive=cfg.lambda_contrastive,
            lambda_agreement=cfg.lambda_agreement,
            lambda_discrepancy=cfg.lambda_discrepancy,
            sigma=cfg.sigma,
            temperature=cfg.temperature,
            contrastive=contrastive,
        )
        if (
            self.validation_fn is None
        ):  # built now: the students' vision tower is the anchor's, before any merge
            self.validation_fn = validation_hook(cfg, teacher=self.teacher)
        self.is_set_up = True

    # ================================================================== real side
    @torch.no_grad()
    def embed_real(
        self, caption_indices: torch.Tensor, batch_size: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_v, z_t)`` of real pairs under the currently installed teacher."""
        zv, zt = [], []
        for chunk in caption_indices.split(batch_size):
            zv.append(self.teacher.image_embeds(self.real_pixels(chunk)))
            zt.append(self.teacher.project_text(self.text_features[chunk.cpu()].to(self.accelerator.device)))
        return torch.cat(zv), torch.cat(zt)

    # ================================================================== teachers
    def _draw_teacher(self, generator: torch.Generator) -> dict:
        """Install a fresh mixed teacher (no-op without an expert bank). Returns merge info for logging."""
        if self.expert_bank is None:
            return {}
        return self.expert_bank.draw(
            self.teacher.model,
            generator,
            k=self.config.experts_per_teacher,
            max_start_epoch=self.config.max_start_epoch,
            alpha=self.config.merge_alpha,
            method=self.config.merge_method,
        )

    def build_teacher_pool(self) -> None:
        """Pooled mode: P mixed teachers, their merged tensors and the embeddings of (a subset of) real pairs."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed + 7919)  # independent of the loop's generator: resumable
        n = self.train_data.num_captions
        subset = torch.arange(n)
        if cfg.pool_real_size is not None and cfg.pool_real_size < n:
            subset = torch.randperm(n, generator=gen)[: cfg.pool_real_size].sort().values
        self.pool_subset = subset
        self.pool = []
        for _ in range(cfg.teacher_pool_size if self.expert_bank is not None else 1):
            state = None
            if self.expert_bank is not None:
                draws = self.expert_bank.sample(gen, cfg.experts_per_teacher, cfg.max_start_epoch)
                state, ratios = self.expert_bank.merged_state(draws, cfg.merge_alpha, cfg.merge_method)
                self.expert_bank.install(self.teacher.model, state)
            zv, zt = self.embed_real(subset)
            self.pool.append({"state": state, "zv": zv.cpu(), "zt": zt.cpu()})

    # ================================================================== initialisation (MDM §1)
    def initialize(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Start ``x~, e~`` from the real pairs ``indices`` -- by default the joint-space k-means choice (MDM §1,
        ``config.init``) under a mixed teacher, as the loop will see the data -- and build the optimiser."""
        cfg = self.config
        self.setup()
        if indices is None:
            self._draw_teacher(torch.Generator().manual_seed(cfg.seed))
            indices = self.select_initial_pairs()
        self.start_from(indices)
        self.support = SupportProjection.build(
            cfg.text_norm, cfg.pixel_range, self.syn_text.detach(), self.text_features,
            self.teacher.image_mean, self.teacher.image_std,
        )  # fmt: skip
        self.support(self.syn_pixels, self.syn_text)  # a real start can sit outside the box by rounding
        self._build_optimizer()
        self._generator = torch.Generator().manual_seed(cfg.seed + 1)  # the loop's draws: teachers, batches
        return self.source_indices

    def _build_optimizer(self) -> None:
        cfg = self.config
        groups = [
            {"params": [self.syn_pixels], "lr": cfg.lr_pixels},
            {"params": [self.syn_text], "lr": cfg.lr_text},
        ]
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, momentum=cfg.momentum)
        else:
            self.optimizer = torch.optim.Adam(groups, betas=(cfg.adam_beta1, cfg.adam_beta2))

    # ================================================================== one iteration
    def _real_batch(self, gen: torch.Generator, timings: StepTimings, pool_entry: dict | None):
        """The global real batch's embeddings; each process embeds its contiguous shard, then all are gathered."""
        acc, cfg = self.accelerator, self.config
        n = len(self.pool_subset) if pool_entry is not None else self.train_data.num_captions
        batch = torch.randint(0, n, (cfg.real_batch_size,), generator=gen)
        with _timer(timings, "real"):
            if pool_entry is not None:  # cached: the real side costs an index lookup, whatever the set size
                dev = acc.device
                return pool_entry["zv"][batch].to(dev), pool_entry["zt"][batch].to(dev)
            shard = batch.chunk(acc.num_processes)[acc.process_index] if acc.num_processes > 1 else batch
            zv, zt = self.embed_real(shard)
            if acc.num_processes > 1:
                zv, zt = acc.gather(zv), acc.gather(zt)
            return zv, zt

    def training_step(self, gen: torch.Generator) -> tuple[dict, StepTimings]:
        """One MDM iteration: mixed teacher, real batch, synthetic mini-batch, loss, clipped update."""
        cfg = self.config
        timings = StepTimings()
        start = time.perf_counter()
        info: dict = {}
        pool_entry = None
        with _timer(timings, "merge"):
            if cfg.teacher_mode == "pooled":
                pool_entry = self.pool[int(torch.randint(0, len(self.pool), (1,), generator=gen))]
                if pool_entry["state"] is not None:
                    self.expert_bank.install(self.teacher.model, pool_entry["state"])
            else:
                info = self._draw_teacher(gen)
        real_zv, real_zt = self._real_batch(gen, timings, pool_entry)
        syn_idx = torch.randperm(cfg.num_pairs, generator=gen)[: min(cfg.syn_batch_size, cfg.num_pairs)]
        syn_idx = syn_idx.to(self.syn_pixels.device)
        with _timer(timings, "synthetic"):
            syn_zv, syn_zt, contrastive_pairs = self._embed_synthetic(syn_idx, gen)
        with _timer(timings, "loss"):
            out = self._matching_loss(real_zv, real_zt, syn_zv, syn_zt, contrastive_pairs)
        if not torch.isfinite(out.loss):
            self._fail_non_finite("loss", out)
        with _timer(timings, "backward"):
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            params = [self.syn_pixels, self.syn_text]
            if cfg.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            if not torch.isfinite(grad_norm):
                self._fail_non_finite("gradient norm", out)
            self.optimizer.step()
            self.support(self.syn_pixels, self.syn_text)  # projected step: stay where real data lives
        timings.total = time.perf_counter() - start
        logs = {
            "loss": out.loss.item(),
            "loss/contrastive": float(out.contrastive.detach()),
            "loss/agreement": float(out.agreement.detach()),
            "loss/discrepancy": float(out.discrepancy.detach()),
            "grad_norm": float(grad_norm),
            "time/iteration": timings.total,
        }
        if "mean_t" in info:
            logs["merge/mean_t"] = info["mean_t"]
        return logs, timings

    def _embed_synthetic(self, syn_idx: torch.Tensor, gen: torch.Generator):
        """``(z_v, z_t, contrastive_pairs)`` of the synthetic mini-batch ``syn_idx``.

        With ``blend_alpha > 0`` the pairs are blended (:mod:`mdm_hf.blending`, docs/method.md §7) before the
        projections -- the vision tower's pooled output and the text feature ``e~`` -- with one draw from the
        loop's generator (so a resumed run redraws it). ``blend_terms="all"`` returns the blended pairs as the
        synthetic side of every term; ``"contrastive"`` keeps the plain pairs for the GKE terms and returns the
        blended ones as ``contrastive_pairs`` (None without blending: no draw is made, the run is unchanged).
        """
        cfg = self.config
        pixels, text = self.syn_pixels[syn_idx], self.syn_text[syn_idx]
        if cfg.blend_alpha == 0:
            return self.teacher.image_embeds(pixels), self.teacher.project_text(text), None
        image_features = self.teacher.image_features(pixels)
        lam, perm = draw_blend(len(syn_idx), cfg.blend_alpha, gen)
        blended_image, blended_text = blend((image_features, text), lam, perm)
        blended = self.teacher.project_image(blended_image), self.teacher.project_text(blended_text)
        if cfg.blend_terms == "all":
            return *blended, None
        return self.teacher.project_image(image_features), self.teacher.project_text(text), blended

    @torch.no_grad()
    def objective(self, real_indices: torch.Tensor) -> float:
        """The MDM loss of the whole synthetic set against fixed real pairs under the installed teacher.

        A deterministic yardstick (no sampling) for checking that distillation lowers the objective.
        """
        real_zv, real_zt = self.embed_real(real_indices)
        syn_zv, syn_zt = self.teacher(self.syn_pixels, self.syn_text)
        return float(self._matching_loss(real_zv, real_zt, syn_zv, syn_zt).loss)

    def _matching_loss(self, real_zv, real_zt, syn_zv, syn_zt, contrastive_pairs=None):
        """docs/method.md §3 under the installed teacher (its own scale and bias for the SigLIP sigmoid loss)."""
        scale, bias = self.teacher.logit_scale, self.teacher.logit_bias
        return self.loss_fn(
            real_zv,
            real_zt,
            syn_zv,
            syn_zt,
            logit_scale=scale,
            logit_bias=bias,
            contrastive_pairs=contrastive_pairs,
        )

    def _fail_non_finite(self, what: str, out) -> None:
        path = self.save_checkpoint(
            self._generator
        )  # the tensors are still the last good ones: nothing stepped
        raise NonFiniteLossError(
            f"The {what} became non-finite at step {self.state.step} (loss={out.loss.item()}, contrastive="
            f"{float(out.contrastive.detach())}, agreement={float(out.agreement.detach())}, "
            f"discrepancy={float(out.discrepancy.detach())}). "
            f"The last good state is saved in {path}. Lower lr_pixels / lr_text, keep max_grad_norm set, or check "
            "the teacher and data for NaNs; resume with --resume_from_checkpoint."
        )

    # ================================================================== loop hooks
    progress_name = "MDM"
    config_file = "mdm_config.json"
    output_files = (LR_SEARCH_DIR,)

    def distill(self):
        """The run (:meth:`SyntheticSetDistiller.distill`), after the learning-rate search when ``lr_search`` asks
        for one."""
        if self.config.lr_search and not self.config.resume_from_checkpoint:
            self._prepare_output_dir()  # before the candidates write into it
            self.setup()
            self.config = search_learning_rate(self)
        elif self.config.lr_search:
            raise ValueError(
                "--lr_search with --resume_from_checkpoint: resume with the learning rates the search chose "
                f"(lr_pixels / lr_text in {self.config.output_dir}/{self.config_file}) instead of searching again."
            )
        return super().distill()

    def _before_loop(self) -> None:
        cfg = self.config
        if cfg.teacher_mode == "pooled":
            self.build_teacher_pool()
        start_trackers(self.accelerator, cfg.report_to, "mdm", cfg.to_dict())

    def _after_loop(self) -> None:
        finish_trackers(self.accelerator)

    def _log(self, logs: dict, step: int) -> None:
        self.accelerator.log(logs, step=step)

    # ================================================================== output
    def provenance(self) -> dict:
        """Where the set came from: ids and revisions, the expert bank, the full config, library versions."""

        cfg = self.config
        out = self._common_provenance("MDM")
        out.update(expert_bank=cfg.expert_bank, expert_bank_revision=cfg.expert_bank_revision)
        out["versions"]["accelerate"] = accelerate.__version__
        return out
