"""What every distiller of this package shares: the outer loop, validation and early stopping, checkpoints, output.

:class:`~mdm_hf.distill.MDMDistiller` and the trajectory-matching baseline
(:class:`~mdm_hf.baselines.tm.TrajectoryMatchingDistiller`) differ in one thing: what a training
step does. Both learn synthetic pixels ``x~`` and text features ``e~`` initialised from real pairs, keep the best
state under a validation hook, checkpoint to resume bit for bit, and return the same
:class:`~mdm_hf.synthetic.SyntheticSet`. That common part lives here once, so the two are measured on equal terms.

A subclass provides ``setup()``, ``initialize(indices=None)`` (calls :meth:`start_from`, then sets ``optimizer`` and
``_generator``), ``training_step(generator) -> (logs, timings)`` and ``provenance()``; it may extend the hooks
``_before_loop`` / ``_after_loop`` / ``_log`` and the checkpoint extras. The real side every method needs --
:meth:`real_pixels`, :meth:`embed_all_pairs`, :meth:`select_initial_pairs` -- is public here, so benchmarks and
subclasses use it without reaching into private state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm

from . import __version__
from .checkpointing import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    check_resume_config,
    flatten_optimizer_state,
    is_checkpoint_dir,
    prepare_output_dir,
    read_checkpoint,
    resume_candidates,
    write_checkpoint,
)
from .data import (
    DataError,
    cached_text_features,
    embed_pairs,
    image_pixels,
    load_split,
    preprocess_split_images,
)
from .models import DualEncoder
from .selection import select_pairs, selection_features
from .synthetic import SyntheticSet

logger = logging.getLogger(__name__)

ValidationFn = Callable[["object", int], dict]  # (SyntheticSet, step) -> metrics with a "mean" key


@dataclass
class DistillState:
    """What changes during the run besides the tensors: kept in ``trainer_state.json``."""

    step: int = 0
    best_score: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    distill_seconds: float = 0.0  # sum of the iterations' seconds (validation and checkpoints excluded)
    history: list = field(default_factory=list)


class SyntheticSetDistiller:
    """Base of the distillers: the loop, the validation hook, checkpoints and the :class:`SyntheticSet` output.

    Args:
        config: a :class:`~mdm_hf.config.DistillRunArguments` subclass that also carries the model fields.
        validation_fn: ``validation_fn(synthetic_set, step) -> metrics`` with a ``"mean"`` entry (higher is better).
        accelerator: an ``accelerate.Accelerator`` (None: a single process on ``device``).
        teacher / train_data / text_features / pixel_cache: pre-loaded pieces (tests, benchmarks); whatever is None
            is loaded from the config in :meth:`setup`.
    """

    progress_name = "distill"  # the progress bar's label
    config_file = "config.json"  # the run's config, written to output_dir
    output_files: tuple[str, ...] = ()  # other files a run writes into output_dir (besides checkpoints)

    def __init__(
        self,
        config,
        validation_fn: ValidationFn | None = None,
        accelerator=None,
        *,
        teacher: DualEncoder | None = None,
        train_data=None,
        text_features: torch.Tensor | None = None,
        pixel_cache: torch.Tensor | None = None,
    ) -> None:
        self.config = config
        self.validation_fn = validation_fn
        self.accelerator = accelerator
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")
        self.teacher = teacher
        self.train_data = train_data
        self.text_features = text_features
        self.pixel_cache = pixel_cache
        self.is_set_up = False
        self._output_ready = False
        self.state = DistillState()
        self.timings: list = []

    # ================================================================== what a subclass provides
    def setup(self) -> None:
        raise NotImplementedError

    def initialize(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Start the synthetic set from ``indices`` (real pair indices; None: :meth:`select_initial_pairs`) and
        build the optimiser. Returns the chosen indices."""
        raise NotImplementedError

    def training_step(self, generator: torch.Generator) -> tuple[dict, object]:
        raise NotImplementedError

    def provenance(self) -> dict:
        raise NotImplementedError

    def _before_loop(self) -> None:
        """After set-up and resume, before the first step (MDM: the teacher pool, trackers)."""

    def _after_loop(self) -> None:
        """After the last checkpoint (MDM: close trackers; TM: LoRS' extras)."""

    def _log(self, logs: dict, step: int) -> None:
        shown = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in logs.items()}
        logger.info("%s step %d: %s", self.progress_name, step, shown)

    def _checkpoint_extras(self) -> dict[str, torch.Tensor]:
        """Tensors besides the synthetic set that a checkpoint must hold (TM: step sizes, similarity)."""
        return {}

    def _restore_extras(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`_checkpoint_extras` saved."""

    # ================================================================== processes
    @property
    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def _wait_for_everyone(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    # ================================================================== set-up
    def _load_teacher_and_data(self, device: torch.device | str) -> None:
        """The frozen teacher on ``device``, the train split (checked against the budget), its cached text
        features ``e = E_t(c)`` and, when the split is small enough, its preprocessed pixels."""
        cfg = self.config
        if self.teacher is None:
            self.teacher = DualEncoder.from_pretrained(
                cfg.model_name_or_path, cfg.model_revision, cfg.text_pooling, cfg.trust_remote_code
            )
        self.teacher.to(device).eval()
        self.teacher.requires_grad_(False)  # only the synthetic tensors are optimised
        if self.train_data is None:
            self.train_data = load_split(cfg)
        data = self.train_data
        if cfg.num_pairs > data.num_captions:
            raise ValueError(
                f"num_pairs={cfg.num_pairs} is larger than the dataset ({data.num_captions} pairs in split "
                f"'{data.split}' of {data.name}). Lower num_pairs or use a larger split."
            )
        if self.text_features is None:
            first = self.accelerator.main_process_first() if self.accelerator is not None else nullcontext()
            with first:  # rank 0 fills the cache, the others read it
                self.text_features = cached_text_features(
                    self.teacher, data, cfg.cache_dir, progress=self.is_main_process
                )
        if self.pixel_cache is None and data.num_images <= cfg.max_cached_images:
            self.pixel_cache = preprocess_split_images(self.teacher, data)

    # ================================================================== the real side and the start
    def real_pixels(self, caption_indices: torch.Tensor) -> torch.Tensor:
        """Normalised pixels of the images of the given real pairs, on ``device``."""
        image_indices = self.train_data.caption_to_image[caption_indices.cpu()]
        return image_pixels(self.teacher, self.train_data, image_indices, self.pixel_cache).to(self.device)

    def embed_all_pairs(self, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_v, z_t)`` of every real pair under the installed teacher (CPU)."""
        return embed_pairs(self.teacher, self.train_data, self.text_features, self.pixel_cache, batch_size)

    def select_initial_pairs(self) -> torch.Tensor:
        """``num_pairs`` real pair indices by ``config.init`` (MDM §1: joint-space k-means) under the installed
        teacher."""
        cfg = self.config
        if cfg.init == "random":
            features = torch.zeros(self.train_data.num_captions, 1)
        else:
            features = selection_features(cfg.init, *self.embed_all_pairs())
        return select_pairs(cfg.init, features, cfg.num_pairs, cfg.seed).cpu().long()

    def start_from(self, indices: torch.Tensor) -> None:
        """``x~ <- x``, ``e~ <- e`` of the real pairs ``indices`` (leaf tensors that require a gradient)."""
        indices = indices.cpu().long()
        self.source_indices = indices
        self.syn_pixels = self.real_pixels(indices).detach().clone().requires_grad_(True)
        self.syn_text = self.text_features[indices].to(self.device).clone().requires_grad_(True)

    # ================================================================== the loop
    def _current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU copies of the synthetic tensors now."""
        return self.syn_pixels.detach().cpu().clone(), self.syn_text.detach().cpu().clone()

    def distill(self):
        """Run the whole distillation and return the best :class:`~mdm_hf.synthetic.SyntheticSet`.

        With a validation hook, "best" is the state with the highest validation mean; without one, the last state.
        A run that fails before writing anything leaves no empty ``output_dir`` behind.
        """
        out = Path(self.config.output_dir)
        created = not out.exists()
        try:
            return self._distill()
        except BaseException:
            if created and self.is_main_process and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            raise

    def _distill(self):
        cfg = self.config
        self._prepare_output_dir()
        self.setup()
        self.initialize()
        self._best = self._current()
        self._resume()
        self._before_loop()
        if self.is_main_process:
            cfg.save(Path(cfg.output_dir) / self.config_file)
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, desc=self.progress_name,
                   disable=not self.is_main_process)  # fmt: skip
        stop = False
        if self.validation_fn is not None and cfg.eval_on_start and self.state.step == 0:
            stop = self._evaluate(0)
        while self.state.step < cfg.max_steps and not stop:
            stop = self._step(bar)
        bar.close()
        if self.validation_fn is None:
            self._best = self._current()
        self.save_checkpoint(self._generator)
        self._after_loop()
        return self.synthetic_set(*self._best)

    def _step(self, bar) -> bool:
        """One iteration with its logging, validation and checkpoint; True when early stopping says stop. A data
        error (an unreadable image, a bad caption) saves the last good state before it is raised."""
        cfg = self.config
        before = self._generator.get_state()
        try:
            logs, timings = self.training_step(self._generator)
        except DataError as err:
            self._generator.set_state(before)  # resuming redraws this very batch
            path = self.save_checkpoint(self._generator)
            raise DataError(
                f"{err} The last good state (step {self.state.step}) is saved in {path}; after fixing the data, "
                "resume with --resume_from_checkpoint latest."
            ) from err
        self.state.step += 1
        self.state.distill_seconds += timings.total
        self.timings.append(timings)
        bar.update(1)
        step = self.state.step
        if cfg.logging_steps and step % cfg.logging_steps == 0:
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            self._log(logs, step)
        stop = False
        if self.validation_fn is not None and cfg.eval_steps and step % cfg.eval_steps == 0:
            stop = self._evaluate(step)
        if cfg.save_steps and step % cfg.save_steps == 0:
            self.save_checkpoint(self._generator)
        return stop

    def _evaluate(self, step: int) -> bool:
        """Validation hook + early stopping; returns True when training should stop."""
        current = self._current()
        metrics = self.validation_fn(self.synthetic_set(*current), step)
        score = float(metrics["mean"])
        self.state.history.append(
            {
                "step": step,
                "distill_seconds": self.state.distill_seconds,
                **{k: float(v) for k, v in metrics.items()},
            }
        )
        self._log({f"eval/{k}": float(v) for k, v in metrics.items()}, step)
        if self.state.best_score is None or score > self.state.best_score:
            self.state.best_score, self.state.best_step = score, step
            self.state.evals_without_improvement = 0
            self._best = current
        else:
            self.state.evals_without_improvement += 1
        patience = self.config.early_stopping_patience
        return patience is not None and self.state.evals_without_improvement >= patience

    # ================================================================== output
    @torch.no_grad()
    def synthetic_set(self, pixels: torch.Tensor, text: torch.Tensor, num_captions: int = 3):
        """Wrap tensors as a :class:`~mdm_hf.synthetic.SyntheticSet` with nearest real captions and provenance."""

        sims = F.normalize(text.float(), dim=-1) @ F.normalize(self.text_features.float(), dim=-1).T
        nearest = sims.topk(min(num_captions, sims.shape[1]), dim=1).indices
        data = self.train_data
        return SyntheticSet(  # copies: a hook or caller may modify the set without touching the optimised tensors
            pixel_values=pixels.detach().float().cpu().clone(),
            text_features=text.detach().float().cpu().clone(),
            image_mean=self.teacher.image_mean,
            image_std=self.teacher.image_std,
            captions=[[data.captions[j] for j in row.tolist()] for row in nearest],
            source_indices=self.source_indices.tolist(),
            source_image_indices=data.caption_to_image[self.source_indices].tolist(),
            provenance=self.provenance(),
        )

    def _common_provenance(self, method: str) -> dict:
        """The provenance keys every method shares: teacher, data, selection, steps, config, library versions."""

        cfg = self.config
        return {
            "method": method,
            "teacher": cfg.model_name_or_path,
            "teacher_revision": cfg.model_revision,
            "teacher_family": self.teacher.family,
            "text_encoder": cfg.model_name_or_path,
            "text_pooling": self.teacher.text_pooling,
            "source_dataset": self.train_data.name,
            "source_dataset_revision": cfg.dataset_revision,
            "source_split": self.train_data.split,
            "source_fingerprint": self.train_data.fingerprint,
            "license": self.train_data.license,
            "selection": cfg.init,
            "best_step": self.state.best_step,
            "steps": self.state.step,
            "config": cfg.to_dict(),
            "versions": {
                "mdm_hf": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "datasets": datasets.__version__,
            },
        }

    # ================================================================== checkpoints
    def owns_output(self, path: Path) -> bool:
        """Whether ``path`` (an entry of ``output_dir``) was written by a run of this kind: what
        ``--overwrite_output_dir`` may remove. Subclasses add their own files to ``output_files``."""
        if is_checkpoint_dir(path) or path.name in (self.config_file, *self.output_files):
            return True
        if path.name == "synthetic":  # the set the command line saves next to the checkpoints
            return (path / "mdm_synthetic.json").is_file()
        return path.name == self.progress_name.lower() and path.is_dir()  # accelerate tracker logs

    def _prepare_output_dir(self) -> None:
        """Once per run (a subclass may prepare early, e.g. before a learning-rate search writes into it)."""
        if self._output_ready:
            return
        cfg = self.config
        self._output_ready = True
        prepare_output_dir(
            cfg.output_dir, owned=self.owns_output, overwrite=cfg.overwrite_output_dir,
            resuming=bool(cfg.resume_from_checkpoint), accelerator=self.accelerator,
        )  # fmt: skip

    def _resume(self) -> None:
        """Continue from ``resume_from_checkpoint``: the newest intact checkpoint for ``latest`` (a torn one is
        skipped with a warning), refusing a checkpoint whose run had other result-changing settings."""
        cfg = self.config
        candidates = resume_candidates(cfg.resume_from_checkpoint, cfg.output_dir, "synthetic.safetensors")
        for i, path in enumerate(candidates):
            try:
                self.load_checkpoint(path)
                return
            except CheckpointError as err:
                if "other settings" in str(err) or i == len(candidates) - 1:
                    raise
                logger.warning("%s Falling back to the checkpoint before it.", err)

    def save_checkpoint(self, generator: torch.Generator) -> Path:
        """Write ``checkpoint-<step>/``: tensors, best tensors, extras, optimiser and RNG state (safetensors) + JSON."""
        cfg = self.config
        path = Path(cfg.output_dir) / f"{CHECKPOINT_PREFIX}{self.state.step}"
        if self.is_main_process:
            synthetic = {
                "pixel_values": self.syn_pixels,
                "text_features": self.syn_text,
                "best_pixel_values": self._best[0],
                "best_text_features": self._best[1],
                "source_indices": self.source_indices,
                "rng_state": generator.get_state(),
                **self._checkpoint_extras(),
            }
            opt_tensors, opt_meta = flatten_optimizer_state(self.optimizer.state_dict())
            state = {
                **self.state.__dict__, "optimizer": opt_meta, "config": cfg.to_dict(),
                "data_fingerprint": self.train_data.fingerprint,
            }  # fmt: skip
            files = {"synthetic.safetensors": synthetic, "optimizer.safetensors": opt_tensors}
            write_checkpoint(path, files, state, keep=cfg.save_total_limit)
        self._wait_for_everyone()
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore tensors, extras, optimiser, RNG and loop state from ``path`` (call after :meth:`initialize`)."""
        tensors, state, opt = read_checkpoint(path, self.syn_pixels.shape, self.syn_text.shape)
        saved = {**state.pop("config", {}), "data_fingerprint": state.pop("data_fingerprint", None)}
        current = {**self.config.to_dict(), "data_fingerprint": self.train_data.fingerprint}
        if saved["data_fingerprint"] is None:  # written before fingerprints were recorded
            saved.pop("data_fingerprint")
        check_resume_config(saved, current, self.config.resume_free_fields, Path(path))
        with torch.no_grad():
            self.syn_pixels.copy_(tensors["pixel_values"])
            self.syn_text.copy_(tensors["text_features"])
            self._restore_extras(tensors)
        self.source_indices = tensors["source_indices"].long()
        self._best = (tensors["best_pixel_values"], tensors["best_text_features"])
        self._generator.set_state(tensors["rng_state"])
        self.optimizer.load_state_dict(opt)
        self.state = DistillState(**state)
        logger.info("Resumed from %s at step %d", path, self.state.step)
