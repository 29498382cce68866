"""Training one student on the ``transformers.Trainer`` (docs/method.md §5).

:class:`StudentTrainer`: symmetric InfoNCE with the student's temperature, differentiable DSA augmentation of the
pixels, SGD / AdamW / Adam with the paper's step schedule (or cosine / constant). :class:`ValidationSelectionCallback`
scores the student on the **validation** split at step 0, every ``eval_steps`` and at the end, and keeps the best
state; :func:`fit_student` loads that state back. Nothing here ever sees the test split.

The Trainer's own evaluation stays off (``eval_strategy="no"``): it computes a loss on an eval dataset, while a
student is selected on validation *retrieval* recall, with its best state kept in memory rather than in checkpoints.
Its scores still reach the trackers of ``report_to`` (as ``eval/<metric>``), next to the training loss.

The training pairs are :class:`FeaturePairDataset`: student-space pixels with a frozen text feature each (unlike
:class:`mdm_hf.data.PairDataset`, which yields real pairs by caption index for the teacher).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
from transformers.trainer_callback import PrinterCallback

from ..augment import DiffAugment
from ..config import trackers
from ..losses import clip_contrastive_loss
from .config import StudentConfig
from .model import PixelSpace, StudentModel, convert_pixels

__all__ = [
    "FeaturePairDataset",
    "LazyImages",
    "StudentRun",
    "StudentTrainer",
    "ValidationSelectionCallback",
    "fit_student",
    "students_bar",
]


# ============================================================================================ data
class LazyImages:
    """Images of a large split, preprocessed (teacher) and converted (student) on access."""

    def __init__(self, data, teacher, source: PixelSpace, target: PixelSpace) -> None:
        self.data, self.teacher, self.source, self.target = data, teacher, source, target

    def __len__(self) -> int:
        return self.data.num_images

    def __getitem__(self, index: int) -> torch.Tensor:
        pixels = self.teacher.preprocess_images([self.data.image(int(index))])
        return convert_pixels(pixels, self.source, self.target)[0]


class FeaturePairDataset(torch.utils.data.Dataset):
    """Student training pairs: item ``i`` is image ``image_index[i]`` (student-space pixels) with the frozen text
    feature ``text_features[i]``: ``{"pixel_values", "text_features"}``."""

    def __init__(self, images, image_index: torch.Tensor, text_features: torch.Tensor) -> None:
        if len(image_index) != len(text_features):
            raise ValueError(f"{len(image_index)} image indices but {len(text_features)} text features.")
        self.images, self.image_index, self.text_features = images, image_index.long(), text_features.float()

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[int(self.image_index[i])], "text_features": self.text_features[i]}


# ============================================================================================ Trainer
class ValidationSelectionCallback(TrainerCallback):
    """Scores the student on the validation split at step 0, every ``eval_steps`` and at the end; keeps the best.

    The best state (by ``metric``, ties keep the earlier step) is a CPU copy of the full ``state_dict`` (buffers
    such as BatchNorm statistics included). ``log`` (e.g. ``Trainer.log``, set by :func:`fit_student`) receives each
    score as ``{"eval_<metric>": value}``, so ``report_to`` trackers and the progress bar show it.
    """

    def __init__(
        self,
        score: Callable[[nn.Module], dict],
        eval_steps: int,
        metric: str = "mean",
        patience: int | None = None,
    ) -> None:
        self.score, self.metric, self.patience = score, metric, patience
        self.eval_steps = max(1, int(eval_steps))
        self.history: list[dict] = []
        self.best_state: dict | None = None
        self.best_step: int | None = None
        self.best_metrics: dict | None = None
        self.losses: list[dict] = []
        self.log: Callable[[dict], None] | None = None
        self._since_best = 0

    def _evaluate(self, model: nn.Module, step: int, log: bool = True) -> None:
        if self.history and self.history[-1]["step"] == step:
            return
        metrics = self.score(model)
        self.history.append({"step": step, **metrics})
        if log and self.log is not None:
            self.log({f"eval_{name}": float(value) for name, value in metrics.items()})
        if self.best_metrics is None or metrics[self.metric] > self.best_metrics[self.metric]:
            self.best_metrics, self.best_step, self._since_best = dict(metrics), step, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            self._since_best += 1

    def _evaluate_logged(self, model: nn.Module, step: int, control) -> None:
        # Trainer.log clears control.should_log, which may be set for this step's training loss: keep it.
        should_log = control.should_log
        self._evaluate(model, step)
        control.should_log = should_log

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._evaluate_logged(model, 0, control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.eval_steps == 0 or step >= state.max_steps:
            self._evaluate_logged(model, step, control)
            if self.patience is not None and self._since_best >= self.patience:
                control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # Not logged: the trackers have closed by now (the last step was scored, and logged, in on_step_end).
        self._evaluate(model, state.global_step, log=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            entry = {"step": state.global_step, "loss": float(logs["loss"])}
            if "learning_rate" in logs:
                entry["learning_rate"] = float(logs["learning_rate"])
            self.losses.append(entry)


class StudentTrainer(Trainer):
    """``Trainer`` with the student loss, DSA augmentation, and SGD / AdamW + step / cosine schedules.

    ``compute_loss``: symmetric InfoNCE ``(CE(s·Z_v Z_t^T, I) + CE(s·Z_t Z_v^T, I)) / 2`` with the student's
    exponentiated logit scale ``s`` (CLIP, arXiv 2103.00020; docs/method.md §5 uses tau = 0.07).
    """

    def __init__(self, *args, augment=None, student_config: StudentConfig, steps_per_epoch: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.augment, self.student_config, self.steps_per_epoch = augment, student_config, steps_per_epoch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixels = inputs["pixel_values"]
        if self.augment is not None and model.training:
            pixels = self.augment(pixels)
        image_embeds, text_embeds = model(pixels, inputs["text_features"])
        loss = clip_contrastive_loss(image_embeds, text_embeds, model.logit_scale)
        return (loss, {"image_embeds": image_embeds, "text_embeds": text_embeds}) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            cfg = self.student_config
            model = self.model if model is None else model
            decay, no_decay = [], []
            for name, p in model.named_parameters():
                if p.requires_grad:
                    (no_decay if name == "log_logit_scale" else decay).append(p)
            groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
            if no_decay:
                groups.append({"params": no_decay, "weight_decay": 0.0})
            if cfg.optimizer == "sgd":
                self.optimizer = torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.momentum)
            elif cfg.optimizer == "adamw":
                self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
            else:
                self.optimizer = torch.optim.Adam(groups, lr=cfg.learning_rate)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            cfg = self.student_config
            optimizer = optimizer or self.optimizer
            if cfg.lr_scheduler_type == "step":
                milestones = sorted(round(e * self.steps_per_epoch) for e in cfg.lr_decay_epochs)

                def factor(step: int) -> float:  # lr x decay after each milestone (paper: x0.1 at epoch 51)
                    return cfg.lr_decay_factor ** sum(step >= m for m in milestones)

            elif cfg.lr_scheduler_type == "cosine":

                def factor(step: int) -> float:
                    return 0.5 * (
                        1.0 + math.cos(math.pi * min(step, num_training_steps) / num_training_steps)
                    )

            else:

                def factor(step: int) -> float:
                    return 1.0

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return self.lr_scheduler


# ============================================================================================ one student
@dataclass
class StudentRun:
    """One trained student: the selected state is loaded into ``model``."""

    model: StudentModel
    best_step: int
    validation: dict
    history: list
    losses: list
    steps: int
    seconds: float


def _training_arguments(
    cfg: StudentConfig,
    output_dir: str,
    batch: int,
    total: int,
    seed: int,
    use_cpu: bool,
    run_name: str | None = None,
    disable_tqdm: bool | None = None,
) -> TrainingArguments:
    """The Trainer's arguments: the loop, logging, trackers and devices; the optimiser and schedule come from
    ``cfg``. ``disable_tqdm``: ``None`` is ``cfg.disable_tqdm`` (and ``None`` there, transformers' default)."""
    return TrainingArguments(
        output_dir=output_dir,
        run_name=run_name,
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        max_steps=total,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=seed,
        data_seed=seed,
        report_to=trackers(cfg.report_to) or "none",
        save_strategy="no",
        eval_strategy="no",  # selection is ValidationSelectionCallback's (validation recall), see the module doc
        logging_strategy="steps" if cfg.logging_steps > 0 else "no",
        logging_steps=max(1, cfg.logging_steps),
        use_cpu=use_cpu,
        dataloader_num_workers=cfg.num_workers,
        dataloader_pin_memory=not use_cpu,
        remove_unused_columns=False,
        disable_tqdm=cfg.disable_tqdm if disable_tqdm is None else disable_tqdm,
    )


def fit_student(
    model: StudentModel,
    pairs: FeaturePairDataset,
    cfg: StudentConfig,
    seed: int,
    score: Callable[[nn.Module], dict],
    method: str = "synthetic",
    max_steps: int | None = None,
    disable_tqdm: bool | None = None,
) -> StudentRun:
    """Train ``model`` on ``pairs``; ``score`` (validation metrics) picks the step; the selected state is loaded.

    ``max_steps`` defaults to the config's (``full_max_steps`` for method ``"full"`` when set); ``disable_tqdm``
    to the config's. The Trainer's ``output_dir`` is ``output_dir/students/<method>-seed<seed>`` when the student
    is saved or logged to a tracker (tensorboard writes its ``runs/`` there), else a scratch folder: it writes
    nothing else (no checkpoints). Saving the selected student is
    :meth:`~mdm_hf.students.StudentEvaluator.save_student`'s (it needs the text tower and processors).
    """
    batch = min(cfg.per_device_train_batch_size, len(pairs))
    steps_per_epoch = math.ceil(len(pairs) / batch)
    if max_steps is None:
        max_steps = cfg.full_max_steps if method == "full" and cfg.full_max_steps > 0 else cfg.max_steps
    total = max_steps if max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    eval_steps = cfg.eval_steps if cfg.eval_steps else max(1, round(cfg.eval_epochs * steps_per_epoch))
    augment = (
        None if cfg.augment in ("none", "", None) else DiffAugment(cfg.augment, cfg.augment_mode, seed=seed)
    )
    use_cpu = cfg.use_cpu if cfg.use_cpu is not None else not torch.cuda.is_available()
    run_name = f"{method}-seed{seed}"
    keep = cfg.output_dir and (cfg.save_students or trackers(cfg.report_to))
    run_dir = Path(cfg.output_dir) / "students" / run_name if keep else None
    callback = ValidationSelectionCallback(score, eval_steps, patience=cfg.early_stopping_patience)
    # The Trainer wants an output_dir even when it saves nothing: a scratch dir unless the run is kept.
    with tempfile.TemporaryDirectory(prefix="mdm-student-") as scratch:
        args = _training_arguments(
            cfg, str(run_dir or scratch), batch, total, seed, use_cpu, run_name, disable_tqdm
        )
        trainer = StudentTrainer(
            model=model,
            args=args,
            train_dataset=pairs,
            data_collator=default_data_collator,
            callbacks=[callback],
            augment=augment,
            student_config=cfg,
            steps_per_epoch=steps_per_epoch,
        )
        trainer.remove_callback(PrinterCallback)
        callback.log = trainer.log
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        model.load_state_dict(callback.best_state)
    return StudentRun(
        model, callback.best_step, callback.best_metrics, callback.history, callback.losses,
        trainer.state.global_step, seconds,
    )  # fmt: skip


@contextlib.contextmanager
def students_bar(students: int, disable_tqdm: bool | None):
    """One progress bar over ``students`` students (``None`` when not shown): the default (``disable_tqdm=None``)
    for more than one, whose Trainer bars are then hidden; a single student shows the Trainer's own bar."""
    if disable_tqdm is not None or students <= 1:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=students, desc="students", unit="student", dynamic_ncols=True) as bar:
        yield bar
