"""The on-disk format of a synthetic set: file names, columns, Arrow <-> tensors, shards, metadata JSON, collate.

:class:`mdm_hf.synthetic.SyntheticSet` reads and writes this layout (``docs/design.md``); a student needs only
``datasets`` and :func:`collate_synthetic`. ``pixel_values`` (``[3, H, W]``) and ``text_features`` (``[D]``) are
float32 Arrow values, read back bit for bit by :func:`column_to_tensor`. Nothing here imports the rest of mdm-hf
except :func:`mdm_hf.hub.scrub_tokens`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .hub import scrub_tokens

__all__ = [
    "CARD_FILE",
    "COLUMNS",
    "DATA_DIR",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "PREVIEW_FILE",
    "collate_synthetic",
    "column_to_tensor",
    "hub_features",
    "jsonable",
    "parse_size",
    "read_saved",
    "rows_per_shard",
    "table_fields",
]

FORMAT_VERSION = 1
METADATA_FILE = "mdm_synthetic.json"
CARD_FILE = "README.md"
PREVIEW_FILE = "preview.png"
DATA_DIR = "data"
COLUMNS = (
    "image",
    "pixel_values",
    "text_features",
    "captions",
    "caption",
    "source_index",
    "source_image_index",
)


# ====================================================================== columns
def hub_features(image_shape: Sequence[int], text_dim: int) -> datasets.Features:
    """The ``datasets.Features`` of the Hub layout for images ``(3, H, W)`` and text features of size ``D``."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "pixel_values": datasets.Array3D(shape=tuple(image_shape), dtype="float32"),
            "text_features": datasets.List(datasets.Value("float32"), length=text_dim),
            "captions": datasets.List(datasets.Value("string")),
            "caption": datasets.Value("string"),
            "source_index": datasets.Value("int64"),
            "source_image_index": datasets.Value("int64"),
        }
    )


def table_fields(table: pa.Table) -> dict[str, Any]:
    """The tensor and list fields of a :class:`~mdm_hf.synthetic.SyntheticSet` from an Arrow table of the layout.

    ``captions`` falls back to ``[caption]`` and the indices to ``-1`` when those columns are missing.
    """
    n = table.num_rows
    names = table.column_names
    if "captions" in names:
        captions = [list(c or []) for c in table.column("captions").to_pylist()]
    elif "caption" in names:
        captions = [[c] if c else [] for c in table.column("caption").to_pylist()]
    else:
        captions = [[] for _ in range(n)]

    def ints(name: str) -> list[int]:
        return [int(v) for v in table.column(name).to_pylist()] if name in names else [-1] * n

    return {
        "pixel_values": column_to_tensor(table.column("pixel_values"), depth=3, name="pixel_values"),
        "text_features": column_to_tensor(table.column("text_features"), depth=1, name="text_features"),
        "captions": captions,
        "source_indices": ints("source_index"),
        "source_image_indices": ints("source_image_index"),
    }


