"""Does each level of MDM matter? Ablations at K = 100 on EmojiCaps, in two regimes (issue 17).

    python benchmarks/ablations.py --regime clip     # the contrastive (CLIP-like) anchor of the EmojiCaps benchmark
    python benchmarks/ablations.py --regime paper    # paper regime: classifier-pretrained vision tower, frozen
                                                     # MiniLM, fresh projections (mdm_hf.classifier_anchor)

-> benchmarks/results/ablations-<regime>.{json,md}, rewritten after every run (partial results survive).

Regimes. ``clip`` reuses the EmojiCaps anchor (ViT + frozen MiniLM trained contrastively on the P concepts), its data
and its 4 x 4 LoRA expert bank, read-only, from ``--clip_dir``. ``paper`` builds once, under ``--work_dir``, an anchor
whose ViT is pre-trained as a classifier of the P concepts (the ImageNet analogue) with the same MiniLM text tower
and untrained projections, and a 2-expert x 3-epoch LoRA bank fine-tuned from it on T train (as in MDM, where the
anchor alone aligns nothing and the experts make the teacher).

Rows (docs/method.md §1-§3; the default is joint k-means, Model Stock, all three loss terms, pooled teachers):
teacher = anchor only / one expert (expert 0's last checkpoint, fixed, full offset) / mean of two experts (weighted
sum: t = 1, merge_alpha 1, i.e. the plain average of the drawn experts) / Model Stock; loss = InfoNCE / + agreement /
+ discrepancy / all; init = random / image-only k-means / text-only k-means / joint k-means; and the joint-k-means
coreset itself (step 0, no distillation); a small sweep of the mixed teacher (4 checkpoints per teacher; first
epoch only). Each row: ``--distill_seeds`` distillations (seed = init, teacher draws, batches) x ``--student_seeds``
small students (50 steps, best step on T validation), scored on T VALIDATION only.

Diagnostics: cosine of expert offsets and Model Stock's ratio t (per tensor group), and the geodesic spread of the
real agreement / discrepancy directions against the GKE bandwidth sigma.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from mdm_hf.bank import load_expert_bank
from mdm_hf.config import MDMConfig
from mdm_hf.data import cached_text_features, load_split, preprocess_split_images
from mdm_hf.demo import DemoConfig, student_config, train_experts
from mdm_hf.distill import MDMDistiller
from mdm_hf.losses import agreement_discrepancy, clip_contrastive_loss, geodesic_kernel_energy
from mdm_hf.models import DualEncoder
from mdm_hf.students import StudentEvaluator

RESULTS = Path(__file__).resolve().parent / "results"
CLIP_DIR = "benchmarks/runs/emojicaps-cli"
# The EmojiCaps benchmark's sizes (benchmarks/emojicaps/run.py); paper-regime bank: 2 experts x 3 epochs. Students:
# the small preset at 50 steps, not the benchmark's 100 (100-pair students peak after 10-20 steps; CPU budget).
SIZES = DemoConfig(image_size=48, anchor_hidden_size=192, anchor_layers=4, anchor_heads=3, anchor_steps=400,
                   anchor_batch_size=128, num_experts=2, expert_epochs=3, expert_lr=5e-4, lora_r=8,
                   student_steps=50, student_eval_steps=10)  # fmt: skip
K = 100

# name -> (level, MDMConfig overrides); special keys: "_bank" ("none" | "one"), "_steps" (0: the coreset).
ROWS: dict[str, tuple[str, dict]] = {
    "joint k-means coreset (step 0, no distillation)": ("coreset", {"_steps": 0}),
    "default: joint k-means, Model Stock, all three terms": ("default", {}),
    "teacher: anchor only": ("teacher", {"_bank": "none"}),
    "teacher: one expert (expert 0, last epoch)": ("teacher", {"_bank": "one", "merge_alpha": 1.0}),
    "teacher: mean of two experts (weighted sum)": ("teacher", {"merge_method": "mean", "merge_alpha": 1.0}),
    "loss: InfoNCE only": ("loss", {"lambda_agreement": 0.0, "lambda_discrepancy": 0.0}),
    "loss: InfoNCE + agreement": ("loss", {"lambda_discrepancy": 0.0}),
    "loss: InfoNCE + discrepancy": ("loss", {"lambda_agreement": 0.0}),
    # a positive control, beyond the paper: at the default weights the geodesic terms' gradient is ~0.5 % of
    # InfoNCE's at the start (gradient diagnostic); x50 gives them a grip comparable to InfoNCE's
    "loss: all three, geodesic weights x50 (lambda 40)": (
        "loss",
        {"lambda_agreement": 40.0, "lambda_discrepancy": 40.0},
    ),
    "init: random real pairs": ("init", {"init": "random"}),
    "init: image-only k-means": ("init", {"init": "kmeans_image"}),
    "init: text-only k-means": ("init", {"init": "kmeans_text"}),
    # the small sweep of issue 17 (default: 2 checkpoints per teacher, any epoch): more checkpoints raise Model
    # Stock's t = k cos / (1 + (k - 1) cos) when expert offsets are near orthogonal; early epochs are closer to the anchor
    "sweep: 4 checkpoints per teacher (experts_per_teacher 4)": ("sweep", {"experts_per_teacher": 4}),
    "sweep: first epoch only (max_start_epoch 1)": ("sweep", {"max_start_epoch": 1}),
}
DEFAULT_ROW = "default: joint k-means, Model Stock, all three terms"


def _json(path: Path, value=None):
    if value is None:
        return json.loads(path.read_text()) if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
    return value


# ============================================================================================ the two regimes
def build_paper_regime(data: Path, work: Path) -> tuple[Path, Path, dict]:
    """Classifier anchor + 2 x 3 LoRA bank under ``work`` (reused when there); returns (anchor, bank, seconds)."""
    from mdm_hf.classifier_anchor import ClassifierAnchorConfig, pretrain_classifier_anchor

    anchor, seconds = work / "anchor", {}
    if not (anchor / "config.json").exists():
        start = time.perf_counter()
        result = pretrain_classifier_anchor(ClassifierAnchorConfig(
            dataset_name=str(data), train_split="pretrain", label_column="concept", image_size=SIZES.image_size,
            hidden_size=SIZES.anchor_hidden_size, num_hidden_layers=SIZES.anchor_layers,
            num_attention_heads=SIZES.anchor_heads, intermediate_size=4 * SIZES.anchor_hidden_size,
            max_steps=SIZES.anchor_steps, num_train_epochs=10_000, per_device_train_batch_size=SIZES.anchor_batch_size,
            grayscale_p=0.2, blur_p=0.2, seed=0, output_dir=str(anchor), overwrite_output_dir=True,
        ))  # fmt: skip
        seconds["anchor"] = time.perf_counter() - start
        print(
            f"classifier anchor: train top-1 error {result.initial_loss:.1f} % -> {result.final_loss:.1f} %"
        )
    start = time.perf_counter()
    bank = train_experts(SIZES, data, anchor, work / "experts")
    seconds["experts"] = time.perf_counter() - start
    return anchor, bank, seconds


class Regime:
    """Everything one regime's runs share, loaded once: data, cached text features and pixels, bank, students."""

    def __init__(self, name: str, data: Path, anchor: Path, bank_dir: Path, work: Path) -> None:
        self.name, self.data, self.anchor, self.bank_dir, self.work = name, data, anchor, bank_dir, work
        self.cache = work / "cache"
        probe = self.teacher()
        self.train = load_split(self.base_config(0))
        self.text_features = cached_text_features(probe, self.train, self.cache)
        self.pixels = preprocess_split_images(probe, self.train)
        self.bank = load_expert_bank(str(bank_dir), probe)
        students = student_config(SIZES, data, anchor, work / "students", num_pairs=K, num_seeds=1,
                                  cache_dir=str(self.cache))  # fmt: skip
        self.evaluator = StudentEvaluator(students, teacher=self.teacher(), validation_only=True)

    def teacher(self) -> DualEncoder:
        """A pristine anchor (a distiller installs merged tensors into its teacher in place)."""
        return DualEncoder.from_pretrained(str(self.anchor))

    @torch.no_grad()
    def embed_pairs(self, teacher: DualEncoder) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_v, z_t)`` of every real (image, caption) pair of the train split under ``teacher``."""
        zv = torch.cat([teacher.image_embeds(p) for p in self.pixels.split(256)])
        return zv[self.train.caption_to_image], teacher.project_text(self.text_features)

    def base_config(self, seed: int, **overrides) -> MDMConfig:
        values = dict(
            model_name_or_path=str(self.anchor), dataset_name=str(self.data), num_pairs=K, teacher_mode="pooled",
            teacher_pool_size=4, pool_real_size=512,  # CPU budget: 4 pooled teachers, 512 cached real pairs each
            eval_steps=0, save_steps=0, output_dir=str(self.work / "distill"), overwrite_output_dir=True,
            cache_dir=str(self.cache), seed=seed, logging_steps=0,
        )  # fmt: skip
        values.update(overrides)
        return MDMConfig(**values)

    def distill(self, overrides: dict, seed: int, steps: int):
        """One distillation (no validation hook: the last state is kept); returns (SyntheticSet, seconds)."""
        overrides = dict(overrides)
        kind = overrides.pop("_bank", "all")
        steps = overrides.pop("_steps", steps)
        bank = {"none": None, "one": self.bank.select([(0, -1)]), "all": self.bank}[kind]
        config = self.base_config(seed, max_steps=steps, **overrides)
        start = time.perf_counter()
        distiller = MDMDistiller(config, teacher=self.teacher(), expert_bank=bank, train_data=self.train,
                                 text_features=self.text_features, pixel_cache=self.pixels)  # fmt: skip
        synthetic = distiller.distill()
        return synthetic, time.perf_counter() - start

    def students(self, synthetic, seeds: list[int]) -> tuple[list[float], float]:
        """Validation mean recall of one small student per seed (best validation step) and the seconds spent."""
        start = time.perf_counter()
        pairs = self.evaluator.synthetic_pairs(synthetic)
        scores = [self.evaluator.train_student(pairs, s, max_steps=SIZES.student_steps).validation["mean"]
                  for s in seeds]  # fmt: skip
        return scores, time.perf_counter() - start


# ============================================================================================ diagnostics
GROUPS = {"projections": ("visual_projection", "text_projection"), "vision LoRA layers": ("vision_model",)}


def _group(key: str) -> str:
    return next((g for g, parts in GROUPS.items() if any(p in key for p in parts)), "other")


@torch.no_grad()
def merge_diagnostics(regime: Regime) -> dict:
    """Offset cosines and Model Stock ratio t, per tensor group, for pairs of last-epoch experts and for the pair
    draws a pooled run samples (the 'cos' and 't' of docs/method.md §2)."""
    bank = regime.bank
    last = [(i, bank.num_epochs(i)) for i in range(bank.num_experts)]
    gen = torch.Generator().manual_seed(7919)
    draws = {"last epochs, experts i<j": list(itertools.combinations(last, 2)),
             "pooled draws (k=2, seeded)": [tuple(bank.sample(gen, 2)) for _ in range(8)]}  # fmt: skip
    out = {}
    for name, pairs in draws.items():
        cos, ts = {}, {}
        for pair in pairs:
            for key, c in bank.offset_cosines(pair).items():
                cos.setdefault(_group(key), []).append(c)
            for key, t in bank.merged_state(pair)[1].items():
                ts.setdefault(_group(key), []).append(t)
        out[name] = {g: {"cos_mean": statistics.fmean(cos[g]), "cos_min": min(cos[g]), "cos_max": max(cos[g]),
                         "t_mean": statistics.fmean(ts[g])} for g in cos}  # fmt: skip
    return out


@torch.no_grad()
def spread_diagnostics(regime: Regime, sigma: float) -> dict:
    """Geodesic spread of the real agreement (u) and discrepancy (g) directions against the GKE bandwidth: pairwise
    angles (median, 10 / 90 %), nearest-neighbour angle and the mean off-diagonal kernel value, under the anchor and
    under one Model Stock teacher (docs/method.md §3)."""
    teacher = regime.teacher()
    out = {}
    for name in ("anchor", "Model Stock teacher"):
        if name != "anchor":
            draws = regime.bank.sample(torch.Generator().manual_seed(0), 2)
            regime.bank.install(teacher.model, regime.bank.merged_state(draws, 0.5)[0])
        zv, zt = regime.embed_pairs(teacher)
        entry = {"image-text cosine (matched pairs), mean": float((zv * zt).sum(-1).mean())}
        for label, d in (
            ("agreement u", F.normalize(zv + zt, dim=-1)),
            ("discrepancy g", F.normalize(zv - zt, dim=-1)),
        ):
            angle = torch.arccos((d @ d.T).clamp(-1, 1))
            off = angle[~torch.eye(len(d), dtype=torch.bool)]
            nn_angle = angle.fill_diagonal_(math.inf).min(1).values
            q = torch.quantile(off[torch.randperm(len(off), generator=torch.Generator().manual_seed(0))[:200_000]],
                               torch.tensor([0.1, 0.5, 0.9]))  # fmt: skip
            entry[label] = {"angle_p10": float(q[0]), "angle_median": float(q[1]), "angle_p90": float(q[2]),
                            "nearest_neighbour_angle_median": float(nn_angle.median()),
                            "mean_kernel_off_diagonal": float(torch.exp(-off.pow(2) / (2 * sigma**2)).mean())}  # fmt: skip
        out[name] = entry
    return out


def gradient_diagnostics(regime: Regime, steps: int, seed: int = 0) -> dict:
    """How hard each weighted loss term pulls on the synthetic embeddings (docs/method.md §3), at the start (K real
    pairs stand in for the joint-k-means init) and after a default distillation of ``steps`` iterations; 512 real
    pairs are the real batch, the anchor is the teacher. Per term: its unweighted value, the norm of its weighted
    gradient with respect to the K synthetic (image, text) embeddings, and that gradient's cosine with InfoNCE's;
    the geodesic terms also as the reference code's U-statistic (``geodesic_kernel_energy(unbiased=True)``). The
    embedding gradient is what the encoders back-propagate to pixels and text features, so the norms compare the
    terms' grip."""
    distilled = regime.distill({}, seed, steps)[0]
    config, teacher, gen = regime.base_config(seed), regime.teacher(), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zv, zt = regime.embed_pairs(teacher)
        order = torch.randperm(len(zt), generator=gen)
        states = {"start (K real pairs)": (zv[order[:K]], zt[order[:K]]),
                  f"after {steps} iterations (default row, seed {seed})": (
                      teacher.image_embeds(distilled.pixel_values.float()),
                      teacher.project_text(distilled.text_features.float()))}  # fmt: skip
    real_v, real_t = zv[order[K : K + 512]], zt[order[K : K + 512]]
    real_u, real_g = agreement_discrepancy(real_v, real_t)

    def geodesic(
        index: int, unbiased: bool
    ):  # the reference code's U-statistic next to this package's default
        return lambda sv, st: geodesic_kernel_energy(
            (real_u, real_g)[index], agreement_discrepancy(sv, st)[index], config.sigma, unbiased=unbiased
        )

    terms = {  # name -> (weight, unweighted term of the synthetic embeddings)
        "InfoNCE": (
            config.lambda_contrastive,
            lambda sv, st: clip_contrastive_loss(sv, st, 1 / config.temperature),
        ),
        "agreement": (config.lambda_agreement, geodesic(0, False)),
        "discrepancy": (config.lambda_discrepancy, geodesic(1, False)),
        "agreement, U-statistic": (config.lambda_agreement, geodesic(0, True)),
        "discrepancy, U-statistic": (config.lambda_discrepancy, geodesic(1, True)),
    }
    out = {}
    for state, (syn_v, syn_t) in states.items():
        grads, values = {}, {}
        for term, (weight, fn) in terms.items():
            sv, st = syn_v.clone().requires_grad_(True), syn_t.clone().requires_grad_(True)
            value = fn(sv, st)
            grads[term] = torch.cat([g.flatten() for g in torch.autograd.grad(weight * value, [sv, st])])
            values[term] = float(value.detach())
        out[state] = {term: {"value": values[term], "grad_norm": float(g.norm()),
                             "cosine_with_InfoNCE": float(F.cosine_similarity(g, grads["InfoNCE"], dim=0))}
                      for term, g in grads.items()}  # fmt: skip
    return out


