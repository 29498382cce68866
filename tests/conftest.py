"""Shared offline fixtures: tiny checkpoints and datasets in the Hub layout, built once per test session."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Datasets written by the tests are cached in a throw-away dir, never in the user's ~/.cache.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="mdm-hf-tests-datasets-"))
os.environ.setdefault("MDM_HF_HOME", tempfile.mkdtemp(prefix="mdm-hf-tests-home-"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from mdm_hf import testing  # noqa: E402

# Tiny models are overhead-bound: one thread is faster than two (and far faster on a loaded machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict:
    """``{"clip": dir, "siglip": dir, "dual_encoder": dir}`` of tiny checkpoints saved with save_pretrained."""
    root = tmp_path_factory.mktemp("models")
    return {family: str(build(root / family)) for family, build in testing.TINY_BUILDERS.items()}


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_model_dirs) -> str:
    return tiny_model_dirs["clip"]


@pytest.fixture(scope="session")
def tiny_siglip_dir(tiny_model_dirs) -> str:
    return tiny_model_dirs["siglip"]


@pytest.fixture(scope="session")
def tiny_dataset_dirs(tmp_path_factory) -> dict:
    """Tiny image-caption datasets on disk in each recognised layout."""
    root = tmp_path_factory.mktemp("datasets")
    return {
        "caption_list": str(testing.write_caption_list_dataset(root / "caption_list")),
        "karpathy": str(testing.write_karpathy_dataset(root / "karpathy")),
        "imagefolder": str(testing.write_imagefolder_dataset(root / "imagefolder")),
    }


@pytest.fixture(scope="session")
def tiny_dataset_dir(tiny_dataset_dirs) -> str:
    """The Flickr30k-style tiny dataset (train / validation / test splits, two captions per image)."""
    return tiny_dataset_dirs["caption_list"]
