"""How much a distilled set teaches: students trained on it, selected on validation, scored once on test
(docs/method.md §5, arXiv 2605.23482).

:class:`StudentEvaluator` prepares once what every student of a protocol shares (teacher, vision-tower template,
frozen text features, pixels of the splits, coreset features) and trains students on a method's pairs
(:func:`~mdm_hf.students.trainer.fit_student`). :func:`evaluate_split` is the ONLY place a student is scored; the
selected state of each student is scored ONCE on the test split. Nothing is ever selected on test.

:func:`evaluate_student` (one method), :func:`compare_methods` (every method, one protocol and seeds) and
:func:`student_validation_fn` (the distiller's validation hook) are the public entry points; the first two return
the typed results of :mod:`mdm_hf.students.results`.
"""

from __future__ import annotations

import copy
import logging
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import set_seed

from .. import __version__
from ..config import load_yaml_config
from ..data import SplitNotFoundError, cached_text_features, embed_pairs, load_split, preprocess_split_images
from ..models import DualEncoder
from ..retrieval import retrieval_metrics
from ..selection import joint_features, select_pairs
from ..synthetic import SyntheticSet
from .config import StudentConfig, check_methods
from .model import (
    FrozenTextEncoder,
    PixelSpace,
    StudentModel,
    backbone_feature_dim,
    convert_pixels,
    load_vision_backbone,
)
from .results import (
    METRIC_NAMES,
    Comparison,
    ResultRow,
    StudentRecord,
    StudentResult,
    method_label,
    save_results,
)
from .saving import save_student, student_info
from .trainer import FeaturePairDataset, LazyImages, StudentRun, fit_student, students_bar

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METHODS",
    "EvalSplit",
    "StudentEvaluator",
    "compare_methods",
    "environment",
    "evaluate_split",
    "evaluate_student",
    "student_validation_fn",
]

DEFAULT_METHODS = ("synthetic", "random", "herding", "kcenter", "full")


# ============================================================================================ scoring
@dataclass
class EvalSplit:
    """A split ready for scoring: student-space pixels, student-space text features, caption owners."""

    name: str
    images: Any  # Tensor [N_img, C, H, W] or LazyImages
    text_features: torch.Tensor
    text_to_image: torch.Tensor

    @property
    def num_images(self) -> int:
        return len(self.images)


def _rows(images, start: int, stop: int) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[start:stop]
    return torch.stack([images[i] for i in range(start, stop)])


