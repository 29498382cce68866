"""Validation-only sweep of MDM's optimisation levers on EmojiCaps (issue 14): which settings beat the coreset?

    python benchmarks/quality_sweep.py --budgets 100 200 500 --settings previous px100-txt10-norm-clamp random \
        --eval_steps 100 --val_seeds 1 --threads 1

Reuses the EmojiCaps benchmark's data, anchor and expert bank (``benchmarks/emojicaps/run.py`` stages, preset
``BENCH``, under ``--work_dir``; trained there if missing). Per budget K and named setting (MDMConfig overrides), one
MDM run of ``BENCH.distill_steps`` iterations with the validation hook (a short student on T validation,
``--val_seeds`` seeds) at step 0 -- the joint-k-means coreset -- and every ``--eval_steps``; the ``random`` setting
scores a random coreset of K real pairs the same way. Test is never loaded. Each record holds the validation curve,
the wall time and the drift of the kept set (:func:`mdm_hf.support.drift_statistics`).

Output: ``<work_dir>/sweep/<tag>.{json,md}``; with ``--results`` also ``benchmarks/results/quality_levers.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mdm_hf.config import MDMConfig
from mdm_hf.demo import build_data, student_config, train_anchor, train_experts
from mdm_hf.distill import MDMDistiller
from mdm_hf.students import student_validation_fn
from mdm_hf.support import drift_statistics

sys.path.insert(0, str(Path(__file__).resolve().parent / "emojicaps"))
from run import BENCH  # noqa: E402  (the EmojiCaps benchmark's preset and stages)

RESULTS = Path(__file__).resolve().parent / "results"
PREVIOUS = {"lr_pixels": 100.0, "lr_text": 100.0, "text_norm": "free", "pixel_range": "free"}
NORM_CLAMP = {"text_norm": "initial", "pixel_range": "clamp"}
# Named settings: MDMConfig overrides. "previous" is the defaults before issue 14; the adopted defaults are
# px100-txt10-norm-clamp.
SETTINGS: dict[str, dict] = {
    "previous": PREVIOUS,
    "lr100-norm-clamp": {**PREVIOUS, **NORM_CLAMP},
    "lr10-norm-clamp": {**NORM_CLAMP, "lr_pixels": 10.0, "lr_text": 10.0},
    "px100-txt10-norm-clamp": {**NORM_CLAMP, "lr_pixels": 100.0, "lr_text": 10.0},
    "px100-txt0-clamp": {"lr_pixels": 100.0, "lr_text": 0.0, "text_norm": "free", "pixel_range": "clamp"},
    "random": {"init": "random", "max_steps": 0},
}


def run_one(
    data: Path, anchor: Path, bank: Path, work: Path, k: int, name: str, val_seeds: int, args
) -> dict:
    """One (K, setting) run; cached in ``work/k<K>-<name>-s<val_seeds>/record.json``."""
    out = work / f"k{k}-{name}-s{val_seeds}"
    if (out / "record.json").exists():
        return json.loads((out / "record.json").read_text())
    hook = student_validation_fn(
        student_config(BENCH, data, anchor, out / "val", num_pairs=k, num_seeds=1),
        max_steps=BENCH.student_steps, num_seeds=val_seeds,
    )  # fmt: skip
    values = dict(
        model_name_or_path=str(anchor), dataset_name=str(data), expert_bank=str(bank), num_pairs=k,
        max_steps=BENCH.distill_steps, teacher_mode=BENCH.teacher_mode, eval_steps=args.eval_steps,
        eval_on_start=True, early_stopping_patience=None, save_steps=0, output_dir=str(out / "run"),
        overwrite_output_dir=True, seed=BENCH.seed,
    )  # fmt: skip
    values.update(SETTINGS[name])
    start = time.perf_counter()
    distiller = MDMDistiller(MDMConfig(**values), validation_fn=hook)
    kept = distiller.distill()
    real = distiller.text_features
    history = distiller.state.history
    record = {
        "k": k, "setting": name, "overrides": SETTINGS[name], "val_seeds": val_seeds,
        "start_validation_mean": history[0]["mean"], "best_validation_mean": distiller.state.best_score,
        "best_step": distiller.state.best_step, "curve": [(h["step"], round(h["mean"], 3)) for h in history],
        "drift_kept": drift_statistics(kept.pixel_values, kept.text_features, real[distiller.source_indices], real,
                                       kept.image_mean, kept.image_std),
        "distill_seconds": distiller.state.distill_seconds, "wall_seconds": time.perf_counter() - start,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "record.json").write_text(json.dumps(record, indent=2))
    return record


def render(records: list[dict], command: str) -> str:
    lines = [
        "# MDM levers on EmojiCaps validation (mean recall; test never loaded)", "",
        f"Command: `{command}`", "",
        "`start` = step 0 = the joint-k-means coreset. Drift of the kept set: text norm (real), cosine to the initial "
        "feature (mean / min), movement relative to the initial norm, spread ratio to real, pixels outside the "
        "valid range.", "",
        "| K | setting | seeds | start | best | best step | curve (step: val) | norm (real) | cos mean/min | moved | "
        "spread | px out | distill s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in sorted(records, key=lambda r: (r["k"], r["val_seeds"], r["setting"])):
        d = r["drift_kept"]
        curve = " ".join(f"{s}:{m:.1f}" for s, m in r["curve"])
        lines.append(
            f"| {r['k']} | {r['setting']} | {r['val_seeds']} | {r['start_validation_mean']:.2f} | "
            f"{r['best_validation_mean']:.2f} | {r['best_step']} | {curve} | {d['text_norm_mean']:.1f} ± "
            f"{d['text_norm_std']:.1f} ({d['real_text_norm_mean']:.1f}) | {d['cosine_to_start_mean']:.2f} / "
            f"{d['cosine_to_start_min']:.2f} | {d['relative_movement_mean']:.2f} | {d['spread_ratio']:.2f} | "
            f"{100 * d['pixels_outside_fraction']:.1f} % | {r['distill_seconds']:.0f} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work_dir", default="benchmarks/runs/emojicaps")
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 200, 500])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--eval_steps", type=int, default=100)
    parser.add_argument("--val_seeds", type=int, default=1, help="student seeds per validation point")
    parser.add_argument("--tag", default="sweep")
    parser.add_argument(
        "--results", action="store_true", help="also write benchmarks/results/quality_levers.*"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    cfg = replace(BENCH, data_dir=str(work / "data"))
    data = build_data(cfg)
    anchor = train_anchor(cfg, data, work / "anchor")
    bank = train_experts(cfg, data, anchor, work / "experts")
    records = [
        run_one(data, anchor, bank, work / "sweep", k, name, args.val_seeds, args)
        for k in args.budgets
        for name in args.settings
    ]
    command = "python benchmarks/quality_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "machine": {"platform": platform.platform(), "torch": torch.__version__,
              "threads": args.threads}, "records": records}  # fmt: skip
    text = render(records, command)
    print(text)
    for folder, name in [
        (work / "sweep", args.tag),
        *([(RESULTS, "quality_levers")] if args.results else []),
    ]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(result, indent=2))
        (folder / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
