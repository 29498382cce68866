"""The distilled set: :class:`SyntheticSet` and its Hub layout.

A synthetic set is ``K`` learned pairs ``(x~, e~)`` (MDM, arXiv 2605.23482): pixels in the teacher's *normalised*
pixel space and text features in the space of the frozen text encoder's pooled output. On disk and on the Hub it is
a plain dataset repository that ``datasets.load_dataset`` opens without custom code::

    README.md                          dataset card (hub_cards/synthetic_dataset_card.md)
    preview.png                        a grid of the synthetic images
    mdm_synthetic.json                 provenance, results, image_mean/std, shapes, format version
    data/train-00000-of-00001.parquet  columns: image, pixel_values, text_features, captions, caption,
                                       source_index, source_image_index

``pixel_values`` and ``text_features`` are stored as float32 Arrow values, so they come back bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .models import OfflineHubError

__all__ = [
    "SyntheticSet",
    "SyntheticSetUploadError",
    "SyntheticSetOfflineError",
    "collate_synthetic",
    "check_repo_id",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = "mdm_synthetic.json"
CARD_FILE = "README.md"
PREVIEW_FILE = "preview.png"
DATA_DIR = "data"
CARD_TEMPLATE = "synthetic_dataset_card"
COLUMNS = (
    "image",
    "pixel_values",
    "text_features",
    "captions",
    "caption",
    "source_index",
    "source_image_index",
)
TAGS = ["dataset-distillation", "mdm", "synthetic", "vision-language"]
TASK_CATEGORIES = ["image-to-text", "text-to-image", "feature-extraction"]

# One part of a Hub repo id: letters, digits, '-', '_', '.'; no leading/trailing '-' or '.', no '--' or '..'.
_HUB_NAME = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9]([A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
# License ids the Hub recognises (a common subset); anything else becomes `license: other` + `license_name`.
_HUB_LICENSES = {
    "apache-2.0", "mit", "openrail", "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "cc",
    "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0",
    "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0",
    "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0", "cdla-permissive-1.0",
    "cdla-permissive-2.0", "odc-by", "odbl", "pddl", "gpl-2.0", "gpl-3.0", "lgpl-3.0", "agpl-3.0", "gfdl",
    "mpl-2.0", "unlicense", "wtfpl", "afl-3.0", "artistic-2.0", "ecl-2.0", "epl-2.0", "isc", "other", "unknown",
}  # fmt: skip
_DEFAULT_METRICS = ["ir@1", "ir@5", "ir@10", "tr@1", "tr@5", "tr@10"]


class SyntheticSetUploadError(RuntimeError):
    """Uploading to the Hub failed; the message says where the local copy is and how to retry."""


class SyntheticSetOfflineError(OfflineHubError):
    """A Hub id was given to :meth:`SyntheticSet.from_pretrained` while the Hub is unreachable or offline."""


# ====================================================================== the dataclass
@dataclasses.dataclass(eq=False)
class SyntheticSet:
    """``K`` distilled image–text pairs with their provenance and (optionally) evaluation results.

    Attributes:
        pixel_values: ``[K, 3, H, W]`` float32, the exact learned pixels in the teacher's normalised pixel space.
        text_features: ``[K, D]`` float32, learned text features (space of the frozen text encoder's pooled output,
            i.e. the input of the text projection).
        image_mean: per-channel mean of the teacher's image processor (``rgb = x * std + mean``).
        image_std: per-channel std of the teacher's image processor.
        captions: for each sample, the nearest real caption(s) (for humans and students with another text encoder).
        source_indices: the real pair each sample was initialised from (index into the source split's flattened
            caption list; ``-1`` when unknown).
        source_image_indices: the image of that pair in the source split (``-1`` when unknown).
        provenance: where the set came from. Keys read by the card (all optional): ``teacher``,
            ``teacher_revision``, ``text_encoder``, ``text_pooling``, ``expert_bank``, ``expert_bank_revision``,
            ``source_dataset``, ``source_dataset_revision``, ``source_fingerprint``, ``source_split``, ``license``,
            ``selection``, ``steps``, ``best_step``, ``config`` (the full config dict), ``versions``,
            ``created_with``. Keys containing ``"token"`` are never written to disk.
        results: evaluation results, or ``None``: ``{"protocol": str, "metric_names": [...], "rows": [{"method":
            "MDM", "pairs": 100, "ir@1": mean, ..., "mean": mean, "mean_std": std, "seeds": n}, ...],
            "notes": str}``; a metric ``m`` may carry its std as ``"m_std"``.
    """

    pixel_values: torch.Tensor
    text_features: torch.Tensor
    image_mean: list[float]
    image_std: list[float]
    captions: list[list[str]]
    source_indices: list[int]
    source_image_indices: list[int]
    provenance: dict = dataclasses.field(default_factory=dict)
    results: dict | None = None

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    def __repr__(self) -> str:
        prov = self.provenance or {}
        parts = [
            f"num_pairs={len(self)}",
            f"pixel_values={list(self.pixel_values.shape)} {str(self.pixel_values.dtype).replace('torch.', '')}",
            f"text_features={list(self.text_features.shape)} {str(self.text_features.dtype).replace('torch.', '')}",
        ]
        if prov.get("teacher"):
            parts.append(f"teacher={prov['teacher']!r}")
        if prov.get("source_dataset"):
            split = f"[{prov['source_split']}]" if prov.get("source_split") else ""
            parts.append(f"source={prov['source_dataset']!r}{split}")
        first = next(iter((self.results or {}).get("rows") or []), None)
        if first and first.get("mean") is not None:
            std = f" ± {first['mean_std']:.2f}" if first.get("mean_std") is not None else ""
            parts.append(f"results={first.get('method', '?')} mean {first['mean']:.2f}{std}")
        return "SyntheticSet(" + ", ".join(parts) + ")"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, H, W)``."""
        return tuple(int(s) for s in self.pixel_values.shape[1:])  # type: ignore[return-value]

    @property
    def text_dim(self) -> int:
        """``D``, the text-feature dimension."""
        return int(self.text_features.shape[1])

    def validate(self) -> None:
        """Check shapes, dtypes and values; raise ``ValueError`` naming the problem and the fix."""
        px, tx = self.pixel_values, self.text_features
        if not isinstance(px, torch.Tensor) or not isinstance(tx, torch.Tensor):
            raise ValueError("pixel_values and text_features must be torch.Tensors (use torch.as_tensor).")
        if px.ndim != 4 or px.shape[1] != 3:
            raise ValueError(f"pixel_values must be [K, 3, H, W]; got shape {list(px.shape)}.")
        if tx.ndim != 2:
            raise ValueError(f"text_features must be [K, D]; got shape {list(tx.shape)}.")
        for name, t in (("pixel_values", px), ("text_features", tx)):
            if t.dtype != torch.float32:
                raise ValueError(f"{name} must be float32, got {t.dtype}; convert with .float().")
        counts = {
            "pixel_values": px.shape[0],
            "text_features": tx.shape[0],
            "captions": len(self.captions),
            "source_indices": len(self.source_indices),
            "source_image_indices": len(self.source_image_indices),
        }
        if len(set(counts.values())) != 1:
            raise ValueError(f"Every field needs one entry per synthetic pair (K); got {counts}.")
        if counts["pixel_values"] == 0:
            raise ValueError("A synthetic set needs at least one pair (K = 0).")
        for name, t in (("pixel_values", px), ("text_features", tx)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"{name} holds NaN or inf values; the distillation diverged (lower the learning rate)."
                )
        for name, values in (("image_mean", self.image_mean), ("image_std", self.image_std)):
            if len(values) != 3 or not all(math.isfinite(float(v)) for v in values):
                raise ValueError(f"{name} must be 3 finite floats (one per RGB channel); got {values!r}.")
        if any(float(s) <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive; got {self.image_std!r}.")
        for i, caps in enumerate(self.captions):
            if isinstance(caps, str) or not all(isinstance(c, str) for c in caps):
                raise ValueError(f"captions[{i}] must be a list of strings (e.g. ['a dog']); got {caps!r}.")
        if self.results is not None and not (
            isinstance(self.results, dict) and isinstance(self.results.get("rows"), list)
        ):
            raise ValueError(
                "results must be a dict with a 'rows' list (see the SyntheticSet docstring) or None."
            )

    # ------------------------------------------------------------------ images
    def to_rgb_uint8(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """De-normalised images ``[n, H, W, 3]`` uint8: ``round(clip(x * std + mean, 0, 1) * 255)``."""
        px = self.pixel_values[start:stop].detach().cpu().float()
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        rgb = (px * std + mean).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
        return rgb.permute(0, 2, 3, 1).contiguous().numpy()

    def preview(self, max_images: int = 64, min_tile: int = 128, pad: int = 2) -> Image.Image:
        """A square-ish grid of up to ``max_images`` synthetic images, upscaled (nearest) to at least ``min_tile`` px."""
        n = min(len(self), max_images)
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        _, h, w = self.image_shape
        # Integer nearest-neighbour upscaling keeps learned pixels crisp (no smoothing of the optimised texture).
        scale = max(1, math.ceil(min_tile / max(h, w)))
        th, tw = h * scale, w * scale
        grid = Image.new("RGB", (cols * tw + (cols + 1) * pad, rows * th + (rows + 1) * pad), "white")
        for i, arr in enumerate(self.to_rgb_uint8(0, n)):
            tile = Image.fromarray(arr).resize((tw, th), Image.NEAREST)
            r, c = divmod(i, cols)
            grid.paste(tile, (pad + c * (tw + pad), pad + r * (th + pad)))
        return grid

    # ------------------------------------------------------------------ datasets.Dataset
    def features(self):
        """The ``datasets.Features`` of the Hub layout."""
        import datasets

        return datasets.Features(
            {
                "image": datasets.Image(),
                "pixel_values": datasets.Array3D(shape=self.image_shape, dtype="float32"),
                "text_features": datasets.List(datasets.Value("float32"), length=self.text_dim),
                "captions": datasets.List(datasets.Value("string")),
                "caption": datasets.Value("string"),
                "source_index": datasets.Value("int64"),
                "source_image_index": datasets.Value("int64"),
            }
        )

    def to_dataset(self):
        """All pairs as an in-memory ``datasets.Dataset`` with the columns of the Hub layout."""
        return self._dataset_rows(0, len(self))

    def _dataset_rows(self, start: int, stop: int):
        import datasets

        images = [Image.fromarray(arr) for arr in self.to_rgb_uint8(start, stop)]  # encoded as PNG (lossless)
        captions = [list(c) for c in self.captions[start:stop]]
        columns = {
            "image": images,
            "pixel_values": self.pixel_values[start:stop].detach().cpu().contiguous().numpy(),
            "text_features": self.text_features[start:stop].detach().cpu().contiguous().numpy(),
            "captions": captions,
            "caption": [c[0] if c else "" for c in captions],
            "source_index": [int(i) for i in self.source_indices[start:stop]],
            "source_image_index": [int(i) for i in self.source_image_indices[start:stop]],
        }
        return datasets.Dataset.from_dict(columns, features=self.features())

    @classmethod
    def from_dataset(
        cls,
        ds,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        provenance: dict | None = None,
        results: dict | None = None,
    ) -> SyntheticSet:
        """A :class:`SyntheticSet` from a ``load_dataset`` output of the Hub layout (tensors restored exactly).

        ``image_mean`` / ``image_std`` are not columns; they are in ``mdm_synthetic.json`` next to the parquet
        files (or use :meth:`from_pretrained`, which reads them). A student needs no mdm-hf code at all::

            from datasets import load_dataset
            from torch.utils.data import DataLoader

            ds = load_dataset("user/coco-mdm-100")["train"].with_format("torch")
            loader = DataLoader(ds, batch_size=64, shuffle=True, collate_fn=collate_synthetic)
            for batch in loader:
                batch["pixel_values"]   # [B, 3, H, W] float32 -> student vision tower
                batch["text_features"]  # [B, D] float32 -> student text projection head

        (``with_format("torch", columns=["pixel_values", "text_features"])`` with the default collate works too;
        :func:`collate_synthetic` is that step spelled out, and also accepts rows without the torch format.)

        Args:
            ds: a ``datasets.Dataset`` (or a ``DatasetDict`` with a ``"train"`` split) with at least
                ``pixel_values`` and ``text_features``; ``captions``/``caption``, ``source_index`` and
                ``source_image_index`` are used when present.
        """
        import datasets

        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"Expected a 'train' split; got splits {list(ds)}. Pass ds['<split>'].")
            ds = ds["train"]
        if not isinstance(ds, datasets.Dataset):
            raise TypeError(
                f"from_dataset needs a datasets.Dataset (not streaming); got {type(ds).__name__}."
            )
        missing = [c for c in ("pixel_values", "text_features") if c not in ds.column_names]
        if missing:
            raise ValueError(f"Dataset lacks column(s) {missing}; it is not an MDM synthetic set.")
        if image_mean is None or image_std is None:
            raise ValueError(
                "Pass image_mean= and image_std= (3 floats each): they are in mdm_synthetic.json next to the "
                "parquet files. Or load the directory / repo with SyntheticSet.from_pretrained, which reads them."
            )
        wanted = [c for c in COLUMNS if c != "image" and c in ds.column_names]
        # The arrow formatter honours an indices mapping (after select/shuffle), unlike ds.data.
        table = ds.select_columns(wanted).with_format("arrow")[:]
        out = cls._from_table(table, image_mean, image_std, provenance or {}, results)
        out.validate()
        return out

    @classmethod
    def _from_table(
        cls, table, image_mean, image_std, provenance: dict, results: dict | None
    ) -> SyntheticSet:
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

        return cls(
            pixel_values=_column_to_tensor(table.column("pixel_values"), depth=3, name="pixel_values"),
            text_features=_column_to_tensor(table.column("text_features"), depth=1, name="text_features"),
            image_mean=[float(v) for v in image_mean],
            image_std=[float(v) for v in image_std],
            captions=captions,
            source_indices=ints("source_index"),
            source_image_indices=ints("source_image_index"),
            provenance=provenance,
            results=results,
        )

    # ------------------------------------------------------------------ metadata and card
    def metadata(self) -> dict:
        """The content of ``mdm_synthetic.json`` (token-like keys removed)."""
        from . import __version__

        return _jsonable(
            {
                "format_version": FORMAT_VERSION,
                "created_with": f"mdm-hf {__version__}",
                "num_pairs": len(self),
                "pixel_values_shape": list(self.pixel_values.shape),
                "text_features_shape": list(self.text_features.shape),
                "dtype": "float32",
                "image_mean": [float(v) for v in self.image_mean],
                "image_std": [float(v) for v in self.image_std],
                "provenance": self._full_provenance(),
                "results": self.results,
            }
        )

    def _full_provenance(self) -> dict:
        """Provenance with ``created_with`` and library versions filled in when missing; no token keys."""
        import datasets
        import huggingface_hub

        from . import __version__

        prov = dict(_scrub_tokens(self.provenance or {}))
        prov.setdefault("created_with", f"mdm-hf {__version__}")
        versions = dict(prov.get("versions") or {})
        versions.setdefault("mdm_hf", __version__)
        versions.setdefault("torch", torch.__version__)
        versions.setdefault("datasets", datasets.__version__)
        versions.setdefault("huggingface_hub", huggingface_hub.__version__)
        prov["versions"] = versions
        return prov

    def to_card(self, repo_id: str | None = None):
        """The dataset card (``huggingface_hub.DatasetCard``) rendered from ``hub_cards/synthetic_dataset_card.md``.

        Args:
            repo_id: used in the "how to load" snippets; defaults to ``config.hub_dataset_id`` from the provenance,
                else a placeholder.
        """
        import yaml
        from huggingface_hub import DatasetCardData

        from .cards import render_dataset_card

        prov = _jsonable(self._full_provenance())
        config = prov.get("config") or {}
        repo_id = repo_id or (config.get("hub_dataset_id") if isinstance(config, dict) else None)
        repo_id = repo_id or "<namespace>/<name>"
        source = prov.get("source_dataset")
        license_id, license_name = _hub_license(prov.get("license"))
        extra = {"license_name": license_name} if license_name else {}
        k = len(self)
        short = Path(str(source)).name if source else "image-text data"
        card_data = DatasetCardData(
            license=license_id,
            task_categories=TASK_CATEGORIES,
            tags=TAGS,
            size_categories=[_size_category(k)],
            source_datasets=[str(source)] if source and _hub_like(str(source)) else None,
            pretty_name=f"{short} distilled with MDM ({k} pairs)",
            configs=[
                {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}
            ],
            **extra,
        )
        _, h, w = self.image_shape
        results = self.results
        return render_dataset_card(
            CARD_TEMPLATE,
            card_data,
            pretty_name=card_data.pretty_name,
            num_pairs=k,
            pixel_shape=f"3, {h}, {w}",
            image_size=f"{h}×{w}",
            text_dim=self.text_dim,
            image_mean=[round(float(v), 6) for v in self.image_mean],
            image_std=[round(float(v), 6) for v in self.image_std],
            source_link=_link(source, "datasets") if source else "an image–caption dataset",
            source_split=prov.get("source_split"),
            selection=prov.get("selection") or "unknown",
            has_expert_bank=bool(prov.get("expert_bank")),
            method=prov.get("method") or "MDM",
            text_encoder=prov.get("text_encoder") or prov.get("teacher") or "the teacher's text encoder",
            created_with=prov["created_with"],
            license_text=prov.get("license") or "unknown",
            provenance_rows=_provenance_rows(prov),
            config_yaml=yaml.safe_dump(config, sort_keys=False, allow_unicode=True).strip() or "{}",
            results_table=_results_table(results) if results else None,
            results_protocol=(results or {}).get("protocol") or "not recorded",
            results_notes=(results or {}).get("notes"),
            repo_id=repo_id,
        )

    # ------------------------------------------------------------------ disk
    def save_pretrained(
        self, directory: str | os.PathLike, overwrite: bool = False, max_shard_size: int | str = "500MB"
    ) -> str:
        """Write the Hub layout (parquet shards, card, preview, ``mdm_synthetic.json``) into ``directory``.

        Args:
            directory: created if missing. A non-empty directory needs ``overwrite=True``; the files of an earlier
                save there (``data/*.parquet``, README.md, preview.png, mdm_synthetic.json) are replaced, other
                files are kept.
            overwrite: allow writing into a non-empty directory.
            max_shard_size: approximate upper bound of one parquet shard (bytes or ``"500MB"``, ``"2GB"``...).

        Returns:
            The directory, as a string. ``datasets.load_dataset(directory)`` opens it.
        """
        return str(
            self._save(Path(directory), overwrite=overwrite, max_shard_size=max_shard_size, repo_id=None)
        )

    def _save(self, directory: Path, overwrite: bool, max_shard_size: int | str, repo_id: str | None) -> Path:
        self.validate()
        limit = _parse_size(max_shard_size)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"'{directory}' exists and is not a directory; choose a directory path.")
        if directory.is_dir() and any(directory.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"Directory '{directory}' is not empty. Pass overwrite=True to replace a synthetic set saved "
                    "there, or choose an empty directory."
                )
            # Remove what an earlier save wrote, so a set with fewer shards leaves no stale ones behind.
            for old in directory.glob(f"{DATA_DIR}/*.parquet"):
                old.unlink()
            for name in (CARD_FILE, PREVIEW_FILE, METADATA_FILE):
                (directory / name).unlink(missing_ok=True)
        (directory / DATA_DIR).mkdir(parents=True, exist_ok=True)

        k = len(self)
        c, h, w = self.image_shape
        caption_bytes = sum(len(s.encode()) for caps in self.captions for s in caps) / k
        # float32 pixels + a PNG (at most about the raw uint8 size) + the text feature + captions/ids.
        row_bytes = 4 * c * h * w + c * h * w + 4 * self.text_dim + 2 * caption_bytes + 64
        rows_per_shard = max(1, int(limit // row_bytes))
        num_shards = math.ceil(k / rows_per_shard)
        for i in range(num_shards):
            part = self._dataset_rows(i * rows_per_shard, min(k, (i + 1) * rows_per_shard))
            part.to_parquet(str(directory / DATA_DIR / f"train-{i:05d}-of-{num_shards:05d}.parquet"))
        self.preview().save(directory / PREVIEW_FILE)
        meta = self.metadata()
        (directory / METADATA_FILE).write_text(
            json.dumps(meta, indent=2, allow_nan=True) + "\n", encoding="utf-8"
        )
        self.to_card(repo_id=repo_id).save(str(directory / CARD_FILE))
        logger.info("Saved %d synthetic pairs (%d shard(s)) to %s", k, num_shards, directory)
        return directory

    @classmethod
    def from_pretrained(
        cls, repo_id_or_dir: str | os.PathLike, revision: str | None = None, token: str | None = None
    ) -> SyntheticSet:
        """Load a set saved by :meth:`save_pretrained` / :meth:`push_to_hub`, from a local directory or the Hub.

        Tensors come back bit for bit. A Hub id is fetched with ``huggingface_hub.snapshot_download``
        (``repo_type="dataset"``); offline, a set already in the Hub cache still loads.

        Raises:
            SyntheticSetOfflineError: a Hub id while offline / unreachable and not cached.
            FileNotFoundError: a path that does not exist, or a directory that is not a synthetic set.
        """
        text = str(repo_id_or_dir)
        path = Path(text).expanduser()
        if path.is_dir():
            return cls._load_dir(path)
        if path.exists():
            raise NotADirectoryError(f"'{text}' is a file; pass the directory written by save_pretrained.")
        if text.startswith((".", "/", "~", "\\")) or not _is_hub_id(text):
            raise FileNotFoundError(
                f"No directory '{text}' (and it is not a Hub dataset id 'namespace/name')."
            )
        return cls._load_dir(Path(_download(text, revision=revision, token=token)))

    @classmethod
    def _load_dir(cls, directory: Path) -> SyntheticSet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta_path = directory / METADATA_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"'{directory}' has no {METADATA_FILE}, so it is not a synthetic set saved by mdm-hf. For another "
                "dataset of this layout use SyntheticSet.from_dataset(load_dataset(dir)['train'], image_mean=..., "
                "image_std=...)."
            )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        version = int(meta.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"'{directory}' uses synthetic-set format {version}; this mdm-hf reads up to {FORMAT_VERSION}. "
                "Upgrade mdm-hf (pip install -U mdm-hf)."
            )
        files = sorted((directory / DATA_DIR).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(
                f"'{directory / DATA_DIR}' holds no parquet shards; the save is incomplete."
            )
        wanted = [c for c in COLUMNS if c != "image"]
        table = pa.concat_tables([pq.read_table(f, columns=wanted) for f in files])
        out = cls._from_table(
            table, meta["image_mean"], meta["image_std"], meta.get("provenance") or {}, meta.get("results")
        )
        expected = (meta.get("pixel_values_shape"), meta.get("text_features_shape"))
        got = (list(out.pixel_values.shape), list(out.text_features.shape))
        if None not in expected and list(expected) != list(got):
            raise ValueError(
                f"'{directory}': {METADATA_FILE} promises shapes {expected} but the shards hold {got}; a shard is "
                "missing or stale. Save again with save_pretrained(..., overwrite=True)."
            )
        out.validate()
        return out

    # ------------------------------------------------------------------ Hub
    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        local_dir: str | os.PathLike | None = None,
        max_shard_size: int | str = "500MB",
    ) -> str:
        """Save the Hub layout locally, then upload it as the dataset repo ``repo_id``; returns the repo URL.

        The local copy is written first (``local_dir``, default ``$MDM_HF_HOME/hub_uploads/<namespace>--<name>-
        <time>``, logged), so a failed upload loses nothing. ``local_dir`` may hold an earlier save of a synthetic
        set (it is rewritten) or be empty. The token is passed to ``HfApi`` only: it is never logged or written.

        Raises:
            ValueError: ``repo_id`` is not ``"namespace/name"`` (checked before anything else).
            SyntheticSetUploadError: the upload failed; the message names the local copy and how to retry.
        """
        check_repo_id(repo_id)
        from huggingface_hub import HfApi, constants

        if local_dir is None:
            from .data import default_cache_dir

            stamp = time.strftime("%Y%m%d-%H%M%S")
            local = default_cache_dir() / "hub_uploads" / f"{repo_id.replace('/', '--')}-{stamp}"
            logger.warning("Writing the local copy of the synthetic set to %s before uploading.", local)
        else:
            local = Path(local_dir)
        previous_save = local.is_dir() and (local / METADATA_FILE).is_file()
        self._save(local, overwrite=previous_save, max_shard_size=max_shard_size, repo_id=repo_id)
        if token:
            _assert_token_absent(local, token)

        url = f"{constants.ENDPOINT}/datasets/{repo_id}"
        api = HfApi(token=token)
        logger.info("Uploading %s to %s", local, url)
        try:
            repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(local),
                repo_type="dataset",
                revision=revision,
                commit_message=commit_message or f"Upload MDM synthetic set ({len(self)} pairs)",
            )
        except Exception as err:  # any failure: keep the local copy and say how to resume
            reason = f"{type(err).__name__}: {err}"
            if token:
                reason = reason.replace(token, "<token>")
            retry = f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(local))} . --repo-type dataset"
            if revision:
                retry += f" --revision {shlex.quote(revision)}"
            raise SyntheticSetUploadError(
                f"Uploading the synthetic set to {url} failed ({reason}). Nothing is lost: the local copy is in "
                f"{local}. Retry with `{retry}` or with SyntheticSet.from_pretrained({str(local)!r})"
                f".push_to_hub({repo_id!r}, local_dir={str(local)!r})."
            ) from err
        if isinstance(repo_url, str) and repo_url.startswith("http"):
            url = str(repo_url).rstrip("/")
        if revision not in (None, "main"):
            url = f"{url}/tree/{revision}"
        logger.info("Uploaded %d synthetic pairs to %s", len(self), url)
        return url


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


