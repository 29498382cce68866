"""EmojiCaps quality at K = 100 / 200 / 500 through the command line a user types (issue 14).

    python benchmarks/emojicaps/cli_table.py --budgets 100 200 500 --seeds 3 --max_steps 500

For each budget K, one recorded command distills with the package defaults and one scores it:

    mdm-hf distill --model_name_or_path <anchor> --dataset_name <EmojiCaps> --expert_bank <bank> --num_pairs K ...
    mdm-hf evaluate --synthetic <run>/synthetic --methods synthetic kmeans random herding kcenter [full] ...

The anchor (ViT 192-d x 4 layers + frozen MiniLM, trained on P) and the bank (4 LoRA experts x 4 epochs on T
train) are the EmojiCaps benchmark's (``benchmarks/emojicaps/run.py``, preset ``BENCH``), made once under
``--work_dir``. Students: fresh projections and temperature, selected on T validation (OpenMoji), scored once on T
test; the joint-k-means coreset -- MDM's own start, "no distillation" -- is a row. Results:
``benchmarks/results/emojicaps_cli.{json,md}``, with the distillation wall time and the drift statistics of every
set (``mdm_hf.support.drift_statistics``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mdm_hf.data import cached_text_features, load_image_caption_dataset
from mdm_hf.demo import build_data, train_anchor, train_experts
from mdm_hf.models import DualEncoder
from mdm_hf.students import Comparison
from mdm_hf.support import drift_statistics
from mdm_hf.synthetic import SyntheticSet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BENCH  # noqa: E402  (the EmojiCaps benchmark's preset: one anchor and bank for both tables)

RESULTS = Path(__file__).resolve().parents[1] / "results"
CORESETS = ("kmeans", "random", "herding", "kcenter")


def run_command(argv: list[str], log: Path) -> float:
    """Run one ``mdm-hf`` command line, its output in ``log``; returns its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def distill_command(anchor: Path, data: Path, bank: Path, k: int, out: Path, args) -> list[str]:
    return [
        "mdm-hf", "distill", "--model_name_or_path", str(anchor), "--dataset_name", str(data),
        "--expert_bank", str(bank), "--num_pairs", str(k), "--max_steps", str(args.max_steps),
        "--teacher_mode", "pooled", "--save_steps", str(args.max_steps), "--output_dir", str(out),
        "--cache_dir", str(args.cache_dir),
    ]  # fmt: skip


def evaluate_command(
    anchor: Path, data: Path, synthetic: Path, methods: list[str], out: Path, args
) -> list[str]:
    return [
        "mdm-hf", "evaluate", "--model_name_or_path", str(anchor), "--dataset_name", str(data),
        "--synthetic", str(synthetic), "--methods", *methods, "--num_seeds", str(args.seeds), "--preset", "small",
        "--max_steps", str(BENCH.student_steps), "--eval_steps", str(BENCH.student_eval_steps),
        "--output_dir", str(out), "--cache_dir", str(args.cache_dir),
    ]  # fmt: skip


def drift(synthetic: SyntheticSet, teacher: DualEncoder, data: Path, cache_dir: Path) -> dict[str, float]:
    train = load_image_caption_dataset(str(data), "train")
    real = cached_text_features(teacher, train, cache_dir)
    start = real[torch.as_tensor(synthetic.source_indices)]
    return drift_statistics(synthetic.pixel_values, synthetic.text_features, start, real, synthetic.image_mean,
                            synthetic.image_std)  # fmt: skip


def one_budget(k: int, anchor: Path, data: Path, bank: Path, work: Path, with_full: bool, args) -> dict:
    """Distill K pairs and score them against the coresets (and, once, full data) with the command line."""
    out = work / f"mdm-{k}"
    methods = ["synthetic", *CORESETS, *(["full"] if with_full else [])]
    distill_seconds = run_command(
        distill_command(anchor, data, bank, k, out, args), work / f"distill-{k}.log"
    )
    evaluate_argv = evaluate_command(anchor, data, out / "synthetic", methods, out / "students", args)
    evaluate_seconds = run_command(evaluate_argv, work / f"evaluate-{k}.log")
    return budget_record(k, anchor, data, bank, work, methods, args, distill_seconds, evaluate_seconds)


def budget_record(
    k: int,
    anchor: Path,
    data: Path,
    bank: Path,
    work: Path,
    methods: list[str],
    args,
    distill_seconds: float,
    evaluate_seconds: float,
) -> dict:
    """A budget's record, read from what its two commands wrote under ``work/mdm-<K>``."""
    out = work / f"mdm-{k}"
    state = json.loads((out / f"checkpoint-{args.max_steps}" / "trainer_state.json").read_text())
    comparison = Comparison.from_dict(json.loads((out / "students" / "comparison.json").read_text()))
    synthetic = SyntheticSet.from_pretrained(out / "synthetic")
    evaluate_argv = evaluate_command(anchor, data, out / "synthetic", methods, out / "students", args)
    return {
        "k": k, "distill_command": shlex.join(distill_command(anchor, data, bank, k, out, args)),
        "evaluate_command": shlex.join(evaluate_argv),
        "distill_wall_seconds": distill_seconds, "evaluate_wall_seconds": evaluate_seconds,
        "distill_iteration_seconds": state["distill_seconds"], "iterations": state["step"],
        "best_step": state["best_step"], "validation_history": state["history"],
        "results": {
            row.method: {"label": row.label, "mean": row.means["mean"], "std": row.stds.get("mean"),
                         "means": row.means, "stds": row.stds, "seeds": row.seeds}
            for row in comparison.rows
        },
        "protocol": comparison.protocol,
        "drift": drift(synthetic, DualEncoder.from_pretrained(str(anchor)), data, args.cache_dir),
    }  # fmt: skip


