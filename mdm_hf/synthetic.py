"""The distilled set: :class:`SyntheticSet` and its Hub layout.

A synthetic set is ``K`` learned pairs ``(x~, e~)``, the output of the MDM loop (MDM, arXiv 2605.23482;
``docs/method.md §4``): pixels in the teacher's *normalised* pixel space and text features in the space of the frozen
text encoder's pooled output (``docs/method.md §2``). On disk and on the Hub it is a plain dataset repository that
``datasets.load_dataset`` opens without custom code (``docs/design.md``)::

    README.md                          dataset card (hub_cards/synthetic_dataset_card.md, :mod:`mdm_hf.cards`)
    preview.png                        a grid of the synthetic images
    mdm_synthetic.json                 provenance, results, image_mean/std, shapes, format version
    data/train-<fingerprint>-00000-of-00001.parquet  columns: image, pixel_values, text_features, captions, caption,
                                       source_index, source_image_index

``pixel_values`` and ``text_features`` are stored as float32 Arrow values, so they come back bit for bit. Talking to
the Hub (ids, download, upload, token scrubbing) is :mod:`mdm_hf.hub`; the card is :mod:`mdm_hf.cards`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import torch
from PIL import Image

from . import __version__
from .cards import synthetic_dataset_card
from .hub import (
    HubUpload,
    HubUploadError,
    OfflineHubError,
    check_repo_id,
    download_repo,
    is_hub_id,
    redact_local_paths,
    scrub_tokens,
    upload_folder_checked,
)
from .synthetic_format import (
    CARD_FILE,
    COLUMNS,
    DATA_DIR,
    FORMAT_VERSION,
    METADATA_FILE,
    PREVIEW_FILE,
    collate_synthetic,
    hub_features,
    jsonable,
    read_saved,
    rows_per_shard,
    table_fields,
)

__all__ = [
    "SyntheticSet",
    "SyntheticSetUploadError",
    "SyntheticSetOfflineError",
    "collate_synthetic",
    "check_repo_id",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)


class SyntheticSetUploadError(HubUploadError):
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
    def features(self) -> datasets.Features:
        """The ``datasets.Features`` of the Hub layout."""
        return hub_features(self.image_shape, self.text_dim)

    def to_dataset(self):
        """All pairs as an in-memory ``datasets.Dataset`` with the columns of the Hub layout."""
        return self._dataset_rows(0, len(self))

    def _dataset_rows(self, start: int, stop: int):
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
        image_mean, image_std = [float(v) for v in image_mean], [float(v) for v in image_std]
        return cls(
            **table_fields(table),
            image_mean=image_mean,
            image_std=image_std,
            provenance=provenance,
            results=results,
        )

    # ------------------------------------------------------------------ metadata and card
    def content_fingerprint(self) -> str:
        """A hash of the set's contents (tensors, captions, sources). It names the parquet shards, because
        ``datasets`` caches a local folder by its name and ``data_files`` patterns, not by its contents: two sets
        saved in folders of the same name would otherwise load as one."""
        digest = hashlib.sha256()
        for tensor in (self.pixel_values, self.text_features):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(json.dumps([self.captions, list(self.source_indices)], default=str).encode())
        return digest.hexdigest()[:12]

    def metadata(self) -> dict:
        """The content of ``mdm_synthetic.json`` (token-like keys removed)."""
        return jsonable(
            {
                "format_version": FORMAT_VERSION,
                "created_with": f"mdm-hf {__version__}",
                "num_pairs": len(self),
                "pixel_values_shape": list(self.pixel_values.shape),
                "text_features_shape": list(self.text_features.shape),
                "dtype": "float32",
                "image_mean": [float(v) for v in self.image_mean],
                "image_std": [float(v) for v in self.image_std],
                "provenance": self.full_provenance(),
                "results": self.results,
            }
        )

    def full_provenance(self) -> dict:
        """JSON-safe provenance with ``created_with`` and library versions filled in when missing; no token keys
        and no absolute local paths (a local source appears by folder name; its fingerprint identifies it)."""
        prov = dict(redact_local_paths(scrub_tokens(self.provenance or {})))
        prov.setdefault("created_with", f"mdm-hf {__version__}")
        versions = dict(prov.get("versions") or {})
        versions.setdefault("mdm_hf", __version__)
        versions.setdefault("torch", torch.__version__)
        versions.setdefault("datasets", datasets.__version__)
        versions.setdefault("huggingface_hub", huggingface_hub.__version__)
        prov["versions"] = versions
        return jsonable(prov)

    def to_card(self, repo_id: str | None = None) -> huggingface_hub.DatasetCard:
        """The dataset card (``huggingface_hub.DatasetCard``): :func:`mdm_hf.cards.synthetic_dataset_card`.

        Args:
            repo_id: used in the "how to load" snippets; defaults to ``config.hub_dataset_id`` from the provenance,
                else a placeholder.
        """
        return synthetic_dataset_card(self, repo_id)

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
        per_shard = rows_per_shard(self.image_shape, self.text_dim, self.captions, max_shard_size)
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

        k, fingerprint = len(self), self.content_fingerprint()
        num_shards = math.ceil(k / per_shard)
        for i in range(num_shards):
            part = self._dataset_rows(i * per_shard, min(k, (i + 1) * per_shard))
            part.to_parquet(
                str(directory / DATA_DIR / f"train-{fingerprint}-{i:05d}-of-{num_shards:05d}.parquet")
            )
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
        if text.startswith((".", "/", "~", "\\")) or not is_hub_id(text):
            raise FileNotFoundError(
                f"No directory '{text}' (and it is not a Hub dataset id 'namespace/name')."
            )
        snapshot = download_repo(
            text,
            repo_type="dataset",
            revision=revision,
            token=token,
            what="the synthetic set",
            use_local="call SyntheticSet.from_pretrained('DIR')",
            offline_error=SyntheticSetOfflineError,
        )
        return cls._load_dir(snapshot)

    @classmethod
    def _load_dir(cls, directory: Path) -> SyntheticSet:
        table, meta = read_saved(directory)
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
        create_pr: bool = False,
    ) -> HubUpload:
        """Save the Hub layout locally, then upload it as the dataset repo ``repo_id``, like ``Dataset.push_to_hub``.

        The local copy is written first (``local_dir``; by default a temporary folder that is removed after a
        successful upload and kept, and named, after a failed one), so a failed upload loses nothing. Shards of an
        earlier push that this one does not re-upload are deleted in the same commit. The token is passed to
        ``HfApi`` only: it is never logged or written.

        Returns:
            the repo URL (a ``str``), with ``.commit_url`` and, for ``create_pr=True``, ``.pr_url``.

        Raises:
            ValueError: ``repo_id`` is not ``"namespace/name"`` (checked before anything else).
            SyntheticSetUploadError: the upload failed; the message names the local copy and how to retry.
        """
        check_repo_id(repo_id)
        temporary = local_dir is None
        local = Path(tempfile.mkdtemp(prefix="mdm-hf-upload-")) if temporary else Path(local_dir)
        previous_save = local.is_dir() and (local / METADATA_FILE).is_file()
        self._save(
            local, overwrite=previous_save or temporary, max_shard_size=max_shard_size, repo_id=repo_id
        )
        upload = upload_folder_checked(
            local,
            repo_id,
            repo_type="dataset",
            commit_message=commit_message or f"Upload MDM synthetic set ({len(self)} pairs)",
            token=token,
            private=private,
            revision=revision,
            delete_patterns=[f"{DATA_DIR}/*.parquet"],
            create_pr=create_pr,
            token_free=(CARD_FILE, METADATA_FILE),
            what="the synthetic set",
            resume_hint=f"SyntheticSet.from_pretrained({str(local)!r}).push_to_hub({repo_id!r}, "
            f"local_dir={str(local)!r})",
            error=SyntheticSetUploadError,
        )
        if temporary:
            shutil.rmtree(local, ignore_errors=True)
        logger.info("Uploaded %d synthetic pairs to %s", len(self), upload.url)
        return upload
