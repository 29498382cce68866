"""``mdm-hf demo``: the whole pipeline, offline, on EmojiCaps (a real image-caption set built from PyPI packages).

    mdm-hf demo --quick          # < 3 min on a 2-core laptop
    mdm-hf demo                  # the default preset, < 15 min

Stages (each reused when its output already exists, so a second run is fast):

1. build EmojiCaps (Twemoji / OpenMoji art, emoji names as captions; concept split P / T);
2. pre-train the anchor: a small ViT + the frozen pretrained MiniLM text encoder, on the P concepts only;
3. train LoRA experts from the anchor on T train, an adapter per epoch;
4. distill K pairs of T train with MDM (mixed teachers from the expert bank, hypersphere matching);
5. train students (fresh projections and temperature, selected on T validation, scored once on T test) on the
   MDM set and on random and k-center coresets of the same size, same protocol and seeds;
6. write the synthetic set in the Hub layout with its card (results table, preview picture).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from .anchor import AnchorPretrainingConfig, pretrain_anchor
from .config import MDMConfig, check_field_types
from .config import config_field as _f
from .distill import MDMDistiller
from .emojicaps import build_emojicaps, default_emojicaps_dir
from .experts import ExpertTrainingConfig, train_expert_bank
from .students import (
    StudentConfig,
    card_results,
    compare_methods,
    format_results_table,
    student_validation_fn,
)

logger = logging.getLogger(__name__)


# The ``--quick`` preset (``DemoConfig.quick()``): smaller images, tower and step counts; one student seed.
QUICK_PRESET = dict(
    image_size=32, anchor_hidden_size=96, anchor_layers=2, anchor_heads=2, anchor_steps=120,
    num_experts=2, expert_epochs=2, lora_r=4, distill_steps=40, eval_steps=0, student_steps=60,
    student_eval_steps=10, student_seeds=1,
)  # fmt: skip


@dataclass
class DemoConfig:
    """Sizes of every stage of ``mdm-hf demo``; field help doubles as its ``--help``. ``quick()`` and the defaults
    are its two presets (the defaults follow docs/benchmarks.md's EmojiCaps setting)."""

    output_dir: str = _f("mdm-demo", "Where the anchor, experts, synthetic set and results are written.")
    data_dir: str | None = _f(
        None, "Where EmojiCaps is built / found (default: $MDM_HF_HOME/emojicaps-<size>px)."
    )
    max_concepts: int | None = _f(None, "Use a seeded subset of EmojiCaps' concepts (tests; None: all).")
    image_size: int = _f(48, "Side of the EmojiCaps images in pixels.")
    num_pairs: int = _f(100, "K: synthetic pairs to distill.")
    # anchor (docs/benchmarks.md: 48 px, ViT 192-d x 4 layers, trained on P)
    anchor_hidden_size: int = _f(192, "Width of the anchor's ViT.")
    anchor_layers: int = _f(4, "Layers of the anchor's ViT.")
    anchor_heads: int = _f(3, "Attention heads of the anchor's ViT.")
    anchor_steps: int = _f(250, "Anchor pre-training steps on the P concepts.")
    anchor_batch_size: int = _f(128, "Anchor pre-training batch size.")
    # experts
    num_experts: int = _f(2, "LoRA experts fine-tuned from the anchor on T train.")
    expert_epochs: int = _f(3, "Epochs per expert (an adapter per epoch).")
    expert_lr: float = _f(5e-4, "Expert learning rate (AdamW).")
    lora_r: int = _f(8, "LoRA rank of the experts.")
    # distillation
    distill_steps: int = _f(200, "MDM iterations.")
    teacher_mode: Literal["fresh", "pooled"] = _f("pooled", "MDM teacher mode (see mdm-hf distill --help).")
    lr_pixels: float = _f(100.0, "MDM pixel learning rate (MDMConfig's default).")
    lr_text: float = _f(10.0, "MDM text-feature learning rate (MDMConfig's default).")
    eval_steps: int = _f(100, "Validate the set every N iterations (0: no validation, keep the last state).")
    # students
    student_steps: int = _f(100, "Steps of each student.")
    student_eval_steps: int = _f(
        10, "Students are scored on validation every N steps (the best step is kept)."
    )
    student_seeds: int = _f(2, "Student seeds per method.")
    methods: list[str] = field(
        default_factory=lambda: ["synthetic", "kmeans", "random", "kcenter"],
        metadata={"help": "The sets compared: synthetic (the distilled set) and coresets of the same size."},
    )
    seed: int = _f(0, "Seed of every stage.")

    def __post_init__(self) -> None:
        check_field_types(self)

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """The ``--quick`` preset (:data:`QUICK_PRESET`); keyword overrides win."""
        return cls(**{**QUICK_PRESET, **overrides})


def _stage(name: str):
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def build_data(cfg: DemoConfig) -> Path:
    """EmojiCaps for the demo; an older EmojiCaps build in the same folder is rebuilt (a folder that is not an
    EmojiCaps build is never touched: :func:`~mdm_hf.emojicaps.build_emojicaps`)."""
    path = Path(cfg.data_dir) if cfg.data_dir else default_emojicaps_dir(cfg.image_size)
    return build_emojicaps(
        path, image_size=cfg.image_size, seed=cfg.seed, max_concepts=cfg.max_concepts, overwrite=True
    )


def train_anchor(cfg: DemoConfig, data_dir: Path, out: Path) -> Path:
    """Pre-train the anchor on the P concepts (reused if already there)."""
    if (out / "config.json").exists():
        print(f"reusing the anchor in {out}")
        return out
    result = pretrain_anchor(
        AnchorPretrainingConfig(
            dataset_name=str(data_dir),
            train_split="pretrain",
            image_size=cfg.image_size,
            hidden_size=cfg.anchor_hidden_size,
            num_hidden_layers=cfg.anchor_layers,
            num_attention_heads=cfg.anchor_heads,
            intermediate_size=4 * cfg.anchor_hidden_size,
            max_steps=cfg.anchor_steps,
            num_train_epochs=10_000,
            per_device_train_batch_size=cfg.anchor_batch_size,
            grayscale_p=0.2,
            blur_p=0.2,
            seed=cfg.seed,
            output_dir=str(out),
        )  # fmt: skip
    )
    print(f"anchor loss on fixed batches: {result.initial_loss:.3f} -> {result.final_loss:.3f}")
    return out


def train_experts(cfg: DemoConfig, data_dir: Path, anchor: Path, out: Path) -> Path:
    """LoRA experts on T train (reused if the bank is complete)."""
    if (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        if len(manifest.get("experts", [])) >= cfg.num_experts:
            print(f"reusing the expert bank in {out}")
            return out
    return Path(
        train_expert_bank(
            ExpertTrainingConfig(
                model_name_or_path=str(anchor),
                dataset_name=str(data_dir),
                train_split="train",
                validation_split="validation",
                num_experts=cfg.num_experts,
                num_train_epochs=cfg.expert_epochs,
                lora_r=cfg.lora_r,
                lora_alpha=2.0 * cfg.lora_r,
                learning_rate=cfg.expert_lr,
                seed=cfg.seed,
                output_dir=str(out),
                overwrite_output_dir=True,
            )  # fmt: skip
        )
    )


def student_config(cfg: DemoConfig, data_dir: Path, anchor: Path, out: Path, **overrides):
    """The one student protocol every method is scored with (docs/benchmarks.md: fresh head, val-selected)."""
    values = dict(
        model_name_or_path=str(anchor), dataset_name=str(data_dir), train_split="train",
        validation_split="validation", test_split="test", preset="small", num_pairs=cfg.num_pairs,
        max_steps=cfg.student_steps, eval_steps=cfg.student_eval_steps, num_seeds=cfg.student_seeds,
        seed=cfg.seed, output_dir=str(out),
    )  # fmt: skip
    values.update(overrides)
    return StudentConfig(**values)


def distill(cfg: DemoConfig, data_dir: Path, anchor: Path, bank: Path, out: Path, validation_fn=None):
    """MDM on T train with the expert bank; returns the SyntheticSet (best on validation when a hook is given)."""
    config = MDMConfig(
        model_name_or_path=str(anchor), dataset_name=str(data_dir), train_split="train",
        validation_split="validation", expert_bank=str(bank), num_pairs=cfg.num_pairs,
        max_steps=cfg.distill_steps, teacher_mode=cfg.teacher_mode, real_batch_size=256, syn_batch_size=64,
        lr_pixels=cfg.lr_pixels, lr_text=cfg.lr_text, eval_steps=cfg.eval_steps if validation_fn else 0,
        save_steps=max(cfg.distill_steps // 2, 1), output_dir=str(out), overwrite_output_dir=True, seed=cfg.seed,
    )  # fmt: skip
    return MDMDistiller(config, validation_fn=validation_fn).distill()


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage and return where things are plus the results table."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = _stage("1/6 EmojiCaps")
    data_dir = build_data(cfg)
    timings["data"] = time.perf_counter() - t
    t = _stage("2/6 anchor pre-training on the P concepts (ViT + frozen MiniLM)")
    anchor = train_anchor(cfg, data_dir, out / "anchor")
    timings["anchor"] = time.perf_counter() - t
    t = _stage("3/6 LoRA experts on T train")
    bank = train_experts(cfg, data_dir, anchor, out / "experts")
    timings["experts"] = time.perf_counter() - t
    t = _stage(f"4/6 MDM distillation to {cfg.num_pairs} pairs")
    hook = None
    if cfg.eval_steps:
        hook = student_validation_fn(
            student_config(cfg, data_dir, anchor, out / "students-val", num_seeds=1),
            max_steps=cfg.student_steps,
        )
    synthetic = distill(cfg, data_dir, anchor, bank, out / "distill", validation_fn=hook)
    timings["distill"] = time.perf_counter() - t
    t = _stage("5/6 students: MDM vs coresets, same protocol and seeds (selected on validation, test once)")
    results = compare_methods(
        student_config(cfg, data_dir, anchor, out / "students"), methods=cfg.methods, synthetic=synthetic
    )
    timings["students"] = time.perf_counter() - t
    print(format_results_table(results))
    t = _stage("6/6 the synthetic set in the Hub layout, with its card")
    synthetic.results = card_results(results)
    synthetic_dir = out / "synthetic"
    synthetic.save_pretrained(synthetic_dir, overwrite=True)
    timings["save"] = time.perf_counter() - t
    summary = {
        "data": str(data_dir), "anchor": str(anchor), "experts": str(bank), "synthetic": str(synthetic_dir),
        "results": card_results(results), "seconds": timings, "config": asdict(cfg),
    }  # fmt: skip
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"\nDone in {sum(timings.values()):.0f} s.\n"
        f"  synthetic set : {synthetic_dir}  (datasets.load_dataset('{synthetic_dir}'), card: README.md, "
        f"picture: preview.png)\n"
        f"  anchor        : {anchor}\n  expert bank   : {bank}\n  EmojiCaps     : {data_dir}\n"
        f'Share it:  python -c "from mdm_hf import SyntheticSet; '
        f"SyntheticSet.from_pretrained('{synthetic_dir}').push_to_hub('<user>/emojicaps-mdm-{cfg.num_pairs}')\"\n"
        f"           (after `hf auth login`; the expert bank: mdm_hf.bank.push_expert_bank('{bank}', "
        "'<user>/emojicaps-experts'))"
    )
    return summary
