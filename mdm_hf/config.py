"""Configuration of an MDM distillation run (docs/method.md §4 reference defaults), YAML- and HfArgumentParser-friendly."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from .models import TextPooling
from .support import PixelRange, TextNorm

logger = logging.getLogger(__name__)


T = TypeVar("T")

# Choices as Literal types, so ``--help`` lists them and a wrong value is refused while the line is parsed.
InitMethod = Literal["kmeans", "random", "herding", "kcenter", "kmeans_image", "kmeans_text"]
REPORT_TO_HELP = (
    "Where to send logs (accelerate trackers): none | tensorboard | trackio | wandb | mlflow | all, or several "
    "separated by commas; tensorboard writes under output_dir."
)


def trackers(report_to: str | None) -> list[str] | None:
    """``report_to`` as accelerate's ``log_with`` (``None`` for ``none``): the one reading of the flag."""
    names = [n.strip() for n in (report_to or "none").split(",") if n.strip() not in ("", "none")]
    return names or None


def config_field(default, help: str, **kw):  # noqa: A002 - mirrors HfArgumentParser's metadata key
    """A dataclass field whose ``help`` becomes the ``--help`` text of ``HfArgumentParser``."""
    return field(default=default, metadata={"help": help, **kw})


_f = config_field


def deprecated_alias(name: str):
    """A field that keeps an old flag / YAML key / keyword working: its value moves to ``name`` (with a warning) in
    :func:`resolve_deprecated_aliases`. One name per concept across commands, following ``TrainingArguments``."""
    # The mark lives in the help text: HfArgumentParser hands every other metadata key to argparse.
    return field(default=None, metadata={"help": _ALIAS_HELP.format(name)})


_ALIAS_HELP = "Deprecated alias of --{}."
_ALIAS_PATTERN = re.compile(r"^Deprecated alias of --(\w+)\.$")


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def deprecated_aliases(cls) -> dict[str, str]:
    """``{deprecated name: current name}`` for the :func:`deprecated_alias` fields of a config class or instance."""
    marks = {f.name: _ALIAS_PATTERN.match(f.metadata.get("help", "")) for f in dataclasses.fields(cls)}
    return {old: mark.group(1) for old, mark in marks.items() if mark is not None}


def resolve_deprecated_aliases(config) -> None:
    """Move every deprecated alias's value to its field (warning once per alias); refuse two different values."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    for alias, name in deprecated_aliases(config).items():
        f, value = fields[alias], getattr(config, alias)
        if value is None:
            continue
        current = getattr(config, name)
        if current != _field_default(fields[name]) and current != value:
            raise ValueError(
                f"--{f.name}={value!r} and --{name}={current!r}: --{f.name} is a deprecated alias of --{name}; "
                f"give the value once, as --{name}."
            )
        logger.warning("--%s is deprecated; use --%s.", f.name, name)
        setattr(config, name, value)
        setattr(config, f.name, None)


def load_yaml_config(path: str | Path, cls: type) -> dict[str, Any]:
    """The one YAML reader for configs: a flat ``field: value`` mapping, checked against ``cls``'s fields."""
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of field: value, got {type(values).__name__}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} for {cls.__name__}. Valid keys: {sorted(known)}")
    return values


def check_field_types(config) -> None:
    """:func:`check_types` for a config instance (the Python API path; the command line checks YAML values).

    Deprecated aliases are resolved first (:func:`resolve_deprecated_aliases`), so every ``__post_init__`` that
    starts with this call accepts the old names."""
    resolve_deprecated_aliases(config)
    check_types(
        type(config),
        {f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
        type(config).__name__,
    )


def parse_dataclass_args(
    cls: type[T],
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    presets: dict[str, tuple[str, dict[str, Any]]] | None = None,
    description: str | None = None,
) -> T:
    """``--config file.yaml`` plus ``--field value`` overrides -> a dataclass instance (overrides win).

    Uses ``transformers.HfArgumentParser`` so every field's ``metadata["help"]`` becomes ``--help`` text.
    ``presets`` maps a bare flag (``quick``) to its help and the field values it sets; the YAML file and the
    other flags override a preset.
    """
    from transformers import HfArgumentParser  # heavy: only when a command line is parsed

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    for name in presets or {}:
        pre.add_argument(f"--{name}", action="store_true")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(cls, prog=prog, description=description)
    parser.add_argument(
        "--config", default=None, help="YAML file with field: value pairs (CLI flags override)."
    )
    for name, (help_text, values) in (presets or {}).items():
        parser.add_argument(f"--{name}", action="store_true", help=help_text)
        if getattr(known, name):
            parser.set_defaults(**values)
    if known.config:
        values = load_yaml_config(known.config, cls)
        check_types(cls, values, known.config)
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)[0]


