"""The EmojiCaps benchmark (docs/benchmarks.md protocol, issue 7): quality of MDM against coresets and full data.

    python benchmarks/emojicaps/run.py                 # full protocol -> benchmarks/results/emojicaps.{json,md,png}
    python benchmarks/emojicaps/run.py --quick         # small smoke run (no result files)

One run, one machine, one student protocol for every method:

* data: EmojiCaps 48 px; P concepts (both styles) pre-train the anchor; T train = Twemoji renders of T;
  T validation / test = OpenMoji renders of disjoint T concepts (cross-style retrieval);
* anchor: ViT 192-d x 4 layers + frozen MiniLM, trained on P only; experts: LoRA fine-tunes on T train;
* MDM at K in {100, 200, 500}: pooled mixed teachers, the validation hook (a short student on T validation) keeps
  the best synthetic state -- test is never looked at during distillation;
* students (fresh projections and temperature, AdamW, selected on T validation, scored ONCE on T test), seeds
  0..S-1, on MDM, random, herding, k-center and the full T train split;
* ablations on validation at K = 100: initialisation, teacher, loss terms, teacher mode.

Stages are cached under --work_dir: a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from mdm_hf.bank import load_expert_bank
from mdm_hf.config import MDMConfig
from mdm_hf.demo import DemoConfig, build_data, student_config, train_anchor, train_experts
from mdm_hf.distill import MDMDistiller
from mdm_hf.models import DualEncoder
from mdm_hf.students import Comparison, compare_methods, student_validation_fn
from mdm_hf.synthetic import SyntheticSet

RESULTS = Path(__file__).resolve().parents[1] / "results"

BENCH = DemoConfig(
    image_size=48, anchor_hidden_size=192, anchor_layers=4, anchor_heads=3, anchor_steps=400, anchor_batch_size=128,
    num_experts=4, expert_epochs=4, expert_lr=5e-4, lora_r=8, distill_steps=300, teacher_mode="pooled",
    lr_pixels=100.0, lr_text=100.0, eval_steps=50, student_steps=100, student_eval_steps=10, student_seeds=3,
)  # fmt: skip


def _json(path: Path, value=None):
    if value is None:
        return json.loads(path.read_text()) if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
    return value


def distill_k(
    cfg: DemoConfig, data: Path, anchor: Path, bank: Path | None, work: Path, k: int, tag: str, **mdm
):
    """One MDM run with the validation hook; returns (SyntheticSet, record) and caches both."""
    out = work / f"mdm-{tag}"
    record_path = out / "record.json"
    if record_path.exists() and (out / "synthetic" / "mdm_synthetic.json").exists():
        return SyntheticSet.from_pretrained(str(out / "synthetic")), _json(record_path)
    hook = student_validation_fn(
        student_config(cfg, data, anchor, out / "val", num_pairs=k, num_seeds=1), max_steps=cfg.student_steps
    )
    values = dict(
        model_name_or_path=str(anchor), dataset_name=str(data), expert_bank=str(bank) if bank else None,
        num_pairs=k, max_steps=cfg.distill_steps, teacher_mode=cfg.teacher_mode, lr_pixels=cfg.lr_pixels,
        lr_text=cfg.lr_text, eval_steps=cfg.eval_steps, save_steps=cfg.distill_steps, output_dir=str(out / "run"),
        overwrite_output_dir=True, seed=cfg.seed,
    )  # fmt: skip
    values.update(mdm)
    start = time.perf_counter()
    distiller = MDMDistiller(MDMConfig(**values), validation_fn=hook)
    synthetic = distiller.distill()
    wall = time.perf_counter() - start
    history = distiller.state.history
    best = distiller.state.best_score
    step95 = next((h["step"] for h in history if best is not None and h["mean"] >= 0.95 * best), None)
    seconds_per_iter = statistics.median(t.total for t in distiller.timings)
    record = {
        "tag": tag, "k": k, "mdm_config": values, "wall_seconds": wall, "seconds_per_iteration": seconds_per_iter,
        "best_step": distiller.state.best_step, "best_validation_mean": best, "history": history,
        "step_to_95pct_of_best": step95,
        "iteration_seconds_to_95pct": None if step95 is None else step95 * seconds_per_iter,
    }  # fmt: skip
    synthetic.save_pretrained(out / "synthetic", overwrite=True)
    _json(record_path, record)
    return synthetic, record


def compare(
    cfg: DemoConfig, data: Path, anchor: Path, work: Path, k: int, methods, synthetic=None
) -> Comparison:
    """Students on ``methods`` at budget ``k`` (cached as JSON under ``work``)."""
    path = work / f"students-k{k}-{'-'.join(methods)}.json"
    cached = _json(path)
    if cached is not None:
        return Comparison.from_dict(cached)
    sc = student_config(
        cfg, data, anchor, work / f"students-k{k}", num_pairs=k, full_max_steps=2 * cfg.student_steps
    )
    results = compare_methods(sc, methods=methods, synthetic=synthetic)
    _json(path, results.to_dict())
    return results


def ablations(cfg: DemoConfig, data: Path, anchor: Path, bank: Path, work: Path, only=None) -> dict:
    """Validation-only ablations at K=100 (best validation mean recall of the distiller's hook)."""
    out = {}
    runs = {
        "init: random": dict(init="random"),
        "teacher: anchor only": dict(expert_bank=None),
        "loss: InfoNCE only": dict(lambda_agreement=0.0, lambda_discrepancy=0.0),
        "loss: InfoNCE + agreement": dict(lambda_discrepancy=0.0),
        "loss: InfoNCE + discrepancy": dict(lambda_agreement=0.0),
        "teacher mode: fresh (paper)": dict(teacher_mode="fresh"),
    }
    for name, overrides in runs.items():
        if only is not None and name not in only:
            continue
        tag = "ablate-" + "".join(c if c.isalnum() else "_" for c in name)
        _, rec = distill_k(cfg, data, anchor, bank, work, 100, tag, **overrides)
        out[name] = {"best_validation_mean": rec["best_validation_mean"], "best_step": rec["best_step"],
                     "seconds_per_iteration": rec["seconds_per_iteration"]}  # fmt: skip
    if only is not None and "teacher: single expert" not in only:
        return out
    # single expert: one checkpoint (the last epoch of expert 0) as a fixed teacher, full offset (alpha = 1)
    teacher = DualEncoder.from_pretrained(str(anchor))
    full = load_expert_bank(str(bank), teacher)
    single = full.select([(0, -1)])
    rec = _single_expert(cfg, data, anchor, work, teacher, single)
    out["teacher: single expert"] = rec
    return out


def _single_expert(cfg, data, anchor, work, teacher, bank) -> dict:
    out = work / "mdm-ablate-single-expert"
    cached = _json(out / "record.json")
    if cached is not None:
        return cached
    hook = student_validation_fn(
        student_config(cfg, data, anchor, out / "val", num_seeds=1), max_steps=cfg.student_steps
    )
    values = dict(
        model_name_or_path=str(anchor), dataset_name=str(data), num_pairs=100, max_steps=cfg.distill_steps,
        teacher_mode=cfg.teacher_mode, lr_pixels=cfg.lr_pixels, lr_text=cfg.lr_text, eval_steps=cfg.eval_steps,
        save_steps=cfg.distill_steps, output_dir=str(out / "run"), overwrite_output_dir=True, seed=cfg.seed,
        merge_alpha=1.0,
    )  # fmt: skip
    d = MDMDistiller(MDMConfig(**values), validation_fn=hook, teacher=teacher, expert_bank=bank)
    d.distill()
    rec = {"best_validation_mean": d.state.best_score, "best_step": d.state.best_step,
           "seconds_per_iteration": statistics.median(t.total for t in d.timings)}  # fmt: skip
    return _json(out / "record.json", rec)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work_dir", default="benchmarks/runs/emojicaps")
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 200, 500])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip_ablations", action="store_true")
    parser.add_argument(
        "--only_ablations", action="store_true", help="run the ablations (e.g. in a 2nd process)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--ablations", nargs="+", default=None, help="names of the ablations to run (default all)"
    )
    return parser.parse_args(argv)


