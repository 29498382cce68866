"""The expert bank: MDM's experts (docs/method.md §2) on disk and on the Hub, read back as anchor-relative offsets.

A bank on disk (and as a Hub model repo)::

    <bank>/manifest.json                     format version, anchor id + revision + fingerprint, family, kind,
                                             target modules, r / alpha, seeds, epochs, per-epoch loss and recall
    <bank>/README.md                         model card (hub_cards/expert_bank_card.md), for local use; a push
                                             uploads a card rendered for the repo and leaves this one alone
    <bank>/expert-<i>/epoch-<e>/             adapter_model.safetensors + adapter_config.json (kind "lora"), or
                                             model.safetensors holding the trained tensors (kind "full")

:func:`load_expert_bank` reads a bank with ``safetensors`` only (never pickle), checks it belongs to the given
anchor and turns every checkpoint into anchor-relative offsets keyed by the anchor's parameter names: a LoRA layer
becomes ``LowRankDelta(A, B, scale)`` with ``ΔW = scale · B · A`` and ``scale = lora_alpha / r`` (``/ sqrt(r)``
with rsLoRA); a module trained in full becomes its dense difference ``w_i − w0``. Those are what
:class:`mdm_hf.merge.ExpertBank` merges. Training the experts is :mod:`mdm_hf.experts`; the trajectory-matching
baseline reads its full-weight buffers through the same format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file
from torch import nn

from .cards import expert_bank_card, published_hub_id
from .data import card_license
from .hub import check_repo_id, download_repo, upload_folder_checked
from .merge import ExpertBank, LowRankDelta
from .models import DualEncoder

logger = logging.getLogger(__name__)


BANK_FORMAT_VERSION = 1


MANIFEST_NAME = "manifest.json"


def anchor_fingerprint(model: nn.Module) -> dict:
    """Identity of an anchor's weights: a hash of names + shapes, a hash of the float32 values, per-tensor mean |w|.

    The exact hash recognises the same checkpoint under another name (a local snapshot of a Hub id); the shape hash
    and the per-tensor statistics (tolerant to loading in another dtype) tell *how* another anchor differs.
    """
    shapes, stats, values = {}, {}, hashlib.sha256()
    for name, param in model.named_parameters():
        shapes[name] = list(param.shape)
        tensor = param.detach().to("cpu", torch.float32).contiguous()
        values.update(name.encode())
        values.update(tensor.numpy().tobytes())
        stats[name] = float(f"{tensor.abs().mean().item():.7g}")
    return {
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "shapes_sha256": hashlib.sha256(json.dumps(list(shapes.items())).encode()).hexdigest(),
        "weights_sha256": values.hexdigest(),
        "shapes": shapes,
        "weight_stats": stats,
    }


def anchor_entry(anchor: DualEncoder) -> dict:
    """The manifest's ``anchor`` record: id, revision, family, pooling and the weight fingerprint that
    :func:`check_anchor` compares against."""
    return {
        "name_or_path": anchor.name_or_path, "revision": anchor.revision, "family": anchor.family,
        "model_type": anchor.model.config.model_type, "text_pooling": anchor.text_pooling,
        **anchor_fingerprint(anchor.model),
    }  # fmt: skip


def _anchor_label(name: str | None, revision: str | None) -> str:
    return f"'{name}'" + (f" (revision {revision})" if revision else "")


def check_anchor(bank_anchor: dict, anchor: DualEncoder, rtol: float = 1e-2) -> None:
    """Raise a ``ValueError`` naming the mismatch unless ``anchor`` is the model the bank was trained from.

    Same weights (exact hash) pass whatever the name. Otherwise shapes, then weight statistics are compared; a
    different id or revision with weights that are not identical is refused as well.
    """
    trained = _anchor_label(bank_anchor.get("name_or_path"), bank_anchor.get("revision"))
    given = _anchor_label(anchor.name_or_path, anchor.revision)
    head = f"The expert bank was trained from {trained}, but the anchor is {given}"
    fix = (
        "Load the anchor the bank was made from (see the bank's manifest.json / README) or train a new bank."
    )
    if bank_anchor.get("family") not in (None, anchor.family):
        raise ValueError(
            f"{head}: a {bank_anchor['family']} bank cannot be applied to a {anchor.family} model. {fix}"
        )
    now = anchor_fingerprint(anchor.model)
    if now["weights_sha256"] == bank_anchor.get("weights_sha256"):
        return
    if now["shapes_sha256"] != bank_anchor.get("shapes_sha256"):
        old_shapes, new_shapes = bank_anchor.get("shapes", {}), now["shapes"]
        missing = [n for n in old_shapes if n not in new_shapes][:3]
        extra = [n for n in new_shapes if n not in old_shapes][:3]
        resized = [f"{n} {old_shapes[n]} vs {v}" for n, v in new_shapes.items() if old_shapes.get(n, v) != v][
            :3
        ]
        raise ValueError(
            f"{head}, and their tensors differ in names or shapes (only in the bank's anchor: {missing}; only in "
            f"the anchor: {extra}; other shapes: {resized}; {bank_anchor.get('num_parameters')} vs "
            f"{now['num_parameters']} parameters). {fix}"
        )
    old = bank_anchor.get("weight_stats", {})
    differing = [
        n
        for n, v in now["weight_stats"].items()
        if not math.isclose(v, old.get(n, math.nan), rel_tol=rtol, abs_tol=1e-8)
    ]
    if differing:
        raise ValueError(
            f"{head}, which has the same architecture but different weights ({len(differing)} tensors differ, e.g. "
            f"{differing[0]}: mean |w| {old.get(differing[0])} in the bank's anchor vs "
            f"{now['weight_stats'][differing[0]]}). {fix}"
        )
    trained_id = (bank_anchor.get("name_or_path"), bank_anchor.get("revision"))
    if trained_id != (anchor.name_or_path, anchor.revision):
        raise ValueError(
            f"{head}: same architecture and nearly the same weights, but not identical (a fine-tuned copy or another "
            f"revision?). {fix}"
        )
    logger.warning(
        "The anchor %s matches the bank's anchor by name and weight statistics but not bit for bit (loaded in "
        "another dtype?); using the bank anyway.",
        given,
    )


def owns_bank_entry(path: Path) -> bool:
    """Whether an entry of a bank folder is the bank's own (what ``--overwrite_output_dir`` may remove)."""
    if path.name in (MANIFEST_NAME, MANIFEST_NAME + ".tmp") or re.fullmatch(r"expert-\d+", path.name):
        return True
    return path.name == "README.md" and (path.parent / MANIFEST_NAME).is_file()  # the bank's card


