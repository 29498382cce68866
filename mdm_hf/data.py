"""Image-caption datasets from the Hub or disk, flattened to (image, caption) pairs, with cached text features.

Recognised without flags:

* an image column with a caption string or a list of captions (Flickr30k-style repos, ``caption``/``captions``/...);
* COCO-Karpathy-style records (``sentences`` / ``filepath`` / ``split``) where one Hub split holds every Karpathy
  split in a ``split`` column (``restval`` counts as train, ``val`` as validation);
* ``imagefolder`` with ``metadata.jsonl`` (``file_name`` + ``text``/``caption``).

Explicit ``image_column`` / ``caption_column`` / ``split_column`` always win. Every caption of an image is a pair;
``caption_to_image`` keeps which captions belong to which image so retrieval can score them.

The frozen text features ``e = E_t(c)`` (docs/method.md, "Notation") depend only on the text tower and the captions, so
they are computed once and cached on disk under a key of model id + revision + pooling + dataset fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .config import DatasetArguments

logger = logging.getLogger(__name__)

CAPTION_COLUMNS = ("caption", "captions", "sentences", "text", "texts", "raw", "alt_text")
IMAGE_COLUMNS = ("image", "img", "jpg", "png")
SPLIT_COLUMNS = ("split",)
# Split names users ask for -> names datasets use (Hub splits or values of a Karpathy split column).
SPLIT_ALIASES = {
    "train": ("train", "restval"),
    "validation": ("validation", "val", "dev", "valid"),
    "test": ("test",),
}


def default_cache_dir() -> Path:
    """Where mdm-hf keeps text-feature caches and built datasets (``$MDM_HF_HOME``, default ``~/.cache/mdm_hf``)."""
    return Path(os.environ.get("MDM_HF_HOME", Path.home() / ".cache" / "mdm_hf"))


@dataclass
class ImageCaptionSplit:
    """One split of an image-caption dataset, flattened to pairs.

    ``dataset`` has one row per image; ``captions[j]`` belongs to image ``caption_to_image[j]``.
    """

    dataset: object  # datasets.Dataset with one row per image
    image_column: str
    captions: list[str]
    caption_to_image: torch.Tensor
    name: str
    split: str
    fingerprint: str
    license: str | None = None
    image_root: str | None = None
    _decoded: dict = field(default_factory=dict, repr=False)

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def image(self, index: int) -> Image.Image:
        """Image ``index`` as RGB. An unreadable image raises a ``ValueError`` naming its index."""
        try:
            value = self.dataset[int(index)][self.image_column]
            if isinstance(value, str):
                value = Image.open(Path(self.image_root or ".") / value)
            elif isinstance(value, dict):  # undecoded Image feature: {"bytes": ..., "path": ...}
                import io

                value = (
                    Image.open(io.BytesIO(value["bytes"]))
                    if value.get("bytes")
                    else Image.open(value["path"])
                )
            return value.convert("RGB")
        except Exception as err:  # noqa: BLE001 - any decode failure is reported with the index
            raise ValueError(
                f"Image {index} of {self.name} [{self.split}] could not be read ({type(err).__name__}: {err}). "
                "Remove or fix that row (e.g. dataset.filter) and try again."
            ) from err

    def images(self, indices: Sequence[int]) -> list[Image.Image]:
        return [self.image(i) for i in indices]

    def captions_of(self, image_index: int) -> list[str]:
        idx = (self.caption_to_image == image_index).nonzero().flatten().tolist()
        return [self.captions[j] for j in idx]

    def subset(self, image_indices: Sequence[int]) -> ImageCaptionSplit:
        """The split restricted to some images (captions follow their images)."""
        image_indices = [int(i) for i in image_indices]
        remap = {old: new for new, old in enumerate(image_indices)}
        keep = [j for j, img in enumerate(self.caption_to_image.tolist()) if img in remap]
        return ImageCaptionSplit(
            dataset=self.dataset.select(image_indices),
            image_column=self.image_column,
            captions=[self.captions[j] for j in keep],
            caption_to_image=torch.tensor(
                [remap[int(self.caption_to_image[j])] for j in keep], dtype=torch.long
            ),
            name=self.name,
            split=self.split,
            fingerprint=_hash(self.fingerprint, image_indices),
            license=self.license,
            image_root=self.image_root,
        )


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _load_raw(name_or_path: str, revision: str | None, streaming: bool, data_dir: str | None):
    import datasets

    try:
        return datasets.load_dataset(name_or_path, revision=revision, streaming=streaming, data_dir=data_dir)
    except (ConnectionError, OSError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        if os.path.exists(name_or_path):
            raise
        from .models import offline_hint

        raise OSError(offline_hint(name_or_path, "dataset")) from err


def _pick_column(
    columns: Sequence[str], explicit: str | None, candidates: Sequence[str], what: str, flag: str
):
    if explicit is not None:
        if explicit not in columns:
            raise ValueError(
                f"The {what} column '{explicit}' does not exist. Columns: {list(columns)}. Set --{flag} to one of them."
            )
        return explicit
    for c in candidates:
        if c in columns:
            return c
    return None


def _caption_list(value, row: int, column: str) -> list[str]:
    """A caption cell -> list of strings. Karpathy's ``sentences`` may be dicts with a ``raw`` key."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            if isinstance(v, dict) and isinstance(v.get("raw"), str):
                out.append(v["raw"])
            elif isinstance(v, str):
                out.append(v)
            else:
                break
        else:
            return out
    raise ValueError(
        f"Caption column '{column}' holds {type(value).__name__} at row {row}; expected a string or a list of "
        "strings. Point --caption_column at the column with the captions."
    )