def run_budgets(cfg: DemoConfig, data: Path, anchor: Path, bank: Path, work: Path, budgets: list[int]):
    """Full data once, then MDM and the coresets at every budget; returns (rows as dicts, distillation records,
    the full-data comparison)."""
    rows, distill_records = [], {}
    full = compare(cfg, data, anchor, work, budgets[0], ["full"])
    for k in budgets:
        synthetic, rec = distill_k(cfg, data, anchor, bank, work, k, f"k{k}")
        distill_records[k] = rec
        res = compare(
            cfg, data, anchor, work, k, ["synthetic", "random", "herding", "kcenter"], synthetic=synthetic
        )
        rows += [r.to_dict() for r in res.rows]
        print(
            "\n".join(f"K={k} {r.label}: {r.means['mean']:.2f} ± {r.stds['mean']:.2f}" for r in res.rows),
            flush=True,
        )
    rows += [r.to_dict() for r in full.rows]
    return rows, distill_records, full


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = replace(BENCH, student_seeds=args.seeds)
    if args.quick:
        cfg = DemoConfig.quick(student_seeds=1, eval_steps=20)
    work = Path(args.work_dir)
    start = time.perf_counter()
    data = build_data(cfg)
    anchor = train_anchor(cfg, data, work / "anchor")
    bank = train_experts(cfg, data, anchor, work / "experts")
    stage_seconds = {"setup": time.perf_counter() - start}
    if args.only_ablations:
        abl = {
            **(_json(work / "ablations.json") or {}),
            **ablations(cfg, data, anchor, bank, work, only=args.ablations),
        }
        _json(work / "ablations.json", abl)
        print(json.dumps(abl, indent=2))
        return 0

    rows, distill_records, full = run_budgets(cfg, data, anchor, bank, work, args.budgets)
    stage_seconds["main"] = time.perf_counter() - start
    abl = _json(work / "ablations.json")
    if abl is None and not (args.skip_ablations or args.quick):
        abl = _json(work / "ablations.json", ablations(cfg, data, anchor, bank, work))
    if abl is not None and 100 in distill_records:  # the default configuration is the main K=100 run
        rec = distill_records[100]
        abl = {"default (joint k-means init, Model Stock mix, all three loss terms, pooled)": {
            "best_validation_mean": rec["best_validation_mean"], "best_step": rec["best_step"],
            "seconds_per_iteration": rec["seconds_per_iteration"]}, **abl}  # fmt: skip

    summary = analyse(rows, args.budgets)
    result = {
        "command": "python benchmarks/emojicaps/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "threads": torch.get_num_threads()},  # fmt: skip
        "config": asdict(cfg), "protocol": full.protocol, "rows": rows, "distillation": distill_records,
        "ablations_validation": abl, "analysis": summary, "stage_seconds": stage_seconds,
    }  # fmt: skip
    print(render(result))
    if not args.quick:
        _json(RESULTS / "emojicaps.json", result)
        (RESULTS / "emojicaps.md").write_text(render(result))
        plot(result, RESULTS / "emojicaps.png")
    return 0


