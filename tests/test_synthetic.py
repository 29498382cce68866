"""SyntheticSet: Hub layout on disk, exact round trips, the dataset card, push_to_hub without network, errors."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import DatasetCard, ModelCardData
from PIL import Image

from mdm_hf import cards, testing
from mdm_hf.hub import hub_license, size_category
from mdm_hf.synthetic import (
    SyntheticSet,
    SyntheticSetOfflineError,
    SyntheticSetUploadError,
    check_repo_id,
    collate_synthetic,
)
from mdm_hf.synthetic_format import parse_size

FAKE_TOKEN = "hf_" + "x" * 34
K, H, W, D = 5, 8, 8, 6
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
RESULTS = {
    "protocol": "student: tiny CLIP, 2 epochs; validation-selected, test reported once",
    "metric_names": ["ir@1", "ir@5", "ir@10", "tr@1", "tr@5", "tr@10"],
    "rows": [
        {
            "method": "MDM",
            "pairs": K,
            "ir@1": 8.1,
            "ir@1_std": 0.4,
            "mean": 26.4,
            "mean_std": 0.3,
            "seeds": 5,
        },
        {"method": "random", "pairs": K, "ir@1": 2.0, "mean": 5.7, "mean_std": 0.2, "seeds": 5},
        {"method": "full data", "pairs": None, "ir@1": 40.0, "mean": 55.7, "mean_std": 0.1, "seeds": 5},
    ],
    "notes": "Tiny smoke run.",
}


def make_set(k: int = K, results: dict | None = None, **provenance) -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(k, 3, H, W, generator=g) * 2.0  # well outside [0, 1] after de-normalising: clipping
    text = torch.randn(k, D, generator=g)
    # Awkward float32 values: extremes, a subnormal, non-terminating binary fractions, negative zero.
    awkward = torch.tensor(
        [1e-38, 3.4e38, -3.4e38, 1.4e-45, 1 / 3, -2 / 3, -0.0, 123456.789], dtype=torch.float32
    )
    pixels[0, 0, 0, :8] = awkward
    text[0, :6] = awkward[:6]
    prov = {
        "teacher": "openai/clip-vit-base-patch32",
        "teacher_revision": "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268",
        "text_encoder": "openai/clip-vit-base-patch32",
        "text_pooling": "pooler",
        "expert_bank": "someone/clip-experts",
        "expert_bank_revision": "v1",
        "source_dataset": "nlphuji/flickr30k",
        "source_dataset_revision": "main",
        "source_split": "train",
        "source_fingerprint": "abc123",
        "license": "cc-by-4.0",
        "selection": "kmeans",
        "config": {"num_pairs": k, "lr_pixels": 100.0, "hub_dataset_id": None, "nested": {"alpha": 0.5}},
    }
    prov.update(provenance)
    return SyntheticSet(
        pixel_values=pixels,
        text_features=text,
        image_mean=MEAN,
        image_std=STD,
        captions=[[f"caption {i} a", f"caption {i} b"] for i in range(k)],
        source_indices=[10 * i for i in range(k)],
        source_image_indices=[5 * i for i in range(k)],
        provenance=prov,
        results=results,
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw float32 bit patterns: equality here is bit-for-bit, stricter than torch.equal."""
    return t.contiguous().view(torch.int32)


