"""Hub cards rendered from the Jinja templates shipped in :mod:`mdm_hf.hub_cards`.

Templates live in ``hub_cards/`` at the repository root and are installed as the package ``mdm_hf.hub_cards``.
A template starts with ``---\\n{{ card_data }}\\n---`` (the YAML metadata that ``huggingface_hub`` renders from a
``DatasetCardData`` / ``ModelCardData``); every other ``{{ variable }}`` comes from the keyword arguments of
:func:`render_dataset_card` / :func:`render_model_card`.
"""

from __future__ import annotations

import importlib.resources

from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

__all__ = ["load_template", "render_dataset_card", "render_model_card", "available_templates"]

_PACKAGE = "mdm_hf.hub_cards"


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
    return DatasetCard.from_template(card_data, template_path=load_template(template_name), **variables)


def render_model_card(template_name: str, card_data: ModelCardData, **variables) -> ModelCard:
    """Render the model-card template ``template_name`` with ``card_data`` as YAML header and ``variables``."""
    return ModelCard.from_template(card_data, template_path=load_template(template_name), **variables)
