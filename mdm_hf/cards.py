"""Every Hub card mdm-hf writes, rendered from the Jinja templates shipped in :mod:`mdm_hf.hub_cards`.

* :func:`synthetic_dataset_card`: the dataset card of a synthetic set (``hub_cards/synthetic_dataset_card.md``);
* :func:`expert_bank_card`: the model card of an expert bank (``hub_cards/expert_bank_card.md``; the experts are
  those of ``docs/method.md §2``);
* :func:`emojicaps_card`: the dataset card of EmojiCaps (``hub_cards/emojicaps_card.md``, ``docs/benchmarks.md``).

Templates live in ``hub_cards/`` at the repository root and are installed as the package ``mdm_hf.hub_cards``.
A template starts with ``---\\n{{ card_data }}\\n---`` (the YAML metadata that ``huggingface_hub`` renders from a
``DatasetCardData`` / ``ModelCardData``); every other ``{{ variable }}`` comes from the keyword arguments of
:func:`render_dataset_card` / :func:`render_model_card`, which also provide the one citation of the paper
(``mdm_reference``, ``mdm_bibtex``) and of Model Stock (``model_stock_reference``, ``model_stock_bibtex``).
The results table of a synthetic set's card is :func:`results_table`, the package's one results renderer (evaluation protocol: ``docs/method.md §5``).
"""

from __future__ import annotations

import importlib.resources
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

from .hub import hub_license, is_hub_reference, redact_local_paths, size_category
from .retrieval import METRIC_NAMES

__all__ = [
    "MDM_BIBTEX",
    "MDM_REFERENCE",
    "MODEL_STOCK_BIBTEX",
    "MODEL_STOCK_REFERENCE",
    "available_templates",
    "published_hub_id",
    "emojicaps_card",
    "expert_bank_card",
    "load_template",
    "render_dataset_card",
    "render_model_card",
    "results_table",
    "synthetic_dataset_card",
]

_PACKAGE = "mdm_hf.hub_cards"

# The paper, cited once for every card.
MDM_REFERENCE = "[Jeong et al., CVPR 2026](https://arxiv.org/abs/2605.23482)"
MDM_BIBTEX = """@inproceedings{jeong2026mdm,
  title     = {Multimodal Distribution Matching for Vision-Language Dataset Distillation},
  author    = {Jeong, Jongoh and Kwon, Hoyong and Kim, Minseok and Yoon, Kuk-Jin},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2026},
  eprint    = {2605.23482},
  archivePrefix = {arXiv}
}"""
# Model Stock, the interpolation that forms MDM's mixed teacher (``docs/method.md §2``).
MODEL_STOCK_REFERENCE = "[Jang et al., ECCV 2024](https://arxiv.org/abs/2403.19522)"
MODEL_STOCK_BIBTEX = """@inproceedings{jang2024modelstock,
  title     = {Model Stock: All we need is just a few fine-tuned models},
  author    = {Jang, Dong-Hwan and Yun, Sangdoo and Han, Dongyoon},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024},
  eprint    = {2403.19522},
  archivePrefix = {arXiv}
}"""
_CITATIONS = {
    "mdm_reference": MDM_REFERENCE,
    "mdm_bibtex": MDM_BIBTEX,
    "model_stock_reference": MODEL_STOCK_REFERENCE,
    "model_stock_bibtex": MODEL_STOCK_BIBTEX,
}

SYNTHETIC_TEMPLATE = "synthetic_dataset_card"
SYNTHETIC_TAGS = ["dataset-distillation", "mdm", "synthetic", "vision-language", "image-text-retrieval"]
# Retrieval data: the Hub has no retrieval task category for images, so the tasks a student trained on the set
# serves (image/text embeddings, captions); not text-to-image, which is generation.
SYNTHETIC_TASK_CATEGORIES = ["image-feature-extraction", "feature-extraction", "image-to-text"]
BANK_TEMPLATE = "expert_bank_card"
EMOJICAPS_TEMPLATE = "emojicaps_card"