@torch.no_grad()
def evaluate_split(model: StudentModel, split: EvalSplit, batch_size: int = 256) -> dict[str, float]:
    """Retrieval metrics (percent) of ``model`` on one split. The ONLY place students are scored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    image_embeds = torch.cat(
        [
            model.encode_image(_rows(split.images, s, min(s + batch_size, split.num_images)).to(device))
            .float()
            .cpu()
            for s in range(0, split.num_images, batch_size)
        ]
    )
    text_embeds = torch.cat(
        [
            model.encode_text(split.text_features[s : s + 4096].to(device)).float().cpu()
            for s in range(0, len(split.text_features), 4096)
        ]
    )
    model.train(was_training)
    return {k: float(v) for k, v in retrieval_metrics(image_embeds, text_embeds, split.text_to_image).items()}


# ============================================================================================ the evaluator
class StudentEvaluator:
    """Everything shared by the students of one protocol, prepared once: teacher, vision tower template, frozen
    text features and pixels of the validation (and, on first use, test and train) splits, coreset features.

    Args:
        config: the protocol.
        teacher: an already loaded :class:`~mdm_hf.models.DualEncoder` (e.g. the distiller's, before it
            distills: the vision tower is copied at construction); loaded from ``config`` when None.
        validation_only: refuse to touch the test split (the distiller's validation hook).
    """

    def __init__(self, config: StudentConfig, teacher=None, validation_only: bool = False) -> None:
        self.config = config
        self.validation_only = validation_only
        if teacher is None:
            teacher = DualEncoder.from_pretrained(
                config.model_name_or_path,
                config.model_revision,
                config.text_pooling,
                config.trust_remote_code,
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_space = PixelSpace.make(teacher.image_mean, teacher.image_std, teacher.image_size)
        if (
            config.track == "paper"
            and config.vision_model_name_or_path is None
            and config.vision_config is None
        ):
            raise ValueError(
                "The paper track trains an image backbone of its own: set --vision_model_name_or_path (e.g. "
                "microsoft/resnet-50, timm/nfnet_l0.ra2_in1k) or --vision_config. For the teacher's own vision "
                "tower use --track clip."
            )
        self.vision_template, self.student_space, self.pretrained_head = load_vision_backbone(config, teacher)
        self.vision_dim = backbone_feature_dim(self.vision_template, self.student_space)
        if config.text_model_name_or_path is None:
            self.text_encoder = teacher
            self.text_dim = teacher.text_feature_dim
        else:
            self.text_encoder = FrozenTextEncoder.from_pretrained(
                config.text_model_name_or_path, pooling=config.text_model_pooling
            )
            self.text_dim = self.text_encoder.text_feature_dim
        self.validation = self._eval_split(config.validation_split)
        self._test: EvalSplit | None = None
        self._train: dict | None = None
        self._synthetic = None
        # A bar over the students of a run (evaluate_student / compare_methods with several students); while it is
        # shown, each student's Trainer bar is hidden unless disable_tqdm=False asks for them.
        self.progress = None

    # ------------------------------------------------------------------ data
    def _text_features(self, data) -> torch.Tensor:
        return cached_text_features(self.text_encoder, data, self.config.cache_dir).float()

    def _pixels(self, data) -> tuple[Any, torch.Tensor | None]:
        """(student-space images, teacher-space tensor or None) of a split; lazy when the split is large."""
        if data.num_images > self.config.max_cached_images:
            return LazyImages(data, self.teacher, self.teacher_space, self.student_space), None
        teacher_pixels = preprocess_split_images(self.teacher, data)
        return convert_pixels(teacher_pixels, self.teacher_space, self.student_space), teacher_pixels

    def _eval_split(self, split: str) -> EvalSplit:
        data = load_split(self.config, split, self.config.max_eval_images)
        images, _ = self._pixels(data)
        return EvalSplit(split, images, self._text_features(data), data.caption_to_image.clone())

    @property
    def test(self) -> EvalSplit:
        """The test split, loaded on first use (never by a validation-only evaluator)."""
        if self.validation_only:
            raise RuntimeError(
                "This evaluator is validation-only (a distillation hook); it never loads test."
            )
        if self._test is None:
            self._test = self._eval_split(self.config.test_split)
        return self._test

    def train_split(self) -> dict:
        """Train split: student images, student text features, caption owners, teacher joint features (lazy)."""
        if self._train is None:
            data = load_split(self.config, self.config.train_split, self.config.max_train_images)
            images, teacher_pixels = self._pixels(data)
            self._train = {
                "data": data,
                "images": images,
                "teacher_pixels": teacher_pixels,
                "text_features": self._text_features(data),
                "caption_to_image": data.caption_to_image.clone(),
                "joint": None,
            }
        return self._train

    def joint_features(self) -> torch.Tensor:
        """Teacher joint features ``normalize([z_v, z_t])`` of every train pair (coreset selection; docs/method.md
        §1), from :func:`mdm_hf.data.embed_pairs` under the teacher."""
        train = self.train_split()
        if train["joint"] is None:
            data = train["data"]
            text = (
                train["text_features"]
                if self.text_encoder is self.teacher
                else cached_text_features(self.teacher, data, self.config.cache_dir)
            )
            batch = self.config.per_device_eval_batch_size
            zv, zt = embed_pairs(self.teacher, data, text, train["teacher_pixels"], batch_size=batch)
            train["joint"] = joint_features(zv.float(), zt.float())
        return train["joint"]

    def load_synthetic(self) -> SyntheticSet:
        """The configured synthetic set (``config.synthetic``), loaded once."""
        if self._synthetic is None:
            if self.config.synthetic is None:
                raise ValueError(
                    "Method 'synthetic' needs a synthetic set: pass --synthetic <dir or Hub id> (a SyntheticSet "
                    "saved with save_pretrained / push_to_hub)."
                )
            self._synthetic = SyntheticSet.from_pretrained(
                self.config.synthetic, self.config.synthetic_revision
            )
        return self._synthetic

    def synthetic_pairs(self, synthetic) -> FeaturePairDataset:
        """Training pairs from a :class:`~mdm_hf.synthetic.SyntheticSet` in the student's pixel and text spaces."""
        pixels = synthetic.pixel_values.float()
        source = PixelSpace.make(synthetic.image_mean, synthetic.image_std, tuple(pixels.shape[-2:]))
        images = convert_pixels(pixels, source, self.student_space)
        source_mode = self.config.text_source
        if source_mode == "auto":
            source_mode = "features" if self.text_encoder is self.teacher else "captions"
        if source_mode == "features":
            text = synthetic.text_features.float()
            if text.shape[-1] != self.text_dim:
                raise ValueError(
                    f"The synthetic text features are {text.shape[-1]}-d but the student's frozen text tower gives "
                    f"{self.text_dim}-d features: the set was distilled in another text space. Evaluate with the "
                    "teacher it was distilled with (--model_name_or_path) or use --text_source captions."
                )
        else:
            if not synthetic.captions or any(not c for c in synthetic.captions):
                raise ValueError(
                    "text_source='captions' needs a nearest real caption for every synthetic pair."
                )
            text = self.text_encoder.encode_text_features([caps[0] for caps in synthetic.captions]).float()
        return FeaturePairDataset(images, torch.arange(len(images)), text)

    def pairs(self, method: str, seed: int, synthetic=None) -> FeaturePairDataset:
        """Training pairs of a method: the synthetic set, a K-pair coreset (seeded) or the full train split."""
        (method,) = check_methods([method])
        if method == "synthetic":
            synthetic = synthetic if synthetic is not None else self.load_synthetic()
            if self.config.num_pairs is not None and self.config.num_pairs != len(synthetic):
                raise ValueError(
                    f"num_pairs={self.config.num_pairs} but the synthetic set has {len(synthetic)} pairs: methods "
                    "are only comparable at the same K. Drop --num_pairs (the set's size is used) or match it."
                )
            return self.synthetic_pairs(synthetic)
        train = self.train_split()
        if method == "full":
            return FeaturePairDataset(train["images"], train["caption_to_image"], train["text_features"])
        k = self.budget(synthetic)
        idx = select_pairs(method, self.joint_features(), k, seed=seed)
        return FeaturePairDataset(
            train["images"], train["caption_to_image"][idx], train["text_features"][idx]
        )

    def budget(self, synthetic=None) -> int:
        """K for the coresets: ``num_pairs``, else the synthetic set's size."""
        if self.config.num_pairs is not None:
            return self.config.num_pairs
        if synthetic is not None or self.config.synthetic is not None:
            return len((synthetic if synthetic is not None else self.load_synthetic()).pixel_values)
        raise ValueError(
            "Coreset methods need a budget: pass --num_pairs K (or --synthetic to use its size)."
        )

    # ------------------------------------------------------------------ students
    def build_student(self) -> StudentModel:
        """A fresh student (call after seeding: the head initialisation draws from the global RNG)."""
        cfg = self.config
        head = self.pretrained_head if cfg.keep_pretrained_head else None
        if cfg.keep_pretrained_head and head is None:
            raise ValueError(
                "keep_pretrained_head=True needs a dual-encoder vision tower (CLIP / SigLIP / VTDE)."
            )
        visual = cfg.visual_projection if cfg.visual_projection is not None else cfg.track == "clip"
        projection_dim = cfg.projection_dim
        if projection_dim is None and visual:
            projection_dim = int(getattr(self.teacher.model.config, "projection_dim", 0) or self.vision_dim)
        return StudentModel(
            copy.deepcopy(self.vision_template),
            self.vision_dim,
            self.text_dim,
            projection_dim,
            visual_projection=visual,
            temperature=cfg.temperature,
            learn_temperature=cfg.learn_temperature,
            head=head,
            text_head=cfg.text_head or ("mlp" if cfg.track == "paper" else "linear"),
        )

    def train_student(
        self, pairs: FeaturePairDataset, seed: int, method: str = "synthetic", max_steps: int | None = None
    ) -> StudentRun:
        """Train one student on ``pairs`` (seeded); validation picks the step; the selected state is loaded and,
        with ``save_students``, saved (:meth:`save_student`).

        The Trainer's progress bar follows ``disable_tqdm``; left at ``None`` it is hidden for a validation-only
        evaluator (the distiller's hook: a student every few iterations would break the distillation's bar) and
        while :attr:`progress` (one bar over many students) is shown."""
        set_seed(seed)
        model = self.build_student()
        batch_size = self.config.per_device_eval_batch_size
        disable_tqdm = self.config.disable_tqdm
        if disable_tqdm is None and (self.validation_only or self.progress is not None):
            disable_tqdm = True
        score = lambda m: evaluate_split(m, self.validation, batch_size)  # noqa: E731
        run = fit_student(
            model, pairs, self.config, seed, score, method, max_steps, disable_tqdm=disable_tqdm
        )
        if self.config.save_students:
            self.save_student(run, method, seed, pairs=len(pairs))
        return run

    def student_dir(self, method: str, seed: int) -> Path:
        """Where ``save_students`` writes a student: ``output_dir/students/<method>-seed<seed>``."""
        return Path(self.config.output_dir) / "students" / f"{method}-seed{seed}"

    def save_student(self, run: StudentRun, method: str, seed: int, pairs: int | None = None) -> Path:
        """Save a trained student under :meth:`student_dir` with :func:`~mdm_hf.students.saving.save_student`: a
        CLIPModel, SiglipModel or VisionTextDualEncoderModel that ``transformers.AutoModel`` loads, with its
        tokenizer and image processor; safetensors only."""
        directory = self.student_dir(method, seed)
        info = student_info(self.config, run, method, seed, pairs, self.protocol())
        layout = save_student(run.model, directory, self.text_encoder, self.teacher.image_processor, self.teacher_space,
                              self.student_space, info)  # fmt: skip
        logger.info("%s seed %d: student saved to %s (%s)", method, seed, directory, layout)
        return directory

    def run(self, method: str, seed: int, synthetic=None) -> StudentRecord:
        """Train, select on validation, score the selected student ONCE on test."""
        (method,) = check_methods([method])
        pairs = self.pairs(method, seed, synthetic)
        run = self.train_student(pairs, seed, method)
        test = evaluate_split(run.model, self.test, self.config.per_device_eval_batch_size)
        logger.info(
            "%s seed %d: best validation step %d, test mean %.2f", method, seed, run.best_step, test["mean"]
        )
        if self.progress is not None:
            self.progress.set_postfix_str(
                f"{method} seed {seed}: test mean {test['mean']:.2f}", refresh=False
            )
            self.progress.update(1)
        return StudentRecord(
            method=method, seed=seed, pairs=len(pairs), best_step=run.best_step, steps=run.steps,
            train_seconds=run.seconds, validation=run.validation, test=test, validation_history=run.history,
            train_loss=run.losses,
        )  # fmt: skip

    def result_row(self, method: str, synthetic=None) -> ResultRow:
        """One student per seed of the config on ``method``'s pairs; mean ± std of their test metrics."""
        (method,) = check_methods([method])
        records = [self.run(method, seed, synthetic) for seed in self.config.seeds]
        if method == "synthetic":
            label = method_label(method, synthetic if synthetic is not None else self.load_synthetic())
        else:
            label = method_label(method)
        return ResultRow.from_records(method, records, label=label)

    def protocol(self) -> str:
        """One sentence describing the student protocol (for the card and the JSON)."""
        cfg = self.config
        vision = cfg.vision_model_name_or_path or (
            "config-built backbone" if cfg.vision_config else "the teacher"
        )
        text = cfg.text_model_name_or_path or f"the teacher ({cfg.model_name_or_path})"
        head = "pretrained head kept" if cfg.keep_pretrained_head else "fresh projections and temperature"
        tau = f"tau init {cfg.temperature}, {'learned' if cfg.learn_temperature else 'fixed'}"
        length = f"{cfg.max_steps} steps" if cfg.max_steps > 0 else f"{cfg.num_train_epochs:g} epochs"
        return (
            f"{cfg.track} track: vision tower from {vision} trained in full, frozen text tower of {text}, {head} "
            f"({tau}); {cfg.optimizer} lr {cfg.learning_rate:g} ({cfg.lr_scheduler_type}), {length}, batch "
            f"{cfg.per_device_train_batch_size}, augmentation {cfg.augment} ({cfg.augment_mode}); step selected on "
            f"'{cfg.validation_split}' mean recall, '{cfg.test_split}' scored once; mean ± std over "
            f"{cfg.num_seeds} seed(s) ({self.config.preset} preset)."
        )


# ============================================================================================ public API
def environment() -> dict:
    """Library versions and the machine, recorded next to every result."""
    return {
        "mdm_hf": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def evaluate_student(config: StudentConfig, synthetic=None, teacher=None) -> StudentResult:
    """Train ``config.num_seeds`` students on ``config.method``'s pairs; mean ± std of the test metrics.

    Each student is selected on the validation split and scored once on test. The result is also written to
    ``output_dir/student_<method>.json`` (``StudentResult.to_dict()``) with its table in ``.md``.
    """
    evaluator = StudentEvaluator(config, teacher=teacher)
    with students_bar(config.num_seeds, config.disable_tqdm) as evaluator.progress:
        row = evaluator.result_row(config.method, synthetic)
    result = StudentResult(row, evaluator.protocol(), config.to_dict(), environment())
    save_results(result, config.output_dir, f"student_{config.method}")
    return result


def compare_methods(
    config: StudentConfig,
    methods: Sequence[str] | None = None,
    synthetic=None,
    teacher=None,
) -> Comparison:
    """Every method under the SAME student protocol and seeds; the ``results`` a SyntheticSet card shows.

    Args:
        config: the protocol (``num_pairs`` or the synthetic set fixes K for the coresets).
        methods: default ``config.methods`` or :data:`DEFAULT_METHODS` (``"synthetic"`` is dropped when no
            synthetic set is given; ``"mdm"`` is a deprecated alias of it).
        synthetic: a :class:`~mdm_hf.synthetic.SyntheticSet` to use for "synthetic" instead of
            ``config.synthetic``.

    Returns:
        A :class:`~mdm_hf.students.results.Comparison`, also written to ``output_dir/comparison.json`` (its
        ``to_dict()``) with the markdown table in ``comparison.md``.
    """
    methods = check_methods(methods or config.methods or DEFAULT_METHODS)
    if synthetic is None and config.synthetic is None and "synthetic" in methods:
        logger.warning("No synthetic set given: the comparison runs without the 'synthetic' row.")
        methods.remove("synthetic")
    if not methods:
        raise ValueError("compare_methods needs at least one method.")
    evaluator = StudentEvaluator(config, teacher=teacher)
    with students_bar(len(methods) * config.num_seeds, config.disable_tqdm) as evaluator.progress:
        rows = [evaluator.result_row(m, synthetic) for m in methods]
    notes = (
        f"Test-split recall (%) of students whose step was selected on '{config.validation_split}'; each "
        f"selected student is scored once on '{config.test_split}'. Coresets are chosen on the teacher's joint "
        f"features of '{config.train_split}'; every method uses the same student protocol and seeds."
    )
    result = Comparison(
        rows, evaluator.protocol(), notes, list(METRIC_NAMES), config.to_dict(), environment()
    )
    save_results(result, config.output_dir, "comparison")
    return result


def student_validation_fn(
    config: StudentConfig,
    teacher=None,
    max_steps: int | None = None,
    num_seeds: int = 1,
) -> Callable[[Any, int], dict]:
    """The distiller's validation hook: ``fn(synthetic_set, step) -> {"mean": ..., "ir@1": ..., ...}``.

    Each call trains a SHORT student run (``max_steps``, default the config's) on the current synthetic set and
    returns the validation metrics of its best validation step, averaged over ``num_seeds`` seeds. It never loads
    the test split. Build it before distilling: the student's vision tower is copied from ``teacher`` now.
    """
    evaluator = StudentEvaluator(config, teacher=teacher, validation_only=True)
    seeds = list(range(config.seed, config.seed + num_seeds))

    def validate(synthetic_set, step: int) -> dict:
        runs = [
            evaluator.train_student(evaluator.synthetic_pairs(synthetic_set), s, max_steps=max_steps)
            for s in seeds
        ]
        metrics = {m: statistics.fmean(r.validation[m] for r in runs) for m in METRIC_NAMES}
        metrics["student_step"] = statistics.fmean(r.best_step for r in runs)
        logger.info("distillation step %d: student validation mean %.2f", step, metrics["mean"])
        return metrics

    validate.evaluator = evaluator  # type: ignore[attr-defined]
    return validate


# The run's fields a validation student inherits unless the run's student_config YAML sets them.
_INHERITED_FIELDS = (
    "model_name_or_path", "model_revision", "text_pooling", "trust_remote_code", "dataset_name", "dataset_revision",
    "train_split", "image_column", "caption_column", "split_column", "image_root", "max_train_images",
    "max_cached_images", "cache_dir", "skip_empty_captions", "validation_split", "num_pairs", "seed",
)  # fmt: skip


def validation_hook(run, teacher=None) -> Callable[[Any, int], dict] | None:
    """The validation hook a distillation run's config asks for (its ``eval_steps``, ``validation_split`` and
    ``student_*`` fields), or None when it asks for none. A dataset without the validation split is distilled
    without validation, with a warning saying so -- never a silent no-op.

    Args:
        run: an :class:`~mdm_hf.config.MDMConfig` (or any config with the same fields).
        teacher: the run's loaded anchor; the students' vision tower is copied from it now, before distilling.
    """
    if not run.eval_steps or run.validation_split is None:
        return None
    values = {name: getattr(run, name) for name in _INHERITED_FIELDS}
    values.update(preset=run.student_preset, output_dir=None, num_seeds=run.student_num_seeds)
    if run.student_max_steps is not None:
        values["max_steps"] = run.student_max_steps
    if run.student_config:
        values.update(load_yaml_config(run.student_config, StudentConfig))
    try:
        hook = student_validation_fn(
            StudentConfig(**values), teacher=teacher, num_seeds=run.student_num_seeds
        )
    except SplitNotFoundError as err:
        logger.warning(
            "No validation: %s Distilling without a validation hook, so the last state is kept (pass "
            "--validation_split none to silence this, or name the split that holds validation data).",
            err,
        )
        return None
    logger.info(
        "Validation every %d iterations on split '%s' (%d student seed(s), preset %s)%s.", run.eval_steps,
        run.validation_split, run.student_num_seeds, run.student_preset,
        ", the initial coreset included" if run.eval_on_start else "",
    )  # fmt: skip
    return hook
