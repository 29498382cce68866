"""mdm_hf.classifier_anchor: the paper-regime anchor (classifier-pretrained vision tower, frozen pretrained text
tower, fresh projections) builds, learns its labels and loads as a DualEncoder."""

import json

import datasets
import pytest
import torch
from accelerate.utils import set_seed
from transformers import AutoModel, AutoTokenizer, VisionTextDualEncoderModel

from mdm_hf import testing
from mdm_hf.anchor import build_anchor
from mdm_hf.classifier_anchor import ClassifierAnchorConfig, pretrain_classifier_anchor
from mdm_hf.models import DualEncoder


def _shapes() -> set[str]:
    return {r["captions"][0].split()[-1] for r in testing.toy_records(24, 2, 32)}


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory):
    """A tiny image-caption split with a class column (the shape each toy picture shows)."""
    directory = tmp_path_factory.mktemp("labelled")
    recs = testing.toy_records(24, 2, 32)
    ds = datasets.Dataset.from_dict(
        {"image": [r["image"] for r in recs], "caption": [r["captions"] for r in recs],
         "concept": [r["captions"][0].split()[-1] for r in recs]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string")),
                                    "concept": datasets.Value("string")}),
    )  # fmt: skip
    (directory / "data").mkdir()
    ds.to_parquet(str(directory / "data" / "pretrain-00000-of-00001.parquet"))
    return str(directory)


@pytest.fixture(scope="module")
def text_dir(tiny_model_dirs, tmp_path_factory):
    """A tiny pretrained BERT text tower with its tokenizer."""
    directory = tmp_path_factory.mktemp("bert")
    VisionTextDualEncoderModel.from_pretrained(tiny_model_dirs["dual_encoder"]).text_model.save_pretrained(
        directory
    )
    AutoTokenizer.from_pretrained(tiny_model_dirs["dual_encoder"]).save_pretrained(directory)
    return str(directory)


def _config(labelled_dir, text_dir, out, **kw):
    values = dict(
        dataset_name=labelled_dir, train_split="pretrain", text_model_name_or_path=text_dir, image_size=32,
        patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        projection_dim=16, num_train_epochs=15, per_device_train_batch_size=8, learning_rate=3e-3, warmup_ratio=0.0,
        output_dir=str(out), seed=3,
    )  # fmt: skip
    return ClassifierAnchorConfig(**{**values, **kw})


def test_classifier_anchor_learns_labels_and_keeps_text_tower_and_fresh_projections(
    labelled_dir, text_dir, tmp_path
):
    cfg = _config(labelled_dir, text_dir, tmp_path / "anchor")
    result = pretrain_classifier_anchor(cfg)
    assert result.final_loss < result.initial_loss - 20, (
        result.initial_loss,
        result.final_loss,
    )  # top-1 error %
    anchor = DualEncoder.from_pretrained(str(result.output_dir))
    assert anchor.family == "dual_encoder" and anchor.image_size == 32
    # the same seed builds the untrained anchor: projections and temperature equal it, the vision tower does not
    set_seed(cfg.seed)
    fresh = build_anchor(cfg)
    trained, initial = dict(anchor.model.named_parameters()), dict(fresh.model.named_parameters())
    for key in ("visual_projection.weight", "text_projection.weight", "logit_scale"):
        torch.testing.assert_close(trained[key], initial[key], msg=key)
    key = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(trained[key], initial[key])
    # the text tower is the pretrained one, untouched
    pretrained = dict(AutoModel.from_pretrained(text_dir).named_parameters())
    text = dict(anchor.model.text_model.named_parameters())
    assert pretrained.keys() == text.keys()
    for k in pretrained:
        torch.testing.assert_close(text[k], pretrained[k], msg=k)
    record = json.loads((result.output_dir / "anchor_training.json").read_text())
    assert record["kind"] == "classifier" and record["num_classes"] == len(_shapes())


def test_missing_label_column_is_named(labelled_dir, text_dir, tmp_path):
    with pytest.raises(ValueError, match="no column 'shape'.*--label_column"):
        pretrain_classifier_anchor(
            _config(labelled_dir, text_dir, tmp_path / "a", label_column="shape", num_train_epochs=1)
        )
    with pytest.raises(ValueError, match="label_smoothing"):
        _config(labelled_dir, text_dir, tmp_path / "b", label_smoothing=1.0)
