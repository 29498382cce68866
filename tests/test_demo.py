"""The demo pipeline end to end at a tiny size: every stage runs offline and the outputs are what the README says."""

import json

import datasets
from huggingface_hub import DatasetCard

from mdm_hf.demo import DemoConfig, run_demo


def test_demo_pipeline_writes_a_loadable_synthetic_set_with_results(tmp_path, capsys):
    cfg = DemoConfig.quick(
        output_dir=str(tmp_path / "demo"), data_dir=str(tmp_path / "emojicaps"), max_concepts=60, image_size=16,
        anchor_hidden_size=32, anchor_layers=1, anchor_heads=2, anchor_steps=4, anchor_batch_size=32,
        expert_epochs=1, num_pairs=8, distill_steps=4, student_steps=4, student_eval_steps=2,
        methods=["mdm", "random"],
    )  # fmt: skip
    summary = run_demo(cfg)

    out = capsys.readouterr().out
    assert "push_to_hub" in out and str(tmp_path / "demo" / "synthetic") in out
    saved = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert saved["synthetic"] == summary["synthetic"]
    assert [r["method"] for r in saved["results"]["rows"]] == ["MDM", "Random"]
    assert all(r["pairs"] == 8 for r in saved["results"]["rows"])

    # datasets 5.2 caches local folders by their name: another test's ".../synthetic" would be served otherwise
    ds = datasets.load_dataset(summary["synthetic"], cache_dir=str(tmp_path / "hf-cache"))["train"]
    assert len(ds) == 8 and ds[0]["image"].size == (16, 16)
    card = DatasetCard.load(str(tmp_path / "demo" / "synthetic" / "README.md"))
    assert "dataset-distillation" in card.data.tags
    assert "| MDM |" in card.text and "| Random |" in card.text
    assert (tmp_path / "demo" / "synthetic" / "preview.png").exists()
    assert (tmp_path / "demo" / "experts" / "manifest.json").exists()

    # a second run reuses the anchor and the expert bank instead of training them again
    run_demo(cfg)
    assert "reusing the anchor" in capsys.readouterr().out