# ============================================================================================ the run
def summarise(runs: list[dict]) -> dict:
    """Per row: mean and sample std (n - 1) over all distill x student scores; the std of the per-distill-seed
    means; and the paired difference to the default row (same distill and student seeds) with its standard error
    over distill seeds (sd of the per-seed mean differences / sqrt(#seeds))."""
    by_row: dict[str, dict[int, list[float]]] = {}
    cost: dict[str, list[float]] = {}
    for r in runs:
        by_row.setdefault(r["row"], {})[r["distill_seed"]] = r["scores"]
        cost.setdefault(r["row"], []).append(r["distill_seconds"] + r["student_seconds"])
    default = by_row.get(DEFAULT_ROW, {})
    rows = {}
    for name, seeds in by_row.items():
        flat = [s for v in seeds.values() for s in v]
        seed_means = [statistics.fmean(v) for v in seeds.values()]
        row = {"level": ROWS[name][0], "mean": statistics.fmean(flat),
               "std": statistics.stdev(flat) if len(flat) > 1 else None,
               "std_of_distill_seed_means": statistics.stdev(seed_means) if len(seed_means) > 1 else None,
               "runs": len(flat), "distill_seeds": sorted(seeds), "seconds_per_distill_seed": statistics.fmean(cost[name])}  # fmt: skip
        common = sorted(set(seeds) & set(default))
        if name != DEFAULT_ROW and common:
            diffs = [statistics.fmean(seeds[s]) - statistics.fmean(default[s]) for s in common]
            row["delta_vs_default"] = statistics.fmean(diffs)
            row["delta_se"] = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
        rows[name] = row
    return {n: rows[n] for n in ROWS if n in rows}