# ====================================================================== templates
def available_templates() -> list[str]:
    """Names of the card templates shipped with the package (``*.md`` in ``mdm_hf.hub_cards``)."""
    root = importlib.resources.files(_PACKAGE)
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".md"))


def load_template(name: str) -> str:
    """Path (as ``str``) of the shipped template ``name`` (``"synthetic_dataset_card"`` or ``"....md"``).

    Raises:
        FileNotFoundError: naming the template and listing the available ones.
    """
    filename = name if name.endswith(".md") else f"{name}.md"
    path = importlib.resources.files(_PACKAGE) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"No card template '{filename}' in {_PACKAGE} (hub_cards/). Available: {available_templates()}."
        )
    # The package is installed from a plain directory (no zip), so the traversable is a real file path.
    return str(path)


def render_dataset_card(template_name: str, card_data: DatasetCardData, **variables) -> DatasetCard:
    """Render the dataset-card template ``template_name`` with ``card_data`` as YAML header and ``variables``."""
    return DatasetCard.from_template(
        card_data, template_path=load_template(template_name), **{**_CITATIONS, **variables}
    )


def render_model_card(template_name: str, card_data: ModelCardData, **variables) -> ModelCard:
    """Render the model-card template ``template_name`` with ``card_data`` as YAML header and ``variables``."""
    return ModelCard.from_template(
        card_data, template_path=load_template(template_name), **{**_CITATIONS, **variables}
    )


# ====================================================================== cells, links, results
def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _value(mean, std=None) -> str:
    if mean is None:
        return "–"
    try:
        text = f"{float(mean):.2f}"
    except (TypeError, ValueError):
        return _cell(mean)
    return f"{text} ± {float(std):.2f}" if std is not None else text


