"""Validation-only sweep of MDM's representation blending (issue 16): does ``--blend_alpha`` beat the defaults?

    python benchmarks/blending_sweep.py --budgets 100 200 500 --arms defaults blend1 \
        --setup_dir benchmarks/runs/emojicaps-cli --setup_dir_500 benchmarks/runs/emojicaps-cli-500 --threads 1

Reuses the EmojiCaps command-line benchmark's anchor, data and expert bank (``benchmarks/emojicaps/cli_table.py``;
K = 500 has its own set-up there) read-only. Per budget K and arm, one command line a user types,

    python -m mdm_hf.cli distill --model_name_or_path <setup>/anchor --dataset_name <setup>/data
        --expert_bank <setup>/experts --num_pairs K --max_steps 300 --eval_steps 50 --teacher_mode pooled
        --save_steps 300 --output_dir <out_dir>/k<K>-<arm> --cache_dir <out_dir>/cache-<setup> <arm flags>

with the package's validation hook (one small student on T validation at step 0 -- the joint-k-means coreset,
"no distillation" -- and every 50 iterations). Test is never loaded. A run that finished (its ``synthetic/``
exists) is read again, not rerun. The text-feature cache is copied out of the set-up, so the set-up stays untouched.

Output: ``benchmarks/results/blending_sweep.{json,md}`` (``--results_name``): per K, the k-means start, each arm's
best validation mean recall and its step, and the difference to the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# Named arms: extra command-line flags of `mdm-hf distill` (the defaults otherwise).
ARMS: dict[str, list[str]] = {
    "defaults": [],
    "blend1": ["--blend_alpha", "1"],
    "blend1-all": ["--blend_alpha", "1", "--blend_terms", "all"],
    "blend0.5": ["--blend_alpha", "0.5"],
    # The same two arms from another distillation seed (k-means start, teacher pool, draws): the run-to-run noise.
    "defaults-seed1": ["--seed", "1"],
    "blend1-seed1": ["--blend_alpha", "1", "--seed", "1"],
}


def distill_command(setup: Path, out_dir: Path, k: int, arm: str, args) -> list[str]:
    """The ``mdm_hf.cli distill`` command line of one (K, arm) run."""
    run = out_dir / f"k{k}-{arm}"
    return [
        sys.executable, "-m", "mdm_hf.cli", "distill",
        "--model_name_or_path", str(setup / "anchor"), "--dataset_name", str(setup / "data"),
        "--expert_bank", str(setup / "experts"), "--num_pairs", str(k), "--max_steps", str(args.max_steps),
        "--eval_steps", str(args.eval_steps), "--teacher_mode", "pooled", "--save_steps", str(args.max_steps),
        "--output_dir", str(run), "--cache_dir", str(out_dir / f"cache-{setup.name.removeprefix('emojicaps-')}"),
        *ARMS[arm],
    ]  # fmt: skip


def trainer_state(run: Path) -> dict:
    """The newest checkpoint's ``trainer_state.json``: the validation history and the loop's seconds."""
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if not checkpoints:
        raise FileNotFoundError(f"{run} has no checkpoint-*; the run did not finish (see {run}.log).")
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())


def run_one(setup: Path, out_dir: Path, k: int, arm: str, args) -> dict:
    """Run (unless finished) one (K, arm) distillation and summarise its validation history."""
    run = out_dir / f"k{k}-{arm}"
    argv = distill_command(setup, out_dir, k, arm, args)
    wall = None
    if not (run / "synthetic").exists():
        if run.exists():  # an interrupted run: start it again from scratch
            shutil.rmtree(run)
        cache = Path(argv[argv.index("--cache_dir") + 1])
        if not cache.exists():
            shutil.copytree(setup / "cache", cache)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
        print(f"[K={k} {arm}] {shlex.join(argv)}", flush=True)
        start = time.perf_counter()
        with open(f"{run}.log", "w") as log:
            subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=True, env=env)
        wall = time.perf_counter() - start
    state = trainer_state(run)
    history = state["history"]
    best = max(history, key=lambda h: h["mean"])
    return {
        "k": k, "arm": arm, "command": shlex.join(["python", *argv[1:]]), "wall_s": wall,
        "distill_seconds": state["distill_seconds"],
        "start": history[0]["mean"] if history[0]["step"] == 0 else None,
        "best": best["mean"], "best_step": best["step"], "final": history[-1]["mean"],
        "final_step": history[-1]["step"], "history": [{"step": h["step"], "mean": h["mean"]} for h in history],
    }  # fmt: skip


ARM_LABELS = {
    "defaults": "MDM (defaults)",
    "blend1": "MDM + blend α = 1 (contrastive)",
    "blend1-all": "MDM + blend α = 1 (all terms)",
    "blend0.5": "MDM + blend α = 0.5 (contrastive)",
    "defaults-seed1": "MDM (defaults), seed 1",
    "blend1-seed1": "MDM + blend α = 1 (contrastive), seed 1",
}


def _baseline(records: dict, k: int, arm: str) -> dict | None:
    """The defaults run a blended arm is compared with: same budget, same distillation seed."""
    base = records.get((k, "defaults-seed1" if arm.endswith("-seed1") else "defaults"))
    return None if base is None or base["arm"] == arm else base


def summary_table(records: list[dict], budgets: list[int]) -> list[str]:
    """Rows = the k-means start and each arm, columns = budgets: best validation mean (its step) and Δ."""
    by_key = {(r["k"], r["arm"]): r for r in records}
    arms = list(dict.fromkeys(r["arm"] for r in records))
    lines = ["| validation mean recall | " + " | ".join(f"K = {k}" for k in budgets) + " |"]
    lines.append("|---" * (len(budgets) + 1) + "|")
    starts = []
    for k in budgets:
        r = by_key.get((k, "defaults"))
        starts.append(f"{r['start']:.2f}" if r is not None and r["start"] is not None else "—")
    lines.append("| joint k-means start (step 0) | " + " | ".join(starts) + " |")
    for arm in arms:
        cells = []
        for k in budgets:
            r = by_key.get((k, arm))
            if r is None:
                cells.append("not run")
                continue
            base = _baseline(by_key, k, arm)
            delta = f", Δ {r['best'] - base['best']:+.2f}" if base is not None else ""
            cells.append(f"{r['best']:.2f} ({r['best_step']}){delta}")
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    return lines


def write_results(records: list[dict], args, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/blending_sweep.py " + shlex.join(sys.argv[1:])
    meta = {
        "command": command, "python": platform.python_version(), "torch": torch.__version__,
        "threads": args.threads, "max_steps": args.max_steps, "eval_steps": args.eval_steps,
    }  # fmt: skip
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    lines = [
        "# MDM with representation blending on EmojiCaps: validation mean recall (test never loaded)",
        "",
        f"Command: `{command}`",
        "",
        f"Each run: `python -m mdm_hf.cli distill ... --max_steps {args.max_steps} --eval_steps {args.eval_steps} "
        "--teacher_mode pooled` plus the arm's flags (every run's command line is in the JSON). Validation: one "
        "small student (seed 0) on T validation at step 0 -- the joint-k-means coreset, the same for every arm of "
        "one seed -- and every eval_steps. Cells: the best validation mean recall over the evaluations (its step); "
        "Δ: minus the defaults run of the same budget and distillation seed.",
        "",
        *summary_table(records, args.budgets),
        "",
        "Per run (final: the score at the last step; the curves are in the JSON):",
        "",
        "| K | arm | flags | start | best (step) | final | iterations' seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        start = f"{r['start']:.2f}" if r["start"] is not None else "—"
        wall = f"{r['distill_seconds']:.0f} s"
        lines.append(
            f"| {r['k']} | {r['arm']} | `{' '.join(ARMS[r['arm']]) or '(none)'}` | {start} | "
            f"{r['best']:.2f} ({r['best_step']}) | {r['final']:.2f} ({r['final_step']}) | {wall} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 200, 500])
    parser.add_argument("--arms", nargs="+", default=["defaults", "blend1"], choices=sorted(ARMS))
    parser.add_argument("--setup_dir", type=Path, default=Path("benchmarks/runs/emojicaps-cli"))
    parser.add_argument("--setup_dir_500", type=Path, default=Path("benchmarks/runs/emojicaps-cli-500"))
    parser.add_argument("--out_dir", type=Path, default=Path("benchmarks/runs/blending"))
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--eval_steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results_name", default="blending_sweep")
    parser.add_argument("--no_results", action="store_true", help="Run only; write no results files.")
    parser.add_argument(
        "--collect", action="store_true", help="Run nothing; report the finished (budget, arm) runs only."
    )
    args = parser.parse_args()
    for setup in {args.setup_dir, args.setup_dir_500}:
        missing = [p for p in ("anchor", "data", "experts", "cache") if not (setup / p).exists()]
        if missing:
            raise SystemExit(
                f"{setup} lacks {', '.join(missing)}: make the EmojiCaps set-up first "
                "(python benchmarks/emojicaps/cli_table.py), or point --setup_dir / --setup_dir_500 at it."
            )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for k in args.budgets:
        setup = args.setup_dir_500 if k == 500 else args.setup_dir
        for arm in args.arms:
            if args.collect and not (args.out_dir / f"k{k}-{arm}" / "synthetic").exists():
                continue
            records.append(run_one(setup, args.out_dir, k, arm, args))
            r = records[-1]
            print(
                f"[K={k} {arm}] start {r['start']}, best {r['best']:.2f} at step {r['best_step']}", flush=True
            )
    if not args.no_results:
        write_results(records, args, args.results_name)


if __name__ == "__main__":
    main()
