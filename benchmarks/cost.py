"""Cost of one MDM iteration, split into its parts, against the floor (issue 3 / docs/benchmarks.md "Cost").

    python benchmarks/cost.py                       # writes benchmarks/results/cost.json and cost.md
    python benchmarks/cost.py --steps 10 --quick    # smoke run

Measured in ONE run on the same machine, medians over ``--steps`` iterations after warm-up:

* both teacher modes (fresh: a new mixed teacher + real forward every iteration; pooled: P teachers whose
  real-side embeddings are cached), split into merge / real side / synthetic forward / loss / backward;
* the floor: one forward + backward of the synthetic mini-batch alone under a fixed teacher;
* the real-set size: 1k vs 100k cached pairs;
* k-means initialisation of K = 1000 over 100k x 512 joint features.

The teacher is a small ViT dual encoder (48 px, patch 8, hidden 192, 4 layers; BERT-style text tower whose
features are cached, as in the real pipeline). Experts: 2 LoRA experts x 3 epochs (r = 8 on q/k/v/out of the
vision tower) + full projections, random offsets (cost does not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def build_teacher(directory: Path, image_size: int = 48):
    """A small ViT dual encoder saved and re-loaded through the real from_pretrained path."""
    from transformers import (
        BertConfig,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    from mdm_hf.models import DualEncoder
    from mdm_hf.testing import _word_tokenizer

    torch.manual_seed(0)
    tokenizer = _word_tokenizer(bert=True)
    vision = CLIPVisionConfig(
        hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
        image_size=image_size, patch_size=8,
    )  # fmt: skip
    text = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=6,
                      vocab_size=len(tokenizer), max_position_embeddings=16)  # fmt: skip
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=256)
    config.mdm_text_pooling = "mean"
    VisionTextDualEncoderModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(directory)
    return DualEncoder.from_pretrained(str(directory))


def random_lora_bank(teacher, num_experts: int = 2, num_epochs: int = 3, rank: int = 8):
    """An in-memory ExpertBank with LoRA offsets on the vision attention and dense projection offsets."""
    from mdm_hf.merge import ExpertBank, LowRankDelta

    params = dict(teacher.model.named_parameters())
    targets = [
        n
        for n in params
        if n.startswith("vision_model.") and n.endswith(("_proj.weight",)) and "self_attn" in n
    ]
    gen = torch.Generator().manual_seed(0)
    experts = []
    for _ in range(num_experts):
        epochs = []
        for _ in range(num_epochs):
            deltas = {}
            for name in targets:
                out_dim, in_dim = params[name].shape
                deltas[name] = LowRankDelta(
                    torch.randn(rank, in_dim, generator=gen) * 0.01, torch.randn(out_dim, rank, generator=gen) * 0.01,
                    scale=2.0,
                )  # fmt: skip
            for name in ("visual_projection.weight", "text_projection.weight"):
                deltas[name] = torch.randn(params[name].shape, generator=gen) * 0.01
            epochs.append(deltas)
        experts.append(epochs)
    anchor = {k: v.detach().clone() for k, v in params.items()}
    return ExpertBank(anchor, experts)


@dataclass
class StubSplit:
    """Just what the distiller's real side reads from a split: enough for N cached pairs without decoding images."""

    caption_to_image: torch.Tensor
    captions: list
    name: str = "synthetic-benchmark"
    split: str = "train"
    fingerprint: str = "bench"
    license: str | None = None

    @property
    def num_captions(self) -> int:
        return len(self.caption_to_image)

    @property
    def num_images(self) -> int:
        return int(self.caption_to_image.max()) + 1