def analyse(rows: list[dict], budgets: list[int]) -> dict:
    """The issue's targets: discrimination, share of the coreset->full gap closed, fraction of full data."""
    by = {(r["method"], r["pairs"]): r for r in rows}
    full = next(r for r in rows if r["method"].lower().startswith("full"))
    out = {"full_mean": full["mean"], "per_budget": {}}
    random_first = by.get(("Random", budgets[0]))
    if random_first:
        out["full_over_random_first_budget"] = full["mean"] / max(random_first["mean"], 1e-9)
    for k in budgets:
        coresets = [by[(m, k)] for m in ("Random", "Herding", "K-Center") if (m, k) in by]
        mdm = by.get(("MDM", k))
        if not coresets or mdm is None:
            continue
        best = max(coresets, key=lambda r: r["mean"])
        gap = full["mean"] - best["mean"]
        out["per_budget"][k] = {
            "mdm": mdm["mean"], "mdm_std": mdm["mean_std"], "best_coreset": best["method"],
            "best_coreset_mean": best["mean"], "gap_closed": (mdm["mean"] - best["mean"]) / gap if gap > 0 else None,
            "fraction_of_full": mdm["mean"] / full["mean"],
        }  # fmt: skip
    return out


def render(r: dict) -> str:
    lines = [
        "## EmojiCaps benchmark: test mean recall of validation-selected students", "",
        f"Command: `{r['command']}` ({r['machine']['platform']}, torch {r['machine']['torch']}, "
        f"{r['machine']['threads']} threads).", "", f"Protocol: {r['protocol']}", "",
        "| method | pairs | IR@1 | IR@5 | IR@10 | TR@1 | TR@5 | TR@10 | mean ± std | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in r["rows"]:
        cells = " | ".join(f"{row[m]:.2f}" for m in ("ir@1", "ir@5", "ir@10", "tr@1", "tr@5", "tr@10"))
        lines.append(
            f"| {row['method']} | {row['pairs']} | {cells} | {row['mean']:.2f} ± {row['mean_std']:.2f} | {row['seeds']} |"
        )
    a = r["analysis"]
    lines += ["", f"Full data: {a['full_mean']:.2f}; full / random@{min(a['per_budget'] or [0])}: "
              f"{a.get('full_over_random_first_budget', float('nan')):.2f}x (target >= 3x).", ""]  # fmt: skip
    lines += ["| K | MDM | best coreset | gap to full closed (target K=100: >= 40 %) | fraction of full (target K=500: >= 60 %) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for k, v in a["per_budget"].items():
        closed = "n/a" if v["gap_closed"] is None else f"{100 * v['gap_closed']:.0f} %"
        lines.append(
            f"| {k} | {v['mdm']:.2f} ± {v['mdm_std']:.2f} | {v['best_coreset']} {v['best_coreset_mean']:.2f} | "
            f"{closed} | {100 * v['fraction_of_full']:.0f} % |"
        )
    lines += ["", "Distillation (validation hook every 50 iterations; best state kept):", "",
              "| K | s / iteration | best step | best val mean | step to 95 % of best | wall (s, incl. hook) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for k, d in r["distillation"].items():
        best = "n/a" if d["best_validation_mean"] is None else f"{d['best_validation_mean']:.2f}"
        lines.append(
            f"| {k} | {d['seconds_per_iteration']:.3f} | {d['best_step']} | {best} | "
            f"{d['step_to_95pct_of_best']} | {d['wall_seconds']:.0f} |"
        )
    if r.get("ablations_validation"):
        lines += ["", "Ablations at K = 100 (validation mean recall of the hook's student; not test):", "",
                  "| variant | best val mean | best step |", "|---|---|---|"]  # fmt: skip
        for name, v in r["ablations_validation"].items():
            lines.append(f"| {name} | {v['best_validation_mean']:.2f} | {v['best_step']} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = sorted({row["method"] for row in r["rows"] if not row["method"].lower().startswith("full")})
    for m in methods:
        pts = sorted((row["pairs"], row["mean"], row["mean_std"]) for row in r["rows"] if row["method"] == m)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=m)
    ax.axhline(r["analysis"]["full_mean"], color="k", linestyle="--", label="full T train")
    ax.set_xlabel("pairs (K)")
    ax.set_ylabel("test mean recall (%)")
    ax.set_xscale("log")
    ax.set_title("EmojiCaps: validation-selected students")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