@dataclass
class ModelArguments:
    """The dual encoder a run loads (anchor, teacher): the four fields every model-loading config shares."""

    model_name_or_path: str = _f(
        "openai/clip-vit-base-patch32",
        "Hub id or local dir of the anchor dual encoder (CLIP / SigLIP / VisionTextDualEncoder).",
    )
    model_revision: str | None = _f(None, "Revision (branch, tag or commit) of the anchor on the Hub.")
    text_pooling: TextPooling = _f("auto", "Text feature pooling (see mdm_hf.models); auto: the model's own.")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the Hub (off by default).")


@dataclass
class DatasetArguments:
    """Where the image-caption pairs come from: the fields every run shares (distillation, experts, anchor,
    students, trajectory matching); :func:`mdm_hf.data.load_split` turns them into a split."""

    dataset_name: str = _f("nlphuji/flickr30k", "Hub id or local dir of the image-caption dataset.")
    dataset_revision: str | None = _f(None, "Revision of the dataset on the Hub.")
    train_split: str = _f("train", "Split that is trained on / distilled.")
    image_column: str | None = _f(None, "Image column (auto-detected when None).")
    caption_column: str | None = _f(None, "Caption column: a string or a list of strings (auto-detected).")
    split_column: str | None = _f(None, "Column holding split names inside one Hub split (Karpathy; auto).")
    image_root: str | None = _f(
        None, "Directory that relative image paths in the dataset are resolved against (Karpathy filepath)."
    )
    max_train_images: int | None = _f(None, "Use only the first N train images (quick runs).")
    skip_empty_captions: bool = _f(
        False, "Leave empty captions out (counted in the log) instead of refusing a dataset that has them."
    )
    max_cached_images: int = _f(20000, "Preprocess all images of a split once when it has at most this many.")
    cache_dir: str | None = _f(None, "Cache for text features (default $MDM_HF_HOME or ~/.cache/mdm_hf).")


def optional_split(value: str | None) -> str | None:
    """``None`` for the strings a command line uses to mean "no split" (``none``, ``null``, empty)."""
    return None if isinstance(value, str) and value.lower() in ("", "none", "null") else value


def _conforms(value: Any, annotation: Any) -> bool:
    """Whether ``value`` has the type a config field declares (``int`` excludes ``bool``; ``float`` takes ints)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return isinstance(value, str | int | bool | None) and value in args
    if origin in (list, tuple, Sequence):
        return (
            isinstance(value, (list, tuple)) and all(_conforms(v, args[0]) for v in value) if args else True
        )
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def _describe_type(annotation: Any) -> str:
    """``one of 'a', 'b'`` for a Literal (optionally ``| None``), the type's name otherwise."""
    args = typing.get_args(annotation)
    literal = next((a for a in (annotation, *args) if typing.get_origin(a) is typing.Literal), None)
    if literal is not None:
        shown = ", ".join(repr(v) for v in typing.get_args(literal))
        return f"one of {shown}" + (" or None" if type(None) in args else "")
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_types(cls: type, values: dict[str, Any], source: str) -> None:
    """Raise one ``ValueError`` naming every value whose type is not its field's (``num_pairs: 8.7``,
    ``num_pairs: [8]``), before anything is loaded."""
    hints = typing.get_type_hints(cls)
    bad = [
        f"{key}={value!r} (expected {_describe_type(hints[key])})"
        for key, value in values.items()
        if key in hints and not _conforms(value, hints[key])
    ]
    if bad:
        raise ValueError(f"{source}: wrong type for {', '.join(bad)}.")


