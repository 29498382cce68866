"""What storing the learned pixels as a PNG ``image`` column costs (issue 5).

    python benchmarks/quantisation.py --synthetic benchmarks/runs/emojicaps/mdm-k100/synthetic \
        --anchor benchmarks/runs/emojicaps/anchor --data ~/.cache/mdm_hf/emojicaps-48px --seeds 3

A SyntheticSet holds the exact float pixels and, for viewing and other processors, an 8-bit RGB ``image`` column
(clipped to [0, 1] after de-normalisation). This trains the same students (same protocol and seeds) on

* ``exact``: the float ``pixel_values`` column, and
* ``png``: the pixels re-read from the ``image`` column (uint8 -> [0, 1] -> normalised),

and reports test mean recall of validation-selected students for both, measured in one run. Without arguments
it builds a tiny offline set (the test fixtures) so the script always runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def png_roundtrip(synthetic):
    """The set as a student reading only the ``image`` column would see it (8-bit, clipped)."""
    rgb = torch.from_numpy(synthetic.to_rgb_uint8()).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(synthetic.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(synthetic.image_std).view(1, 3, 1, 1)
    quantised = copy.copy(synthetic)
    quantised.pixel_values = (rgb - mean) / std
    return quantised


def tiny_setup(tmp: Path):
    """A tiny distilled set on the offline fixtures (the same ones the tests use)."""
    from mdm_hf import testing
    from mdm_hf.config import MDMConfig
    from mdm_hf.distill import MDMDistiller

    model = testing.build_tiny_clip(tmp / "clip")
    data = testing.write_caption_list_dataset(tmp / "data")
    cfg = MDMConfig(
        model_name_or_path=str(model), dataset_name=str(data), num_pairs=8, max_steps=30, real_batch_size=16,
        syn_batch_size=8, lr_pixels=10.0, lr_text=10.0, eval_steps=0, save_steps=0, output_dir=str(tmp / "out"),
    )  # fmt: skip
    return MDMDistiller(cfg).distill(), model, data


def main(argv=None) -> int:
    from mdm_hf.evaluation import StudentConfig, StudentEvaluator
    from mdm_hf.synthetic import SyntheticSet

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--synthetic", default=None)
    parser.add_argument("--anchor", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--name", default=None, help="result file stem (default: quantisation-<tiny|emojicaps>)"
    )
    args = parser.parse_args(argv)
    if args.synthetic:
        synthetic, anchor, data = SyntheticSet.from_pretrained(args.synthetic), args.anchor, args.data
        name = args.name or "quantisation-emojicaps"
    else:
        synthetic, anchor, data = tiny_setup(Path(tempfile.mkdtemp()))
        name = args.name or "quantisation-tiny"
    quantised = png_roundtrip(synthetic)
    error = (quantised.pixel_values - synthetic.pixel_values).abs()
    std = torch.tensor(synthetic.image_std).view(1, 3, 1, 1)
    rgb = synthetic.pixel_values * std + torch.tensor(synthetic.image_mean).view(1, 3, 1, 1)
    cfg = StudentConfig(
        model_name_or_path=str(anchor), dataset_name=str(data), preset="small", max_steps=args.steps, eval_steps=10,
        num_seeds=args.seeds,
    )  # fmt: skip
    evaluator = StudentEvaluator(cfg)
    scores = {"exact": [], "png": []}
    for seed in range(args.seeds):  # interleaved, same seeds: one run, like for like
        for label, s in (("exact", synthetic), ("png", quantised)):
            scores[label].append(evaluator.run("mdm", seed, s)["test"]["mean"])
    result = {
        "command": "python benchmarks/quantisation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "pairs": len(synthetic),
        "pixel_error": {"mean_abs": float(error.mean()), "max_abs": float(error.max())},
        "clipped_fraction": float(((rgb < 0) | (rgb > 1)).float().mean()),
        "test_mean_recall": {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                                 "per_seed": v} for k, v in scores.items()},  # fmt: skip
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    t = result["test_mean_recall"]
    table = (
        f"## PNG quantisation of the learned pixels ({name})\n\nCommand: `{result['command']}`\n\n"
        f"{result['pairs']} pairs; mean |Δpixel| after the PNG round trip {result['pixel_error']['mean_abs']:.4f} "
        f"(normalised units), max {result['pixel_error']['max_abs']:.3f}; "
        f"{100 * result['clipped_fraction']:.1f} % of values fall outside [0, 1] in RGB and are clipped.\n\n"
        "| student trained on | test mean recall (mean ± std over seeds) |\n|---|---|\n"
        f"| exact float pixels | {t['exact']['mean']:.2f} ± {t['exact']['std']:.2f} |\n"
        f"| PNG `image` column | {t['png']['mean']:.2f} ± {t['png']['std']:.2f} |\n"
    )
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
