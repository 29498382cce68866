"""``mdm-hf``: the command line for people who never open Python.

Subcommands wrap the library (and the thin scripts in ``recipes/``):

    mdm-hf distill  --config recipes/configs/flickr30k_clip_mdm_100.yaml [--field value ...]
    mdm-hf experts  --config recipes/configs/experts_tiny.yaml [--field value ...]
    mdm-hf evaluate --synthetic out/ --model_name_or_path ... --dataset_name ...
    mdm-hf data emojicaps --output_dir emojicaps/
    mdm-hf tm-buffer / mdm-hf tm   (the trajectory-matching baseline)
    mdm-hf demo [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from accelerate import PartialState

from .anchor import AnchorPretrainingConfig, pretrain_anchor
from .bank import bank_size_bytes, push_expert_bank
from .baselines.tm import (
    TrajectoryBufferConfig,
    TrajectoryMatchingConfig,
    TrajectoryMatchingDistiller,
    record_trajectory_buffer,
)
from .config import MDMConfig, parse_dataclass_args
from .data import cached_text_features, load_split, preprocess_split_images
from .demo import QUICK_PRESET, DemoConfig, run_demo
from .distill import MDMDistiller
from .emojicaps import EmojiCapsArguments
from .experts import ExpertTrainingConfig, train_expert_bank
from .models import DualEncoder
from .students import StudentConfig, card_results, compare_methods, evaluate_student, format_results_table
from .synthetic import SyntheticSet


def _parse_command(cls, argv: Sequence[str], command: str, **kwargs):
    """The command's config from YAML + flags, with the command's one-line help as ``--help``'s description."""
    return parse_dataclass_args(
        cls, argv, prog=f"mdm-hf {command}", description=COMMANDS[command][1], **kwargs
    )


def distill_main(argv: Sequence[str]) -> int:
    """``mdm-hf distill --config file.yaml [--field value ...]``: distill, save ``<output_dir>/synthetic``, push."""
    config = _parse_command(MDMConfig, argv, "distill")
    out = Path(config.output_dir) / "synthetic"
    if out.exists() and not out.is_dir():  # found now, not after the whole run
        raise NotADirectoryError(
            f"'{out}' is a file; the synthetic set is saved there. Move it or change --output_dir."
        )
    distiller = MDMDistiller(config)
    synthetic = distiller.distill()
    if distiller.is_main_process:  # one writer and one uploader; the other processes wait below
        synthetic.save_pretrained(out, overwrite=True)
        print(f"Synthetic set ({len(synthetic)} pairs) written to {out}; load it with load_dataset('{out}').")
        if config.push_to_hub:
            url = synthetic.push_to_hub(
                config.hub_dataset_id, private=config.hub_private or None, local_dir=out
            )
            print(f"Pushed to {url}")
    distiller.accelerator.wait_for_everyone()
    return 0


def experts_main(argv: Sequence[str]) -> int:
    """``mdm-hf experts --config file.yaml [--field value ...]``: train a bank, optionally push it."""
    config = _parse_command(ExpertTrainingConfig, argv, "experts")
    bank = train_expert_bank(config)
    if PartialState().is_main_process:
        print(f"Expert bank ({config.num_experts} experts x {config.num_train_epochs} epochs, {config.kind}) written to "
              f"{bank} ({bank_size_bytes(bank) / 2**20:.1f} MiB). Use it with --expert_bank {bank}.")  # fmt: skip
        if config.push_to_hub:
            print(
                f"Pushed to {push_expert_bank(bank, config.hub_model_id, private=config.hub_private or None)}"
            )
    return 0


def anchor_main(argv: Sequence[str]) -> int:
    """``mdm-hf anchor --config file.yaml [--field value ...]``: pre-train an anchor dual encoder."""
    config = _parse_command(AnchorPretrainingConfig, argv, "anchor")
    result = pretrain_anchor(config)
    if PartialState().is_main_process:
        print(f"Anchor saved to {result.output_dir} (loss on fixed batches {result.initial_loss:.4f} -> "
              f"{result.final_loss:.4f}). Use it with --model_name_or_path {result.output_dir}.")  # fmt: skip
    return 0


