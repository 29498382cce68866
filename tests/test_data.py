"""Image-caption loading through the real ``datasets.load_dataset`` path, for every recognised layout.

Expected contents are read back INDEPENDENTLY of ``mdm_hf.data``: straight from the parquet files / the
``metadata.jsonl`` the fixtures wrote, and from the pictures themselves (each caption names its image's colour).
"""

import io
import json
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mdm_hf import testing
from mdm_hf.data import (
    DataError,
    PairDataset,
    cached_text_features,
    card_license,
    load_image_caption_dataset,
    load_split,
    preprocess_split_images,
    to_rgb,
)
from mdm_hf.models import DualEncoder

# What the fixtures build (mdm_hf/testing.py): images per split and captions per image.
EXPECTED = {
    ("caption_list", "train"): (24, 2),
    ("caption_list", "validation"): (8, 2),
    ("caption_list", "test"): (8, 2),
    # 32 records cycling through [train, restval, train, val, train, test, train, train]: restval counts as train
    ("karpathy", "train"): (24, 3),
    ("karpathy", "validation"): (4, 3),
    ("karpathy", "test"): (4, 3),
    ("imagefolder", "train"): (16, 1),
    ("imagefolder", "test"): (8, 1),
}
KARPATHY_VALUES = {"train": {"train", "restval"}, "validation": {"val"}, "test": {"test"}}


def raw_rows(layout: str, root: str, split: str) -> list[tuple[Image.Image, list[str]]]:
    """(image, captions) of one split, read from the files on disk without ``datasets`` or ``mdm_hf.data``."""
    root = Path(root)
    if layout == "imagefolder":
        lines = (root / split / "metadata.jsonl").read_text().splitlines()
        meta = sorted((json.loads(line) for line in lines), key=lambda m: m["file_name"])
        return [(Image.open(root / split / m["file_name"]), [m["text"]]) for m in meta]
    if layout == "caption_list":
        rows = pq.read_table(root / "data" / f"{split}-00000-of-00001.parquet").to_pylist()
        return [(Image.open(io.BytesIO(r["image"]["bytes"])), r["caption"]) for r in rows]
    rows = pq.read_table(root / "data" / "train-00000-of-00001.parquet").to_pylist()
    return [
        (Image.open(io.BytesIO(r["image"]["bytes"])), r["sentences"])
        for r in rows
        if r["split"] in KARPATHY_VALUES[split]
    ]


