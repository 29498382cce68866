"""``mdm-hf tm-buffer`` and ``mdm-hf tm``: parse the arguments, call the library, print where the result is."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ...config import parse_dataclass_args
from ...data import cached_text_features, load_split, preprocess_split_images
from ...models import DualEncoder
from .buffer import record_trajectory_buffer
from .config import TrajectoryBufferConfig, TrajectoryMatchingConfig
from .distiller import TrajectoryMatchingDistiller

__all__ = ["buffer_main", "tm_main"]


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
    """``mdm-hf tm --config file.yaml [--preset lors] [--field value ...]``: distil with trajectory matching, save
    the set. ``--preset lors`` fills every field not given from LoRS' settings (:mod:`mdm_hf.baselines.tm.config`)."""
    config = parse_dataclass_args(TrajectoryMatchingConfig, argv, prog="mdm-hf tm")
    synthetic = TrajectoryMatchingDistiller(config).distill()
    out = Path(config.output_dir) / "synthetic"
    synthetic.save_pretrained(out, overwrite=True)
    print(f"Synthetic set ({len(synthetic)} pairs) written to {out}; load it with load_dataset('{out}').")
    return 0