def evaluate_main(argv: Sequence[str]) -> int:
    """``mdm-hf evaluate``: one method (``--method``), or ``--methods ...`` compared under one protocol; the results
    go into the set's card with ``--update_card`` (a local set) and to the Hub with ``--push_to_hub``."""
    config = _parse_command(StudentConfig, argv, "evaluate")
    result = compare_methods(config) if config.methods else evaluate_student(config)
    print(format_results_table(result))
    print(f"\nProtocol: {result.protocol}")
    if config.output_dir:
        print(f"Results written to {os.path.abspath(config.output_dir)}")
    synthetic = None
    # the set's card and metadata carry the table (a local folder, checked at parse time)
    if config.update_card:
        synthetic = SyntheticSet.from_pretrained(config.synthetic)
        synthetic.results = card_results(result)
        synthetic.save_pretrained(config.synthetic, overwrite=True)
        print(f"Results written into the card of {config.synthetic}")
    # a local set was updated above (--push_to_hub implies --update_card); a set on the Hub is updated here
    if config.push_to_hub:
        if synthetic is None:
            synthetic = SyntheticSet.from_pretrained(config.synthetic, config.synthetic_revision)
            synthetic.results = card_results(result)
        local = config.synthetic if config.update_card else None
        url = synthetic.push_to_hub(
            config.hub_dataset_id, private=config.hub_private or None, local_dir=local
        )
        print(f"Pushed the set with its results to {url}")
    return 0


DATASETS = {
    "emojicaps": (EmojiCapsArguments, "EmojiCaps: Twemoji / OpenMoji art captioned with emoji names.")
}


def data_main(argv: Sequence[str]) -> int:
    """``mdm-hf data <dataset> [--field value ...]``: build a dataset offline (today: EmojiCaps)."""
    parser = argparse.ArgumentParser(prog="mdm-hf data", description=COMMANDS["data"][1],
                                     epilog="`mdm-hf data DATASET --help` lists the dataset's fields.")  # fmt: skip
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for name, (_, help_text) in DATASETS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    dataset = parser.parse_args(list(argv)[:1]).dataset
    cls, help_text = DATASETS[dataset]
    arguments = parse_dataclass_args(cls, argv[1:], prog=f"mdm-hf data {dataset}", description=help_text)
    path = arguments.build()
    print(f"{dataset} is in {path}; open it with datasets.load_dataset('{path}').")
    return 0


def tm_main(argv: Sequence[str]) -> int:
    """``mdm-hf tm --config file.yaml [--preset lors|repblend] [--field value ...]``: distil with trajectory
    matching, save the set. ``--preset lors`` / ``repblend`` fills every field not given from LoRS' / RepBlend's
    settings (:mod:`mdm_hf.baselines.tm.config`); RepBlend needs a buffer of ``mdm-hf tm-buffer --trainable
    projections``."""
    config = _parse_command(TrajectoryMatchingConfig, argv, "tm")
    out = Path(config.output_dir) / "synthetic"
    if out.exists() and not out.is_dir():  # found now, not after the whole run
        raise NotADirectoryError(
            f"'{out}' is a file; the synthetic set is saved there. Move it or change --output_dir."
        )
    synthetic = TrajectoryMatchingDistiller(config).distill()
    synthetic.save_pretrained(out, overwrite=True)
    print(f"Synthetic set ({len(synthetic)} pairs) written to {out}; load it with load_dataset('{out}').")
    return 0


