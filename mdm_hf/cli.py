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
import sys
from collections.abc import Sequence

from .config import parse_dataclass_args


def _distill(argv: Sequence[str]) -> int:
    from .config import MDMConfig
    from .distill import MDMDistiller

    config = parse_dataclass_args(MDMConfig, argv, prog="mdm-hf distill")
    synthetic = MDMDistiller(config).distill()
    out = f"{config.output_dir}/synthetic"
    synthetic.save_pretrained(out, overwrite=True)
    print(f"Synthetic set ({len(synthetic)} pairs) written to {out}; load it with load_dataset('{out}').")
    if config.push_to_hub:
        url = synthetic.push_to_hub(config.hub_dataset_id, private=config.hub_private, local_dir=out)
        print(f"Pushed to {url}")
    return 0


def _experts(argv: Sequence[str]) -> int:
    from .experts import experts_main

    return experts_main(argv)


def _anchor(argv: Sequence[str]) -> int:
    from .anchor import anchor_main

    return anchor_main(argv)


def _evaluate(argv: Sequence[str]) -> int:
    from .evaluation import evaluate_main

    return evaluate_main(argv)


def _data(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mdm-hf data", description="Build datasets offline.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    emoji = sub.add_parser("emojicaps", help="EmojiCaps: Twemoji/OpenMoji art captioned with emoji names.")
    emoji.add_argument("--output_dir", default=None, help="Default: $MDM_HF_HOME/emojicaps-<size>px")
    emoji.add_argument("--image_size", type=int, default=48)
    emoji.add_argument("--seed", type=int, default=0)
    emoji.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    from .emojicaps import build_emojicaps, default_emojicaps_dir

    out = args.output_dir or default_emojicaps_dir(args.image_size)
    path = build_emojicaps(out, image_size=args.image_size, seed=args.seed, overwrite=args.overwrite)
    print(f"EmojiCaps is in {path}; open it with datasets.load_dataset('{path}').")
    return 0


def _tm(argv: Sequence[str]) -> int:
    from .baselines.trajectory_matching import tm_main

    return tm_main(argv)


def _tm_buffer(argv: Sequence[str]) -> int:
    from .baselines.trajectory_matching import buffer_main

    return buffer_main(argv)


def _demo(argv: Sequence[str]) -> int:
    from .demo import demo_main

    return demo_main(argv)


COMMANDS = {
    "distill": (_distill, "Distill a dataset into synthetic pairs with MDM."),
    "experts": (_experts, "Train LoRA (or full) experts from an anchor into an expert bank."),
    "anchor": (_anchor, "Pre-train a small dual-encoder anchor (vision tower + frozen text encoder)."),
    "evaluate": (_evaluate, "Train students on a synthetic set or coresets; validation-selected, test once."),
    "data": (_data, "Build a dataset offline (emojicaps)."),
    "tm": (_tm, "Baseline: distill with trajectory matching (MTT-VL / LoRS style) for comparisons."),
    "tm-buffer": (_tm_buffer, "Baseline: record the SGD expert trajectories that `mdm-hf tm` matches."),
    "demo": (_demo, "The whole pipeline offline on EmojiCaps: anchor, experts, MDM, students, card."),
}


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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