def _birth(path: Path) -> float:
    """Creation time of a file or folder (``stat %W``; Python's ``os.stat`` has no birth time on Linux)."""
    return float(subprocess.run(["stat", "-c", "%W", str(path)], capture_output=True, text=True).stdout)


def collect_budget(k: int, anchor: Path, data: Path, bank: Path, work: Path, with_full: bool, args) -> dict:
    """The record of a budget whose two commands already ran (an interrupted table), wall times read from file
    creation times (distill: output folder -> final checkpoint; evaluate: its log -> its comparison.json)."""
    out = work / f"mdm-{k}"
    methods = ["synthetic", *CORESETS, *(["full"] if with_full else [])]
    distill_seconds = _birth(out / f"checkpoint-{args.max_steps}") - _birth(out)
    evaluate_seconds = (out / "students" / "comparison.json").stat().st_mtime - _birth(
        work / f"evaluate-{k}.log"
    )
    record = budget_record(k, anchor, data, bank, work, methods, args, distill_seconds, evaluate_seconds)
    return {**record, "wall_from_file_times": True}


def _cell(row: dict | None) -> str:
    return "–" if row is None else f"{row['mean']:.2f} ± {row['std'] or 0:.2f}"


def render(result: dict) -> str:
    budgets = result["budgets"]
    full = next((b["results"]["full"] for b in budgets if "full" in b["results"]), None)
    lines = [
        "# EmojiCaps through the command line: test mean recall (students selected on validation, scored once)",
        "",
        f"Command: `{result['command']}`",
        "",
        "| K | MDM (defaults) | joint k-means | random | herding | k-center | MDM − best coreset | "
        "closes of best→full gap | % of full | distill wall | iterations (best) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in budgets:
        res = b["results"]
        mdm, coresets = res["synthetic"], [res.get(name) for name in CORESETS]
        best = max((r for r in coresets if r), key=lambda r: r["mean"])
        gap = (mdm["mean"] - best["mean"]) / (full["mean"] - best["mean"]) if full else float("nan")
        share = 100 * mdm["mean"] / full["mean"] if full else float("nan")
        lines.append(
            f"| {b['k']} | **{_cell(mdm)}** | "
            + " | ".join(_cell(r) for r in coresets)
            + f" | {mdm['mean'] - best['mean']:+.2f} (vs {best['label']}) | {100 * gap:.0f} % | {share:.0f} % | "
            f"{b['distill_wall_seconds'] / 60:.1f} min | {b['iterations']} ({b['best_step']}) |"
        )
    if full:
        lines += ["", f"Full T train: {_cell(full)}."]
    lines += ["", "Drift of each distilled set from the real data (`mdm_hf.support.drift_statistics`):", "",
              "| K | text norm (real) | cosine to start (min) | moved | spread ratio | pixels outside |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for b in budgets:
        d = b["drift"]
        lines.append(
            f"| {b['k']} | {d['text_norm_mean']:.2f} ± {d['text_norm_std']:.2f} ({d['real_text_norm_mean']:.2f} ± "
            f"{d['real_text_norm_std']:.2f}) | {d['cosine_to_start_mean']:.2f} ({d['cosine_to_start_min']:.2f}) | "
            f"{100 * d['relative_movement_mean']:.0f} % | {d['spread_ratio']:.2f} | "
            f"{100 * d['pixels_outside_fraction']:.1f} % |"
        )
    lines += ["", "Per-budget commands:", ""]
    for b in budgets:
        lines += [f"- K = {b['k']}: `{b['distill_command']}`", f"  then `{b['evaluate_command']}`"]
    return "\n".join(lines) + "\n"


def merge(tags: list[str], tag: str) -> int:
    """One table from parts recorded in parallel (one process per core): budgets in order, commands kept."""
    parts = [json.loads((RESULTS / f"emojicaps_cli{t}.json").read_text()) for t in tags]
    budgets = sorted((b for p in parts for b in p["budgets"]), key=lambda b: b["k"])
    result = {
        **parts[0],
        "command": " && ".join(p["command"] for p in parts),
        "budgets": budgets,
        "parts": tags,
    }
    text = render(result)
    print(text)
    (RESULTS / f"emojicaps_cli{tag}.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / f"emojicaps_cli{tag}.md").write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="benchmarks/runs/emojicaps-cli")
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 200, 500])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the result files (variants, parallel parts)")
    parser.add_argument(
        "--no_full", action="store_true", help="skip the full-data students (another part has them)"
    )
    parser.add_argument(
        "--merge", nargs="+", default=None, help="tags of recorded parts to merge into one table"
    )
    parser.add_argument("--collect", action="store_true", help="record budgets whose commands already ran")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.tag)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    args.cache_dir = work / "cache"
    cfg = replace(BENCH, data_dir=str(work / "data"))
    start = time.perf_counter()
    data = build_data(cfg)
    anchor = train_anchor(cfg, data, work / "anchor")
    bank = train_experts(cfg, data, anchor, work / "experts")
    setup = time.perf_counter() - start
    budget_fn = collect_budget if args.collect else one_budget
    budgets = [
        budget_fn(k, anchor, data, bank, work, i == 0 and not args.no_full, args)
        for i, k in enumerate(args.budgets)
    ]
    result = {
        "command": "python benchmarks/emojicaps/cli_table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "threads": args.threads},  # fmt: skip
        "setup_seconds": setup, "budgets": budgets,
    }  # fmt: skip
    text = render(result)
    print(text)
    name = f"emojicaps_cli{args.tag}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