def dominant_colour(image: Image.Image) -> str:
    """The named colour of the shape: mean of the pixels far from the grey background, nearest palette entry."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    shape = pixels[np.abs(pixels - 128).max(1) > 50]
    mean = shape.mean(0)
    return min(testing.COLOURS, key=lambda c: np.sum((np.array(testing.COLOURS[c]) - mean) ** 2))


def colour_word(caption: str) -> str:
    (word,) = [w for w in caption.split() if w in testing.COLOURS]
    return word


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def write_parquet_dataset(directory: Path, columns: dict, features: dict, split: str = "train") -> str:
    """A one-split Hub-layout repo ``data/<split>-00000-of-00001.parquet``."""
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    (directory / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(directory / "data" / f"{split}-00000-of-00001.parquet"))
    return str(directory)


# ---------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize(("layout", "split"), list(EXPECTED))
def test_split_contents_match_the_files_on_disk(tiny_dataset_dirs, layout, split):
    data = load_image_caption_dataset(tiny_dataset_dirs[layout], split)
    rows = raw_rows(layout, tiny_dataset_dirs[layout], split)
    num_images, per_image = EXPECTED[(layout, split)]
    assert len(rows) == num_images  # the reader above agrees with the fixture's construction
    assert data.num_images == num_images
    assert data.num_captions == num_images * per_image == len(data.caption_to_image)
    assert data.split == split and data.image_column == "image"
    assert data.captions == [c for _, caps in rows for c in caps]
    assert data.caption_to_image.tolist() == [i for i, (_, caps) in enumerate(rows) for _ in caps]
    for i, (image, caps) in enumerate(rows):
        assert data.captions_of(i) == caps
        assert same_pixels(data.image(i), image)
    # the pairing is semantically right: every caption names the colour of the image it is paired with
    colours = [dominant_colour(data.image(i)) for i in range(data.num_images)]
    if layout != "karpathy":  # (Karpathy's val/test rows all share one colour and differ by shape)
        assert len(set(colours)) == 8  # the colour check can discriminate
    for caption, owner in zip(data.captions, data.caption_to_image.tolist()):
        assert colour_word(caption) == colours[owner], caption


@pytest.mark.parametrize(
    ("layout", "split"), [("caption_list", "train"), ("karpathy", "validation"), ("imagefolder", "test")]
)
def test_streaming_equals_non_streaming(tiny_dataset_dirs, layout, split):
    eager = load_image_caption_dataset(tiny_dataset_dirs[layout], split)
    streamed = load_image_caption_dataset(tiny_dataset_dirs[layout], split, streaming=True)
    assert streamed.num_images == eager.num_images
    assert streamed.captions == eager.captions
    assert torch.equal(streamed.caption_to_image, eager.caption_to_image)
    assert all(same_pixels(streamed.image(i), eager.image(i)) for i in range(eager.num_images))
    # a streamed split gets the same fingerprint on every load, so its cached text features are reused
    again = load_image_caption_dataset(tiny_dataset_dirs[layout], split, streaming=True)
    assert again.fingerprint == streamed.fingerprint


@pytest.mark.parametrize("streaming", [False, True])
def test_max_images(tiny_dataset_dirs, streaming):
    full = load_image_caption_dataset(tiny_dataset_dirs["karpathy"], "train")
    head = load_image_caption_dataset(
        tiny_dataset_dirs["karpathy"], "train", max_images=5, streaming=streaming
    )
    assert head.num_images == 5
    assert head.captions == full.captions[:15]
    assert head.caption_to_image.tolist() == full.caption_to_image[:15].tolist()
    assert same_pixels(head.image(4), full.image(4))
    assert head.fingerprint != full.fingerprint
    big = load_image_caption_dataset(
        tiny_dataset_dirs["karpathy"], "train", max_images=1000, streaming=streaming
    )
    assert big.num_images == full.num_images


def test_explicit_columns_win(tmp_path):
    n = 4
    records = testing.toy_records(n, 2)
    thumbs = [testing.toy_image("white", "cross", 16, seed=i) for i in range(n)]
    path = write_parquet_dataset(
        tmp_path,
        {
            "image": [r["image"] for r in records],
            "thumb": thumbs,
            "caption": [r["captions"] for r in records],
            "alt": [f"alt text {i}" for i in range(n)],
        },
        {
            "image": datasets.Image(),
            "thumb": datasets.Image(),
            "caption": datasets.Sequence(datasets.Value("string")),
            "alt": datasets.Value("string"),
        },
    )
    auto = load_image_caption_dataset(path, "train")
    assert auto.image_column == "image" and auto.captions == [c for r in records for c in r["captions"]]
    chosen = load_image_caption_dataset(path, "train", image_column="thumb", caption_column="alt")
    assert chosen.image_column == "thumb"
    assert chosen.captions == [f"alt text {i}" for i in range(n)]
    assert chosen.caption_to_image.tolist() == list(range(n))
    assert all(same_pixels(chosen.image(i), thumbs[i]) for i in range(n))


def test_explicit_caption_and_split_columns_win_on_karpathy(tiny_dataset_dirs):
    root = tiny_dataset_dirs["karpathy"]
    rows = pq.read_table(Path(root) / "data" / "train-00000-of-00001.parquet").to_pylist()
    by_filename = load_image_caption_dataset(root, "train", caption_column="filename")
    assert by_filename.captions == [r["filename"] for r in rows if r["split"] in ("train", "restval")]
    # a different split column: Karpathy's val images are the ones under val2014/
    by_folder = load_image_caption_dataset(root, "val2014", split_column="filepath")
    expected = [r for r in rows if r["filepath"] == "val2014"]
    assert len(expected) == 4 and all(r["split"] == "val" for r in expected)
    assert by_folder.captions == [c for r in expected for c in r["sentences"]]


def test_subset_keeps_captions_with_their_images(tiny_dataset_dir):
    data = load_image_caption_dataset(tiny_dataset_dir, "train")
    picked = [5, 0, 17]
    sub = data.subset(picked)
    assert sub.num_images == 3 and sub.num_captions == 6
    for new, old in enumerate(picked):
        assert sub.captions_of(new) == data.captions_of(old)
        assert same_pixels(sub.image(new), data.image(old))
    for caption, owner in zip(sub.captions, sub.caption_to_image.tolist()):
        assert caption in data.captions_of(picked[owner])
    assert sub.fingerprint != data.fingerprint
    # order matters: image i of the subset is a different image
    assert sub.fingerprint != data.subset([0, 5, 17]).fingerprint
    assert data.captions_of(10_000) == []


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("flag", ["image_column", "caption_column", "split_column"])
def test_missing_explicit_column_lists_columns_and_flag(tiny_dataset_dirs, flag):
    with pytest.raises(ValueError) as info:
        load_image_caption_dataset(tiny_dataset_dirs["karpathy"], "train", **{flag: "nope"})
    message = str(info.value)
    assert "'nope'" in message and f"--{flag}" in message
    for column in ("image", "sentences", "filepath", "filename", "split"):
        assert f"'{column}'" in message


def test_no_caption_column_detected(tmp_path):
    path = write_parquet_dataset(
        tmp_path,
        {"image": [testing.toy_image("red", "square", 16)], "description": ["a red square"]},
        {"image": datasets.Image(), "description": datasets.Value("string")},
    )
    with pytest.raises(ValueError, match="No caption column") as info:
        load_image_caption_dataset(path, "train")
    assert "'description'" in str(info.value) and "--caption_column" in str(info.value)
    assert load_image_caption_dataset(path, "train", caption_column="description").captions == [
        "a red square"
    ]


@pytest.mark.parametrize(
    ("values", "feature", "type_name"),
    [
        ([3, 4], datasets.Value("int64"), "int"),
        ([[1, 2], [3]], datasets.Sequence(datasets.Value("int64")), "list"),
    ],
)
def test_caption_column_of_non_strings(tmp_path, values, feature, type_name):
    images = [testing.toy_image("red", "square", 16), testing.toy_image("blue", "circle", 16)]
    path = write_parquet_dataset(
        tmp_path, {"image": images, "caption": values}, {"image": datasets.Image(), "caption": feature}
    )
    with pytest.raises(ValueError) as info:
        load_image_caption_dataset(path, "train")
    message = str(info.value)
    assert "'caption'" in message and type_name in message and "row 0" in message
    assert "--caption_column" in message


def test_empty_split_in_a_split_column(tiny_dataset_dirs):
    with pytest.raises(ValueError, match="is empty"):
        load_image_caption_dataset(tiny_dataset_dirs["karpathy"], "dev")


@pytest.mark.parametrize("streaming", [False, True])
def test_empty_hub_split(tmp_path, streaming):
    path = str(testing.write_caption_list_dataset(tmp_path, splits={"train": 3, "test": 0}))
    with pytest.raises(ValueError, match="'test'.*is empty"):
        load_image_caption_dataset(path, "test", streaming=streaming)
    # the other split of the same repo still loads
    train = load_image_caption_dataset(path, "train", streaming=streaming)
    assert train.num_images == 3 and train.num_captions == 6


def test_unreadable_image_names_its_index(tmp_path):
    good = io.BytesIO()
    testing.toy_image("red", "square", 16).save(good, format="PNG")
    cells = [{"bytes": good.getvalue(), "path": None}] * 2 + [{"bytes": b"not an image", "path": None}]
    path = write_parquet_dataset(
        tmp_path,
        {"image": cells, "caption": ["a red square", "the square red", "a broken picture"]},
        {"image": datasets.Image(), "caption": datasets.Value("string")},
    )
    data = load_image_caption_dataset(path, "train")  # captions load without decoding any image
    assert data.image(1).size == (16, 16)
    with pytest.raises(ValueError, match=r"image in row 2 of .* could not be read"):
        data.image(2)
    encoder = type(
        "E", (), {"preprocess_images": staticmethod(lambda imgs: torch.zeros(len(imgs), 3, 2, 2))}
    )()
    with pytest.raises(ValueError, match="image in row 2"):
        preprocess_split_images(encoder, data)


def test_a_broken_image_behind_a_split_filter_is_named_by_its_source_row(tmp_path):
    good = io.BytesIO()
    testing.toy_image("red", "square", 16).save(good, format="PNG")
    ok, bad = {"bytes": good.getvalue(), "path": None}, {"bytes": b"not an image", "path": None}
    path = write_parquet_dataset(  # Karpathy style: one Hub split, a split column; the broken row is row 3
        tmp_path,
        {
            "image": [ok, ok, ok, bad],
            "caption": ["a", "b", "c", "d"],
            "split": ["train", "test", "test", "test"],
        },
        {"image": datasets.Image(), "caption": datasets.Value("string"), "split": datasets.Value("string")},
    )
    data = load_image_caption_dataset(path, "test")
    assert data.num_images == 3 and data.row_ids == [1, 2, 3]
    with pytest.raises(DataError, match="row 3 of"):  # not "row 2": the index after the filter
        data.image(2)
    assert data.subset([2]).row_ids == [3]


def _modes_case(mode: str):
    """An image of ``mode`` and the 8-bit RGB a viewer shows for its first pixel."""
    if mode == "I;16":
        return Image.new("I;16", (2, 2), 32896), (128, 128, 128)
    if mode == "I":
        return Image.new("I", (2, 2), 65535), (255, 255, 255)
    if mode == "F":
        return Image.new("F", (2, 2), 0.5), (128, 128, 128)
    if mode == "RGBA":  # fully transparent red: the hidden colour must not show
        return Image.new("RGBA", (2, 2), (255, 0, 0, 0)), (255, 255, 255)
    if mode == "LA":  # half-transparent black on white
        return Image.new("LA", (2, 2), (0, 128)), (127, 127, 127)
    if mode == "P":  # palette with a transparency key on index 0 (drawn green)
        image = Image.new("P", (2, 2), 0)
        image.putpalette([0, 255, 0] + [0, 0, 0] * 255)
        image.info["transparency"] = 0
        return image, (255, 255, 255)
    if mode == "L":
        return Image.new("L", (2, 2), 77), (77, 77, 77)
    if mode == "CMYK":
        return Image.new("CMYK", (2, 2), (0, 0, 0, 0)), (255, 255, 255)
    return Image.new("RGB", (2, 2), (1, 2, 3)), (1, 2, 3)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "RGBA", "LA", "P", "L", "CMYK", "RGB"])
def test_every_pil_mode_decodes_to_what_a_viewer_shows(mode):
    image, expected = _modes_case(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == pytest.approx(expected, abs=1)


def test_a_16_bit_png_file_round_trips_through_the_loader(tmp_path):
    buf = io.BytesIO()
    Image.new("I;16", (4, 4), 16448).save(buf, format="PNG")
    path = write_parquet_dataset(
        tmp_path, {"image": [{"bytes": buf.getvalue(), "path": None}], "caption": ["a grey square"]},
        {"image": datasets.Image(), "caption": datasets.Value("string")},
    )  # fmt: skip
    assert load_image_caption_dataset(path, "train").image(0).getpixel((0, 0)) == (64, 64, 64)  # not white


@pytest.mark.parametrize("captions", [["a cat", ""], [["a cat", "  "], ["a dog"]]])
def test_empty_captions_are_refused_with_their_row_or_skipped_on_request(tmp_path, captions):
    feature = (
        datasets.Value("string")
        if isinstance(captions[0], str)
        else datasets.Sequence(datasets.Value("string"))
    )
    buf = io.BytesIO()
    testing.toy_image("red", "square", 8).save(buf, format="PNG")
    cells = [{"bytes": buf.getvalue(), "path": None}] * 2
    path = write_parquet_dataset(
        tmp_path, {"image": cells, "caption": captions}, {"image": datasets.Image(), "caption": feature}
    )
    bad_row = 1 if isinstance(captions[0], str) else 0
    with pytest.raises(DataError, match=f"of row {bad_row} .* is empty.*--skip_empty_captions"):
        load_image_caption_dataset(path, "train")
    data = load_image_caption_dataset(path, "train", skip_empty_captions=True)
    assert all(c.strip() for c in data.captions)
    assert data.num_captions == (1 if isinstance(captions[0], str) else 2)
    assert int(data.caption_to_image.max()) == data.num_images - 1  # no image is left without a caption


def test_a_caption_list_holding_none_names_row_and_item(tmp_path):
    buf = io.BytesIO()
    testing.toy_image("red", "square", 8).save(buf, format="PNG")
    path = write_parquet_dataset(
        tmp_path, {"image": [{"bytes": buf.getvalue(), "path": None}], "caption": [["a cat", None]]},
        {"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))},
    )  # fmt: skip
    with pytest.raises(DataError, match="row 0 whose item 1 is NoneType"):
        load_image_caption_dataset(path, "train")


@pytest.mark.parametrize(
    ("layout", "split"), [("caption_list", "nonexistent"), ("imagefolder", "validation")]
)
def test_unknown_split_lists_the_splits(tiny_dataset_dirs, layout, split):
    with pytest.raises(ValueError) as info:
        load_image_caption_dataset(tiny_dataset_dirs[layout], split)
    message = str(info.value)
    assert f"'{split}' not found" in message and "'train'" in message and "'test'" in message
    assert "--split_column" in message


def test_hub_id_offline_is_a_clear_fast_error():
    start = time.perf_counter()
    with pytest.raises(OSError) as info:
        load_image_caption_dataset("some-user/some-captions", "train")
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert "some-user/some-captions" in message and "offline" in message.lower()
    assert "local directory" in message and "--dataset_name" in message
    assert elapsed < 2.0, f"offline failure took {elapsed:.1f}s (retries?)"


# ---------------------------------------------------------------------------------------------- text-feature cache
@pytest.fixture(scope="module")
def clip(tiny_clip_dir) -> DualEncoder:
    return DualEncoder.from_pretrained(tiny_clip_dir)


def _count_calls(monkeypatch, encoder) -> list:
    calls = []
    original = encoder.encode_text_features

    def counting(captions, *args, **kwargs):
        calls.append(len(captions))
        return original(captions, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode_text_features", counting)
    return calls


def test_cached_text_features_compute_once_and_are_reused_across_runs(
    monkeypatch, tmp_path, clip, tiny_clip_dir, tiny_dataset_dir
):
    data = load_image_caption_dataset(tiny_dataset_dir, "validation")
    direct = clip.encode_text_features(data.captions)
    calls = _count_calls(monkeypatch, clip)
    first = cached_text_features(clip, data, cache_dir=tmp_path)
    second = cached_text_features(clip, data, cache_dir=tmp_path)
    assert calls == [data.num_captions]
    assert first.shape == (data.num_captions, clip.text_feature_dim)
    torch.testing.assert_close(first, direct, atol=1e-6, rtol=0)
    assert torch.equal(second, first)
    # a "new run": freshly loaded model and dataset find the same cache entry
    encoder = DualEncoder.from_pretrained(tiny_clip_dir)
    fresh_calls = _count_calls(monkeypatch, encoder)
    again = cached_text_features(
        encoder, load_image_caption_dataset(tiny_dataset_dir, "validation"), tmp_path
    )
    assert fresh_calls == [] and torch.equal(again, first)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1


def test_cache_key_changes_with_model_and_dataset(
    monkeypatch, tmp_path, clip, tiny_model_dirs, tiny_dataset_dirs
):
    validation = load_image_caption_dataset(tiny_dataset_dirs["caption_list"], "validation")
    test = load_image_caption_dataset(tiny_dataset_dirs["caption_list"], "test")
    assert validation.captions == test.captions  # same text, different dataset: still a different key
    dual = DualEncoder.from_pretrained(tiny_model_dirs["dual_encoder"])
    clip_calls, dual_calls = _count_calls(monkeypatch, clip), _count_calls(monkeypatch, dual)
    cached_text_features(clip, validation, tmp_path)
    cached_text_features(clip, test, tmp_path)
    feats = cached_text_features(dual, validation, tmp_path)
    assert len(clip_calls) == 2 and len(dual_calls) == 1
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    torch.testing.assert_close(feats, dual.encode_text_features(validation.captions), atol=1e-6, rtol=0)
    other = load_image_caption_dataset(tiny_dataset_dirs["karpathy"], "validation")
    cached_text_features(clip, other, tmp_path)
    assert len(clip_calls) == 3


def test_cache_is_invalidated_when_local_weights_change(
    monkeypatch, tmp_path, tiny_clip_dir, tiny_dataset_dir
):
    data = load_image_caption_dataset(tiny_dataset_dir, "validation")
    model_dir = tmp_path / "model"
    DualEncoder.from_pretrained(tiny_clip_dir).save_pretrained(model_dir)
    before = cached_text_features(DualEncoder.from_pretrained(str(model_dir)), data, tmp_path / "cache")
    changed = DualEncoder.from_pretrained(str(model_dir))
    with torch.no_grad():
        changed.model.text_model.final_layer_norm.bias.add_(1.0)
    changed.save_pretrained(model_dir)  # same directory, new weights
    reloaded = DualEncoder.from_pretrained(str(model_dir))
    calls = _count_calls(monkeypatch, reloaded)
    after = cached_text_features(reloaded, data, tmp_path / "cache")
    assert len(calls) == 1
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, before + 1.0, atol=1e-5, rtol=0)  # final LN bias shifts every feature


def test_pair_dataset_items(clip, tiny_dataset_dir):
    data = load_image_caption_dataset(tiny_dataset_dir, "validation")
    pairs = PairDataset(data, clip)
    assert len(pairs) == data.num_captions == 16
    pixels = preprocess_split_images(clip, data, batch_size=3)
    assert pixels.shape == (data.num_images, 3, 32, 32)
    cached = PairDataset(data, clip, pixel_cache=pixels)
    for j in (0, 1, 7, 15):
        item, from_cache = pairs[j], cached[j]
        owner = int(data.caption_to_image[j])
        expected = clip.preprocess_images([data.image(owner)])[0]
        assert item["caption_index"] == from_cache["caption_index"] == j
        assert torch.equal(item["pixel_values"], expected)
        torch.testing.assert_close(from_cache["pixel_values"], expected, atol=1e-6, rtol=0)
    batch = next(iter(torch.utils.data.DataLoader(pairs, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["caption_index"].tolist() == [0, 1, 2, 3]


def test_karpathy_records_with_image_paths_resolve_against_image_root(tmp_path):
    import datasets

    from mdm_hf.testing import toy_records

    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    recs = toy_records(6, 2)
    for i, rec in enumerate(recs):
        rec["image"].save(root / "train2014" / f"img{i}.png")
    ds = datasets.Dataset.from_dict(
        {
            "filepath": ["train2014"] * 6,
            "filename": [f"img{i}.png" for i in range(6)],
            "sentences": [r["captions"] for r in recs],
            "split": ["train", "train", "val", "test", "restval", "train"],
        }
    )
    (tmp_path / "repo" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    split = load_image_caption_dataset(str(tmp_path / "repo"), "train", image_root=str(root))
    assert (split.num_images, split.num_captions) == (4, 8)  # train + restval rows
    expected = recs[4]["image"].convert("RGB")  # rows 0, 1, 4, 5 are train/restval: split image 2 is row 4
    assert list(split.image(2).getdata()) == list(expected.getdata())
    # every run's config reaches the same split through data.load_split, image_root included
    # (expert and anchor configs had no image_root before the shared fields)
    from mdm_hf.anchor import AnchorPretrainingConfig
    from mdm_hf.baselines.tm import TrajectoryMatchingConfig
    from mdm_hf.config import DatasetArguments, MDMConfig
    from mdm_hf.evaluation import StudentConfig
    from mdm_hf.experts import ExpertTrainingConfig

    for cls in (
        MDMConfig,
        ExpertTrainingConfig,
        AnchorPretrainingConfig,
        StudentConfig,
        TrajectoryMatchingConfig,
    ):
        assert issubclass(cls, DatasetArguments)
        config = cls(
            dataset_name=str(tmp_path / "repo"), train_split="train", image_root=str(root), max_train_images=3
        )
        got = load_split(config)
        assert (got.num_images, got.captions) == (3, split.captions[:6]), cls.__name__
        assert load_split(config, "test").num_images == 1


def test_a_licence_only_in_the_card_is_carried(tmp_path):
    """datasets leaves info.license empty when the licence is in the README YAML: it is read from the card."""
    buf = io.BytesIO()
    testing.toy_image("red", "square", 8).save(buf, format="PNG")
    path = write_parquet_dataset(
        tmp_path, {"image": [{"bytes": buf.getvalue(), "path": None}], "caption": ["a red square"]},
        {"image": datasets.Image(), "caption": datasets.Value("string")},
    )  # fmt: skip
    assert load_image_caption_dataset(path, "train").license is None  # no card: unknown, not invented
    (Path(path) / "README.md").write_text("---\nlicense: cc-by-sa-4.0\n---\n# data\n")
    card_license.cache_clear()  # the card is read once per dataset; this test writes it after the first read
    assert load_image_caption_dataset(path, "train").license == "cc-by-sa-4.0"