def read_manifest(bank_dir: str | os.PathLike) -> dict:
    """The bank's ``manifest.json``; a clear error when ``bank_dir`` is not an expert bank or is too new."""
    path = Path(bank_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(
            f"'{bank_dir}' is not an expert bank: it has no {MANIFEST_NAME}. Make one with `mdm-hf experts` "
            "(recipes/finetune_experts.py)."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the bank is damaged. Train it again.") from err
    if not isinstance(manifest, dict):
        raise ValueError(
            f"{path} holds a {type(manifest).__name__}, not a manifest object; the bank is damaged."
        )
    version = manifest.get("format_version", 0)
    if isinstance(version, int) and version > BANK_FORMAT_VERSION:
        raise ValueError(
            f"Expert bank '{bank_dir}' has format version {version}; this mdm-hf reads up to "
            f"{BANK_FORMAT_VERSION}. Upgrade mdm-hf."
        )
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: dict, path: Path) -> None:
    """The fields loading relies on, each named when missing or of the wrong type."""
    problems = []
    if not isinstance(manifest.get("anchor"), dict):
        problems.append("no 'anchor' object (which model the bank was trained from)")
    if manifest.get("kind") not in ("lora", "full"):
        problems.append(f"'kind' is {manifest.get('kind')!r}, not 'lora' or 'full'")
    experts = manifest.get("experts")
    if not isinstance(experts, list):
        problems.append("no 'experts' list")
    else:
        for i, expert in enumerate(experts):
            epochs = expert.get("epochs") if isinstance(expert, dict) else None
            if not isinstance(epochs, list) or not all(isinstance(e, dict) for e in epochs):
                problems.append(f"experts[{i}] has no 'epochs' list")
                continue
            for e in epochs:
                if not isinstance(e.get("epoch"), int) or isinstance(e.get("epoch"), bool):
                    problems.append(f"experts[{i}] has epoch {e.get('epoch')!r}, not an integer")
                if not isinstance(e.get("path"), str):
                    problems.append(f"experts[{i}] epoch {e.get('epoch')!r} has no 'path'")
    if problems:
        raise ValueError(f"{path} is not a valid expert-bank manifest: {'; '.join(problems[:4])}.")


def bank_size_bytes(bank_dir: str | os.PathLike) -> int:
    """Bytes of every file in the bank (weights, configs, manifest, card)."""
    return sum(p.stat().st_size for p in Path(bank_dir).rglob("*") if p.is_file())


def anchor_license(bank_anchor: dict) -> str | list[str] | None:
    """The ``license:`` of the anchor's model card: its local folder's README, or the Hub card of its id (also
    recovered from a Hub-cache snapshot path) when the Hub is reachable; None when unknown."""
    name = bank_anchor.get("name_or_path")
    for candidate in dict.fromkeys(c for c in (name, published_hub_id(name, "model")) if c):
        if value := card_license(str(candidate), bank_anchor.get("revision"), repo_type="model"):
            return value
    return None


def bank_card(
    bank_dir: str | os.PathLike, manifest: dict | None = None, repo_id: str | None = None
) -> ModelCard:
    """The bank's model card, in memory (:func:`mdm_hf.cards.expert_bank_card`; ``repo_id`` fills the snippets,
    default the directory itself)."""
    bank_dir = Path(bank_dir)
    manifest = manifest or read_manifest(bank_dir)
    return expert_bank_card(
        manifest,
        repo_id=repo_id or str(bank_dir),
        size_bytes=bank_size_bytes(bank_dir),
        anchor_license=anchor_license(manifest["anchor"]),
    )


def write_bank_card(
    bank_dir: str | os.PathLike, manifest: dict | None = None, repo_id: str | None = None
) -> Path:
    """Render ``README.md`` of the bank (:func:`bank_card`)."""
    path = Path(bank_dir) / "README.md"
    bank_card(bank_dir, manifest, repo_id).save(str(path))
    return path


def _stage_for_upload(bank_dir: Path, card: ModelCard) -> Path:
    """A temporary folder mirroring ``bank_dir`` file by file (symbolic links, copies where links are refused)
    with ``card`` as its README: the upload reads the bank without writing one byte into it."""
    staging = Path(tempfile.mkdtemp(prefix="mdm-hf-bank-upload-"))
    for source in sorted(bank_dir.rglob("*")):
        target = staging / source.relative_to(bank_dir)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif source.is_file() and source.relative_to(bank_dir) != Path("README.md"):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.symlink_to(source.resolve())
            except OSError:  # no symlink permission (Windows without developer mode)
                shutil.copy2(source, target)
    card.save(str(staging / "README.md"))
    return staging


def push_expert_bank(
    bank_dir: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload MDM expert bank",
    create_pr: bool = False,
) -> str:
    """Upload a bank directory as a Hub **model** repo (created if needed); returns the commit URL (the pull
    request's URL with ``create_pr=True``).

    The card is rendered with ``repo_id`` in memory and uploaded from a temporary staging folder, so the bank
    directory is left exactly as it was (its own README keeps its local snippets). Expert checkpoints of an
    earlier push that this one does not re-upload are deleted in the same commit, so the repo never lists more
    experts than its manifest. ``token`` (or the logged-in token) is only handed to ``HfApi``; it is never
    written to a file (the card and the manifest are checked before the upload).

    Raises:
        ValueError: ``repo_id`` is not ``"namespace/name"`` (checked before anything is read or written).
        mdm_hf.hub.HubUploadError: the upload failed; the message names the staging copy (kept) and how to retry.
    """
    check_repo_id(repo_id)
    bank_dir = Path(bank_dir)
    staging = _stage_for_upload(bank_dir, bank_card(bank_dir, read_manifest(bank_dir), repo_id=repo_id))
    upload = upload_folder_checked(
        staging,
        repo_id,
        repo_type="model",
        commit_message=commit_message,
        token=token,
        private=private,
        revision=revision,
        ignore_patterns=["*.tmp", ".cache/**"],
        delete_patterns=["expert-*/**"],
        create_pr=create_pr,
        token_free=("README.md", MANIFEST_NAME),
        what="the expert bank",
        resume_hint=f"mdm_hf.bank.push_expert_bank({str(bank_dir)!r}, {repo_id!r})",
    )
    shutil.rmtree(staging, ignore_errors=True)  # links and a card only; kept above when the upload failed
    return upload.pr_url or upload.commit_url or upload.url


def resolve_bank_dir(
    id_or_dir: str | os.PathLike, revision: str | None = None, token: str | None = None
) -> Path:
    """A local bank directory: ``id_or_dir`` itself, or a snapshot of the Hub model repo ``id_or_dir``.

    Raises:
        mdm_hf.hub.OfflineHubError: offline / unreachable and not in the Hub cache (the message says how to
            download the bank and pass the directory instead).
        FileNotFoundError: not a directory and not an existing Hub repo id.
    """
    if os.path.isdir(id_or_dir):
        return Path(id_or_dir)
    return download_repo(
        str(id_or_dir),
        repo_type="model",
        revision=revision,
        token=token,
        what="the expert bank",
        use_local="pass the local directory instead (--expert_bank DIR)",
    )


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _strip_peft_prefix(key: str) -> str:
    key = key.removeprefix("base_model.model.")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)