def results_table(rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str] | None = None) -> str:
    """The package's one markdown results table: a row per method, ``mean ± std`` per metric (``.2f``, recall in
    %). ``rows`` are row dicts (``method``, ``pairs``, ``<metric>``, ``<metric>_std``, ``seeds``), as a card's
    results and ``comparison.json`` hold them; typed results render through
    :func:`mdm_hf.students.results.format_results_table`. ``"mean"`` is always the last metric column; a missing
    value shows as ``–``, a row without ``pairs`` as ``all``."""
    metrics = [m for m in (metric_names or METRIC_NAMES) if m != "mean"]
    header = ["Method", "Pairs", *(m.upper() for m in metrics), "Mean", "Seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in rows:
        pairs, seeds = row.get("pairs"), row.get("seeds")
        cells = [
            _cell(row.get("method", "?")),
            "all" if pairs is None else _cell(pairs),
            *(_value(row.get(m), row.get(f"{m}_std")) for m in metrics),
            _value(row.get("mean"), row.get("mean_std")),
            "–" if seeds is None else _cell(seeds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _link(name, kind: str) -> str:
    """Markdown link to a Hub repo for Hub ids, plain code span for local paths."""
    name = str(name)
    if is_hub_reference(name):
        prefix = "datasets/" if kind == "datasets" else ""
        return f"[`{name}`](https://huggingface.co/{prefix}{name})"
    return f"`{_cell(name)}` (local)"


def _with_revision(name, revision) -> str:
    return f"{name} @ `{_cell(revision)}`" if revision else name


# ====================================================================== the synthetic set's dataset card
def _provenance_rows(prov: dict) -> list[tuple[str, str]]:
    """The card's provenance table: teacher, text encoder, expert bank and source as links, then plain keys."""
    rows = []
    if prov.get("teacher"):
        teacher = _with_revision(_link(prov["teacher"], "models"), prov.get("teacher_revision"))
        rows.append(("Teacher (anchor)", teacher))
    if prov.get("text_encoder"):
        pooling = f" (pooling: `{prov['text_pooling']}`)" if prov.get("text_pooling") else ""
        rev = prov.get("text_encoder_revision") or (
            prov.get("teacher_revision") if prov.get("text_encoder") == prov.get("teacher") else None
        )
        rows.append(
            ("Text encoder (frozen)", _with_revision(_link(prov["text_encoder"], "models"), rev) + pooling)
        )
    if prov.get("expert_bank"):
        bank = _with_revision(_link(prov["expert_bank"], "models"), prov.get("expert_bank_revision"))
    else:
        bank = "none (the pretrained anchor is the teacher)"
    rows.append(("Expert bank", bank))
    if prov.get("source_dataset"):
        source = _link(prov["source_dataset"], "datasets")
        rows.append(("Source dataset", _with_revision(source, prov.get("source_dataset_revision"))))
    for key, label in (
        ("source_split", "Source split"),
        ("source_fingerprint", "Source fingerprint"),
        ("license", "Source license"),
        ("selection", "Initial selection"),
        ("steps", "Distillation steps"),
        ("best_step", "Selected step"),
        ("created_with", "Created with"),
    ):
        if prov.get(key) not in (None, ""):
            rows.append((label, f"`{_cell(prov[key])}`"))
    if prov.get("versions"):
        rows.append(("Library versions", ", ".join(f"{k} {v}" for k, v in prov["versions"].items())))
    return rows


def _synthetic_card_data(num_pairs: int, prov: dict, fingerprint: str) -> DatasetCardData:
    """The YAML header: licence mapped to a Hub id, size bucket, Hub source, one ``train`` split of parquet."""
    source = prov.get("source_dataset")
    license_id, license_name = hub_license(prov.get("license"))
    extra = {"license_name": license_name} if license_name else {}
    short = Path(str(source)).name if source else "image-text data"
    return DatasetCardData(
        license=license_id,
        task_categories=SYNTHETIC_TASK_CATEGORIES,
        tags=SYNTHETIC_TAGS,
        size_categories=[size_category(num_pairs)],
        source_datasets=[str(source)] if source and is_hub_reference(str(source)) else None,
        pretty_name=f"{short} distilled with MDM ({num_pairs} pairs)",
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": f"data/train-{fingerprint}-*.parquet"}],
            }
        ],
        **extra,
    )


def synthetic_dataset_card(synthetic_set, repo_id: str | None = None) -> DatasetCard:
    """The dataset card of a :class:`~mdm_hf.synthetic.SyntheticSet`, from ``hub_cards/synthetic_dataset_card.md``.

    The card describes MDM's three levels (data, model and loss: ``docs/method.md §1``–``§3``), the provenance,
    the results table and how to load the set. Keys containing "token" never reach it
    (``synthetic_set.full_provenance()`` drops them).

    Args:
        repo_id: used in the "how to load" snippets; defaults to ``config.hub_dataset_id`` from the provenance,
            else a placeholder.
    """
    prov = synthetic_set.full_provenance()
    config = prov.get("config") or {}
    repo_id = repo_id or (config.get("hub_dataset_id") if isinstance(config, dict) else None)
    k, (_, h, w), results = len(synthetic_set), synthetic_set.image_shape, synthetic_set.results
    card_data = _synthetic_card_data(k, prov, synthetic_set.content_fingerprint())
    source = prov.get("source_dataset")
    return render_dataset_card(
        SYNTHETIC_TEMPLATE,
        card_data,
        pretty_name=card_data.pretty_name,
        num_pairs=k,
        pixel_shape=f"3, {h}, {w}",
        image_size=f"{h}×{w}",
        text_dim=synthetic_set.text_dim,
        image_mean=[round(float(v), 6) for v in synthetic_set.image_mean],
        image_std=[round(float(v), 6) for v in synthetic_set.image_std],
        source_link=_link(source, "datasets") if source else "an image–caption dataset",
        source_split=prov.get("source_split"),
        selection=prov.get("selection") or "unknown",
        has_expert_bank=bool(prov.get("expert_bank")),
        method=prov.get("method") or "MDM",
        text_encoder=prov.get("text_encoder") or prov.get("teacher") or "the teacher's text encoder",
        created_with=prov["created_with"],
        license_text=prov.get("license") or "unknown",
        provenance_rows=_provenance_rows(prov),
        config_yaml=yaml.safe_dump(config, sort_keys=False, allow_unicode=True).strip() or "{}",
        results_table=results_table(results.get("rows") or [], results.get("metric_names"))
        if results
        else None,
        results_protocol=(results or {}).get("protocol") or "not recorded",
        results_notes=(results or {}).get("notes"),
        repo_id=repo_id or "<namespace>/<name>",
    )


# ====================================================================== the expert bank's model card
# CLIP-like dual encoders are tagged zero-shot-image-classification on the Hub (openai/clip-*, google/siglip-*).
BANK_PIPELINE_TAG = "zero-shot-image-classification"
BANK_TAGS = ["mdm-hf", "dataset-distillation", "model-stock", "expert-bank", "vision-language"]
# A snapshot in the Hub cache: <cache>/models--<namespace>--<name>/snapshots/<commit>.
_CACHE_SNAPSHOT = re.compile(
    r"(?:^|[/\\])(?P<type>models|datasets)--(?P<id>[^/\\]+)[/\\]snapshots[/\\][0-9a-f]{40}"
)


def published_hub_id(name_or_path: str | None, repo_type: str = "model") -> str | None:
    """The Hub id a card may publish for ``name_or_path``: the id itself, the id of a Hub-cache snapshot path
    (``.../models--ns--name/snapshots/<commit>``), else None (a local checkpoint, never shown as a path)."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    if is_hub_reference(name):
        return name
    match = _CACHE_SNAPSHOT.search(name)
    if match and match["type"] == f"{repo_type}s":
        return match["id"].replace("--", "/")  # a repo name never holds "--" (hub.check_repo_id)
    return None


def _local_name(name: str) -> str:
    """A local source by its folder name (``_link`` would link a folder name that reads like a Hub id)."""
    return f"`{_cell(name)}` (local)"


def _bank_license(manifest: dict, anchor_license) -> tuple[str | list[str], str | None, str]:
    """(Hub licence id(s), ``license_name`` for ``other``, where it comes from): the anchor's card, else the
    training data's; ``unknown`` only with a warning."""
    for value, source in ((anchor_license, "the anchor's (from its model card)"),
                          (manifest["dataset"].get("license"), "the training data's")):  # fmt: skip
        if value:
            return (*hub_license(value), source)
    warnings.warn(
        "The expert bank's card says `license: unknown`: neither the anchor's model card nor the training data "
        "names a licence. Add `license:` to the card's YAML (README.md) before publishing.",
        stacklevel=3,
    )
    return "unknown", None, "unknown: neither the anchor's model card nor the training data names one"


def _stock_draws(manifest: dict) -> list[tuple[int, int]]:
    """Two (expert, 1-based epoch) checkpoints for the card's Model Stock example: the last epochs of the first
    two experts, or the last two epochs of a single expert."""
    experts = manifest["experts"]
    if len(experts) > 1:
        return [(0, len(experts[0]["epochs"])), (1, len(experts[1]["epochs"]))]
    last = len(experts[0]["epochs"]) if experts else 1
    return [(0, last), (0, max(last - 1, 1))]


def expert_bank_card(manifest: dict, repo_id: str, size_bytes: int, anchor_license=None) -> ModelCard:
    """The model card of an expert bank (the experts of ``docs/method.md §2``) from its ``manifest.json`` content.

    The YAML header follows the Hub's conventions for adapters: ``library_name: peft`` (LoRA banks),
    ``base_model`` the anchor's Hub id (never a local path: a local anchor is named by its folder only, as every
    published path is, :func:`mdm_hf.hub.redact_local_paths`), ``pipeline_tag``, ``datasets`` when the training
    data is on the Hub, and the licence of the anchor, else of the training data.

    Args:
        repo_id: the Hub id (or the local directory) shown in the "use it" snippets.
        size_bytes: the bank's size on disk, shown in the introduction.
        anchor_license: the ``license:`` of the anchor's model card, when known
            (:func:`mdm_hf.bank.anchor_license`).
    """
    anchor, kind, dataset = manifest["anchor"], manifest["kind"], manifest["dataset"]
    anchor_id = published_hub_id(anchor["name_or_path"], "model")
    dataset_id = published_hub_id(dataset["name"], "dataset")
    license_id, license_name, license_source = _bank_license(manifest, anchor_license)
    card_data = ModelCardData(
        license=license_id,
        license_name=license_name,
        # A full-weight bank holds partial state dicts that neither peft nor transformers load on their own.
        library_name="peft" if kind == "lora" else None,
        base_model=anchor_id,
        pipeline_tag=BANK_PIPELINE_TAG,
        datasets=[dataset_id] if dataset_id else None,
        tags=[*BANK_TAGS, manifest["family"], *(["lora"] if kind == "lora" else [])],
    )
    rows = []
    for expert in manifest["experts"]:
        for ep in expert["epochs"]:
            val = ep.get("validation") or {}
            rows.append([expert["name"], expert["seed"], ep["epoch"], f"{ep['train_loss']:.4f}",
                         *(f"{val[k]:.1f}" if k in val else "–" for k in ("ir@1", "tr@1", "mean"))])  # fmt: skip
    first = manifest["experts"][0] if manifest["experts"] else {"name": "expert-0", "epochs": [{"epoch": 1}]}
    last = first["epochs"][-1]
    published = redact_local_paths({"anchor": anchor["name_or_path"], "dataset": dataset["name"]})
    return render_model_card(
        BANK_TEMPLATE,
        card_data,
        repo_id=repo_id,
        anchor=anchor,
        anchor_ref=anchor_id or published["anchor"],
        anchor_on_hub=anchor_id is not None,
        anchor_link=_link(anchor_id, "models") if anchor_id else _local_name(published["anchor"]),
        dataset_link=_link(dataset_id, "datasets") if dataset_id else _local_name(published["dataset"]),
        kind=kind,
        family=manifest["family"],
        lora=manifest.get("lora"),
        num_experts=len(manifest["experts"]),
        num_epochs=manifest["num_epochs"],
        seeds=manifest["seeds"],
        dataset=dataset,
        first_expert=first["name"],
        first_checkpoint=last.get("path", f"{first['name']}/epoch-{last['epoch']}"),  # the bank's layout
        stock_draws=_stock_draws(manifest),
        rows=rows,
        size_mb=f"{size_bytes / 2**20:.1f}",
        license_id=license_id if isinstance(license_id, str) else ", ".join(license_id),
        license_source=license_source,
        training_yaml=yaml.safe_dump(redact_local_paths(manifest["training"]), sort_keys=True).strip(),
        created_with=manifest.get("created_with", "mdm-hf"),
    )


# ====================================================================== EmojiCaps
def emojicaps_card(card_vars: dict, num_images: int) -> DatasetCard:
    """The dataset card of an EmojiCaps build (:mod:`mdm_hf.emojicaps`); ``card_vars`` (with ``splits``) fill the
    template."""
    card_data = DatasetCardData(
        language="en",
        # Twemoji images are CC-BY 4.0, OpenMoji images CC-BY-SA 4.0: each image keeps its own licence.
        license=["cc-by-4.0", "cc-by-sa-4.0"],
        pretty_name="EmojiCaps",
        annotations_creators=["found"],
        language_creators=["found"],
        multilinguality="monolingual",
        source_datasets=["original"],
        size_categories=size_category(num_images),
        task_categories=["image-feature-extraction", "image-to-text", "zero-shot-image-classification"],
        tags=[
            "emoji",
            "image-text-retrieval",
            "image-captioning",
            "dataset-distillation",
            "twemoji",
            "openmoji",
        ],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": card_vars["data_files"][s]} for s in card_vars["splits"]],
            }
        ],
    )
    return render_dataset_card(EMOJICAPS_TEMPLATE, card_data, **card_vars)
