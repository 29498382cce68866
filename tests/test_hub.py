"""mdm_hf.hub without network: repo ids, token scrubbing, licences, downloads and the checked upload."""

from __future__ import annotations

import huggingface_hub
import pytest
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

from mdm_hf import bank, hub, models, testing

FAKE_TOKEN = "hf_" + "y" * 34


# ====================================================================== ids, offline helpers
def test_repo_id_checks():
    hub.check_repo_id("me/coco-mdm-100")
    for bad in ("noslash", "a/b/c", "", "/x", "ns/", "ns/a--b", "ns/a..b", "ns/-a", None):
        with pytest.raises(ValueError, match="namespace/name"):
            hub.check_repo_id(bad)
    assert hub.is_hub_id("clip") and hub.is_hub_id("openai/clip-vit-base-patch32")
    assert not hub.is_hub_id("a/b/c") and not hub.is_hub_id("/abs/path")


def test_hub_reference_is_a_hub_id_that_is_not_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.is_hub_reference("someone/data")
    (tmp_path / "someone" / "data").mkdir(parents=True)
    assert not hub.is_hub_reference("someone/data")  # a local directory of that name wins


def test_offline_helpers_moved_but_importable_from_models():
    assert models.OfflineHubError is hub.OfflineHubError and issubclass(hub.OfflineHubError, OSError)
    assert models.offline_hint is hub.offline_hint and models.is_hub_offline is hub.is_hub_offline
    assert "hf download me/x" in hub.offline_hint("me/x", "model")
    assert "hf download" not in hub.offline_hint("./typo/path/x", "dataset")


# ====================================================================== tokens
def test_scrub_tokens_drops_every_token_key_recursively():
    prov = {
        "teacher": "t",
        "hub_token": FAKE_TOKEN,
        "Auth": {"HF_TOKEN": FAKE_TOKEN, "keep": 1, "nested": [{"tokenizer": "x", "a": (1, 2)}]},
        "values": (1, {"push_token": FAKE_TOKEN}),
    }
    assert hub.scrub_tokens(prov) == {
        "teacher": "t",
        "Auth": {"keep": 1, "nested": [{"a": [1, 2]}]},  # 'tokenizer' contains 'token': dropped too
        "values": [1, {}],
    }
    assert hub.scrub_tokens("plain") == "plain" and hub.scrub_tokens(3) == 3
    assert prov["hub_token"] == FAKE_TOKEN  # the input is not modified


def test_assert_token_absent(tmp_path):
    (tmp_path / "README.md").write_text("a card")
    (tmp_path / "meta.json").write_text(f'{{"t": "{FAKE_TOKEN}"}}')
    hub.assert_token_absent(tmp_path, FAKE_TOKEN, ["README.md", "missing.json"])  # a missing file is skipped
    with pytest.raises(ValueError, match="token appears in meta.json"):
        hub.assert_token_absent(tmp_path, FAKE_TOKEN, ["README.md", "meta.json"])


# ====================================================================== card metadata
def test_licence_mapping_and_size_buckets():
    assert hub.hub_license("Apache 2.0") == ("apache-2.0", None)
    assert hub.hub_license("CC_BY_SA_4.0") == ("cc-by-sa-4.0", None)
    assert hub.hub_license(("odc-by",)) == ("odc-by", None)
    assert hub.hub_license("   ") == ("unknown", None)
    license_id, name = hub.hub_license(["mit", "Flickr Terms"])
    assert license_id == "other" and name == "mit--flickr-terms"
    assert hub.hub_license("!!!") == ("other", "source-license")
    assert hub.hub_license("x" * 100)[1] == "x" * 64
    assert {"mit", "cc-by-4.0", "other", "unknown"} <= hub.HUB_LICENSES
    assert hub.size_category(0) == "n<1K" and hub.size_category(10**7) == "1M<n<10M"


# ====================================================================== downloads
def _raise(err):
    def snapshot_download(*args, **kwargs):
        raise err

    return snapshot_download


class _Offline(hub.OfflineHubError):
    pass


def test_download_repo_offline_message_names_the_local_route(monkeypatch):
    monkeypatch.setattr(hub, "snapshot_download", _raise(LocalEntryNotFoundError("not cached")))
    with pytest.raises(_Offline) as info:
        hub.download_repo(
            "me/set",
            what="the synthetic set",
            use_local="call X.from_pretrained('DIR')",
            offline_error=_Offline,
        )
    message = str(info.value)
    assert message.startswith("Cannot load the synthetic set 'me/set': it is not a local directory")
    assert (
        "(`hf download me/set --repo-type dataset --local-dir DIR`) and call X.from_pretrained('DIR')."
        in message
    )
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)

    with pytest.raises(hub.OfflineHubError) as info:
        hub.download_repo("me/bank", repo_type="model", revision="v1", what="the expert bank")
    message = str(info.value)
    assert (
        "'me/bank' (revision v1)" in message
        and "hf download me/bank --revision v1 --local-dir DIR" in message
    )


