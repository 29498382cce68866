"""Tiny, offline-built checkpoints and datasets in the Hub's on-disk layout.

Used by the test-suite, the cost benchmarks and anyone who wants to try the pipeline without a download: every
artefact here is built from a config and saved with ``save_pretrained`` / parquet, then loaded back through the
real ``from_pretrained`` / ``load_dataset`` paths.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "stripe", "cross")
WORDS = sorted(set(COLOURS) | set(SHAPES) | {"a", "on", "background", "picture", "of", "the", "small", "big"})


def toy_image(colour: str, shape: str, size: int = 32, seed: int = 0) -> Image.Image:
    """A small picture of a coloured shape on a grey background (deterministic for the arguments)."""
    rng = np.random.default_rng(seed)
    canvas = np.full((size, size, 3), 128, dtype=np.int16) + rng.integers(-12, 12, (size, size, 3))
    rgb = np.array(COLOURS[colour], dtype=np.int16)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.uniform(-2, 2)
    if shape == "square":
        mask = (abs(yy - c) < size / 4) & (abs(xx - c) < size / 4)
    elif shape == "circle":
        mask = (yy - c) ** 2 + (xx - c) ** 2 < (size / 3.2) ** 2
    elif shape == "stripe":
        mask = abs(yy - c) < size / 8
    else:
        mask = (abs(yy - c) < size / 10) | (abs(xx - c) < size / 10)
    canvas[mask] = rgb
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def toy_records(
    num_images: int = 24, captions_per_image: int = 2, size: int = 32, seed: int = 0
) -> list[dict]:
    """Image-caption records: ``{"image": PIL, "captions": [str, ...]}``; captions name colour and shape."""
    colours, records = sorted(COLOURS), []
    for i in range(num_images):
        colour, shape = colours[i % len(colours)], SHAPES[(i // len(colours)) % len(SHAPES)]
        caps = [
            f"a {colour} {shape}",
            f"a picture of a {colour} {shape} on the background",
            f"the {shape} {colour}",
        ]
        records.append(
            {"image": toy_image(colour, shape, size, seed + i), "captions": caps[:captions_per_image]}
        )
    return records


# ---------------------------------------------------------------------------------------------- datasets
def write_caption_list_dataset(
    directory: str | Path, splits: dict[str, int] | None = None, size: int = 32
) -> Path:
    """Flickr30k-style repo: ``data/<split>-*.parquet`` with ``image`` and ``caption`` (a list of strings)."""
    import datasets

    directory = Path(directory)
    splits = splits or {"train": 24, "validation": 8, "test": 8}
    offset = 0
    for split, n in splits.items():
        recs = toy_records(n, 2, size, seed=offset)[:n]
        ds = datasets.Dataset.from_dict(
            {"image": [r["image"] for r in recs], "caption": [r["captions"] for r in recs]},
            features=datasets.Features(
                {"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))}
            ),
        )
        (directory / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(directory / "data" / f"{split}-00000-of-00001.parquet"))
        offset += 1000
    return directory


def write_karpathy_dataset(directory: str | Path, size: int = 32) -> Path:
    """COCO-Karpathy-style records in ONE Hub split: ``image``, ``sentences``, ``filepath``, ``split``."""
    import datasets

    directory = Path(directory)
    recs = toy_records(32, 3, size)
    split_of = ["train", "restval", "train", "val", "train", "test", "train", "train"]
    ds = datasets.Dataset.from_dict(
        {
            "image": [r["image"] for r in recs],
            "sentences": [r["captions"] for r in recs],
            "filepath": ["train2014" if split_of[i % 8] != "val" else "val2014" for i in range(len(recs))],
            "filename": [f"img_{i:05d}.jpg" for i in range(len(recs))],
            "split": [split_of[i % 8] for i in range(len(recs))],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "sentences": datasets.Sequence(datasets.Value("string")),
                "filepath": datasets.Value("string"),
                "filename": datasets.Value("string"),
                "split": datasets.Value("string"),
            }
        ),
    )
    (directory / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(directory / "data" / "train-00000-of-00001.parquet"))
    return directory


def write_imagefolder_dataset(directory: str | Path, size: int = 32) -> Path:
    """``imagefolder`` layout: ``train/`` and ``test/`` with PNG files and ``metadata.jsonl`` (one caption)."""
    directory = Path(directory)
    for split, n, seed in (("train", 16, 0), ("test", 8, 500)):
        folder = directory / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w") as f:
            for i, rec in enumerate(toy_records(n, 1, size, seed=seed)):
                name = f"{i:04d}.png"
                rec["image"].save(folder / name)
                f.write(json.dumps({"file_name": name, "text": rec["captions"][0]}) + "\n")
    return directory


# ---------------------------------------------------------------------------------------------- tokenizers
def _clip_tokenizer(directory: Path):
    """A character-level CLIP BPE tokenizer (no merges): enough for tiny models, built without a download."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,'-!?")
    vocab = {}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=32)