def tm_buffer_main(argv: Sequence[str]) -> int:
    """``mdm-hf tm-buffer --model_name_or_path ... --dataset_name ... --output_dir buffer/ [--trainable
    projections]``: record SGD expert trajectories (``projections``: RepBlend's, of the two projections only)."""
    config = _parse_command(TrajectoryBufferConfig, argv, "tm-buffer")
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
        num_epochs=config.num_train_epochs, learning_rate=config.learning_rate, momentum=config.momentum,
        weight_decay=config.weight_decay, batch_size=config.per_device_train_batch_size, seed=config.seed,
        cache_dir=config.cache_dir, validation=validation, overwrite=config.overwrite_output_dir,
        trainable=config.trainable, report_to=config.report_to,
    )  # fmt: skip
    preset = " --preset repblend" if config.trainable == "projections" else ""
    print(f"Trajectory buffer ({config.num_experts} experts x {config.num_train_epochs} epochs, {config.trainable}, "
          f"{bank_size_bytes(out) / 2**20:.2f} MiB) written to {out}; use it with "
          f"`mdm-hf tm --trajectory_buffer {out}{preset}`.")  # fmt: skip
    return 0


def demo_main(argv: Sequence[str]) -> int:
    """``mdm-hf demo [--quick] [--field value ...]``: the whole pipeline offline on EmojiCaps."""
    quick = ("The < 3 minute preset: " + ", ".join(f"{k}={v}" for k, v in QUICK_PRESET.items()) + "; other "
             "flags override it.")  # fmt: skip
    run_demo(_parse_command(DemoConfig, argv, "demo", presets={"quick": (quick, QUICK_PRESET)}))
    return 0


# What a user can cause -- a bad flag value, file, dataset, checkpoint, a missing package or Hub access, a run
# that diverged -- ends as one line and exit code 2; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)

COMMANDS = {
    "distill": (distill_main, "Distill a dataset into synthetic pairs with MDM."),
    "experts": (experts_main, "Train LoRA (or full) experts from an anchor into an expert bank."),
    "anchor": (anchor_main, "Pre-train a small dual-encoder anchor (vision tower + frozen text encoder)."),
    "evaluate": (
        evaluate_main,
        "Train students on a synthetic set or coresets; validation-selected, test once.",
    ),
    "data": (data_main, "Build a dataset offline (emojicaps)."),
    "tm": (tm_main, "Baseline: distill with trajectory matching (MTT-VL / LoRS style) for comparisons."),
    "tm-buffer": (tm_buffer_main, "Baseline: record the SGD expert trajectories that `mdm-hf tm` matches."),
    "demo": (demo_main, "The whole pipeline offline on EmojiCaps: anchor, experts, MDM, students, card."),
}


LOG_LEVELS = ("debug", "info", "warning", "error")


def _global_flags(args: list[str]) -> tuple[list[str], dict]:
    """Split the flags every command takes (``--debug``, ``--log_level LEVEL``) from the command's own."""
    rest, flags, i = [], {"debug": False, "log_level": "info"}, 0
    while i < len(args):
        if args[i] == "--debug":
            flags["debug"] = True
        elif args[i].startswith("--log_level"):
            value = args[i].split("=", 1)[1] if "=" in args[i] else (args[i + 1] if i + 1 < len(args) else "")
            i += "=" not in args[i]
            if value.lower() not in LOG_LEVELS:
                raise SystemExit(f"mdm-hf: --log_level must be one of {LOG_LEVELS}, got {value!r}.")
            flags["log_level"] = value.lower()
        else:
            rest.append(args[i])
        i += 1
    return rest, flags


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mdm-hf`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="mdm-hf",
        description="Multimodal Distribution Matching: distill image-caption datasets into a few hundred "
        "synthetic pairs and share them on the Hugging Face Hub.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.print_usage()
        print(f"mdm-hf: unknown command '{argv[0]}'. Choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, rest, global_flags = argv[0], *_global_flags(argv[1:])
    debug = global_flags["debug"] or os.environ.get("MDM_HF_DEBUG", "") not in ("", "0")
    # the package's own progress at --log_level (INFO); third-party loggers (faiss' CPU probing, ...) from WARNING
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mdm_hf").setLevel(global_flags["log_level"].upper())
    try:
        return COMMANDS[command][0](rest)
    except KeyboardInterrupt:
        print(f"mdm-hf {command}: interrupted.", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"mdm-hf {command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
