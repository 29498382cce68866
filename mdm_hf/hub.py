"""Everything mdm-hf does with the Hugging Face Hub, in one place.

* offline checks: :class:`OfflineHubError`, :func:`is_hub_offline`, :func:`offline_hint`;
* repo ids: :func:`check_repo_id` (``"namespace/name"``), :func:`is_hub_id`, :func:`is_hub_reference`;
* downloads: :func:`download_repo` (a snapshot, or one error that says how to work offline);
* uploads: :func:`upload_folder_checked` (create the repo / branch, refuse a token written to disk, and on failure
  name the local copy and the command that resumes);
* credentials: :func:`scrub_tokens`, :func:`assert_token_absent`;
* card metadata the Hub validates: :data:`HUB_LICENSES`, :func:`hub_license`, :func:`size_category`.

The synthetic set (:mod:`mdm_hf.synthetic`, a Hub *dataset* repo) and the expert bank (:mod:`mdm_hf.bank`, a Hub
*model* repo) both go through these functions; the layouts are described in ``docs/design.md``. This module
imports nothing of the package, so every other module may import it.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

__all__ = [
    "HUB_LICENSES",
    "HubUpload",
    "HubUploadError",
    "OfflineHubError",
    "assert_token_absent",
    "check_repo_id",
    "download_repo",
    "hub_license",
    "is_hub_id",
    "is_hub_offline",
    "is_hub_reference",
    "offline_hint",
    "scrub_tokens",
    "size_category",
    "upload_folder_checked",
]

logger = logging.getLogger(__name__)

# One part of a Hub repo id: letters, digits, '-', '_', '.'; no leading/trailing '-' or '.', no '--' or '..'.
_HUB_NAME = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9]([A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")

# License ids the Hub recognises (a common subset); anything else becomes `license: other` + `license_name`.
HUB_LICENSES = frozenset({
    "apache-2.0", "mit", "openrail", "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "cc",
    "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0",
    "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0",
    "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0", "cdla-permissive-1.0",
    "cdla-permissive-2.0", "odc-by", "odbl", "pddl", "gpl-2.0", "gpl-3.0", "lgpl-3.0", "agpl-3.0", "gfdl",
    "mpl-2.0", "unlicense", "wtfpl", "afl-3.0", "artistic-2.0", "ecl-2.0", "epl-2.0", "isc", "other", "unknown",
})  # fmt: skip


# ====================================================================== offline
class OfflineHubError(OSError):
    """A Hub id was requested while the Hub is unreachable or ``HF_HUB_OFFLINE`` is set."""


class HubUploadError(RuntimeError):
    """Uploading a folder to the Hub failed; the message says where the local copy is and how to retry."""


def is_hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or the datasets equivalent) forbids network access."""
    return any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"} for v in ("HF_HUB_OFFLINE",))


def offline_hint(name_or_path: str, what: str) -> str:
    """The message shown when ``name_or_path`` is neither a local directory nor reachable on the Hub."""
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1:
        # a Hub id is "name" or "owner/name"; anything else is a local path with a typo
        return (
            f"Could not load the {what} '{name_or_path}': that local path does not exist (and it is not a Hub id "
            "of the form 'owner/name'). Check the path."
        )
    return (
        f"Could not load the {what} '{name_or_path}': it is not a local directory and the Hugging Face Hub is "
        f"unreachable (offline={is_hub_offline()}). Download it once where the Hub is reachable "
        f"(`hf download {name_or_path}` or `snapshot_download`) and pass the local directory instead, e.g. "
        f"--{'model_name_or_path' if what == 'model' else 'dataset_name'} /path/to/{name_or_path.split('/')[-1]}"
    )