def expected_rgb(s: SyntheticSet) -> np.ndarray:
    """Independent de-normalisation in numpy (float64): round(clip(x * std + mean, 0, 1) * 255), HWC."""
    x = s.pixel_values.double().numpy()
    rgb = x * np.array(STD)[None, :, None, None] + np.array(MEAN)[None, :, None, None]
    return np.rint(np.clip(rgb, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def load_local(directory, tmp_path):
    return datasets.load_dataset(str(directory), cache_dir=str(tmp_path / "hf_cache"))


@pytest.fixture
def hub_calls(monkeypatch):
    """Record HfApi calls instead of talking to the Hub."""
    return testing.record_hub_calls(monkeypatch)


# ====================================================================== disk round trips
def test_save_pretrained_opens_with_load_dataset_and_restores_bitwise(tmp_path):
    s = make_set(results=RESULTS)
    out = tmp_path / "out"
    s.save_pretrained(out)

    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    shard = f"data/train-{s.content_fingerprint()}-00000-of-00001.parquet"
    assert files == ["README.md", shard, "mdm_synthetic.json", "preview.png"]

    ds = load_local(out, tmp_path)["train"]  # no custom code: the parquet builder and the card's configs
    assert ds.num_rows == K
    assert set(ds.column_names) == {
        "image",
        "pixel_values",
        "text_features",
        "captions",
        "caption",
        "source_index",
        "source_image_index",
    }
    row = ds[1]
    assert (
        isinstance(row["image"], Image.Image) and row["image"].mode == "RGB" and row["image"].size == (W, H)
    )
    assert np.array_equal(np.asarray(row["image"]), expected_rgb(s)[1])
    assert row["captions"] == ["caption 1 a", "caption 1 b"] and row["caption"] == "caption 1 a"
    assert (row["source_index"], row["source_image_index"]) == (10, 5)

    # The plain datasets/torch path a student uses, with no mdm-hf code, is exact as well.
    torch_ds = ds.with_format("torch", columns=["pixel_values", "text_features"])
    assert torch.equal(bits(torch_ds[:]["pixel_values"]), bits(s.pixel_values))
    assert torch.equal(bits(torch_ds[:]["text_features"]), bits(s.text_features))

    back = SyntheticSet.from_pretrained(str(out))
    assert back.pixel_values.dtype == torch.float32 and back.text_features.dtype == torch.float32
    assert torch.equal(bits(back.pixel_values), bits(s.pixel_values))
    assert torch.equal(bits(back.text_features), bits(s.text_features))
    assert back.pixel_values[0, 0, 0, 3].item() == 2.0**-149  # the smallest subnormal survived
    assert back.captions == s.captions
    assert back.source_indices == s.source_indices and back.source_image_indices == s.source_image_indices
    assert back.image_mean == MEAN and back.image_std == STD
    assert back.results == RESULTS
    assert back.provenance["teacher_revision"] == s.provenance["teacher_revision"]
    assert back.provenance["config"] == s.provenance["config"]
    assert back.provenance["created_with"].startswith("mdm-hf ")
    assert {"torch", "datasets", "mdm_hf"} <= set(back.provenance["versions"])


def test_sharding_keeps_order_and_overwrite_removes_stale_shards(tmp_path):
    s = make_set(k=7)
    out = tmp_path / "sharded"
    # A row is ~1 KB (768 B of float pixels alone), so 3 KB shards give several of them.
    s.save_pretrained(out, max_shard_size="3KB")
    shards = sorted(p.name for p in (out / "data").glob("*.parquet"))
    n = len(shards)
    fp = s.content_fingerprint()
    assert 2 <= n <= 7 and shards == [f"train-{fp}-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    ds = load_local(out, tmp_path)["train"]
    assert ds["source_index"] == [10 * i for i in range(7)]
    back = SyntheticSet.from_pretrained(out)
    assert torch.equal(bits(back.pixel_values), bits(s.pixel_values))

    with pytest.raises(FileExistsError, match="overwrite=True") as info:
        s.save_pretrained(out)
    assert str(out) in str(info.value)

    (out / "notes.txt").write_text("kept")
    smaller = make_set(k=2)
    smaller.save_pretrained(out, overwrite=True)
    shard = f"train-{smaller.content_fingerprint()}-00000-of-00001.parquet"
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == [shard]
    assert (out / "notes.txt").read_text() == "kept"
    assert len(SyntheticSet.from_pretrained(out)) == 2


def test_to_dataset_from_dataset_and_collate(tmp_path):
    s = make_set()
    ds = s.to_dataset()
    assert isinstance(ds.features["pixel_values"], datasets.Array3D)
    assert ds.features["pixel_values"].shape == (3, H, W)
    assert np.array_equal(np.stack([np.asarray(im) for im in ds["image"]]), expected_rgb(s))

    out = tmp_path / "out"
    s.save_pretrained(out)
    loaded = load_local(out, tmp_path)
    # A DatasetDict and a re-ordered view (indices mapping) both come back exactly.
    full = SyntheticSet.from_dataset(loaded, image_mean=MEAN, image_std=STD)
    assert torch.equal(bits(full.pixel_values), bits(s.pixel_values))
    view = SyntheticSet.from_dataset(loaded["train"].select([3, 0]), image_mean=MEAN, image_std=STD)
    assert torch.equal(bits(view.pixel_values), bits(s.pixel_values[[3, 0]]))
    assert torch.equal(bits(view.text_features), bits(s.text_features[[3, 0]]))
    assert view.source_indices == [30, 0] and view.captions == [s.captions[3], s.captions[0]]
    with pytest.raises(ValueError, match="image_mean"):
        SyntheticSet.from_dataset(loaded)

    # The documented student path: torch format + DataLoader + collate_synthetic.
    train = loaded["train"].with_format("torch")
    loader = torch.utils.data.DataLoader(train, batch_size=3, shuffle=False, collate_fn=collate_synthetic)
    batches = list(loader)
    assert [b["pixel_values"].shape[0] for b in batches] == [3, 2]
    assert torch.equal(bits(torch.cat([b["pixel_values"] for b in batches])), bits(s.pixel_values))
    assert torch.equal(bits(torch.cat([b["text_features"] for b in batches])), bits(s.text_features))
    assert batches[0]["caption"] == ["caption 0 a", "caption 1 a", "caption 2 a"]
    assert batches[1]["source_index"].tolist() == [30, 40]
    # Plain rows (nested lists, no torch format) give the same batch.
    plain = collate_synthetic([loaded["train"][i] for i in range(3)])
    assert torch.equal(bits(plain["pixel_values"]), bits(s.pixel_values[:3]))
    with pytest.raises(KeyError, match="text_features"):
        collate_synthetic([{"pixel_values": [0.0]}])


def test_preview_grid_and_repr(tmp_path):
    s = make_set()
    grid = s.preview(min_tile=32, pad=2)
    # 5 images -> 3 columns x 2 rows; 8 px tiles upscaled x4 (nearest) to 32 px.
    assert grid.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)
    rgb = expected_rgb(s)
    image_4 = (2 + 1 * (32 + 2), 2 + 1 * (32 + 2))  # row 1, column 1
    for dy, dx in [(0, 0), (3, 3), (31, 31), (12, 5)]:
        assert grid.getpixel((image_4[0] + dx, image_4[1] + dy)) == tuple(rgb[4, dy // 4, dx // 4])
    text = repr(s)
    assert "num_pairs=5" in text and "[5, 3, 8, 8]" in text and "openai/clip-vit-base-patch32" in text
    assert len(s) == K


# ====================================================================== the card
def test_card_metadata_and_body(tmp_path):
    secret = {"hub_token": FAKE_TOKEN, "auth": {"HF_TOKEN": FAKE_TOKEN, "keep": 1}}
    s = make_set(results=RESULTS, config={"num_pairs": K, "hub_dataset_id": "me/flickr-mdm-5", **secret})
    out = tmp_path / "out"
    s.save_pretrained(out)
    card = DatasetCard.load(out / "README.md")
    data = card.data
    assert data.license == "cc-by-4.0"
    assert {"dataset-distillation", "mdm", "synthetic", "vision-language"} <= set(data.tags)
    assert data.size_categories == ["n<1K"]
    assert data.source_datasets == ["nlphuji/flickr30k"]
    assert set(data.task_categories) == {"image-feature-extraction", "feature-extraction", "image-to-text"}
    assert "text-to-image" not in data.task_categories  # generation, not what this data is for
    shards = f"data/train-{s.content_fingerprint()}-*.parquet"  # content-named: see the same-name test
    assert data.configs == [{"config_name": "default", "data_files": [{"split": "train", "path": shards}]}]
    assert "MDM" in data.pretty_name
    text = card.text
    assert "| MDM | 5 | 8.10 ± 0.40 |" in text and "26.40 ± 0.30" in text  # two decimals, like every table
    assert "| full data | all |" in text and "| random | 5 |" in text
    assert "validation" in text and "reported once" in text and RESULTS["protocol"] in text
    assert "![preview](preview.png)" in text
    assert 'load_dataset("me/flickr-mdm-5"' in text  # repo id taken from the config's hub_dataset_id
    assert "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268" in text and "someone/clip-experts" in text
    assert "2605.23482" in text and "2403.19522" in text and "@inproceedings{jeong2026mdm" in text
    config_block = text.split("```yaml")[1].split("```")[0]
    assert "keep: 1" in config_block and "hub_dataset_id: me/flickr-mdm-5" in config_block
    assert "token" not in config_block.lower()  # every key containing 'token' is dropped
    assert FAKE_TOKEN not in (out / "README.md").read_text() + (out / "mdm_synthetic.json").read_text()

    no_results = make_set().to_card()
    assert "No evaluation results" in no_results.text and "| Method |" not in no_results.text


def test_license_mapping_and_size_categories():
    assert hub_license("CC BY 4.0") == ("cc-by-4.0", None)
    assert hub_license(None) == ("unknown", None)
    assert hub_license("") == ("unknown", None)
    assert hub_license("Flickr Terms of Use") == ("other", "flickr-terms-of-use")
    assert hub_license(["mit"]) == ("mit", None)
    assert [size_category(n) for n in (1, 999, 1000, 9999, 10_000, 250_000, 10**6)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "1K<n<10K",
        "10K<n<100K",
        "100K<n<1M",
        "1M<n<10M",
    ]
    card = make_set(license="Flickr Terms of Use", source_dataset=None).to_card()
    assert card.data.license == "other" and card.data.license_name == "flickr-terms-of-use"
    assert card.data.source_datasets is None
    assert "Flickr Terms of Use" in card.text
    assert "without an expert bank" in make_set(expert_bank=None).to_card().text
    assert parse_size("2KB") == 2000 and parse_size("1MiB") == 2**20 and parse_size(5) == 5
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_card_helpers():
    assert cards.load_template("synthetic_dataset_card").endswith("synthetic_dataset_card.md")
    assert "synthetic_dataset_card.md" in cards.available_templates()
    with pytest.raises(FileNotFoundError, match="synthetic_dataset_card.md"):
        cards.load_template("no_such_card")
    model_card = cards.render_model_card(
        "synthetic_dataset_card", ModelCardData(license="mit"), pretty_name="X"
    )
    assert model_card.data.license == "mit" and "# X" in model_card.text


# ====================================================================== push_to_hub without network
def test_push_to_hub_uploads_the_layout_and_never_leaks_the_token(tmp_path, hub_calls, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    s = make_set(results=RESULTS, config={"num_pairs": K, "hub_token": FAKE_TOKEN})
    local = tmp_path / "local"
    url = s.push_to_hub(
        "me/flickr-mdm-5", private=True, token=FAKE_TOKEN, local_dir=local, commit_message="hi"
    )

    assert url == "https://huggingface.co/datasets/me/flickr-mdm-5"
    assert hub_calls["init"][-1]["token"] == FAKE_TOKEN  # the token goes to HfApi and nowhere else
    (repo,) = hub_calls["create_repo"]
    assert repo["repo_id"] == "me/flickr-mdm-5" and repo["repo_type"] == "dataset"
    assert repo["private"] is True and repo["exist_ok"] is True
    (upload,) = hub_calls["upload_folder"]
    assert upload["repo_type"] == "dataset" and upload["repo_id"] == "me/flickr-mdm-5"
    assert upload["commit_message"] == "hi" and upload["folder_path"] == str(local)
    assert [f.split("-")[0] if f.startswith("data/") else f for f in upload["files"]] == [
        "README.md", "data/train", "mdm_synthetic.json", "preview.png",
    ]  # fmt: skip
    assert hub_calls["create_branch"] == []
    assert 'load_dataset("me/flickr-mdm-5"' in (local / "README.md").read_text()

    for path in local.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    captured = capsys.readouterr()
    assert FAKE_TOKEN not in caplog.text + captured.out + captured.err
    assert str(local) in caplog.text

    # Pushing again into the same local copy (what `mdm-hf distill` does) rewrites it; a revision makes a branch.
    url = s.push_to_hub("me/flickr-mdm-5", local_dir=local, revision="v2")
    assert url.endswith("/tree/v2") and hub_calls["create_branch"][0]["branch"] == "v2"
    assert hub_calls["create_repo"][-1]["private"] is None


def test_push_leaves_no_copy_behind_and_deletes_stale_shards(tmp_path, hub_calls, monkeypatch):
    """Without local_dir the local copy is temporary (no timestamped folder under the package's home on every
    push); every push deletes the remote shards it does not re-upload, and returns the repo URL with the commit."""
    monkeypatch.setenv("MDM_HF_HOME", str(tmp_path / "home"))
    first = make_set().push_to_hub("me/x")
    second = make_set(k=3).push_to_hub("me/x", create_pr=True, commit_message="smaller")
    uploads = hub_calls["upload_folder"]
    assert [u["delete_patterns"] for u in uploads] == [["data/*.parquet"]] * 2  # stale shards go
    assert uploads[1]["create_pr"] is True and uploads[1]["commit_message"] == "smaller"
    assert not any(Path(u["folder_path"]).exists() for u in uploads)
    assert not (tmp_path / "home" / "hub_uploads").exists()
    assert first == "https://huggingface.co/datasets/me/x" and second.commit_url.endswith("/commit/abc")


@pytest.mark.parametrize("bad", ["noslash", "a/b/c", "", "/name", "ns/", "ns/na me", "ns/a--b"])
def test_push_to_hub_rejects_bad_repo_ids_before_anything(bad, tmp_path, hub_calls, monkeypatch):
    monkeypatch.setenv("MDM_HF_HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match="namespace/name"):
        make_set().push_to_hub(bad, local_dir=tmp_path / "local")
    assert not (tmp_path / "local").exists() and not (tmp_path / "home").exists()
    assert hub_calls["create_repo"] == [] and hub_calls["upload_folder"] == []
    check_repo_id("user/coco-mdm-1k")  # and a good one passes


def test_failed_upload_names_the_local_copy(tmp_path, hub_calls, monkeypatch):
    def fail(self, **kwargs):
        raise RuntimeError(f"503 Service Unavailable (sent {FAKE_TOKEN})")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fail)
    s = make_set()
    local = tmp_path / "copy"
    with pytest.raises(SyntheticSetUploadError) as info:
        s.push_to_hub("me/x", token=FAKE_TOKEN, local_dir=local)
    message = str(info.value)
    assert str(local) in message and "hf upload me/x" in message and "push_to_hub" in message
    assert "503" in message and FAKE_TOKEN not in message
    back = SyntheticSet.from_pretrained(local)  # nothing lost
    assert torch.equal(bits(back.pixel_values), bits(s.pixel_values))


def test_push_to_hub_refuses_a_foreign_non_empty_local_dir(tmp_path, hub_calls):
    local = tmp_path / "busy"
    local.mkdir()
    (local / "thesis.tex").write_text("not a synthetic set")
    with pytest.raises(FileExistsError, match="busy"):
        make_set().push_to_hub("me/x", local_dir=local)
    assert hub_calls["upload_folder"] == []


# ====================================================================== loading errors and validation
def test_from_pretrained_offline_hub_id_and_missing_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    with pytest.raises(SyntheticSetOfflineError) as info:
        SyntheticSet.from_pretrained("someone/not-cached-mdm-set")
    message = str(info.value)
    assert (
        "HF_HUB_OFFLINE" in message and "local directory" in message and "from_pretrained('DIR')" in message
    )

    with pytest.raises(FileNotFoundError, match="No directory"):
        SyntheticSet.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="mdm_synthetic.json"):
        SyntheticSet.from_pretrained(tmp_path / "plain")


def test_validate_reports_inconsistent_fields():
    s = make_set()
    s.validate()  # the well-formed set passes
    s.captions = s.captions[:-1]
    with pytest.raises(ValueError, match="one entry per synthetic pair") as info:
        s.validate()
    assert "'captions': 4" in str(info.value) and "'pixel_values': 5" in str(info.value)

    bad_shape = make_set()
    bad_shape.pixel_values = bad_shape.pixel_values[:, :2]
    with pytest.raises(ValueError, match=r"\[K, 3, H, W\]"):
        bad_shape.validate()
    non_finite = make_set()
    non_finite.text_features[2, 1] = math.nan
    with pytest.raises(ValueError, match="text_features holds NaN"):
        non_finite.validate()
    wide = make_set()
    wide.text_features = wide.text_features.double()
    with pytest.raises(ValueError, match="float32"):
        wide.validate()
    bare = make_set()
    bare.captions[0] = "a bare string"
    with pytest.raises(ValueError, match=r"captions\[0\]"):
        bare.validate()
    with pytest.raises(ValueError, match="one entry per synthetic pair"):
        s.save_pretrained("/nonexistent/never-written")  # validation runs before anything is written


def test_two_sets_in_folders_of_the_same_name_load_as_themselves(tmp_path):
    """datasets caches a local folder by its name and data_files patterns: the content-fingerprinted shard names
    keep a/synthetic and b/synthetic apart (issue 13.8)."""
    first, second = make_set(k=3), make_set(k=4)
    first.save_pretrained(tmp_path / "a" / "synthetic")
    second.save_pretrained(tmp_path / "b" / "synthetic")
    cache = str(tmp_path / "shared-cache")  # one cache, as every user has
    a = datasets.load_dataset(str(tmp_path / "a" / "synthetic"), cache_dir=cache)["train"]
    b = datasets.load_dataset(str(tmp_path / "b" / "synthetic"), cache_dir=cache)["train"]
    assert (len(a), len(b)) == (3, 4)
    assert torch.equal(torch.tensor(b["text_features"]), second.text_features)


def test_no_local_path_reaches_a_published_file(tmp_path):
    """Cards and metadata name local sources by folder name (with their fingerprint), never a home directory."""
    home = "/home/someone/.cache/mdm_hf"
    s = make_set(teacher=f"{home}/anchor", source_dataset=f"{home}/emojicaps-48px", source_fingerprint="abc123",
                 config={"output_dir": str(tmp_path / "run"), "expert_bank": "user/bank", "cache_dir": "~/c"})  # fmt: skip
    out = tmp_path / "published"
    s.save_pretrained(out)
    for name in ("README.md", "mdm_synthetic.json"):
        text = (out / name).read_text()
        assert "/home/someone" not in text and str(tmp_path) not in text and "~/c" not in text, name
        assert "emojicaps-48px" in text and "user/bank" in text, name  # names and Hub ids stay