def make_distiller(teacher, bank, num_pairs: int, num_real: int, mode: str, pool: int, tmp: Path):
    """An MDMDistiller on N random cached real pairs (2 captions per image), initialised from random pairs."""
    from mdm_hf.config import MDMConfig
    from mdm_hf.distill import MDMDistiller

    cfg = MDMConfig(
        model_name_or_path="bench", dataset_name="bench", num_pairs=num_pairs, real_batch_size=256,
        syn_batch_size=64, teacher_mode=mode, teacher_pool_size=pool, init="random", output_dir=str(tmp),
        eval_steps=0, save_steps=0, lr_pixels=100.0, lr_text=100.0, contrastive="clip",
    )  # fmt: skip
    num_images = num_real // 2
    gen = torch.Generator().manual_seed(1)
    split = StubSplit(torch.arange(num_images).repeat_interleave(2), [""] * num_real)
    s = teacher.image_size
    d = MDMDistiller(
        cfg, teacher=teacher, expert_bank=bank, train_data=split,
        text_features=torch.randn(num_real, teacher.text_feature_dim, generator=gen),
        pixel_cache=torch.randn(num_images, 3, s, s, generator=gen),
    )  # fmt: skip
    d.initialize(indices=torch.randperm(num_real, generator=gen)[:num_pairs])
    if mode == "pooled":
        d.build_teacher_pool()
    return d


def floor_step(d, gen) -> float:
    """One forward + backward of the synthetic mini-batch alone (fixed teacher, no real side, no merge)."""
    idx = torch.randperm(d.config.num_pairs, generator=gen)[: d.config.syn_batch_size]
    start = time.perf_counter()
    zv = d.teacher.image_embeds(d.syn_pixels[idx])
    zt = d.teacher.project_text(d.syn_text[idx])
    (zv.sum() + zt.sum()).backward()
    return time.perf_counter() - start


def measure(d, steps: int, warmup: int = 3) -> dict:
    gen = torch.Generator().manual_seed(2)
    for _ in range(warmup):
        d.training_step(gen)
        floor_step(d, gen)
    parts = {k: [] for k in ("merge", "real", "synthetic", "loss", "backward", "total", "floor")}
    for _ in range(steps):  # interleaved: both see the same machine state
        _, t = d.training_step(gen)
        for k in ("merge", "real", "synthetic", "loss", "backward", "total"):
            parts[k].append(getattr(t, k))
        parts["floor"].append(floor_step(d, gen))
    med = {k: statistics.median(v) for k, v in parts.items()}
    med["ratio_to_floor"] = med["total"] / med["floor"]
    return med


def measure_sizes(teacher, bank, sizes, mode: str, steps: int, tmp: Path) -> dict:
    """Per-iteration seconds for two real-set sizes, interleaved step by step so both see the same machine."""
    runs = {n: make_distiller(teacher, bank, 100, n, mode, 2, tmp / f"{mode}{n}") for n in sizes}
    gen = torch.Generator().manual_seed(3)
    times = {n: [] for n in sizes}
    for i in range(steps + 3):
        for n, d in runs.items():
            _, t = d.training_step(gen)
            if i >= 3:  # warm-up
                times[n].append(t.total)
    return {n: statistics.median(v) for n, v in times.items()}