# ====================================================================== repo ids
def check_repo_id(repo_id: str) -> None:
    """Raise ``ValueError`` unless ``repo_id`` is a Hub repo id of the form ``"namespace/name"``."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(_HUB_NAME.match(p) for p in parts):
        raise ValueError(
            f"Invalid Hub repo id {repo_id!r}: use 'namespace/name' (your user or organisation name, a slash, and "
            "a name of letters, digits, '-', '_' or '.'), e.g. 'my-user/coco-mdm-100'."
        )


def is_hub_id(text: str) -> bool:
    """``text`` is spelled like a Hub repo id, ``"name"`` or ``"namespace/name"`` (whether or not it exists)."""
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(_HUB_NAME.match(p) for p in parts)


def is_hub_reference(name: str) -> bool:
    """A Hub repo id rather than a local path (cards link Hub ids and never list local paths as sources)."""
    return is_hub_id(name) and not Path(name).exists()


# ====================================================================== downloads
def download_repo(
    repo_id: str,
    *,
    repo_type: str = "dataset",
    revision: str | None = None,
    token: str | None = None,
    what: str = "the repository",
    use_local: str = "pass the local directory instead",
    offline_error: type[OfflineHubError] = OfflineHubError,
) -> Path:
    """A local snapshot of the Hub repo ``repo_id`` (``huggingface_hub.snapshot_download``; the cache serves it
    offline).

    Args:
        what: names the thing in messages ("the synthetic set", "the expert bank").
        use_local: how to use a downloaded copy ``DIR``, ending the offline message ("call X.from_pretrained('DIR')").
        offline_error: the :class:`OfflineHubError` subclass raised when the Hub cannot provide the repo.

    Raises:
        offline_error: offline or unreachable, and not in the Hub cache.
        FileNotFoundError: no such repo (or private / gated without a token), or ``repo_id`` is not a valid id.
    """
    at = f" (revision {revision})" if revision else ""
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, token=token))
    except LocalEntryNotFoundError as err:
        state = (
            "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached"
        )
        flags = "" if repo_type == "model" else f" --repo-type {repo_type}"
        flags += f" --revision {shlex.quote(revision)}" if revision else ""
        raise offline_error(
            f"Cannot load {what} '{repo_id}'{at}: it is not a local directory ({Path(repo_id).resolve()} does not "
            f"exist), {state}, and it is not in the Hub cache. Offline, pass a local directory: download it where "
            f"the Hub is reachable (`hf download {repo_id}{flags} --local-dir DIR`) and {use_local}."
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"No {repo_type} repo '{repo_id}' on the Hub, or it is private/gated: check the id, or pass token= / "
            "run `hf auth login`."
        ) from err
    except HFValidationError as err:
        raise FileNotFoundError(
            f"{what[:1].upper()}{what[1:]} '{repo_id}' is neither a local directory nor a valid Hub repo id."
        ) from err


# ====================================================================== uploads
class HubUpload(str):
    """Where an upload landed: the repo page (``/tree/<revision>`` for a branch) -- the string itself, as
    ``huggingface_hub.CommitInfo`` is a string -- with the commit's ``commit_url`` and ``pr_url`` (``create_pr``)."""

    def __new__(cls, url: str, commit_url: str | None = None, pr_url: str | None = None) -> HubUpload:
        upload = super().__new__(cls, url)
        upload.commit_url, upload.pr_url = commit_url, pr_url
        return upload

    @property
    def url(self) -> str:
        return str(self)


def upload_folder_checked(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    repo_type: str,
    commit_message: str,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    ignore_patterns: Sequence[str] | None = None,
    delete_patterns: Sequence[str] | None = None,
    create_pr: bool = False,
    token_free: Sequence[str] = (),
    what: str = "the folder",
    resume_hint: str | None = None,
    error: type[HubUploadError] = HubUploadError,
) -> HubUpload:
    """Upload ``folder`` as the Hub repo ``repo_id`` (created if needed; a ``revision`` other than ``main`` becomes a
    branch). The folder is the local copy: a failed upload loses nothing.

    ``token`` goes to ``HfApi`` only. Before anything is sent, the files named in ``token_free`` (paths relative
    to ``folder``, e.g. the card and the metadata) are checked not to contain it.

    Args:
        delete_patterns: remote files matching these are deleted in the same commit unless re-uploaded (a set
            saved with fewer or renamed shards leaves no stale shard that the card's ``data_files`` would match).
        create_pr: open a pull request with the commit instead of committing to the branch.
        what: names the upload in messages ("the synthetic set").
        resume_hint: a second way to retry, appended to the message after the ``hf upload`` command.
        error: the :class:`HubUploadError` subclass raised on failure.

    Raises:
        ValueError: ``repo_id`` is not ``"namespace/name"``, or the token appears in a ``token_free`` file.
        error: the Hub refused or could not be reached; the message (token removed) names the local copy and the
            command that resumes.
    """
    check_repo_id(repo_id)
    local = Path(folder)
    used = (
        token or get_token()
    )  # the token the upload will really use: the argument, HF_TOKEN or `hf auth login`
    if used:
        assert_token_absent(local, used, token_free)
    url = f"{constants.ENDPOINT}/{constants.REPO_TYPES_URL_PREFIXES.get(repo_type, '')}{repo_id}"
    branch = revision not in (None, "main")
    api = HfApi(token=token)
    logger.info("Uploading %s to %s", local, url)
    try:
        repo_url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        if branch:
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(local),
            repo_type=repo_type,
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=list(ignore_patterns) if ignore_patterns is not None else None,
            delete_patterns=list(delete_patterns) if delete_patterns is not None else None,
            create_pr=create_pr,
        )
    except Exception as err:  # any failure: keep the local copy and say how to resume
        where = dict(repo_id=repo_id, repo_type=repo_type, revision=revision, local=local, url=url)
        raise error(_upload_failure(err, used, what, resume_hint, **where)) from err
    if isinstance(repo_url, str) and repo_url.startswith("http"):
        url = str(repo_url).rstrip("/")
    if branch:
        url = f"{url}/tree/{revision}"
    commit_url, pr_url = getattr(commit, "commit_url", None), getattr(commit, "pr_url", None)
    return HubUpload(url, str(commit_url) if commit_url else None, str(pr_url) if pr_url else None)