def _lora_config(epoch_dir: Path, bank_anchor: dict) -> dict:
    """The adapter's ``adapter_config.json``, checked: a plain LoRA adapter trained from the bank's anchor."""
    weights = epoch_dir / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = any((epoch_dir / n).exists() for n in ("adapter_model.bin", "adapter_model.pt"))
        hint = (
            " (only a pickled adapter_model.bin, which is never loaded: re-save it with safetensors)"
            if pickled
            else ""
        )
        raise ValueError(f"{epoch_dir}: no adapter_model.safetensors{hint}.")
    try:
        cfg = json.loads((epoch_dir / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{epoch_dir / 'adapter_config.json'} cannot be read ({err}).") from err
    if cfg.get("peft_type") != "LORA":
        raise ValueError(
            f"{epoch_dir}: a {cfg.get('peft_type')} adapter; expert banks hold LoRA adapters only."
        )
    for flag in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if cfg.get(flag):
            raise ValueError(
                f"{epoch_dir}: {flag}=True adapters are not plain low-rank offsets and are not supported."
            )
    base = (cfg.get("base_model_name_or_path"), cfg.get("revision"))
    if base != (bank_anchor.get("name_or_path"), bank_anchor.get("revision")):
        raise ValueError(
            f"{epoch_dir}: the adapter was trained from {_anchor_label(*base)}, but the bank's manifest names "
            f"{_anchor_label(bank_anchor.get('name_or_path'), bank_anchor.get('revision'))}. The bank is inconsistent."
        )
    return cfg


def _low_rank_delta(epoch_dir: Path, module: str, ab: dict, weight: torch.Tensor, cfg: dict) -> LowRankDelta:
    """``ΔW = scale · B · A`` of one adapted layer, its factors checked against the anchor weight and the config."""
    a, b = ab["A"], ab["B"]
    if (
        a.ndim != 2
        or b.ndim != 2
        or a.shape[0] != b.shape[1]
        or (b.shape[0], a.shape[1]) != tuple(weight.shape)
    ):
        raise ValueError(
            f"{epoch_dir}: LoRA factors of '{module}' (A {tuple(a.shape)}, B {tuple(b.shape)}) do not fit the "
            f"anchor weight {tuple(weight.shape)}."
        )
    r = a.shape[0]
    ranks, alphas = cfg.get("rank_pattern", {}), cfg.get("alpha_pattern", {})
    expected_r = ranks.get(get_pattern_key(ranks.keys(), module), cfg["r"])
    if r != expected_r:
        raise ValueError(f"{epoch_dir}: '{module}' has rank {r} but its adapter_config says {expected_r}.")
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), cfg["lora_alpha"])
    # peft: scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; ΔW = scaling · B · A.
    return LowRankDelta(a, b, alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)


