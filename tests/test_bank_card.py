"""The expert bank's model card (Hub metadata, licence, snippets that run) and a push that leaves the bank alone."""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file

from mdm_hf import bank, cards, hub, testing
from mdm_hf.cli import experts_main
from mdm_hf.merge import LowRankDelta
from mdm_hf.models import DualEncoder

RECIPE_CONFIG = Path(__file__).parents[1] / "recipes" / "configs" / "experts_tiny.yaml"
HUB_ANCHOR, HUB_DATA, HUB_BANK = "someone/tiny-clip", "someone/tiny-captions", "someone/tiny-experts"
FAKE_TOKEN = "hf_" + "z" * 34


@pytest.fixture(scope="module")
def banks(tiny_clip_dir, tiny_dataset_dir, tmp_path_factory) -> dict[str, Path]:
    """A LoRA and a full-weight CLIP bank (2 experts x 2 epochs) made by the CLI, as tests/test_experts.py does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bank-card")
    common = ["--config", str(RECIPE_CONFIG), "--model_name_or_path", tiny_clip_dir, "--dataset_name",
              tiny_dataset_dir, "--cache_dir", str(root / "cache")]  # fmt: skip
    assert experts_main([*common, "--output_dir", str(root / "lora")]) == 0
    full = ["--full_finetune", "true", "--learning_rate", "0.001", "--validation_split", "none"]
    assert experts_main([*common, "--output_dir", str(root / "full"), *full]) == 0
    torch.set_num_threads(before)
    return {"lora": root / "lora", "full": root / "full"}


def _front_matter(card_text: str) -> dict:
    assert card_text.startswith("---\n")
    return yaml.safe_load(card_text.split("---\n")[1])


def _as_published(manifest: dict) -> dict:
    """The manifest of the same bank trained from Hub ids (the tests' checkpoints are local folders)."""
    published = copy.deepcopy(manifest)
    published["anchor"]["name_or_path"], published["dataset"]["name"] = HUB_ANCHOR, HUB_DATA
    return published


# ---------------------------------------------------------------------------------------------- metadata
def test_hub_metadata_of_a_lora_bank(banks):
    manifest = _as_published(bank.read_manifest(banks["lora"]))
    card = cards.expert_bank_card(manifest, repo_id=HUB_BANK, size_bytes=2**20, anchor_license="Apache 2.0")
    meta = _front_matter(card.content)
    assert meta["library_name"] == "peft" and meta["base_model"] == HUB_ANCHOR
    assert meta["pipeline_tag"] == "zero-shot-image-classification"  # what the Hub shows for CLIP / SigLIP
    assert meta["license"] == "apache-2.0" and meta["datasets"] == [HUB_DATA]
    assert {"mdm-hf", "dataset-distillation", "model-stock", "clip", "lora"} <= set(meta["tags"])
    assert "| licence | `apache-2.0`: the anchor's (from its model card) |" in card.text
    assert card.text.count("@inproceedings{jeong2026mdm") == 1 and cards.MDM_BIBTEX in card.text
    full = cards.expert_bank_card(_as_published(bank.read_manifest(banks["full"])), HUB_BANK, 1, "mit")
    # partial state dicts, which neither peft nor transformers load on their own
    assert "library_name" not in _front_matter(full.content)


def test_licence_is_the_anchors_else_the_datas_else_unknown_with_a_warning(banks):
    manifest = _as_published(bank.read_manifest(banks["lora"]))
    manifest["dataset"]["license"] = "cc-by-4.0"
    assert _front_matter(cards.expert_bank_card(manifest, HUB_BANK, 1, "MIT").content)["license"] == "mit"
    card = cards.expert_bank_card(manifest, HUB_BANK, 1, anchor_license=None).content
    assert _front_matter(card)["license"] == "cc-by-4.0" and "`cc-by-4.0`: the training data's" in card
    meta = _front_matter(cards.expert_bank_card(manifest, HUB_BANK, 1, "OpenAI model licence").content)
    assert meta["license"] == "other" and meta["license_name"] == "openai-model-licence"
    manifest["dataset"]["license"] = None
    with pytest.warns(UserWarning, match="license: unknown"):
        card = cards.expert_bank_card(manifest, HUB_BANK, 1, anchor_license=None).content
    assert _front_matter(card)["license"] == "unknown"


def test_the_anchor_licence_is_read_from_its_model_card(tmp_path):
    snapshot = tmp_path / "hub" / "models--someone--tiny-clip" / "snapshots" / ("ab12" * 10)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert bank.anchor_license({"name_or_path": str(snapshot), "revision": None}) == "mit"
    assert bank.anchor_license({"name_or_path": str(tmp_path), "revision": None}) is None  # no card
    assert bank.anchor_license({"name_or_path": HUB_ANCHOR, "revision": None}) is None  # offline: unknown
    assert cards.published_hub_id(str(snapshot)) == HUB_ANCHOR  # a Hub-cache snapshot names its repo
    assert cards.published_hub_id(str(snapshot), "dataset") is None
    assert cards.published_hub_id(str(tmp_path)) is None and cards.published_hub_id(HUB_ANCHOR) == HUB_ANCHOR


def test_a_local_anchor_and_local_data_are_never_published_as_paths(banks, tiny_clip_dir, tiny_dataset_dir):
    manifest = bank.read_manifest(banks["lora"])
    with pytest.warns(UserWarning, match="license: unknown"):  # the tiny checkpoint and data carry none
        text = cards.expert_bank_card(manifest, repo_id=HUB_BANK, size_bytes=1).content
    meta = _front_matter(text)
    assert "base_model" not in meta and "datasets" not in meta
    for local in (tiny_clip_dir, tiny_dataset_dir, str(banks["lora"])):
        assert local not in text
    name = Path(tiny_clip_dir).name
    assert f"The anchor `{name}` is a local checkpoint" in text
    assert f'AutoModel.from_pretrained("{name}")' in text


# ---------------------------------------------------------------------------------------------- snippets
def _python_blocks(card_text: str, substitutions: dict[str, str]) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", card_text, flags=re.DOTALL)
    for hub_id, local in substitutions.items():
        blocks = [b.replace(f'"{hub_id}"', repr(local)) for b in blocks]
    return blocks


def test_the_cards_lora_snippets_run_on_a_plain_transformers_model(banks, tiny_clip_dir):
    manifest = _as_published(bank.read_manifest(banks["lora"]))
    card = cards.expert_bank_card(manifest, repo_id=HUB_BANK, size_bytes=1, anchor_license="mit").content
    peft_block, stock_block = _python_blocks(card, {HUB_ANCHOR: tiny_clip_dir, HUB_BANK: str(banks["lora"])})
    assert "PeftModel.from_pretrained(model," in peft_block and "mdm_hf" not in peft_block

    scope: dict = {}
    exec(peft_block, scope)  # noqa: S102 - the card's own code, on the tiny bank
    assert type(scope["model"]).__name__ == "CLIPModel"  # plain transformers, not mdm-hf's wrapper
    # independent of peft's merge: the anchor plus scale * B @ A read from the adapter file by mdm-hf
    anchor = dict(DualEncoder.from_pretrained(tiny_clip_dir).model.named_parameters())
    checkpoint = manifest["experts"][0]["epochs"][-1]["path"]
    assert f'subfolder="{checkpoint}"' in peft_block and checkpoint == "expert-0/epoch-2"
    bank_anchor = bank.read_manifest(banks["lora"])["anchor"]
    deltas = bank.lora_epoch_deltas(banks["lora"] / checkpoint, anchor, bank_anchor)
    merged = dict(scope["expert_model"].named_parameters())
    for name, delta in deltas.items():
        offset = delta.dense() if isinstance(delta, LowRankDelta) else delta
        torch.testing.assert_close(merged[name], anchor[name] + offset, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(merged[n], anchor[n]) for n in deltas)

    assert "load_expert_bank(" in stock_block and "merged_state([(0, 2), (1, 2)])" in stock_block
    exec(stock_block, scope)  # noqa: S102
    installed = dict(scope["anchor"].model.named_parameters())
    assert scope["state"].keys() == set(scope["bank"].touched_keys)
    for name, value in scope["state"].items():
        torch.testing.assert_close(installed[name], value)
    assert all(0.0 <= t <= 1.0 for t in scope["ratios"].values())
    assert any(not torch.equal(installed[n], anchor[n]) for n in scope["state"])


def test_the_cards_full_weight_snippet_runs(banks, tiny_clip_dir):
    manifest = _as_published(bank.read_manifest(banks["full"]))
    card = cards.expert_bank_card(manifest, repo_id=HUB_BANK, size_bytes=1, anchor_license="mit").content
    load_block, stock_block = _python_blocks(card, {HUB_ANCHOR: tiny_clip_dir, HUB_BANK: str(banks["full"])})
    scope: dict = {}
    exec(load_block, scope)  # noqa: S102
    trained = load_file(str(banks["full"] / "expert-0" / "epoch-2" / "model.safetensors"))
    anchor = dict(DualEncoder.from_pretrained(tiny_clip_dir).model.named_parameters())
    params = dict(scope["model"].named_parameters())
    for name, value in params.items():
        torch.testing.assert_close(value, trained.get(name, anchor[name]))
    assert any(not torch.equal(trained[n], anchor[n]) for n in trained)
    exec(stock_block, scope)  # noqa: S102
    assert scope["ratios"]


# ---------------------------------------------------------------------------------------------- push
def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def hub_calls(monkeypatch) -> dict[str, list]:
    """Recorded HfApi calls, plus the README each upload would have sent."""
    calls = testing.record_hub_calls(monkeypatch)
    recorded_upload = HfApi.upload_folder
    calls["cards"] = []

    def upload_folder(self, **kwargs):
        calls["cards"].append((Path(kwargs["folder_path"]) / "README.md").read_text(encoding="utf-8"))
        return recorded_upload(self, **kwargs)

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_leaves_the_local_bank_byte_identical(banks, hub_calls, tmp_path):
    folder = banks["lora"]
    before = _snapshot(folder)
    with pytest.warns(UserWarning, match="license: unknown"):
        url = bank.push_expert_bank(folder, HUB_BANK, private=True, token=FAKE_TOKEN, revision="v1")
    assert _snapshot(folder) == before  # README.md included: the card for the repo was never written here
    assert url == f"https://huggingface.co/{HUB_BANK}/commit/abc"
    (upload,) = hub_calls["upload_folder"]
    staging = Path(upload["folder_path"])
    assert staging != folder and not staging.exists()  # uploaded from a staging copy, removed afterwards
    assert set(upload["files"]) == set(before)  # every file of the bank, and its card
    assert upload["repo_type"] == "model" and upload["revision"] == "v1" and upload["create_pr"] is False
    assert hub_calls["create_repo"][0]["private"] is True and hub_calls["init"][-1]["token"] == FAKE_TOKEN
    (card,) = hub_calls["cards"]
    assert f'load_expert_bank("{HUB_BANK}", anchor)' in card and str(folder) not in card
    assert f'load_expert_bank("{folder}", anchor)' in (folder / "README.md").read_text()  # the local card
    # stale experts of an earlier, larger push go in the same commit; the card and manifest are re-uploaded
    stale = ["expert-7/epoch-1/adapter_model.safetensors", "expert-1/epoch-3/adapter_config.json"]
    kept = ["README.md", "manifest.json", ".gitattributes"]
    assert list(filter_repo_objects(stale + kept, allow_patterns=upload["delete_patterns"])) == stale


def test_push_as_a_pull_request_returns_its_url(banks, hub_calls, monkeypatch):
    recorded_upload = HfApi.upload_folder

    def upload_folder(self, **kwargs):
        commit = recorded_upload(self, **kwargs)
        commit.pr_url = f"https://huggingface.co/{kwargs['repo_id']}/discussions/1"
        return commit

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    with pytest.warns(UserWarning):
        url = bank.push_expert_bank(banks["full"], HUB_BANK, create_pr=True)
    assert url == f"https://huggingface.co/{HUB_BANK}/discussions/1"
    assert hub_calls["upload_folder"][0]["create_pr"] is True


def test_a_failed_push_keeps_the_staging_copy_and_the_bank(banks, hub_calls, monkeypatch):
    def fail(self, **kwargs):
        raise RuntimeError("503 Service Unavailable")

    monkeypatch.setattr(HfApi, "upload_folder", fail)
    before = _snapshot(banks["lora"])
    with pytest.warns(UserWarning), pytest.raises(hub.HubUploadError) as info:
        bank.push_expert_bank(banks["lora"], HUB_BANK)
    staging = Path(re.search(r"the local copy is in (\S+)\. Retry", str(info.value))[1])
    assert _snapshot(staging) == before | {"README.md": _snapshot(staging)["README.md"]}  # ready to retry
    assert f"push_expert_bank({str(banks['lora'])!r}, {HUB_BANK!r})" in str(info.value)
    assert _snapshot(banks["lora"]) == before
    shutil.rmtree(staging)