# ====================================================================== helpers
def check_repo_id(repo_id: str) -> None:
    """Raise ``ValueError`` unless ``repo_id`` is a Hub repo id of the form ``"namespace/name"``."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(_HUB_NAME.match(p) for p in parts):
        raise ValueError(
            f"Invalid Hub repo id {repo_id!r}: use 'namespace/name' (your user or organisation name, a slash, and "
            "a name of letters, digits, '-', '_' or '.'), e.g. 'my-user/coco-mdm-100'."
        )


def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(_HUB_NAME.match(p) for p in parts)


def _hub_like(name: str) -> bool:
    """A Hub repo id rather than a local path (cards link Hub ids and never list local paths as sources)."""
    return _is_hub_id(name) and not Path(name).exists()


def _download(repo_id: str, revision: str | None, token: str | None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, repo_type="dataset", revision=revision, token=token)
    except LocalEntryNotFoundError as err:
        state = (
            "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached"
        )
        raise SyntheticSetOfflineError(
            f"Cannot load the synthetic set '{repo_id}': it is not a local directory ({Path(repo_id).resolve()} "
            f"does not exist), {state}, and it is not in the Hub cache. Offline, pass a local directory: download "
            f"it where the Hub is reachable (`hf download {repo_id} --repo-type dataset --local-dir DIR`) and call "
            "SyntheticSet.from_pretrained('DIR')."
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"No dataset repo '{repo_id}' on the Hub, or it is private/gated: check the id, or pass token= / run "
            "`hf auth login`."
        ) from err


def _column_to_tensor(column, depth: int, name: str) -> torch.Tensor:
    """A (chunked) Arrow column of equal-length nested float lists -> float32 tensor ``[n, *inner]``, bit-exact."""
    import pyarrow as pa

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
        values = arr.to_numpy(zero_copy_only=False)
        arrays.append(values.reshape(len(chunk), *shape))
    if not arrays:
        raise ValueError(f"Column '{name}' is empty.")
    data = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    # float32 in, float32 out: no rounding; wider floats from hand-made datasets are narrowed once here.
    return torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy owned by torch


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive; got {size}.")
        return size
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size {size!r} not understood; use bytes (int) or e.g. '500MB', '2GB'.")
    return int(float(match.group(1)) * units[match.group(2) or "B"])


def _size_category(n: int) -> str:
    bounds = [(10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M")]
    return next((label for bound, label in bounds if n < bound), "1M<n<10M")


def _hub_license(value) -> tuple[str, str | None]:
    """Source license -> (Hub license id, license_name for ``other``)."""
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) == 1 else ", ".join(map(str, value))
    if not value or not str(value).strip():
        return "unknown", None
    norm = re.sub(r"[\s_]+", "-", str(value).strip().lower())
    if norm in _HUB_LICENSES:
        return norm, None
    slug = re.sub(r"[^a-z0-9.-]+", "-", norm).strip("-.")[:64] or "source-license"
    return "other", slug


def _scrub_tokens(obj):
    """Drop every mapping key containing 'token' (any case), recursively: no credential reaches disk or a card."""
    if isinstance(obj, dict):
        return {k: _scrub_tokens(v) for k, v in obj.items() if "token" not in str(k).lower()}
    if isinstance(obj, (list, tuple)):
        return [_scrub_tokens(v) for v in obj]
    return obj


def _jsonable(obj):
    """JSON-safe copy (dataclasses -> dicts, paths/other objects -> str), with token keys dropped."""

    def default(o):
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        if isinstance(o, (np.generic,)):
            return o.item()
        return str(o)

    return _scrub_tokens(json.loads(json.dumps(obj, default=default)))


def _assert_token_absent(directory: Path, token: str) -> None:
    """Refuse to upload if the token string ended up in any written text file (defence in depth)."""
    for path in (directory / CARD_FILE, directory / METADATA_FILE):
        if token in path.read_text(encoding="utf-8"):
            raise ValueError(
                f"Refusing to upload: a Hub token appears in {path.name}. Remove it from the provenance."
            )


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _link(name, kind: str) -> str:
    """Markdown link to a Hub repo for Hub ids, plain code span for local paths."""
    name = str(name)
    if _hub_like(name):
        prefix = "datasets/" if kind == "datasets" else ""
        return f"[`{name}`](https://huggingface.co/{prefix}{name})"
    return f"`{_cell(name)}` (local)"


def _with_revision(name, revision) -> str:
    return f"{name} @ `{_cell(revision)}`" if revision else name


def _provenance_rows(prov: dict) -> list[tuple[str, str]]:
    rows = []
    if prov.get("teacher"):
        rows.append(
            (
                "Teacher (anchor)",
                _with_revision(_link(prov["teacher"], "models"), prov.get("teacher_revision")),
            )
        )
    if prov.get("text_encoder"):
        pooling = f" (pooling: `{prov['text_pooling']}`)" if prov.get("text_pooling") else ""
        rev = prov.get("text_encoder_revision") or (
            prov.get("teacher_revision") if prov.get("text_encoder") == prov.get("teacher") else None
        )
        rows.append(
            ("Text encoder (frozen)", _with_revision(_link(prov["text_encoder"], "models"), rev) + pooling)
        )
    if prov.get("expert_bank"):
        bank = _with_revision(_link(prov["expert_bank"], "models"), prov.get("expert_bank_revision"))
    else:
        bank = "none (the pretrained anchor is the teacher)"
    rows.append(("Expert bank", bank))
    if prov.get("source_dataset"):
        rows.append(
            (
                "Source dataset",
                _with_revision(
                    _link(prov["source_dataset"], "datasets"), prov.get("source_dataset_revision")
                ),
            )
        )
    for key, label in (
        ("source_split", "Source split"),
        ("source_fingerprint", "Source fingerprint"),
        ("license", "Source license"),
        ("selection", "Initial selection"),
        ("steps", "Distillation steps"),
        ("best_step", "Selected step"),
        ("created_with", "Created with"),
    ):
        if prov.get(key) not in (None, ""):
            rows.append((label, f"`{_cell(prov[key])}`"))
    if prov.get("versions"):
        rows.append(("Library versions", ", ".join(f"{k} {v}" for k, v in prov["versions"].items())))
    return rows


def _fmt(mean, std=None) -> str:
    if mean is None:
        return "–"
    try:
        text = f"{float(mean):.1f}"
    except (TypeError, ValueError):
        return _cell(mean)
    return f"{text} ± {float(std):.1f}" if std is not None else text


def _results_table(results: dict) -> str:
    """Markdown table of ``results["rows"]`` (metrics as mean ± std)."""
    metrics = [m for m in (results.get("metric_names") or _DEFAULT_METRICS) if m != "mean"]
    header = ["Method", "Pairs", *[m.upper() for m in metrics], "Mean", "Seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results.get("rows") or []:
        pairs = row.get("pairs")
        cells = [
            _cell(row.get("method", "?")),
            "all" if pairs is None else _cell(pairs),
            *[_fmt(row.get(m), row.get(f"{m}_std")) for m in metrics],
            _fmt(row.get("mean"), row.get("mean_std")),
            _cell(row.get("seeds", "–")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
