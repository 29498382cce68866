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

import functools
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from huggingface_hub import DatasetCard, ModelCard
from PIL import Image

from .config import DatasetArguments
from .hub import is_hub_id, is_hub_offline, offline_hint

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


class DataError(ValueError):
    """A row of the user's dataset cannot be used (unreadable image, empty or malformed caption); names the row."""


class SplitNotFoundError(ValueError):
    """The dataset has no split of the requested name (and no split column holding it)."""


# PIL modes whose pixels are not 8-bit: 16-bit integer greyscale and 32-bit int / float greyscale.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, faithfully: ``convert("RGB")`` alone clips 16-bit greyscale to white and drops
    alpha (showing whatever colour hides under transparent pixels).

    16-bit greyscale is scaled by 255 / 65535; 32-bit integer greyscale likewise when its values exceed 255; float
    greyscale is read as [0, 1] when its maximum is at most 1, else as [0, 255]. Transparency (alpha channel or a
    palette / greyscale transparency key) is composited onto white, the usual background of line art and icons.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
            values = values * (255.0 / 65535.0)
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
        return grey.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(value, image_root: str | None = None) -> Image.Image:
    """A cell of an image column -> 8-bit RGB: a PIL image, a path (relative to ``image_root``) or an undecoded
    ``{"bytes", "path"}`` dict."""
    if isinstance(value, str):
        value = Image.open(Path(image_root or ".") / value)
    elif isinstance(value, dict):  # undecoded Image feature
        value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    if not isinstance(value, Image.Image):
        raise TypeError(f"expected an image, a path or image bytes, got {type(value).__name__}")
    return to_rgb(value)


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
    row_ids: list[int] | None = None  # row of each image in the source split (before a split-column filter)

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def image(self, index: int) -> Image.Image:
        """Image ``index`` as 8-bit RGB (:func:`to_rgb`). An unreadable image raises :class:`DataError` naming its
        row in the source dataset."""
        try:
            return decode_image(self.dataset[int(index)][self.image_column], self.image_root)
        except Exception as err:  # noqa: BLE001 - any decode failure is reported with the row
            row = self.row_ids[int(index)] if self.row_ids is not None else int(index)
            raise DataError(
                f"The image in row {row} of {self.name} (split '{self.split}', column '{self.image_column}') could "
                f"not be read ({type(err).__name__}: {err}). Remove or fix that row (e.g. dataset.filter) and run "
                "again."
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
            row_ids=[self.row_ids[i] for i in image_indices] if self.row_ids is not None else image_indices,
        )


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _load_raw(name_or_path: str, revision: str | None, streaming: bool, data_dir: str | None):
    """``datasets.load_dataset`` with its errors turned into ones that name the fix."""
    try:
        return datasets.load_dataset(name_or_path, revision=revision, streaming=streaming, data_dir=data_dir)
    except UnicodeDecodeError as err:
        raise DataError(
            f"A text file of {name_or_path} (e.g. metadata.jsonl / metadata.csv) is not UTF-8 ({err}). Re-save it "
            "as UTF-8."
        ) from err
    except (ConnectionError, OSError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        if os.path.exists(name_or_path):
            raise
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
        for k, v in enumerate(value):
            if isinstance(v, dict) and isinstance(v.get("raw"), str):
                out.append(v["raw"])
            elif isinstance(v, str):
                out.append(v)
            else:
                raise DataError(
                    f"Caption column '{column}' holds a list at row {row} whose item {k} is {type(v).__name__}, "
                    "not a string. Fix that row or point --caption_column at the column with the captions."
                )
        return out
    raise DataError(
        f"Caption column '{column}' holds {type(value).__name__} at row {row}; expected a string or a list of "
        "strings. Point --caption_column at the column with the captions."
    )


def _open_split(name_or_path, split, revision, split_column, data_dir, streaming, max_images):
    """The rows of ``split`` as a ``datasets.Dataset``, with their row numbers in the source split."""
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
            raise SplitNotFoundError(
                f"Split '{split}' not found in {name_or_path}: it has splits {hub_splits} and no split column. "
                "Pass --train_split / --validation_split / --test_split with one of them, or --split_column."
            )
    ds = raw[chosen]
    if streaming:
        rows, row_ids = [], []
        for i, row in enumerate(ds):
            if split_col is None or row[split_col] in aliases:
                rows.append(row)
                row_ids.append(i)
            if max_images is not None and len(rows) >= max_images:
                break
        ds = datasets.Dataset.from_list(rows, features=ds.features) if rows else None
    elif split_col is not None:
        row_ids = [i for i, v in enumerate(ds[split_col]) if v in aliases]
        ds = ds.select(row_ids)
    else:
        row_ids = list(range(len(ds)))
    if ds is not None and max_images is not None:
        ds, row_ids = ds.select(range(min(max_images, len(ds)))), row_ids[:max_images]
    if ds is None or len(ds) == 0:  # from_list([]) cannot carry the features: report the empty split itself
        raise ValueError(
            f"Split '{split}' of {name_or_path} is empty. Check --split / --split_column or choose another split."
        )
    return ds, row_ids, chosen, columns


def _image_column(ds, columns: list[str], image_column: str | None, name_or_path: str):
    """The image column (explicit, typed ``Image``, or a conventional name); Karpathy paths become one column."""
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
    return ds, img_col


def _flatten_captions(cells, row_ids: list[int], column: str, skip_empty: bool):
    """Caption cells -> (captions, owner image per caption, images kept). An empty caption names its row, or is
    skipped (with a count in the log) when ``skip_empty``; an image left without a caption is then dropped."""
    captions, owners, kept, skipped = [], [], [], 0
    for i, cell in enumerate(cells):
        caps = _caption_list(cell, row_ids[i], column)
        empty = [k for k, c in enumerate(caps) if not c.strip()]
        if empty and not skip_empty:
            raise DataError(
                f"Caption {empty[0]} of row {row_ids[i]} in column '{column}' is empty. Fix the dataset, or pass "
                "--skip_empty_captions true to leave empty captions out (they are counted in the log)."
            )
        caps = [c for c in caps if c.strip()]
        skipped += len(empty)
        if caps:
            captions.extend(caps)
            owners.extend([len(kept)] * len(caps))
            kept.append(i)
    if skipped:
        logger.warning(
            "Left out %d empty caption(s) in column '%s' (--skip_empty_captions); %d image(s) without any caption "
            "were dropped.", skipped, column, len(cells) - len(kept),
        )  # fmt: skip
    return captions, owners, kept


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
    skip_empty_captions: bool = False,
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
        skip_empty_captions: leave empty captions out (counted in the log) instead of refusing the dataset.
    """
    ds, row_ids, chosen, columns = _open_split(
        name_or_path, split, revision, split_column, data_dir, streaming, max_images
    )
    ds, img_col = _image_column(ds, columns, image_column, name_or_path)
    cap_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", "caption_column")
    if cap_col is None:
        raise ValueError(
            f"No caption column found in {name_or_path}. Columns: {columns}. Set --caption_column to the column "
            "holding a caption string or a list of captions."
        )
    captions, owners, kept = _flatten_captions(ds[cap_col], row_ids, cap_col, skip_empty_captions)
    if not captions:
        raise DataError(f"Split '{split}' of {name_or_path} has images but no captions in '{cap_col}'.")
    if len(kept) < len(ds):
        ds, row_ids = ds.select(kept), [row_ids[i] for i in kept]
    info = getattr(ds, "info", None)
    fingerprint = _hash(
        name_or_path, revision, chosen, split, getattr(ds, "_fingerprint", None), len(captions)
    )
    return ImageCaptionSplit(
        dataset=ds, image_column=img_col, captions=captions, caption_to_image=torch.tensor(owners, dtype=torch.long),
        name=name_or_path, split=split, fingerprint=fingerprint,
        license=getattr(info, "license", None) or card_license(name_or_path, revision),
        image_root=image_root, row_ids=row_ids,
    )  # fmt: skip


@functools.lru_cache(maxsize=64)  # one read per dataset, not one per split loaded
def card_license(
    name_or_path: str, revision: str | None = None, repo_type: str = "dataset"
) -> str | list[str] | None:
    """The licence in a dataset's (or, with ``repo_type="model"``, a model's) card (README YAML ``license:``),
    where ``datasets`` leaves ``info.license`` empty: a local folder's README, or the Hub card when the Hub is
    reachable. None when there is none."""
    card_class = ModelCard if repo_type == "model" else DatasetCard
    try:
        if os.path.isdir(name_or_path):
            readme = Path(name_or_path) / "README.md"
            return card_class.load(readme).data.license if readme.is_file() else None
        if is_hub_offline() or not is_hub_id(name_or_path):
            return None
        return card_class.load(name_or_path, repo_type=repo_type).data.license
    except Exception as err:  # noqa: BLE001 - a missing or malformed card only means "licence unknown"
        logger.info("No licence read from the card of %s (%s).", name_or_path, err)
        return None


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
        max_images=max_images, skip_empty_captions=args.skip_empty_captions,
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
