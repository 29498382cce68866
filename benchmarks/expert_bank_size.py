"""Storage of an MDM expert bank versus full-weight checkpoints (issue 4 / docs/benchmarks.md "Cost": storage).

    python benchmarks/expert_bank_size.py            # writes benchmarks/results/expert_bank_size.{json,md}

Two parts, one run:

* **measured** on the tiny test models (CLIP and SigLIP from ``mdm_hf.testing``): a LoRA bank of N experts x E
  epochs trained with the default LoRA settings of ``ExpertTrainingConfig`` (r = 16, alpha = 32, q/k/v/out of the
  vision tower, projections in full) is written to disk by the real code path; so is a full-weight bank of the same
  N x E (vision tower + projections per checkpoint, ``full_finetune``). Both are compared with N x E whole-model
  ``model.safetensors`` checkpoints (what LoRS-style trajectory buffers keep).
* **computed** for CLIP ViT-B/32 (``CLIPConfig()`` defaults: vision 768-d x 12 layers, patch 32; text 512-d x 12;
  projection 512) by counting parameters of a model built on the ``meta`` device -- no download, no weights.
  File sizes follow the safetensors format exactly (float32 data + JSON header), the same formula that is checked
  byte for byte against every file written in the measured part.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def safetensors_file_bytes(shapes: dict[str, tuple[int, ...]], metadata: dict | None = None) -> int:
    """Exact size of a float32 safetensors file: 8-byte length + JSON header (padded to 8) + data.

    Mirrors the format (tensors ordered by name for one dtype, compact JSON, space padding); checked against real
    files in :func:`measured_tiny`.
    """
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for name in sorted(shapes):
        n = 4 * math.prod(shapes[name])
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    return 8 + len(raw) + (-len(raw) % 8) + offset


def _file_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict | None]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


def measured_tiny(num_experts: int, num_epochs: int) -> dict:
    """Train LoRA and full banks on the tiny models and measure bytes on disk."""
    from mdm_hf import testing
    from mdm_hf.bank import bank_size_bytes
    from mdm_hf.experts import ExpertTrainingConfig, train_expert_bank

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = testing.write_caption_list_dataset(tmp / "data")
        for family in ("clip", "siglip"):
            anchor_dir = testing.TINY_BUILDERS[family](tmp / family)
            anchor_bytes = (anchor_dir / "model.safetensors").stat().st_size
            sizes = {}
            for kind in ("lora", "full"):
                config = ExpertTrainingConfig(
                    model_name_or_path=str(anchor_dir), dataset_name=str(dataset), num_experts=num_experts,
                    num_train_epochs=num_epochs, full_finetune=kind == "full", max_train_images=8,
                    per_device_train_batch_size=8, validation_split=None, output_dir=str(tmp / f"bank-{family}-{kind}"),
                    cache_dir=str(tmp / "cache"),
                )  # fmt: skip
                bank = train_expert_bank(config)
                weights = sum(p.stat().st_size for p in bank.rglob("*.safetensors"))
                sizes[kind] = {"bank_bytes": bank_size_bytes(bank), "weight_file_bytes": weights,
                               "per_checkpoint_bytes": weights // (num_experts * num_epochs)}  # fmt: skip
            for file in [anchor_dir / "model.safetensors", *bank.rglob("*.safetensors")]:
                shapes, metadata = _file_shapes(file)
                if safetensors_file_bytes(shapes, metadata) != file.stat().st_size:
                    raise AssertionError(f"size formula disagrees with {file}")
            whole = anchor_bytes * num_experts * num_epochs
            out[family] = {
                "anchor_model_safetensors_bytes": anchor_bytes,
                "lora_bank": sizes["lora"],
                "full_bank": sizes["full"],
                "whole_model_checkpoints_bytes": whole,
                "lora_vs_whole_model": sizes["lora"]["bank_bytes"] / whole,
                "lora_vs_full_bank": sizes["lora"]["bank_bytes"] / sizes["full"]["bank_bytes"],
            }
    return out


def computed_clip_b32(r: int, grids: list[tuple[int, int]]) -> dict:
    """Parameter counting for CLIP ViT-B/32 at the default LoRA settings (meta device: no memory, no download)."""
    from transformers import CLIPConfig, CLIPModel

    from mdm_hf.experts import PROJECTION_MODULES, lora_target_regex

    with torch.device("meta"):
        model = CLIPModel(CLIPConfig())
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    regex = lora_target_regex(model)  # default targets: q/k/v/out of the vision encoder layers
    import re

    adapter: dict[str, tuple[int, ...]] = {}  # the keys peft writes to adapter_model.safetensors
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.fullmatch(regex, name):
            out_dim, in_dim = module.weight.shape
            adapter[f"base_model.model.{name}.lora_A.weight"] = (r, in_dim)
            adapter[f"base_model.model.{name}.lora_B.weight"] = (out_dim, r)
    saved = PROJECTION_MODULES["clip"]
    for name, p in params.items():
        if any(name.startswith(m + ".") for m in saved):
            adapter[f"base_model.model.{name}"] = tuple(p.shape)
    lora_params = sum(math.prod(s) for n, s in adapter.items() if ".lora_" in n)
    projection_params = sum(math.prod(s) for n, s in adapter.items() if ".lora_" not in n)
    adapter_bytes = safetensors_file_bytes(adapter)
    trainable_full = [
        n for n in params if n.startswith(("vision_model.", "visual_projection.", "text_projection."))
    ]
    full_expert_params = sum(params[n].numel() for n in trainable_full)
    full_expert_bytes = safetensors_file_bytes(
        {n: tuple(params[n].shape) for n in trainable_full}, {"format": "pt"}
    )
    whole_bytes = safetensors_file_bytes({n: tuple(p.shape) for n, p in params.items()}, {"format": "pt"})
    rows = []
    for n, e in grids:
        k = n * e
        rows.append({
            "experts": n, "epochs": e, "lora_bank_bytes": k * adapter_bytes, "full_expert_bank_bytes": k * full_expert_bytes,
            "whole_model_checkpoints_bytes": k * whole_bytes, "lora_vs_whole_model": adapter_bytes / whole_bytes,
        })  # fmt: skip
    return {
        "model": "CLIP ViT-B/32 (transformers CLIPConfig() defaults)",
        "total_parameters": total,
        "lora": {
            "r": r,
            "target_modules": regex,
            "modules_to_save": saved,
            "lora_parameters": lora_params,
            "projection_parameters": projection_params,
            "adapter_file_bytes": adapter_bytes,
        },  # fmt: skip
        "full_expert": {"parameters": full_expert_params, "file_bytes": full_expert_bytes},
        "whole_model_checkpoint_bytes": whole_bytes,
        "grid": rows,
    }


def _mb(b: float) -> str:
    return f"{b / 2**20:,.2f} MiB" if b < 2**30 else f"{b / 2**30:,.2f} GiB"


def markdown(results: dict) -> str:
    lines = [
        "# Expert bank size on disk",
        "",
        f"Command: `{results['command']}`; {results['machine']['platform']}, torch {results['machine']['torch']}, "
        f"peft {results['machine']['peft']}.",
        "",
        f"## Measured: tiny test models, {results['num_experts']} experts x {results['num_epochs']} epochs "
        f"(LoRA r = {results['lora_r']})",
        "",
        "| model | LoRA bank (whole dir) | per LoRA checkpoint | full-weight bank (vision + projections) | "
        "whole-model checkpoints | LoRA / whole-model |",
        "|---|---|---|---|---|---|",
    ]
    for family, m in results["measured_tiny"].items():
        lines.append(
            f"| tiny {family} | {_mb(m['lora_bank']['bank_bytes'])} | {m['lora_bank']['per_checkpoint_bytes']:,} B | "
            f"{_mb(m['full_bank']['bank_bytes'])} | {_mb(m['whole_model_checkpoints_bytes'])} | "
            f"{m['lora_vs_whole_model']:.2f} |"
        )
    lines += [
        "",
        "The tiny models are so small (hidden 32) that a rank-16 adapter plus the fully trained projections is not "
        "much smaller than the model itself; the ratio that matters is the computed one below.",
        "",
        "## Computed: CLIP ViT-B/32 at the default LoRA settings (parameter counting, no download)",
        "",
    ]
    c = results["computed_clip_vit_b32"]
    lines += [
        f"{c['total_parameters']:,} parameters; one LoRA checkpoint = {c['lora']['lora_parameters']:,} LoRA + "
        f"{c['lora']['projection_parameters']:,} projection parameters = **{_mb(c['lora']['adapter_file_bytes'])}** "
        f"(float32 safetensors); one full expert (vision + projections) = {_mb(c['full_expert']['file_bytes'])}; "
        f"one whole-model checkpoint = {_mb(c['whole_model_checkpoint_bytes'])}.",
        "",
        "| experts x epochs | LoRA bank | full-weight experts | whole-model checkpoints | LoRA / whole |",
        "|---|---|---|---|---|",
    ]
    for row in c["grid"]:
        lines.append(
            f"| {row['experts']} x {row['epochs']} | {_mb(row['lora_bank_bytes'])} | "
            f"{_mb(row['full_expert_bank_bytes'])} | {_mb(row['whole_model_checkpoints_bytes'])} | "
            f"{row['lora_vs_whole_model']:.3%} |"
        )
    lines += [
        "",
        "20 x 11 is the LoRS-style buffer size quoted in docs/method.md §5 (20 experts x 11 epochs).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import peft
    import transformers

    from mdm_hf.experts import ExpertTrainingConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--num_epochs", type=int, default=3)
    parser.add_argument("--no_write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # sizes do not depend on speed; tiny models run fastest on one thread
    r = ExpertTrainingConfig.__dataclass_fields__["lora_r"].default
    results = {
        "command": " ".join(
            ["python benchmarks/expert_bank_size.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },  # fmt: skip
        "num_experts": args.num_experts,
        "num_epochs": args.num_epochs,
        "lora_r": r,
        "measured_tiny": measured_tiny(args.num_experts, args.num_epochs),
        "computed_clip_vit_b32": computed_clip_b32(
            r, [(args.num_experts, args.num_epochs), (4, 5), (20, 11)]
        ),
    }
    text = markdown(results)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "expert_bank_size.json").write_text(json.dumps(results, indent=2))
        (RESULTS / "expert_bank_size.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