def lora_epoch_deltas(epoch_dir: Path, anchor_params: dict[str, torch.Tensor], bank_anchor: dict) -> dict:
    """One saved LoRA checkpoint -> ``{anchor parameter name: LowRankDelta | dense Tensor offset}``.

    Refuses a file that cannot be read (named), an adapter without LoRA tensors, and one that changes nothing
    (every offset zero): either would silently make the mixed teacher the anchor.
    """
    cfg = _lora_config(epoch_dir, bank_anchor)
    weights = epoch_dir / "adapter_model.safetensors"
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # noqa: BLE001 - truncated or not safetensors: name the file either way
        raise ValueError(
            f"{weights} cannot be read ({type(err).__name__}: {err}); the bank is damaged."
        ) from err
    factors: dict[str, dict[str, torch.Tensor]] = {}
    deltas: dict = {}
    for key, tensor in tensors.items():
        if match := _LORA_KEY.match(key):
            factors.setdefault(match["module"], {})[match["ab"]] = tensor.float()
            continue
        name = _strip_peft_prefix(key)
        if name not in anchor_params:
            raise ValueError(f"{epoch_dir}: tensor '{key}' matches no parameter of the anchor ('{name}').")
        if tuple(tensor.shape) != tuple(anchor_params[name].shape):
            raise ValueError(
                f"{epoch_dir}: '{name}' has shape {tuple(tensor.shape)}, the anchor's {tuple(anchor_params[name].shape)}."
            )
        deltas[name] = tensor.float() - anchor_params[name].detach().float().cpu()
    if not factors:
        raise ValueError(
            f"{weights} holds no LoRA tensors (lora_A / lora_B); it is not an expert of this bank."
        )
    for module, ab in factors.items():
        if set(ab) != {"A", "B"} or f"{module}.weight" not in anchor_params:
            raise ValueError(
                f"{epoch_dir}: LoRA factors of '{module}' are incomplete or match no anchor weight."
            )
        deltas[f"{module}.weight"] = _low_rank_delta(
            epoch_dir, module, ab, anchor_params[f"{module}.weight"], cfg
        )
    if all(not _changes_anything(d) for d in deltas.values()):
        raise ValueError(
            f"{weights}: every offset is zero, so this expert equals the anchor (an untrained adapter?)."
        )
    return deltas