def check_values(config, checks: dict[str, bool], choices: dict[str, Sequence] | None = None) -> None:
    """Raise one ``ValueError`` naming every field that fails ``checks`` (name -> ok) or is not in its ``choices``.

    Call :func:`check_field_types` first when a check compares values (a list compared to 0 raises a TypeError).
    """
    name = type(config).__name__
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        shown = ", ".join(f"{k}={getattr(config, k)!r}" if hasattr(config, k) else k for k in bad)
        raise ValueError(f"Invalid {name} values: {shown} (see --help for valid ranges).")
    for key, allowed in (choices or {}).items():
        if getattr(config, key) not in allowed:
            raise ValueError(f"{name}.{key}={getattr(config, key)!r}; choose one of {tuple(allowed)}.")


@dataclass
class DistillRunArguments(DatasetArguments):
    """What every distillation run has besides its method: the budget, the loop, validation, checkpoints, logging
    (read by :class:`~mdm_hf.distill_loop.SyntheticSetDistiller`), and (de)serialisation."""

    num_pairs: int = _f(100, "K: number of synthetic image-text pairs (the budget).")
    max_steps: int = _f(3000, "Distillation iterations.")
    eval_steps: int = _f(50, "Run the validation hook every N iterations (0: never).")
    eval_on_start: bool = _f(
        True,
        "Also score the initial set (step 0), so the state kept is never worse on validation than the coreset.",
    )
    early_stopping_patience: int | None = _f(
        10, "Stop after N evaluations without improvement (None: never; the best state is kept either way)."
    )
    save_steps: int = _f(100, "Checkpoint every N iterations (0: only at the end).")
    save_total_limit: int | None = _f(2, "Keep at most N checkpoints (oldest removed).")
    output_dir: str = _f("out", "Where checkpoints and the synthetic set are written.")
    overwrite_output_dir: bool = _f(False, "Allow writing into a non-empty output_dir without resuming.")
    resume_from_checkpoint: str | None = _f(None, "A checkpoint dir, or 'latest' to resume from output_dir.")
    logging_steps: int = _f(10, "Log losses and timings every N iterations.")
    report_to: str = _f("none", REPORT_TO_HELP)
    seed: int = _f(0, "Seed of initialisation, teacher / trajectory draws and batch sampling.")

    # Fields that may change when a run resumes from a checkpoint: they set how long it runs, what it logs and
    # saves, and where -- never the result of the steps already taken. Any other difference refuses the resume.
    resume_free_fields: ClassVar[tuple[str, ...]] = (
        "max_steps", "eval_steps", "eval_on_start", "early_stopping_patience", "save_steps", "save_total_limit",
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps", "cache_dir",
        "max_cached_images", "report_to", "num_workers", "push_to_hub", "hub_dataset_id", "hub_private",
        "validation_split", "student_preset", "student_max_steps", "student_num_seeds", "student_config",
        "lr_search", "lr_search_steps",
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_field_types(self)
        check_values(self, {
            "num_pairs": self.num_pairs > 0, "max_steps": self.max_steps >= 0, "eval_steps": self.eval_steps >= 0,
            "save_steps": self.save_steps >= 0, "logging_steps": self.logging_steps >= 0,
            "save_total_limit": self.save_total_limit is None or self.save_total_limit >= 1,
            "early_stopping_patience": self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            "max_train_images": self.max_train_images is None or self.max_train_images >= 1,
            "max_cached_images": self.max_cached_images >= 0,
        })  # fmt: skip

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML-safe). Never holds a token: there is no token field by design."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} keys: {unknown}. Valid keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any):
        """Load a YAML file (flat mapping of field -> value); keyword overrides win."""
        return cls.from_dict({**load_yaml_config(path, cls), **overrides})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))