def _upload_failure(err, token, what, resume_hint, *, repo_id, repo_type, revision, local, url) -> str:
    """The message of a failed upload: the reason (token removed), the local copy, and how to retry."""
    reason = f"{type(err).__name__}: {err}"
    if token:
        reason = reason.replace(token, "<token>")
    retry = f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(local))} . --repo-type {repo_type}"
    if revision:
        retry += f" --revision {shlex.quote(revision)}"
    resume = f" or with {resume_hint}" if resume_hint else ""
    return (
        f"Uploading {what} to {url} failed ({reason}). Nothing is lost: the local copy is in {local}. "
        f"Retry with `{retry}`{resume}."
    )


# ====================================================================== credentials
def scrub_tokens(obj):
    """Drop every mapping key containing 'token' (any case), recursively: no credential reaches disk or a card."""
    if isinstance(obj, dict):
        return {k: scrub_tokens(v) for k, v in obj.items() if "token" not in str(k).lower()}
    if isinstance(obj, (list, tuple)):
        return [scrub_tokens(v) for v in obj]
    return obj


def assert_token_absent(directory: str | os.PathLike, token: str, files: Sequence[str]) -> None:
    """Refuse to upload if the token string ended up in one of the text ``files`` (defence in depth)."""
    for name in files:
        path = Path(directory) / name
        if path.is_file() and token in path.read_text(encoding="utf-8", errors="replace"):
            raise ValueError(
                f"Refusing to upload: a Hub token appears in {path.name}. Remove it from the provenance."
            )


# ====================================================================== card metadata
def hub_license(value) -> tuple[str | list[str], str | None]:
    """Source license -> (Hub license id, or ids for a source under several, ``license_name`` for ``other``)."""
    if isinstance(value, (list, tuple)):
        ids = [re.sub(r"[\s_]+", "-", str(v).strip().lower()) for v in value]
        if len(ids) > 1 and all(i in HUB_LICENSES for i in ids):
            return ids, None
        value = value[0] if len(value) == 1 else ", ".join(map(str, value))
    if not value or not str(value).strip():
        return "unknown", None
    norm = re.sub(r"[\s_]+", "-", str(value).strip().lower())
    if norm in HUB_LICENSES:
        return norm, None
    slug = re.sub(r"[^a-z0-9.-]+", "-", norm).strip("-.")[:64] or "source-license"
    return "other", slug


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket of a dataset with ``n`` rows."""
    bounds = [(10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M")]
    return next((label for bound, label in bounds if n < bound), "1M<n<10M")


def redact_local_paths(obj):
    """``obj`` (nested dicts / lists) with every absolute local path replaced by its last component: what is
    published (cards, metadata) names local sources by folder name -- their fingerprints identify them -- and never
    shows a home directory. Hub ids and relative names are kept."""
    if isinstance(obj, dict):
        return {k: redact_local_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_local_paths(v) for v in obj]
    if isinstance(obj, str) and (os.path.isabs(obj) or obj.startswith("~")) and not is_hub_id(obj):
        return os.path.basename(obj.rstrip("/\\")) or obj
    return obj