def load_image_caption_dataset(
    name_or_path: str,
    split: str = "train",
    *,
    revision: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    split_column: str | None = None,
    image_root: str | None = None,
    data_dir: str | None = None,
    streaming: bool = False,
    max_images: int | None = None,
) -> ImageCaptionSplit:
    """Load one split of an image-caption dataset (Hub id or local directory) through ``load_dataset``.

    Args:
        name_or_path: Hub dataset id or a local directory in the Hub layout (parquet, imagefolder, ...).
        split: ``"train"``, ``"validation"`` or ``"test"`` (aliases such as ``val`` / ``restval`` are understood),
            looked up among the Hub splits first and then in a split column.
        image_column / caption_column / split_column: explicit column names; they always win.
        image_root: directory that relative image paths are resolved against when images are stored as paths.
        streaming: stream the dataset and materialise the split (a full pass is needed to flatten captions).
        max_images: keep only the first N images of the split (quick runs).
    """
    import datasets

    try:
        raw = _load_raw(name_or_path, revision, streaming, data_dir)
    except ValueError as err:
        if streaming or "corresponds to no data" not in str(err):
            raise
        # load_dataset prepares every split at once and refuses a repo where one is empty; streaming reads only
        # the split asked for (and an empty one then gets the clear error below).
        logger.warning("%s has an empty split (%s); reading it in streaming mode instead.", name_or_path, err)
        streaming = True
        raw = _load_raw(name_or_path, revision, streaming, data_dir)
    hub_splits = list(raw.keys())
    aliases = SPLIT_ALIASES.get(split, (split,))
    first = raw[hub_splits[0]]
    columns = list(first.column_names or first.features.keys())
    split_col = _pick_column(columns, split_column, SPLIT_COLUMNS, "split", "split_column")
    chosen = next((s for s in (split, *aliases) if s in hub_splits), None)
    if split_col is not None and (split_column is not None or len(hub_splits) == 1):
        chosen = chosen or hub_splits[0]  # a split column inside one Hub split (Karpathy)
    else:
        split_col = None
        if chosen is None:
            raise ValueError(
                f"Split '{split}' not found in {name_or_path}: it has splits {hub_splits} and no split column. "
                "Pass --train_split / --validation_split / --test_split with one of them, or --split_column."
            )
    ds = raw[chosen]
    if streaming:
        rows = []
        for row in ds:
            if split_col is None or row[split_col] in aliases:
                rows.append(row)
            if max_images is not None and len(rows) >= max_images:
                break
        if not rows:  # from_list([]) cannot carry the features; report the empty split itself
            raise ValueError(
                f"Split '{split}' of {name_or_path} is empty. Check --split / --split_column or choose another split."
            )
        ds = datasets.Dataset.from_list(rows, features=ds.features)
    elif split_col is not None:
        ds = ds.select([i for i, v in enumerate(ds[split_col]) if v in aliases])

    if max_images is not None:
        ds = ds.select(range(min(max_images, len(ds))))
    if len(ds) == 0:
        raise ValueError(
            f"Split '{split}' of {name_or_path} is empty. Check --split / --split_column or choose another split."
        )

    img_col = _pick_column(columns, image_column, (), "image", "image_column")
    if img_col is None:
        img_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if img_col is None:
        img_col = _pick_column(columns, None, IMAGE_COLUMNS + ("file_name", "image_path", "filepath"), "", "")
    if img_col == "filepath" and "filename" in columns:
        # Karpathy records: the image lives at <image_root>/<filepath>/<filename>.
        ds = ds.map(
            lambda b: {"image_path": [f"{d}/{f}" for d, f in zip(b["filepath"], b["filename"])]}, batched=True
        )
        img_col = "image_path"
    if img_col is None:
        raise ValueError(
            f"No image column found in {name_or_path}. Columns: {columns}. Set --image_column to the column "
            "holding images (or image paths together with --image_root)."
        )
    cap_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", "caption_column")
    if cap_col is None:
        raise ValueError(
            f"No caption column found in {name_or_path}. Columns: {columns}. Set --caption_column to the column "
            "holding a caption string or a list of captions."
        )

    captions, owners = [], []
    for i, cell in enumerate(ds[cap_col]):
        caps = _caption_list(cell, i, cap_col)
        captions.extend(caps)
        owners.extend([i] * len(caps))
    if not captions:
        raise ValueError(f"Split '{split}' of {name_or_path} has images but no captions in '{cap_col}'.")

    info_license = None
    info = getattr(ds, "info", None)
    if info is not None and getattr(info, "license", None):
        info_license = info.license
    fingerprint = _hash(
        name_or_path, revision, chosen, split, getattr(ds, "_fingerprint", None), len(captions)
    )
    return ImageCaptionSplit(
        dataset=ds,
        image_column=img_col,
        captions=captions,
        caption_to_image=torch.tensor(owners, dtype=torch.long),
        name=name_or_path,
        split=split,
        fingerprint=fingerprint,
        license=info_license,
        image_root=image_root,
    )