@dataclass
class MDMConfig(ModelArguments, DistillRunArguments):
    """Everything that defines an MDM run. Field help doubles as ``--help`` text of ``recipes/distill.py``.

    Defaults follow the paper's reference run (docs/method.md §4) where it states one, except where this package
    measured better on validation and says so in the field's help (``lr_text``, ``text_norm``, ``pixel_range``,
    ``eval_on_start``); ``lr_pixels`` uses the
    reference's library default (100; its run script uses 1000). The dataset fields come from
    :class:`DatasetArguments`, the budget, loop, validation and checkpoint fields from :class:`DistillRunArguments`.
    """

    # ---- teacher (the anchor: ModelArguments)
    expert_bank: str | None = _f(
        None, "Hub id or dir of the expert bank; None: the anchor alone is the teacher."
    )
    expert_bank_revision: str | None = _f(None, "Revision of the expert bank on the Hub.")
    experts_per_teacher: int = _f(2, "k: expert checkpoints merged into each mixed teacher (paper: 2).")
    max_start_epoch: int | None = _f(
        None, "Experts are drawn at a random epoch in [1, max_start_epoch] (None: all)."
    )
    merge_alpha: float = _f(
        0.5, "Scale of the Model Stock offset (1.0 = Model Stock; reference script: 0.5)."
    )
    teacher_mode: Literal["fresh", "pooled"] = _f(
        "fresh",
        "fresh: a new mixed teacher every iteration (paper). pooled: reuse a pool of teachers whose "
        "real-side embeddings are computed once (faster).",
    )
    teacher_pool_size: int = _f(8, "Number of mixed teachers in the pool (teacher_mode=pooled).")
    pool_real_size: int | None = _f(
        None, "Real pairs whose embeddings each pooled teacher caches (None: all pairs of the train split)."
    )
    merge_method: Literal["model_stock", "mean"] = _f(
        "model_stock",
        "How drawn experts are mixed: model_stock (MDM, docs/method.md §2) | mean (t = 1: w0 + merge_alpha x the "
        "mean offset; with merge_alpha 1 the plain average of the experts, the paper's 'weighted sum' ablation).",
    )

    # ---- data: the DatasetArguments fields, and
    validation_split: str | None = _f(
        "validation",
        "Split the validation hook scores (never test); 'none' turns validation off. A dataset without it is "
        "distilled without validation, with a warning.",
    )
    student_preset: Literal["small", "paper"] = _f(
        "small", "Recipe of the validation students (mdm_hf.students.PRESETS)."
    )
    student_max_steps: int | None = _f(None, "Steps of each validation student (None: the preset's).")
    student_num_seeds: int = _f(
        1, "Validation students per evaluation, averaged (more: less noise, more time)."
    )
    student_config: str | None = _f(
        None,
        "YAML of StudentConfig fields for the validation students (e.g. a paper-track student); the teacher, "
        "dataset, validation split and budget follow this run unless the file sets them.",
    )

    # ---- synthetic set (its size: num_pairs)
    init: InitMethod = _f(
        "kmeans",
        "Initialisation: kmeans is MDM's joint-space k-means (docs/method.md §1); kmeans_image / kmeans_text: the "
        "same on one modality's embeddings (the paper's ablation).",
    )

    # ---- optimisation (docs/method.md §4)
    real_batch_size: int = _f(256, "Real pairs per iteration (global, split across processes).")
    syn_batch_size: int = _f(64, "Synthetic pairs per iteration.")
    optimizer: Literal["sgd", "adam"] = _f("sgd", "sgd (with momentum) or adam.")
    lr_pixels: float = _f(100.0, "Learning rate of the synthetic pixels (reference: 100).")
    lr_text: float = _f(
        10.0,
        "Learning rate of the synthetic text features. 10x below lr_pixels: with text_norm=initial only their "
        "direction moves, and on EmojiCaps validation 10 beat 100 at every budget (README, Results).",
    )
    text_norm: TextNorm = _f(
        "initial",
        "Keep learned text features on the real features' scale: initial (each keeps the norm of the real "
        "feature it started from; only its direction is learned) | real_mean | free (the reference).",
    )
    pixel_range: PixelRange = _f(
        "clamp",
        "clamp: keep pixels in the range that de-normalises to valid RGB [0, 1] | free (the reference).",
    )
    lr_search: list[float] | None = _f(
        None,
        "Pixel learning rates to try before the run (text lr scales with them), e.g. 10 30 100 300: each runs "
        "lr_search_steps iterations from the same start and is scored by the validation hook; the best is kept. "
        "Costs len(lr_search) x lr_search_steps iterations plus one validation each.",
    )
    lr_search_steps: int = _f(100, "Iterations per lr_search candidate.")
    momentum: float = _f(0.5, "SGD momentum.")
    adam_beta1: float = _f(0.5, "Adam beta1 (optimizer=adam).")
    adam_beta2: float = _f(0.999, "Adam beta2 (optimizer=adam).")
    max_grad_norm: float | None = _f(1.0, "Clip the joint gradient norm of pixels and text features.")

    # ---- loss (docs/method.md §3)
    lambda_contrastive: float = _f(
        1.0, "Weight of the symmetric InfoNCE (or sigmoid) loss on synthetic pairs."
    )
    lambda_agreement: float = _f(0.8, "Weight of GKE between real and synthetic agreement directions.")
    lambda_discrepancy: float = _f(0.8, "Weight of GKE between real and synthetic discrepancy directions.")
    sigma: float = _f(0.5, "Bandwidth of the geodesic Gaussian kernel (radians).")
    temperature: float | None = _f(0.07, "InfoNCE temperature; None: the teacher's own logit scale.")
    contrastive: Literal["auto", "clip", "siglip"] = _f(
        "auto", "auto (from the teacher), clip (softmax InfoNCE) or siglip (sigmoid)."
    )
    blend_alpha: float = _f(
        0.0,
        "Representation blending of the synthetic mini-batch (RepBlend, docs/method.md §7): each iteration mixes "
        "(pooled image-tower output, text feature) pairs before the projections with one lambda ~ Beta(a, a) and "
        "one permutation; a blended pair is its own positive. 0: off, the default: on EmojiCaps validation it "
        "moved the best mean recall by +0.07 / +0.19 / -0.37 at K = 100 / 200 / 500, within the noise "
        "(benchmarks/results/blending_sweep.md).",
    )
    blend_terms: Literal["contrastive", "all"] = _f(
        "contrastive",
        "Which terms see the blended synthetic pairs (blend_alpha > 0): contrastive (only the InfoNCE / sigmoid "
        "term) | all (also the synthetic agreement and discrepancy directions of the GKE terms).",
    )

    # ---- logging and the Hub (budget, loop, validation and checkpoint fields: DistillRunArguments)
    num_workers: int = _f(0, "DataLoader workers for real images that are not cached.")
    push_to_hub: bool = _f(False, "Push the synthetic set to the Hub at the end (needs hub_dataset_id).")
    hub_dataset_id: str | None = _f(None, "namespace/name of the dataset repo to push to.")
    hub_private: bool | None = _f(
        False, "Create the Hub repo as private (default: the Hub's default, public)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validation_split = optional_split(self.validation_split)
        checks = {
            "real_batch_size": self.real_batch_size > 0,
            "syn_batch_size": self.syn_batch_size > 0,
            "experts_per_teacher": self.experts_per_teacher >= 1,
            "max_start_epoch": self.max_start_epoch is None or self.max_start_epoch >= 1,
            "merge_alpha": self.merge_alpha > 0,
            "teacher_pool_size": self.teacher_pool_size >= 1,
            "pool_real_size": self.pool_real_size is None or self.pool_real_size >= 1,
            "lr_pixels": self.lr_pixels > 0,
            "lr_text": self.lr_text >= 0,  # 0 freezes the text features on purpose
            "momentum": 0 <= self.momentum < 1,
            "adam_beta1": 0 <= self.adam_beta1 < 1,
            "adam_beta2": 0 <= self.adam_beta2 < 1,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "lambda_contrastive": self.lambda_contrastive >= 0,
            "lambda_agreement": self.lambda_agreement >= 0,
            "lambda_discrepancy": self.lambda_discrepancy >= 0,
            "sigma": self.sigma > 0,
            "temperature": self.temperature is None or self.temperature > 0,
            "blend_alpha": 0 <= self.blend_alpha < float("inf"),  # NaN fails both comparisons
            "num_workers": self.num_workers >= 0,
            "student_max_steps": self.student_max_steps is None or self.student_max_steps >= 1,
            "student_num_seeds": self.student_num_seeds >= 1,
            "lr_search": self.lr_search is None
            or (len(self.lr_search) > 0 and all(x > 0 for x in self.lr_search)),
            "lr_search_steps": self.lr_search_steps >= 1,
        }
        check_values(self, checks)
        if self.blend_alpha > 0 and self.blend_terms == "contrastive" and self.lambda_contrastive == 0:
            raise ValueError(
                "--blend_alpha > 0 with --blend_terms contrastive blends only the contrastive term, which "
                "--lambda_contrastive 0 switches off: set --blend_terms all, or --blend_alpha 0."
            )
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError(
                "--push_to_hub needs --hub_dataset_id (namespace/name of the dataset repo to create)."
            )