def _word_tokenizer(pad: str = "<pad>", eos: str | None = "</s>", bert: bool = False):
    """A word-level fast tokenizer over :data:`WORDS` (SigLIP pads to max length and appends ``</s>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if bert else [pad, "<unk>", eos]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    unk = "[UNK]" if bert else "<unk>"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            model_max_length=16,
        )
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, unk_token=unk, eos_token=eos, model_max_length=16
    )


# ---------------------------------------------------------------------------------------------- models
def _tiny_vision(image_size: int) -> dict:
    return {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": image_size, "patch_size": 8, "num_channels": 3,
    }  # fmt: skip


def _tiny_text(vocab_size: int, max_positions: int) -> dict:
    return {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "vocab_size": vocab_size, "max_position_embeddings": max_positions,
    }  # fmt: skip


def build_tiny_clip(directory: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny ``CLIPModel`` + CLIP tokenizer + ``CLIPImageProcessor`` saved in the Hub layout."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer(directory)
    text = _tiny_text(len(tokenizer), 32) | {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }  # fmt: skip
    config = CLIPConfig(text_config=text, vision_config=_tiny_vision(image_size), projection_dim=24)
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(directory)
    return directory


def build_tiny_siglip(directory: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny ``SiglipModel`` + word-level tokenizer + ``SiglipImageProcessor`` saved in the Hub layout."""
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = _word_tokenizer()
    text = _tiny_text(len(tokenizer), 16) | {"projection_size": 32, "pad_token_id": tokenizer.pad_token_id}
    config = SiglipConfig(text_config=text, vision_config=_tiny_vision(image_size))
    SiglipModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    SiglipImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def build_tiny_dual_encoder(directory: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny ``VisionTextDualEncoderModel`` (CLIP vision tower + BERT text tower, mean pooling)."""
    from transformers import (
        BertConfig,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = _word_tokenizer(bert=True)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        CLIPVisionConfig(**_tiny_vision(image_size)),
        BertConfig(**_tiny_text(len(tokenizer), 16)),
        projection_dim=24,
    )
    config.mdm_text_pooling = "mean"
    model = VisionTextDualEncoderModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(directory)
    return directory


TINY_BUILDERS = {
    "clip": build_tiny_clip,
    "siglip": build_tiny_siglip,
    "dual_encoder": build_tiny_dual_encoder,
}


# ---------------------------------------------------------------------------------------------- the Hub, recorded
def record_hub_calls(monkeypatch) -> dict[str, list]:
    """Replace ``HfApi``'s network calls with recorders (tests): every ``create_repo`` / ``create_branch`` /
    ``upload_folder`` call's arguments are appended to the returned lists, ``upload_folder`` also records the
    ``files`` the folder held at upload time and returns a commit with a ``commit_url``."""
    import huggingface_hub

    calls: dict[str, list] = {"init": [], "create_repo": [], "create_branch": [], "upload_folder": []}
    original_init = huggingface_hub.HfApi.__init__

    def init(self, *args, **kwargs):
        calls["init"].append(kwargs)
        original_init(self, *args, **kwargs)

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        prefix = "datasets/" if kwargs.get("repo_type") == "dataset" else ""
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{prefix}{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"].append({"repo_id": repo_id, **kwargs})

    def upload_folder(self, **kwargs):
        root = Path(kwargs["folder_path"])
        kwargs["files"] = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        calls["upload_folder"].append(kwargs)
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()

    for name, fake in (("__init__", init), ("create_repo", create_repo), ("create_branch", create_branch),
                       ("upload_folder", upload_folder)):  # fmt: skip
        monkeypatch.setattr(huggingface_hub.HfApi, name, fake)
    return calls