def render(result: dict) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"## MDM ablations on EmojiCaps, {result['regime']} regime, K = {K} (T validation mean recall; not test)",
             "", f"Command: `{result['command']}` ({result['machine']['platform']}, torch {result['machine']['torch']}, "
             f"{result['machine']['threads']} thread).", "", result["protocol"], "",
             "| row | level | mean ± std (runs) | std of distill-seed means | Δ vs default ± SE | s per distill seed |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in result["rows"].items():
        delta = "" if "delta_vs_default" not in r else f"{r['delta_vs_default']:+.2f} ± {fmt(r['delta_se'])}"
        lines.append(f"| {name} | {r['level']} | {r['mean']:.2f} ± {fmt(r['std'])} ({r['runs']}) | "
                     f"{fmt(r['std_of_distill_seed_means'])} | {delta} | {r['seconds_per_distill_seed']:.0f} |")  # fmt: skip
    missing = [n for n in ROWS if n not in result["rows"]]
    if missing:
        lines += ["", "Not run (did not fit): " + "; ".join(missing) + "."]
    diag = result.get("diagnostics", {})
    if "merge" in diag:
        lines += ["", "Expert offsets (docs/method.md §2): mean pairwise cosine and Model Stock ratio t per tensor group:",
                  "", "| draws | group | cos mean [min, max] | t mean |", "|---|---|---|---|"]  # fmt: skip
        for draw, groups in diag["merge"].items():
            for g, v in groups.items():
                lines.append(f"| {draw} | {g} | {v['cos_mean']:.3f} [{v['cos_min']:.3f}, {v['cos_max']:.3f}] | "
                             f"{v['t_mean']:.3f} |")  # fmt: skip
    if "spread" in diag:
        lines += ["", f"Real agreement / discrepancy directions against the GKE bandwidth sigma = {diag['sigma']} rad "
                  "(docs/method.md §3; angles in rad):", "",
                  "| teacher | direction | pairwise angle p10 / median / p90 | nearest-neighbour median | mean kernel |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for teacher, entry in diag["spread"].items():
            for label in ("agreement u", "discrepancy g"):
                v = entry[label]
                lines.append(f"| {teacher} | {label} | {v['angle_p10']:.2f} / {v['angle_median']:.2f} / "
                             f"{v['angle_p90']:.2f} | {v['nearest_neighbour_angle_median']:.2f} | "
                             f"{v['mean_kernel_off_diagonal']:.3f} |")  # fmt: skip
            lines.append(
                f"| {teacher} | matched image-text cosine | {entry['image-text cosine (matched pairs), mean']:.3f} | | |"
            )
    if "gradients" in diag:
        lines += ["", "Grip of each loss term (anchor teacher, 512 real pairs; gradient of the weighted term with "
                  "respect to the K synthetic embeddings):", "",
                  "| state | term | value | weighted gradient norm | cosine with the InfoNCE gradient |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for state, terms in diag["gradients"].items():
            for term, v in terms.items():
                lines.append(f"| {state} | {term} | {v['value']:.4f} | {v['grad_norm']:.4f} | "
                             f"{v['cosine_with_InfoNCE']:.2f} |")  # fmt: skip
    if result.get("setup_seconds"):
        lines += [
            "",
            "Setup seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result["setup_seconds"].items()) + ".",
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--regime", choices=("clip", "paper"), required=True)
    parser.add_argument(
        "--clip_dir", default=CLIP_DIR, help="EmojiCaps benchmark run with anchor/ data/ experts/."
    )
    parser.add_argument("--work_dir", default="benchmarks/runs/ablations")
    parser.add_argument("--steps", type=int, default=100, help="MDM iterations per distillation.")
    parser.add_argument("--distill_seeds", type=int, default=3)
    parser.add_argument("--student_seeds", type=int, default=3)
    parser.add_argument(
        "--rows", nargs="+", default=None, help="levels to run (coreset default teacher loss init sweep)"
    )
    parser.add_argument("--time_one", action="store_true", help="one default run, timed; no result files")
    parser.add_argument(
        "--diagnostics_only",
        action="store_true",
        help="recompute the diagnostics of a recorded run (one extra default distillation); run no row",
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="re-render the result files from the recorded runs; run nothing",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    clip_dir, work = Path(args.clip_dir), Path(args.work_dir) / args.regime
    if (args.report_only or args.diagnostics_only) and not (
        RESULTS / f"ablations-{args.regime}.json"
    ).exists():
        raise SystemExit(
            f"No recorded ablations-{args.regime}.json to re-render; run --regime {args.regime} first."
        )
    if args.report_only:
        result, runs = _json(RESULTS / f"ablations-{args.regime}.json"), _json(work / "runs.json") or []
        result.update(rows=summarise(runs), runs=runs)
        _json(RESULTS / f"ablations-{args.regime}.json", result)
        (RESULTS / f"ablations-{args.regime}.md").write_text(render(result))
        print(render(result))
        return 0
    data, setup = clip_dir / "data", {}
    if args.regime == "clip":
        anchor, bank = clip_dir / "anchor", clip_dir / "experts"
    else:
        os.environ["MDM_HF_HOME"] = str(work)  # the experts' text-feature cache
        anchor, bank, setup = build_paper_regime(data, work)
    start = time.perf_counter()
    regime = Regime(args.regime, data, anchor, bank, work)
    setup["load"] = time.perf_counter() - start
    student_seeds = list(range(args.student_seeds))
    if args.time_one:
        synthetic, seconds = regime.distill({}, 0, args.steps)
        scores, student_seconds = regime.students(synthetic, student_seeds)
        print(json.dumps({"distill_seconds": seconds, "student_seconds": student_seconds, "scores": scores}))
        return 0
    runs_path = work / "runs.json"
    runs = _json(runs_path) or []
    recorded = _json(RESULTS / f"ablations-{args.regime}.json") or {}
    sigma = MDMConfig.__dataclass_fields__["sigma"].default
    # the diagnostics cost a distillation: a continued run keeps the recorded ones (--diagnostics_only renews them)
    diagnostics = recorded.get("diagnostics", {})
    if args.diagnostics_only or "gradients" not in diagnostics:
        diagnostics = {"sigma": sigma, "merge": merge_diagnostics(regime), "spread": spread_diagnostics(regime, sigma),
                       "gradients": gradient_diagnostics(regime, args.steps)}  # fmt: skip
    result = {
        "command": "python benchmarks/ablations.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "regime": args.regime,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "protocol": (f"Anchor {anchor}, expert bank {bank}. MDM: K = {K}, {args.steps} iterations, 4 pooled teachers x 512 real pairs, "
                     f"MDMConfig defaults otherwise; {args.distill_seeds} distillation seeds x {args.student_seeds} "
                     f"small students ({SIZES.student_steps} steps, best step on T validation) scored on T "
                     "validation; std = sample std over all runs of a row."),
        "config": {"steps": args.steps, "sizes": asdict(SIZES)},
        "setup_seconds": setup,
        "diagnostics": diagnostics,
    }  # fmt: skip
    print(json.dumps(diagnostics, indent=1), flush=True)
    if args.diagnostics_only:  # the recorded run's result, its diagnostics replaced
        recorded.update(diagnostics=diagnostics, diagnostics_command=result.pop("command"))
        result = recorded
    result.update(rows=summarise(runs), runs=runs)
    if args.diagnostics_only:
        _json(RESULTS / f"ablations-{args.regime}.json", result)
        (RESULTS / f"ablations-{args.regime}.md").write_text(render(result))
        return 0
    done = {(r["row"], r["distill_seed"]) for r in runs}
    # Priority (issue 17): the teacher level against the default first, the coreset, then loss, init; seed-major
    # inside a group, so a run cut short leaves every row of a group with the same seeds (paired differences).
    groups = [("default", "teacher"), ("coreset",), ("loss",), ("init",), ("sweep",)]
    order = [(name, seed) for group in groups for seed in range(args.distill_seeds)
             for name, (level, _) in ROWS.items() if level in group and (args.rows is None or level in args.rows)]  # fmt: skip
    for name, seed in order:
        if (name, seed) in done:
            continue
        synthetic, seconds = regime.distill(ROWS[name][1], seed, args.steps)
        scores, student_seconds = regime.students(synthetic, student_seeds)
        runs.append({"row": name, "distill_seed": seed, "scores": scores, "distill_seconds": seconds,
                     "student_seconds": student_seconds})  # fmt: skip
        _json(runs_path, runs)
        print(f"{name} seed {seed}: {[round(s, 2) for s in scores]} ({seconds:.0f} + {student_seconds:.0f} s)",
              flush=True)  # fmt: skip
        result.update(rows=summarise(runs), runs=runs)
        _json(RESULTS / f"ablations-{args.regime}.json", result)
        (RESULTS / f"ablations-{args.regime}.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