def test_download_repo_missing_or_invalid_repo_is_file_not_found(monkeypatch):
    missing = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
    monkeypatch.setattr(hub, "snapshot_download", _raise(missing))
    with pytest.raises(FileNotFoundError, match="No model repo 'me/x' on the Hub"):
        hub.download_repo("me/x", repo_type="model")
    monkeypatch.setattr(hub, "snapshot_download", _raise(HFValidationError("bad id")))
    with pytest.raises(FileNotFoundError, match="The expert bank 'a b' is neither"):
        hub.download_repo("a b", what="the expert bank")


def test_download_repo_returns_the_snapshot_path(monkeypatch, tmp_path):
    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(repo_id=repo_id, **kwargs)
        return str(tmp_path)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    assert hub.download_repo("me/x", repo_type="model", revision="r", token=FAKE_TOKEN) == tmp_path
    assert seen == {"repo_id": "me/x", "repo_type": "model", "revision": "r", "token": FAKE_TOKEN}


# ====================================================================== uploads
@pytest.fixture
def api_calls(monkeypatch):
    """Record HfApi calls instead of talking to the Hub."""
    return testing.record_hub_calls(monkeypatch)


def test_upload_folder_checked_model_repo_on_a_branch(tmp_path, api_calls):
    (tmp_path / "README.md").write_text("card")
    result = hub.upload_folder_checked(
        tmp_path, "me/bank", repo_type="model", commit_message="hi", token=FAKE_TOKEN, revision="v2",
        ignore_patterns=["*.tmp"], token_free=["README.md"],
    )  # fmt: skip
    assert result == hub.HubUpload(
        url="https://huggingface.co/me/bank/tree/v2", commit_url="https://huggingface.co/me/bank/commit/abc"
    )
    assert api_calls["init"][-1]["token"] == FAKE_TOKEN
    assert (
        api_calls["create_branch"][0]["branch"] == "v2"
        and api_calls["create_branch"][0]["repo_type"] == "model"
    )
    (upload,) = api_calls["upload_folder"]
    assert (
        upload["repo_type"] == "model"
        and upload["revision"] == "v2"
        and upload["ignore_patterns"] == ["*.tmp"]
    )
    assert upload["folder_path"] == str(tmp_path) and upload["commit_message"] == "hi"

    hub.upload_folder_checked(tmp_path, "me/bank", repo_type="model", commit_message="x", revision="main")
    assert len(api_calls["create_branch"]) == 1  # main is never created as a branch


def test_upload_folder_checked_refuses_before_any_call(tmp_path, api_calls):
    (tmp_path / "manifest.json").write_text(f'{{"hub_token": "{FAKE_TOKEN}"}}')
    with pytest.raises(ValueError, match="token appears in manifest.json"):
        hub.upload_folder_checked(
            tmp_path,
            "me/x",
            repo_type="model",
            commit_message="x",
            token=FAKE_TOKEN,
            token_free=["manifest.json"],
        )
    with pytest.raises(ValueError, match="namespace/name"):
        hub.upload_folder_checked(tmp_path, "bad id", repo_type="model", commit_message="x")
    assert api_calls["init"] == [] and api_calls["create_repo"] == []


def test_the_token_from_the_environment_is_checked_too(tmp_path, api_calls, monkeypatch):
    """No token= argument: the upload would use HF_TOKEN, so that token must not be in the files either."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    (tmp_path / "README.md").write_text(f"leaked {FAKE_TOKEN}")
    with pytest.raises(ValueError, match="token appears in README.md"):
        hub.upload_folder_checked(
            tmp_path, "me/x", repo_type="dataset", commit_message="x", token_free=["README.md"]
        )
    assert api_calls["create_repo"] == []


def test_failed_upload_names_the_local_copy_without_the_token(tmp_path, api_calls, monkeypatch):
    def fail(self, **kwargs):
        raise RuntimeError(f"503 (sent {FAKE_TOKEN})")

    class BankUploadError(hub.HubUploadError):
        pass

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fail)
    with pytest.raises(BankUploadError) as info:
        hub.upload_folder_checked(
            tmp_path, "me/x", repo_type="model", commit_message="x", token=FAKE_TOKEN, revision="v1",
            what="the bank", resume_hint="push(...)", error=BankUploadError,
        )  # fmt: skip
    message = str(info.value)
    assert message.startswith("Uploading the bank to https://huggingface.co/me/x failed (RuntimeError: 503")
    assert FAKE_TOKEN not in message and "<token>" in message and str(tmp_path) in message
    assert f"`hf upload me/x {tmp_path} . --repo-type model --revision v1` or with push(...)." in message
    assert isinstance(info.value, RuntimeError)


def test_push_expert_bank_checks_the_repo_id_before_writing(tmp_path, api_calls):
    with pytest.raises(ValueError, match="namespace/name"):
        bank.push_expert_bank(tmp_path / "no-bank-here", "not a repo id")
    assert not (tmp_path / "no-bank-here").exists() and api_calls["create_repo"] == []