def kmeans_timing(n: int, dim: int = 512, k: int = 1000) -> float:
    from mdm_hf.selection import kmeans_select

    feats = torch.nn.functional.normalize(
        torch.randn(n, dim, generator=torch.Generator().manual_seed(0)), dim=1
    )
    start = time.perf_counter()
    chosen = kmeans_select(feats, k, seed=0)
    elapsed = time.perf_counter() - start
    assert len(set(chosen.tolist())) == k
    return elapsed


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small sizes, no result files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only_sizes", action="store_true", help="re-measure only the real-set-size comparison"
    )
    parser.add_argument(
        "--only_kmeans", type=int, nargs="+", default=None, help="time k-means for these N only"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only_kmeans:
        results = json.loads((RESULTS / "cost.json").read_text())
        for n in args.only_kmeans:
            results["kmeans_seconds"][str(n)] = kmeans_timing(n)
            print("kmeans", n, results["kmeans_seconds"][str(n)], flush=True)
        results["peak_rss_mb_kmeans"] = peak_rss_mb()
        results["command_kmeans"] = "python benchmarks/cost.py " + " ".join(argv or sys.argv[1:])
        (RESULTS / "cost.json").write_text(json.dumps(results, indent=2))
        (RESULTS / "cost.md").write_text(render_table(results))
        return 0
    tmp = Path(tempfile.mkdtemp())
    teacher = build_teacher(tmp / "teacher")
    bank = random_lora_bank(teacher)
    sizes = (1000, 4000) if args.quick else (1000, 100_000)
    if args.only_sizes:
        results = json.loads((RESULTS / "cost.json").read_text())
        results["real_set_size"] = {}
        for mode in ("fresh", "pooled"):
            for n, sec in measure_sizes(teacher, bank, sizes, mode, args.steps, tmp).items():
                results["real_set_size"][f"{mode}/{n}"] = sec
            print(mode, results["real_set_size"], flush=True)
        results["command_sizes"] = "python benchmarks/cost.py " + " ".join(argv or sys.argv[1:])
        (RESULTS / "cost.json").write_text(json.dumps(results, indent=2))
        (RESULTS / "cost.md").write_text(render_table(results))
        print(render_table(results))
        return 0
    results = {"modes": {}, "real_set_size": {}}
    for mode in ("fresh", "pooled"):
        d = make_distiller(teacher, bank, 100, sizes[0], mode, 8, tmp / mode)
        results["modes"][mode] = measure(d, args.steps)
        print(mode, json.dumps({k: round(v, 4) for k, v in results["modes"][mode].items()}), flush=True)
    for mode in ("fresh", "pooled"):
        for n, sec in measure_sizes(teacher, bank, sizes, mode, args.steps, tmp).items():
            results["real_set_size"][f"{mode}/{n}"] = sec
        print(mode, results["real_set_size"], flush=True)
    results["kmeans_seconds"] = {
        str(n): kmeans_timing(n) for n in ((10_000,) if args.quick else (10_000, 100_000))
    }
    print("kmeans", results["kmeans_seconds"], flush=True)
    results["peak_rss_mb"] = peak_rss_mb()
    results["machine"] = {
        "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu_count": __import__("os").cpu_count(),
    }  # fmt: skip
    results["command"] = "python benchmarks/cost.py " + " ".join(argv or sys.argv[1:])
    results["setup"] = {"num_pairs": 100, "syn_batch_size": 64, "real_batch_size": 256, "teacher": "ViT 48px/8, d=192, 4 layers", "pool": 8, "experts": "2 x 3 epochs LoRA r=8"}  # fmt: skip
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "cost.json").write_text(json.dumps(results, indent=2))
        (RESULTS / "cost.md").write_text(render_table(results))
    print(render_table(results))
    return 0


def render_table(r: dict) -> str:
    lines = [
        "## Cost of one MDM iteration (median seconds, K=100, synthetic batch 64, real batch 256)",
        "",
        f"Command: `{r['command']}`; machine: {r['machine']['platform']}, {r['machine']['threads']} threads.",
        "",
        "| mode | merge | real side | synthetic fwd | loss | backward | total | floor | total / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in r["modes"].items():
        lines.append(
            f"| {mode} | {m['merge']:.4f} | {m['real']:.4f} | {m['synthetic']:.4f} | {m['loss']:.4f} | "
            f"{m['backward']:.4f} | {m['total']:.4f} | {m['floor']:.4f} | {m['ratio_to_floor']:.2f} |"
        )
    lines += [
        "",
        f"Real-set size (interleaved step by step; `{r.get('command_sizes', r['command'])}`):",
        "",
        "| real set size | fresh (s/iter) | pooled (s/iter) |",
        "|---|---|---|",
    ]
    sizes = sorted({int(k.split("/")[1]) for k in r["real_set_size"]})
    for n in sizes:
        lines.append(
            f"| {n:,} | {r['real_set_size'][f'fresh/{n}']:.4f} | {r['real_set_size'][f'pooled/{n}']:.4f} |"
        )
    lines += ["", f"k-means (`{r.get('command_kmeans', r['command'])}` for the largest N):", ""]
    lines += ["| k-means init, K=1000, d=512 | seconds |", "|---|---|"]
    lines += [f"| N = {int(n):,} | {s:.1f} |" for n, s in r["kmeans_seconds"].items()]
    lines += ["", f"Peak RSS: {r['peak_rss_mb']:.0f} MB", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