def load_split(
    args: DatasetArguments, split: str | None = None, max_images: int | None = None
) -> ImageCaptionSplit:
    """One split of the dataset that ``args`` names (default: its ``train_split``, capped at
    ``max_train_images``): the one place a config's dataset fields reach :func:`load_image_caption_dataset`."""
    if split is None:
        split, max_images = args.train_split, args.max_train_images
    return load_image_caption_dataset(
        args.dataset_name, split, revision=args.dataset_revision, image_column=args.image_column,
        caption_column=args.caption_column, split_column=args.split_column, image_root=args.image_root,
        max_images=max_images,
    )  # fmt: skip


def _model_key(encoder) -> dict:
    """Identity of the text tower for the cache key: id, revision (or local weights' stat), pooling."""
    key = {"model": encoder.name_or_path, "revision": encoder.revision, "pooling": encoder.text_pooling}
    commit = getattr(encoder.model.config, "_commit_hash", None)
    if commit:
        key["commit"] = commit
    if os.path.isdir(encoder.name_or_path):
        for f in sorted(Path(encoder.name_or_path).glob("*.safetensors")):
            st = f.stat()
            key[f.name] = [st.st_size, st.st_mtime_ns]
    return key


def cached_text_features(
    encoder,
    data: ImageCaptionSplit,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Frozen text features of every caption in ``data`` ``[N_txt, D]``, computed once and cached on disk.

    The key covers the model id + revision (or, for a local directory, its weight files), the pooling, the dataset
    fingerprint and a hash of the captions themselves, so a changed model or dataset never reuses stale features.
    """
    from safetensors.torch import load_file, save_file

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _hash(
        _model_key(encoder), data.fingerprint, hashlib.sha256("\n".join(data.captions).encode()).hexdigest()
    )
    path = cache_dir / "text_features" / f"{key}.safetensors"
    if path.exists():
        logger.info("Reusing cached text features %s", path)
        return load_file(str(path))["text_features"]
    feats = encoder.encode_text_features(data.captions, batch_size=batch_size, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"text_features": feats.contiguous()}, str(tmp), metadata={"model": str(encoder.name_or_path)})
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache entry
    return feats


def preprocess_split_images(encoder, data: ImageCaptionSplit, batch_size: int = 64) -> torch.Tensor:
    """All images of a (small) split as normalised pixels ``[N_img, 3, S, S]``.

    Fine for EmojiCaps-sized sets; large sets should read images lazily through :class:`PairDataset`.
    """
    chunks = [
        encoder.preprocess_images(data.images(range(s, min(s + batch_size, data.num_images))))
        for s in range(0, data.num_images, batch_size)
    ]
    return torch.cat(chunks)


def image_pixels(
    encoder, data: ImageCaptionSplit, image_indices: torch.Tensor, pixel_cache: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalised pixels ``[n, 3, S, S]`` of the given images: rows of ``pixel_cache`` when the split was
    preprocessed once, else decoded and preprocessed now."""
    if pixel_cache is not None:
        return pixel_cache[image_indices]
    return encoder.preprocess_images(data.images(image_indices.tolist()))


@torch.no_grad()
def embed_pairs(
    encoder,
    data: ImageCaptionSplit,
    text_features: torch.Tensor,
    pixel_cache: torch.Tensor | None = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_v, z_t)`` of every real pair of ``data`` under ``encoder``, on the CPU: the one "embed every pair".

    Each image is embedded once and its embedding repeated for each of its captions; ``text_features[j]`` is the
    frozen feature ``e`` of caption ``j``.
    """
    device = next(encoder.parameters()).device
    image_embeds = []
    for start in range(0, data.num_images, batch_size):
        idx = torch.arange(start, min(start + batch_size, data.num_images))
        pixels = image_pixels(encoder, data, idx, pixel_cache)
        image_embeds.append(encoder.image_embeds(pixels.to(device)).cpu())
    zv = torch.cat(image_embeds)[data.caption_to_image]
    zt = torch.cat([encoder.project_text(t.to(device)).cpu() for t in text_features.split(batch_size)])
    return zv, zt


class PairDataset(torch.utils.data.Dataset):
    """Real (image, caption) pairs for a ``DataLoader``: item ``j`` is caption ``j`` with its image's pixels.

    Returns ``{"pixel_values": [3, S, S], "caption_index": j}``; text features are looked up by index from the
    cache, so the loader only decodes and preprocesses images. ``pixel_cache`` (all images preprocessed once)
    skips decoding for small sets.
    """

    def __init__(self, data: ImageCaptionSplit, encoder, pixel_cache: torch.Tensor | None = None) -> None:
        self.data, self.encoder, self.pixel_cache = data, encoder, pixel_cache

    def __len__(self) -> int:
        return self.data.num_captions

    def __getitem__(self, j: int) -> dict:
        image = self.data.caption_to_image[j : j + 1]
        pixels = image_pixels(self.encoder, self.data, image, self.pixel_cache)[0]
        return {"pixel_values": pixels, "caption_index": j}
