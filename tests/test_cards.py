"""mdm_hf.cards: the results table, links, and one citation of the paper in every card that cites it."""

from __future__ import annotations

import torch

from mdm_hf import cards
from mdm_hf.students.results import format_results_table
from mdm_hf.synthetic import SyntheticSet

BANK_MANIFEST = {
    "anchor": {"name_or_path": "openai/clip-vit-base-patch32", "revision": "abc", "num_parameters": 10,
               "weights_sha256": "ff"},
    "lora": None,
    "kind": "full",
    "family": "clip",
    "dataset": {"name": "nlphuji/flickr30k", "split": "train", "num_images": 3, "num_captions": 9,
                "validation_split": "validation"},
    "experts": [{"name": "expert-0", "seed": 0,
                 "epochs": [{"epoch": 1, "train_loss": 1.23456, "validation": {"ir@1": 1.25, "tr@1": 2.0}}]}],
    "num_epochs": 1,
    "seeds": [0],
    "training": {"lr": 1e-4},
    "created_with": "mdm-hf test",
}  # fmt: skip


def test_the_one_results_table_rounds_to_two_decimals():
    table = format_results_table(
        {
            "metric_names": ["ir@1", "tr@1", "mean"],  # "mean" is always the last column, never twice
            "rows": [
                {"method": "MDM", "pairs": 100, "ir@1": 8.125, "ir@1_std": 0.4, "tr@1": 10, "mean": 9.06,
                 "mean_std": 0.333, "seeds": 3},
                {"method": "a|b", "pairs": None, "ir@1": "n/a"},
            ],
        }
    )  # fmt: skip
    assert table.splitlines() == [
        "| Method | Pairs | IR@1 | TR@1 | Mean | Seeds |",
        "|---|---|---|---|---|---|",
        "| MDM | 100 | 8.12 ± 0.40 | 10.00 | 9.06 ± 0.33 | 3 |",
        "| a\\|b | all | n/a | – | – | – |",
    ]
    assert cards.results_table(
        [{"method": "MDM", "pairs": 100, "ir@1": 8.125, "ir@1_std": 0.4}], ["ir@1"]
    ) == (
        "| Method | Pairs | IR@1 | Mean | Seeds |\n|---|---|---|---|---|\n| MDM | 100 | 8.12 ± 0.40 | – | – |"
    )  # the plain-dict renderer the card uses is the same one
    default = format_results_table({"rows": []}).splitlines()[0]
    assert default == "| Method | Pairs | IR@1 | IR@5 | IR@10 | TR@1 | TR@5 | TR@10 | Mean | Seeds |"


def test_links_to_hub_ids_and_local_paths(tmp_path):
    assert cards._link("me/data", "datasets") == "[`me/data`](https://huggingface.co/datasets/me/data)"
    assert cards._link("openai/clip", "models") == "[`openai/clip`](https://huggingface.co/openai/clip)"
    assert cards._link(tmp_path, "models") == f"`{tmp_path}` (local)"
    assert cards._with_revision("x", "v1") == "x @ `v1`" and cards._with_revision("x", None) == "x"


def _tiny_set() -> SyntheticSet:
    return SyntheticSet(
        pixel_values=torch.zeros(2, 3, 4, 4),
        text_features=torch.zeros(2, 3),
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        captions=[["a"], ["b"]],
        source_indices=[0, 1],
        source_image_indices=[0, 1],
        provenance={"teacher": "openai/clip-vit-base-patch32"},
    )


def test_one_citation_in_the_dataset_card_and_the_bank_card(tmp_path):
    assert "Jeong, Jongoh and Kwon, Hoyong and Kim, Minseok and Yoon, Kuk-Jin" in cards.MDM_BIBTEX
    assert "2605.23482" in cards.MDM_BIBTEX and "2605.23482" in cards.MDM_REFERENCE
    dataset_card = cards.synthetic_dataset_card(_tiny_set(), "me/tiny").text
    bank_card = cards.expert_bank_card(BANK_MANIFEST, repo_id="me/bank", size_bytes=3 * 2**20).text
    for text in (dataset_card, bank_card):
        assert cards.MDM_BIBTEX in text and cards.MODEL_STOCK_BIBTEX in text
        assert cards.MDM_REFERENCE in text and cards.MODEL_STOCK_REFERENCE in text
        assert text.count("@inproceedings{jeong2026mdm") == 1
    assert 'load_dataset("me/tiny"' in dataset_card and "No evaluation results" in dataset_card
    assert 'load_expert_bank("me/bank", anchor)' in bank_card and "(3.0 MiB on disk)" in bank_card
    assert "| expert-0 | 0 | 1 | 1.2346 | 1.2 | 2.0 | – |" in bank_card


def test_to_card_is_the_cards_module_rendering():
    s = _tiny_set()
    assert str(s.to_card("me/tiny")) == str(cards.synthetic_dataset_card(s, "me/tiny"))