def column_to_tensor(column, depth: int, name: str) -> torch.Tensor:
    """A (chunked) Arrow column of equal-length nested float lists -> float32 tensor ``[n, *inner]``, bit-exact."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    arrays = []
    inner: list[int] | None = None
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        # datasets' ArrayND columns are extension arrays over nested lists; read the plain storage.
        arr = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        shape = []
        for level in range(depth):
            if arr.null_count:
                raise ValueError(f"Column '{name}' has missing values at nesting level {level}.")
            if pa.types.is_fixed_size_list(arr.type):
                shape.append(arr.type.list_size)
            elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
                if lengths.min() != lengths.max():
                    raise ValueError(f"Column '{name}' is ragged (lengths {lengths.min()}..{lengths.max()}).")
                shape.append(int(lengths[0]))
            else:
                raise ValueError(
                    f"Column '{name}' must be nested lists of floats (depth {depth}); got {arr.type}."
                )
            arr = arr.flatten()  # respects slicing offsets
        if inner is not None and shape != inner:
            raise ValueError(f"Column '{name}' changes shape between chunks: {inner} vs {shape}.")
        inner = shape
        if arr.type not in (
            pa.float32(),
            pa.float64(),
        ):  # float16 loses the learned values; ints are not ours
            raise ValueError(
                f"Column '{name}' holds {arr.type} values, expected float32: the set was modified or written by "
                "other code. Re-create it with SyntheticSet(...).save_pretrained, which writes float32."
            )
        values = arr.to_numpy(zero_copy_only=False)
        arrays.append(values.reshape(len(chunk), *shape))
    if not arrays:
        raise ValueError(f"Column '{name}' is empty.")
    data = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    # float32 in, float32 out: no rounding; wider floats from hand-made datasets are narrowed once here.
    return torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy owned by torch


# ====================================================================== files
def read_saved(directory: Path) -> tuple[pa.Table, dict]:
    """The parquet shards (every column but ``image``) and the metadata of a directory written by mdm-hf.

    Raises:
        FileNotFoundError: no ``mdm_synthetic.json`` (not a synthetic set) or no parquet shard (incomplete save).
        ValueError: a format version newer than this mdm-hf reads.
    """
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"'{directory}' has no {METADATA_FILE}, so it is not a synthetic set saved by mdm-hf. For another "
            "dataset of this layout use SyntheticSet.from_dataset(load_dataset(dir)['train'], image_mean=..., "
            "image_std=...)."
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err}); save the set again.") from err
    missing = [k for k in ("image_mean", "image_std") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(
            f"{meta_path} lacks {missing}: without the pixel normalisation the learned pixels cannot be read. "
            "Save the set again with SyntheticSet.save_pretrained."
        )
    version = int(meta.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ValueError(
            f"'{directory}' uses synthetic-set format {version}; this mdm-hf reads up to {FORMAT_VERSION}. "
            "Upgrade mdm-hf (pip install -U mdm-hf)."
        )
    files = sorted((directory / DATA_DIR).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"'{directory / DATA_DIR}' holds no parquet shards; the save is incomplete.")
    wanted = [c for c in COLUMNS if c != "image"]
    for f in files:
        absent = [c for c in wanted if c not in pq.read_schema(f).names]
        if absent:
            raise ValueError(
                f"{f} lacks the column(s) {absent}; the set was modified or is incomplete. Save it again."
            )
    return pa.concat_tables([pq.read_table(f, columns=wanted) for f in files]), meta


def rows_per_shard(
    image_shape: Sequence[int], text_dim: int, captions: Sequence[Sequence[str]], max_shard_size: int | str
) -> int:
    """How many rows keep one parquet shard under about ``max_shard_size`` (bytes or ``"500MB"``, ``"2GB"``...)."""
    limit = parse_size(max_shard_size)
    c, h, w = image_shape
    caption_bytes = sum(len(s.encode()) for caps in captions for s in caps) / max(1, len(captions))
    # float32 pixels + a PNG (at most about the raw uint8 size) + the text feature + captions/ids.
    row_bytes = 4 * c * h * w + c * h * w + 4 * text_dim + 2 * caption_bytes + 64
    return max(1, int(limit // row_bytes))


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"500MB"``, ``"2GB"``, ``"1MiB"``."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive; got {size}.")
        return size
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size {size!r} not understood; use bytes (int) or e.g. '500MB', '2GB'.")
    return int(float(match.group(1)) * units[match.group(2) or "B"])


def jsonable(obj):
    """JSON-safe copy (dataclasses -> dicts, paths/other objects -> str), with token keys dropped."""

    def default(o):
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        if isinstance(o, (np.generic,)):
            return o.item()
        return str(o)

    return scrub_tokens(json.loads(json.dumps(obj, default=default)))


# ====================================================================== collate
def collate_synthetic(batch: Sequence[dict]) -> dict[str, Any]:
    """Stack rows of the Hub layout into a student batch.

    Works on rows from ``load_dataset(...)["train"].with_format("torch")`` (tensors) and on plain rows (nested
    lists); other columns (``image``, ``captions``) are dropped, except ``caption`` (kept as a list of strings).

    Returns:
        ``{"pixel_values": [B, 3, H, W] float32, "text_features": [B, D] float32, "caption": list[str]?,
        "source_index": LongTensor [B]?}``
    """
    if not batch:
        raise ValueError("collate_synthetic got an empty batch.")
    missing = [c for c in ("pixel_values", "text_features") if c not in batch[0]]
    if missing:
        raise KeyError(
            f"Rows lack {missing}; collate_synthetic needs the 'pixel_values' and 'text_features' columns."
        )
    out: dict[str, Any] = {
        "pixel_values": torch.stack([_float_tensor(row["pixel_values"]) for row in batch]),
        "text_features": torch.stack([_float_tensor(row["text_features"]) for row in batch]),
    }
    if "caption" in batch[0]:
        out["caption"] = [row["caption"] for row in batch]
    if "source_index" in batch[0]:
        out["source_index"] = torch.tensor([int(row["source_index"]) for row in batch], dtype=torch.long)
    return out


def _float_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(torch.float32)
    return torch.from_numpy(np.asarray(value, dtype=np.float32))