def _changes_anything(delta) -> bool:
    if isinstance(delta, LowRankDelta):
        return bool(delta.lora_A.abs().sum() > 0 and delta.lora_B.abs().sum() > 0 and delta.scale != 0)
    return bool(delta.abs().sum() > 0)


def full_epoch_deltas(epoch_dir: Path, anchor_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One saved full checkpoint (``model.safetensors`` of the trained tensors) -> dense offsets ``w_i − w0``."""

    weights = epoch_dir / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{epoch_dir}: no model.safetensors in this full-weight expert checkpoint.")
    deltas = {}
    for name, tensor in load_file(str(weights)).items():
        if name not in anchor_params or tuple(tensor.shape) != tuple(anchor_params[name].shape):
            raise ValueError(
                f"{epoch_dir}: tensor '{name}' {tuple(tensor.shape)} matches no anchor parameter of that shape."
            )
        deltas[name] = tensor.float() - anchor_params[name].detach().float().cpu()
    return deltas


def load_expert_bank(
    id_or_dir: str | os.PathLike,
    anchor: DualEncoder,
    revision: str | None = None,
    token: str | None = None,
):
    """Load a bank (Hub id or directory) as a :class:`mdm_hf.merge.ExpertBank` over ``anchor``.

    Raises ``ValueError`` when the bank was trained from another anchor (id / revision / weights / shapes), and a
    clear ``OSError`` with the fix when a Hub id cannot be fetched (offline).
    """
    bank_dir = resolve_bank_dir(id_or_dir, revision, token)
    manifest = read_manifest(bank_dir)
    check_anchor(manifest["anchor"], anchor)
    anchor_params = {n: p.detach().float().cpu() for n, p in anchor.model.named_parameters()}
    experts, names = [], []
    for expert in manifest["experts"]:
        epochs = []
        for ep in sorted(expert["epochs"], key=lambda e: e["epoch"]):
            epoch_dir = bank_dir / ep["path"]
            if manifest["kind"] == "lora":
                epochs.append(lora_epoch_deltas(epoch_dir, anchor_params, manifest["anchor"]))
            else:
                epochs.append(full_epoch_deltas(epoch_dir, anchor_params))
        experts.append(epochs)
        names.append(expert.get("name", f"expert-{len(names)}"))
    if not experts:
        raise ValueError(f"Expert bank '{id_or_dir}' holds no experts (an interrupted run?). Train it again.")
    touched = sorted({n for epochs in experts for deltas in epochs for n in deltas})

    return ExpertBank({n: anchor_params[n] for n in touched}, experts, names=names)
