"""Students and their evaluation (mdm_hf.students): DSA augmentation, pixel-space conversion, both student tracks,
selection on validation with one test evaluation, reproducibility, the comparison table, the distiller's validation
hook, and the old mdm_hf.evaluation import path."""

from __future__ import annotations

import dataclasses
import json
import logging
import runpy
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mdm_hf.augment import AugmentParams, DiffAugment
from mdm_hf.data import embed_pairs
from mdm_hf.selection import joint_features
from mdm_hf.students import evaluator as student_evaluator
from mdm_hf.students import model as student_model
from mdm_hf.students import results as student_results
from mdm_hf.students import trainer as student_trainer
from mdm_hf.students.config import StudentConfig
from mdm_hf.students.evaluator import StudentEvaluator, evaluate_student, student_validation_fn
from mdm_hf.students.model import PixelSpace, convert_pixels
from mdm_hf.students.results import Comparison, StudentResult, format_results_table

REPO = Path(__file__).resolve().parents[1]
METRICS = ("ir@1", "ir@5", "ir@10", "tr@1", "tr@5", "tr@10", "mean")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread beats two threads contending for a shared 2-core machine (6x less CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(model_dir: str, dataset_dir: str, tmp_path: Path, **overrides) -> StudentConfig:
    values = dict(
        model_name_or_path=model_dir,
        dataset_name=dataset_dir,
        preset="small",
        max_steps=4,
        full_max_steps=4,
        eval_steps=2,
        per_device_train_batch_size=8,
        num_pairs=8,
        num_seeds=1,
        logging_steps=1,
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
    )
    values.update(overrides)
    return StudentConfig(**values)


@pytest.fixture(scope="module")
def clip_evaluator(tiny_clip_dir, tiny_dataset_dir, tmp_path_factory):
    return StudentEvaluator(
        small_config(tiny_clip_dir, tiny_dataset_dir, tmp_path_factory.mktemp("clip_eval"))
    )


def real_pairs_as_synthetic(evaluator: StudentEvaluator, k: int = 8, **provenance):
    """A SyntheticSet made of K real train pairs, in the teacher's pixel and text spaces (no distillation)."""
    from mdm_hf.synthetic import SyntheticSet

    train = evaluator.train_split()
    idx = torch.arange(0, 2 * k, 2)  # one caption of each of the first k images
    owners = train["caption_to_image"][idx]
    teacher_text = train["text_features"] if evaluator.text_encoder is evaluator.teacher else None
    return SyntheticSet(
        pixel_values=train["teacher_pixels"][owners].clone(),
        text_features=teacher_text[idx].clone(),
        image_mean=evaluator.teacher.image_mean,
        image_std=evaluator.teacher.image_std,
        captions=[[train["data"].captions[int(j)]] for j in idx],
        source_indices=idx.tolist(),
        source_image_indices=owners.tolist(),
        provenance={"teacher": evaluator.config.model_name_or_path, **provenance},
    )


# ============================================================================================ augmentation
def test_augmentation_is_deterministic_for_a_seed_and_differs_across_seeds():
    x = torch.randn(6, 3, 16, 16)
    a, b, c = (
        DiffAugment(seed=3, mode="all"),
        DiffAugment(seed=3, mode="all"),
        DiffAugment(seed=4, mode="all"),
    )
    first = [a(x), a(x)]
    assert torch.equal(first[0], b(x)) and torch.equal(first[1], b(x))  # the same sequence, call by call
    assert not torch.equal(first[0], first[1])  # the sequence moves on
    assert not torch.equal(first[0], c(x))
    torch.manual_seed(123)  # the global RNG plays no part
    a.reset()
    assert torch.equal(a(x), first[0])
    # siamese use: an explicit per-call seed gives the same transform to two batches
    assert torch.equal(a(x, seed=7), b(x, seed=7))


@pytest.mark.parametrize("mode", ["single", "all"])
def test_augmentation_is_differentiable_in_the_pixels(mode):
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    aug = DiffAugment(mode=mode, seed=0)
    for _ in range(6):  # single mode: several ops get drawn
        x.grad = None
        (aug(x) * torch.randn(4, 3, 16, 16)).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_single_mode_applies_one_op_and_none_is_identity():
    aug = DiffAugment(seed=0)
    drawn = {aug.sample_params(2, 8, 8).ops for _ in range(40)}
    assert all(len(ops) == 1 for ops in drawn) and len(drawn) == 6
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(DiffAugment("none")(x), x)
    with pytest.raises(ValueError, match="Unknown augmentation op"):
        DiffAugment("color_blur")


def test_geometric_ops_match_hand_computed_images():
    x = torch.randn(3, 3, 10, 12)
    aug = DiffAugment(seed=0)
    flipped = aug.apply(x, AugmentParams(ops=("flip",), flip=torch.tensor([True, False, True])))
    torch.testing.assert_close(flipped[0], x[0].flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(flipped[1], x[1], atol=1e-4, rtol=0)
    # shift (dx, dy) = (2, -1): dst[y - 1, x + 2] = src[y, x], zero padding
    shifted = aug.apply(x, AugmentParams(ops=("crop",), shift=torch.tensor([[2, -1], [0, 0], [0, 3]])))
    expected = torch.zeros_like(x[0])
    expected[:, 0:9, 2:12] = x[0][:, 1:10, 0:10]
    torch.testing.assert_close(shifted[0], expected, atol=1e-4, rtol=0)
    # a 90-degree rotation of a square image is a rot90 (either direction: the range is symmetric)
    sq = torch.randn(1, 3, 9, 9)
    rotated = aug.apply(sq, AugmentParams(ops=("rotate",), angle=torch.tensor([90.0])))[0]
    err = min((rotated - torch.rot90(sq[0], k, (-2, -1))).abs().max() for k in (1, -1))
    assert err < 1e-4


def test_color_and_cutout_match_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=g)
    b, s, c = torch.tensor([0.3, -0.2]), torch.tensor([1.5, 0.4]), torch.tensor([0.7, 1.2])
    out = DiffAugment(seed=0).apply(x, AugmentParams(ops=("color",), brightness=b, saturation=s, contrast=c))
    xn = x.numpy().astype(np.float64)
    for i in range(2):  # per sample, per pixel, with numpy
        y = xn[i] + b[i].item()
        gray = y.mean(axis=0, keepdims=True)
        y = gray + s[i].item() * (y - gray)
        y = y.mean() + c[i].item() * (y - y.mean())
        np.testing.assert_allclose(out[i].numpy(), y, atol=1e-5)
    # cutout 0.5 of 6 px: a 3x3 square starting one pixel before the centre
    ones = torch.ones(2, 1, 6, 6)
    centers = torch.tensor([[0, 0], [3, 2]])  # (x, y)
    cut = DiffAugment(seed=0).apply(ones, AugmentParams(ops=("cutout",), cutout_center=centers))
    assert cut[0, 0, :2, :2].sum() == 0 and cut[0].sum() == 36 - 4  # clipped at the corner: rows, cols {0, 1}
    assert cut[1, 0, 1:4, 2:5].sum() == 0 and cut[1].sum() == 36 - 9  # rows {1, 2, 3}, cols {2, 3, 4}


# ============================================================================================ pixel spaces
def test_pixel_conversion_is_exact_on_a_hand_case():
    src = PixelSpace.make([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], 2)
    dst = PixelSpace.make([0.1, 0.2, 0.3], [0.2, 0.25, 0.5], 2)
    x = torch.tensor([-1.0, 1.0, 0.0, 0.5]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)  # rgb 0, 1, 0.5, 0.75
    out = convert_pixels(x, src, dst)
    rgb = torch.tensor([0.0, 1.0, 0.5, 0.75]).view(2, 2)
    for ch, (m, s) in enumerate(zip(dst.mean, dst.std)):
        torch.testing.assert_close(out[0, ch], (rgb - m) / s)
    # shrinking 2x2 -> 1x1 (antialiased bilinear) averages the four pixels: rgb mean 0.5625
    one = convert_pixels(x, src, PixelSpace.make([0.0] * 3, [1.0] * 3, 1))
    torch.testing.assert_close(one, torch.full((1, 3, 1, 1), 0.5625))
    # identical spaces: the very same tensor (no float round trip)
    assert convert_pixels(x, src, src) is x
    # there and back again
    back = convert_pixels(convert_pixels(x, src, dst), dst, src)
    torch.testing.assert_close(back, x)


# ============================================================================================ students
def test_clip_student_has_fresh_head_by_default_and_keeps_pretrained_head_on_request(
    clip_evaluator, tiny_clip_dir
):
    fresh = clip_evaluator.build_student()
    teacher = clip_evaluator.teacher.model
    assert not torch.equal(fresh.text_projection.weight, teacher.text_projection.weight)
    torch.testing.assert_close(fresh.logit_scale, torch.tensor(1 / 0.07))
    assert fresh.log_logit_scale.requires_grad  # small preset: learnable temperature
    # the vision tower starts from the teacher's (anchor) weights
    for (n, p), q in zip(fresh.vision.model.named_parameters(), teacher.vision_model.parameters()):
        assert torch.equal(p, q), n
    cfg = dataclasses.replace(clip_evaluator.config, keep_pretrained_head=True)
    kept = StudentEvaluator(cfg, teacher=clip_evaluator.teacher).build_student()
    assert torch.equal(kept.text_projection.weight, teacher.text_projection.weight)
    assert torch.equal(kept.visual_projection.weight, teacher.visual_projection.weight)
    torch.testing.assert_close(kept.log_logit_scale, teacher.logit_scale.detach())


def test_clip_student_trains_and_reports_every_metric(clip_evaluator):
    run = clip_evaluator.train_student(clip_evaluator.pairs("random", 0), seed=0, method="random")
    steps = [h["step"] for h in run.history]
    assert steps == [0, 2, 4] and run.best_step in steps and run.steps == 4
    assert set(METRICS) <= set(run.validation) and all(0 <= run.validation[m] <= 100 for m in METRICS)
    assert run.validation["mean"] == max(h["mean"] for h in run.history)
    assert len(run.losses) == 4 and all(np.isfinite(entry["loss"]) for entry in run.losses)
    # the selected state is what the model now holds: scoring it again reproduces the best validation numbers
    assert student_evaluator.evaluate_split(run.model, clip_evaluator.validation) == run.validation


def test_same_seed_reproduces_the_same_numbers(clip_evaluator):
    first, second = clip_evaluator.run("random", 0), clip_evaluator.run("random", 0)
    for key in ("test", "validation", "validation_history", "train_loss", "best_step"):
        assert getattr(first, key) == getattr(second, key), key
    other = clip_evaluator.run("random", 1)
    assert other.train_loss != first.train_loss  # a different seed is a different student


def test_model_selection_never_looks_at_test(tiny_clip_dir, tiny_dataset_dir, tmp_path, monkeypatch):
    calls = []
    original = student_evaluator.evaluate_split

    def spy(model, split, batch_size=256):
        calls.append(split.name)
        return original(model, split, batch_size)

    monkeypatch.setattr(student_evaluator, "evaluate_split", spy)
    config = small_config(tiny_clip_dir, tiny_dataset_dir, tmp_path, method="herding", num_seeds=2)
    result = evaluate_student(config)
    assert calls.count("test") == 2  # once per student, with its selected state
    first_test = calls.index("test")
    assert (
        calls[:first_test] == ["validation"] * 3
    )  # steps 0, 2, 4 of seed 0, then its single test evaluation
    assert calls[first_test + 1 :] == ["validation"] * 3 + ["test"]
    assert isinstance(result, StudentResult) and result.method == "herding"
    row = result.row
    tests = [r.test["mean"] for r in result.runs]
    assert row.means["mean"] == pytest.approx(np.mean(tests)) and row.stds["mean"] == pytest.approx(
        np.std(tests, ddof=1)
    )
    assert row.seeds == 2 and row.label == "Herding" and row.pairs == 8
    saved = json.loads((tmp_path / "out" / "student_herding.json").read_text())
    assert list(saved) == ["method", "row", "protocol", "runs", "config", "environment"]
    assert saved["row"] == row.to_dict() and saved["row"]["method"] == "Herding"
    assert saved["row"]["mean"] == row.means["mean"] and saved["row"]["mean_std"] == row.stds["mean"]
    assert "validation_history" in saved["runs"][0]
    assert StudentResult.from_dict(saved).to_dict() == saved


def test_validation_hook_never_loads_test(
    tiny_clip_dir, tiny_dataset_dir, tmp_path, monkeypatch, clip_evaluator
):
    import mdm_hf.data

    loaded = []
    original = mdm_hf.data.load_image_caption_dataset

    def spy(name, split="train", **kwargs):
        loaded.append(split)
        return original(name, split, **kwargs)

    monkeypatch.setattr(mdm_hf.data, "load_image_caption_dataset", spy)
    synthetic = real_pairs_as_synthetic(clip_evaluator)
    hook = student_validation_fn(clip_evaluator.config, teacher=clip_evaluator.teacher, max_steps=2)
    metrics = hook(synthetic, 50)
    assert loaded == ["validation"]
    assert set(METRICS) <= set(metrics) and all(isinstance(v, float) for v in metrics.values())
    with pytest.raises(RuntimeError, match="validation-only"):
        _ = hook.evaluator.test


def test_synthetic_pairs_reach_the_student_like_the_real_pairs_they_came_from(clip_evaluator):
    synthetic = real_pairs_as_synthetic(clip_evaluator)
    pairs = clip_evaluator.synthetic_pairs(synthetic)
    train = clip_evaluator.train_split()
    for i, j in enumerate(synthetic.source_indices):
        real = train["images"][int(train["caption_to_image"][j])]
        assert torch.equal(pairs[i]["pixel_values"], real)
        assert torch.equal(pairs[i]["text_features"], train["text_features"][j])
    bad = dataclasses.replace(synthetic, text_features=torch.zeros(len(synthetic), 5))
    with pytest.raises(ValueError, match="another text space"):
        clip_evaluator.synthetic_pairs(bad)


def _save_tiny_resnet(directory: Path) -> str:
    """A tiny ResNet image backbone with its own processor (other mean/std, 24 px): a cross-architecture student."""
    from transformers import CLIPImageProcessorPil, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    ResNetModel(config).save_pretrained(directory)
    CLIPImageProcessorPil(
        size={"shortest_edge": 24},
        crop_size={"height": 24, "width": 24},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(directory)
    return str(directory)


def test_paper_track_cross_architecture_student(tiny_model_dirs, tiny_dataset_dir, tmp_path):
    """ResNet image tower (trained) + the teacher's frozen BERT text tower + a fresh text projection; paper
    preset (SGD, step decay x0.1, epochs, fixed tau) shortened to 4 epochs with the decay after epoch 2."""
    resnet = _save_tiny_resnet(tmp_path / "resnet")
    config = small_config(
        tiny_model_dirs["dual_encoder"],
        tiny_dataset_dir,
        tmp_path,
        track="paper",
        vision_model_name_or_path=resnet,
        preset="paper",
        max_steps=None,
        full_max_steps=None,
        eval_steps=None,
        num_train_epochs=4.0,
        lr_decay_epochs=[2.0],
        eval_epochs=1.0,
        method="kcenter",
    )
    assert (config.optimizer, config.learn_temperature, config.lr_scheduler_type) == ("sgd", False, "step")
    evaluator = StudentEvaluator(config)
    assert evaluator.student_space == PixelSpace.make([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 24)
    assert evaluator.validation.images.shape[-2:] == (24, 24)
    student = evaluator.build_student()
    assert type(student.vision.model).__name__ == "ResNetModel"
    assert isinstance(student.visual_projection, torch.nn.Identity)  # paper: the text side projects
    assert isinstance(
        student.text_projection, student_model.ProjectionHead
    )  # the paper track's MLP text head
    assert student.text_projection.projection.weight.shape == (16, evaluator.teacher.text_feature_dim)
    assert not student.log_logit_scale.requires_grad  # tau fixed at 0.07
    record = evaluator.run("kcenter", 0)
    assert record.steps == 4 and [h["step"] for h in record.validation_history] == [0, 1, 2, 3, 4]
    lrs = [entry["learning_rate"] for entry in record.train_loss]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.01)  # x0.1 after epoch 2
    assert all(0 <= record.test[m] <= 100 for m in METRICS)
    with pytest.raises(ValueError, match="paper track trains an image backbone"):
        StudentEvaluator(dataclasses.replace(config, vision_model_name_or_path=None))


def test_siglip_student_and_a_separate_text_encoder(tiny_model_dirs, tiny_dataset_dir, tmp_path):
    siglip = small_config(tiny_model_dirs["siglip"], tiny_dataset_dir, tmp_path, keep_pretrained_head=True)
    evaluator = StudentEvaluator(siglip)
    student = evaluator.build_student()
    assert isinstance(student.visual_projection, torch.nn.Identity)  # SigLIP's P_v is the identity
    run = evaluator.train_student(evaluator.pairs("random", 0), seed=0, max_steps=2)
    assert run.steps == 2 and np.isfinite(run.validation["mean"])

    # A student with its own frozen text encoder trains on the set's nearest real captions, not on the features.
    from transformers import AutoTokenizer, VisionTextDualEncoderModel

    text_dir = tmp_path / "bert"
    dual = VisionTextDualEncoderModel.from_pretrained(tiny_model_dirs["dual_encoder"])
    dual.text_model.save_pretrained(text_dir)
    AutoTokenizer.from_pretrained(tiny_model_dirs["dual_encoder"]).save_pretrained(text_dir)
    config = small_config(
        tiny_model_dirs["dual_encoder"], tiny_dataset_dir, tmp_path, text_model_name_or_path=str(text_dir)
    )
    own_text = StudentEvaluator(config)
    synthetic = real_pairs_as_synthetic(
        StudentEvaluator(dataclasses.replace(config, text_model_name_or_path=None))
    )
    pairs = own_text.synthetic_pairs(synthetic)
    expected = own_text.text_encoder.encode_text_features([c[0] for c in synthetic.captions])
    torch.testing.assert_close(pairs.text_features, expected)
    tokens = own_text.text_encoder.tokenizer(synthetic.captions[0], return_tensors="pt")
    cls = own_text.text_encoder.model(**tokens).last_hidden_state[0, 0]
    torch.testing.assert_close(expected[0], cls)  # CLS pooling by default


def test_compare_methods_prints_one_table_from_the_recipe(
    clip_evaluator, tiny_clip_dir, tiny_dataset_dir, tmp_path, capsys, monkeypatch
):
    """The recipe's YAML still says ``methods: [mdm, ...]``: the deprecated alias runs the synthetic set, whose row
    is labelled with the distiller its provenance names."""
    synthetic_dir = tmp_path / "synthetic"
    real_pairs_as_synthetic(clip_evaluator, method="MDM").save_pretrained(synthetic_dir)
    argv = [
        "evaluate_student.py",
        "--config", str(REPO / "recipes" / "configs" / "evaluate_tiny.yaml"),
        "--model_name_or_path", tiny_clip_dir,
        "--dataset_name", tiny_dataset_dir,
        "--synthetic", str(synthetic_dir),
        "--output_dir", str(tmp_path / "cmp"),
        "--cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "recipes" / "evaluate_student.py"), run_name="__main__")
    assert done.value.code == 0
    printed = capsys.readouterr().out
    for label in (
        "| MDM | 8 |",
        "| Random | 8 |",
        "| Herding | 8 |",
        "| K-Center | 8 |",
        "| Full train set | 48 |",
    ):
        assert label in printed, printed
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["MDM", "Random", "Herding", "K-Center", "Full train set"]
    assert (
        "No evaluation results were recorded" in (synthetic_dir / "README.md").read_text()
    )  # not asked to update
    assert list(saved["runs"]) == ["synthetic", "random", "herding", "kcenter", "full"]
    assert all(len(saved["runs"][m]) == 1 for m in ("synthetic", "random", "herding", "kcenter", "full"))
    assert list(saved) == ["protocol", "metric_names", "rows", "notes", "runs", "config", "environment"]
    assert (tmp_path / "cmp" / "comparison.md").read_text().strip() == format_results_table(saved)
    assert Comparison.from_dict(saved).to_dict() == saved
    assert not (tmp_path / "cmp" / "students").exists()  # the Trainer saved nothing


def test_results_plug_into_the_synthetic_set_card(clip_evaluator, tmp_path):
    results = {
        "protocol": "p",
        "metric_names": list(METRICS),
        "rows": [
            {
                "method": "MDM",
                "pairs": 8,
                **{m: 10.0 for m in METRICS},
                **{f"{m}_std": 1.0 for m in METRICS},
                "seeds": 2,
            }
        ],
        "notes": "n",
        "runs": {"mdm": []},
    }
    table = format_results_table(results)
    assert table.splitlines()[2] == "| MDM | 8 | " + " | ".join(["10.00 ± 1.00"] * 7) + " | 2 |"
    synthetic = real_pairs_as_synthetic(clip_evaluator)
    synthetic.results = student_results.card_results(results)
    card = str(synthetic.to_card())
    assert "| MDM | 8 |" in card and "runs" not in synthetic.results
    typed = Comparison.from_dict(results)  # the typed result gives the same card results and table
    assert student_results.card_results(typed) == synthetic.results and format_results_table(typed) == table


class _FakeSet:
    def __len__(self) -> int:
        return 8


def test_bad_configurations_are_explained(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    with pytest.raises(ValueError, match=r"preset='fast' \(expected one of 'paper', 'small'\)"):
        small_config(tiny_clip_dir, tiny_dataset_dir, tmp_path, preset="fast")
    with pytest.raises(ValueError, match=r"method='forgetting' \(expected one of 'synthetic', 'random'"):
        small_config(tiny_clip_dir, tiny_dataset_dir, tmp_path, method="forgetting")
    with pytest.raises(ValueError, match="keep_pretrained_head"):
        small_config(tiny_clip_dir, tiny_dataset_dir, tmp_path, keep_pretrained_head=True, track="paper")
    config = small_config(tiny_clip_dir, tiny_dataset_dir, tmp_path, num_pairs=None)
    with pytest.raises(ValueError, match="only comparable at the same K"):
        StudentEvaluator(dataclasses.replace(config, num_pairs=3)).pairs("synthetic", 0, synthetic=_FakeSet())
    with pytest.raises(ValueError, match="only comparable at the same K"), pytest.warns(DeprecationWarning):
        StudentEvaluator(dataclasses.replace(config, num_pairs=3)).pairs("mdm", 0, synthetic=_FakeSet())
    with pytest.raises(ValueError, match="needs a synthetic set"):
        StudentEvaluator(config).load_synthetic()
    with pytest.raises(ValueError, match="--num_pairs"):
        StudentEvaluator(config).budget()


def test_student_logit_scale_is_exponentiated_once():
    student = student_model.StudentModel(torch.nn.Flatten(), 12, 5, 4, temperature=0.05)
    img, txt = torch.randn(3, 3, 2, 2), torch.randn(3, 5)
    zi, zt = student(img, txt)
    torch.testing.assert_close(zi.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(zt, F.normalize(txt @ student.text_projection.weight.T, dim=-1))
    torch.testing.assert_close(student.logit_scale, torch.tensor(20.0))


def test_projection_head_matches_its_formula():
    torch.manual_seed(0)
    head = student_model.ProjectionHead(5, 4).eval()  # eval: dropout off
    x = torch.randn(3, 5)
    p = x @ head.projection.weight.T + head.projection.bias
    h = p + (F.gelu(p) @ head.fc.weight.T + head.fc.bias)
    expected = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(head(x), expected * head.norm.weight + head.norm.bias)


def test_vision_backbone_from_an_inline_config_on_the_clip_track(clip_evaluator):
    resnet = '{"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 12], "depths": [1, 1]}'
    config = dataclasses.replace(clip_evaluator.config, vision_config=resnet)
    evaluator = StudentEvaluator(config, teacher=clip_evaluator.teacher)
    student = evaluator.build_student()
    assert type(student.vision.model).__name__ == "ResNetModel" and evaluator.vision_dim == 12
    assert student.visual_projection.weight.shape == (24, 12)  # clip track: fresh P_v into the teacher's 24-d
    with torch.no_grad():
        zv, zt = student(evaluator.validation.images[:3], evaluator.validation.text_features[:3])
    assert zv.shape == zt.shape == (3, 24)


def test_large_splits_are_decoded_lazily_with_identical_results(clip_evaluator):
    config = dataclasses.replace(clip_evaluator.config, max_cached_images=0)
    lazy = StudentEvaluator(config, teacher=clip_evaluator.teacher)
    assert isinstance(lazy.validation.images, student_trainer.LazyImages)
    torch.testing.assert_close(lazy.validation.images[3], clip_evaluator.validation.images[3])
    torch.manual_seed(0)
    student = clip_evaluator.build_student()
    evaluate_split = student_evaluator.evaluate_split
    assert evaluate_split(student, lazy.validation, batch_size=3) == evaluate_split(
        student, clip_evaluator.validation
    )
    torch.testing.assert_close(lazy.joint_features(), clip_evaluator.joint_features())


def test_distiller_selects_its_synthetic_set_with_the_student_hook(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    from mdm_hf.config import MDMConfig
    from mdm_hf.distill import MDMDistiller

    mdm = MDMConfig(
        model_name_or_path=tiny_clip_dir, dataset_name=tiny_dataset_dir, num_pairs=8, max_steps=4,
        real_batch_size=16, syn_batch_size=8, lr_pixels=10.0, lr_text=10.0, eval_steps=2, save_steps=0,
        output_dir=str(tmp_path / "distill"), cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    hook = student_validation_fn(
        small_config(tiny_clip_dir, tiny_dataset_dir, tmp_path, num_pairs=None), max_steps=2
    )
    distiller = MDMDistiller(mdm, validation_fn=hook)
    distiller.distill()
    history = distiller.state.history
    assert [h["step"] for h in history] == [0, 2, 4]  # eval_on_start: the initial coreset is scored too
    assert all(0 <= h["mean"] <= 100 and "ir@1" in h for h in history)
    assert hook.evaluator._test is None  # the test split was never loaded


def test_coreset_features_are_the_teachers_joint_features_of_every_pair(clip_evaluator):
    """The evaluator's coreset features come from data.embed_pairs; all pairs embedded at once give the same."""
    train, teacher = clip_evaluator.train_split(), clip_evaluator.teacher
    with torch.no_grad():
        zv = teacher.image_embeds(train["teacher_pixels"])[train["caption_to_image"]]
        zt = teacher.project_text(train["text_features"])
    torch.testing.assert_close(clip_evaluator.joint_features(), joint_features(zv, zt))
    via_embed_pairs = joint_features(
        *embed_pairs(teacher, train["data"], train["text_features"], train["teacher_pixels"])
    )
    assert torch.equal(clip_evaluator.joint_features(), via_embed_pairs)


def test_mdm_is_a_deprecated_alias_of_synthetic(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    with pytest.warns(DeprecationWarning, match="'mdm' is deprecated"):
        config = small_config(
            tiny_clip_dir, tiny_dataset_dir, tmp_path, method="mdm", methods=["mdm", "random"]
        )
    assert config.method == "synthetic" and config.methods == ["synthetic", "random"]
    assert config.to_dict()["method"] == "synthetic"
    with pytest.raises(ValueError, match="methods contains 'forgetting'"):
        small_config(tiny_clip_dir, tiny_dataset_dir, tmp_path, methods=["random", "forgetting"])


def test_the_old_import_paths_still_work():
    """``mdm_hf.evaluation`` is the documented home of retrieval_metrics and re-exports the student API;
    ``mdm_hf.students`` (now a package) still gives the student models."""
    from mdm_hf import evaluation, retrieval, students
    from mdm_hf.evaluation import retrieval_metrics
    from mdm_hf.students import PixelSpace as package_pixel_space
    from mdm_hf.students import ProjectionHead, StudentModel

    assert retrieval_metrics is retrieval.retrieval_metrics
    new_homes = {
        "StudentConfig": StudentConfig, "StudentEvaluator": StudentEvaluator, "evaluate_student": evaluate_student,
        "compare_methods": student_evaluator.compare_methods, "student_validation_fn": student_validation_fn,
        "card_results": student_results.card_results, "format_results_table": format_results_table,
        "PixelSpace": PixelSpace, "convert_pixels": convert_pixels,
        "StudentModel": StudentModel, "StudentTrainer": student_trainer.StudentTrainer,
        "ValidationSelectionCallback": student_trainer.ValidationSelectionCallback,
    }  # fmt: skip
    for name, obj in new_homes.items():
        assert name in evaluation.__all__ and getattr(evaluation, name) is obj, name
    assert "synthetic" in evaluation.METHODS and evaluation.METRIC_NAMES == student_results.METRIC_NAMES
    assert package_pixel_space is PixelSpace and ProjectionHead is student_model.ProjectionHead
    assert hasattr(students, "__path__")  # a package, no longer the students.py module
    with pytest.warns(DeprecationWarning, match="FeaturePairDataset"):
        assert evaluation.PairDataset is student_trainer.FeaturePairDataset


def test_evaluate_update_card_writes_the_results_into_the_set(
    clip_evaluator, tiny_clip_dir, tiny_dataset_dir, tmp_path
):
    from mdm_hf.cli import evaluate_main
    from mdm_hf.synthetic import SyntheticSet

    synthetic_dir = tmp_path / "synthetic"
    real_pairs_as_synthetic(clip_evaluator, method="MDM").save_pretrained(synthetic_dir)
    argv = ["--config", str(REPO / "recipes" / "configs" / "evaluate_tiny.yaml"), "--model_name_or_path", tiny_clip_dir,
            "--dataset_name", tiny_dataset_dir, "--synthetic", str(synthetic_dir), "--methods", "synthetic", "random",
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "eval"),
            "--update_card", "true"]  # fmt: skip
    assert evaluate_main(argv) == 0
    card = (synthetic_dir / "README.md").read_text()
    assert (
        "| MDM | 8 |" in card
        and "| Random | 8 |" in card
        and "No evaluation results were recorded" not in card
    )
    assert [r["method"] for r in SyntheticSet.from_pretrained(synthetic_dir).results["rows"]] == [
        "MDM",
        "Random",
    ]
    with pytest.raises(ValueError, match="--update_card needs --synthetic to be a local folder"):
        evaluate_main([*argv[:-4], "--synthetic", "user/remote-set", "--update_card", "true"])


# ============================================================================================ TrainingArguments names
def test_old_names_are_deprecated_aliases_of_the_training_arguments_names(
    tiny_clip_dir, tiny_dataset_dir, tmp_path, caplog
):
    from mdm_hf.config import parse_dataclass_args

    with caplog.at_level(logging.WARNING, logger="mdm_hf"):
        config = small_config(tiny_clip_dir, tiny_dataset_dir, tmp_path, per_device_train_batch_size=None,
                              batch_size=4, eval_batch_size=32, lr_scheduler="cosine")  # fmt: skip
    assert (config.per_device_train_batch_size, config.per_device_eval_batch_size, config.lr_scheduler_type) == (
        4, 32, "cosine",
    )  # fmt: skip
    for old in ("batch_size", "eval_batch_size", "lr_scheduler"):
        assert f"--{old} is deprecated" in caplog.text, old
    assert not set(config.deprecated_fields) & set(config.to_dict())  # results record the current names only
    # resolved once: dataclasses.replace (which runs __post_init__ again) sees no alias, hence no conflict
    assert dataclasses.replace(config, seed=1).per_device_train_batch_size == 4
    with pytest.raises(ValueError, match="deprecated alias of --per_device_train_batch_size"):
        small_config(tiny_clip_dir, tiny_dataset_dir, tmp_path, batch_size=4)  # small_config gives 8 as well

    # the command line and YAML files keep the old spellings working too
    common = ["--model_name_or_path", tiny_clip_dir, "--dataset_name", tiny_dataset_dir]
    parsed = parse_dataclass_args(StudentConfig, [*common, "--batch_size", "4", "--lr_scheduler", "step"])
    assert (parsed.per_device_train_batch_size, parsed.lr_scheduler_type) == (4, "step")
    old_yaml = tmp_path / "old.yaml"
    old_yaml.write_text("preset: small\nbatch_size: 16\neval_batch_size: 64\n")
    parsed = parse_dataclass_args(StudentConfig, ["--config", str(old_yaml), *common])
    assert (parsed.per_device_train_batch_size, parsed.per_device_eval_batch_size) == (16, 64)

    # --progress meant "show the bars": it is the opposite of --disable_tqdm, not an alias of it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mdm_hf"):
        assert parse_dataclass_args(StudentConfig, [*common, "--progress"]).disable_tqdm is False
        assert parse_dataclass_args(StudentConfig, [*common, "--progress", "false"]).disable_tqdm is True
    assert "--progress is deprecated" in caplog.text
    assert parse_dataclass_args(StudentConfig, [*common, "--disable_tqdm"]).disable_tqdm is True
    assert parse_dataclass_args(StudentConfig, common).disable_tqdm is None
    with pytest.raises(ValueError, match="--progress=True and --disable_tqdm=True disagree"):
        parse_dataclass_args(StudentConfig, [*common, "--progress", "--disable_tqdm"])


def _choices(annotation) -> tuple | None:
    """The values of a Literal annotation (optionally ``| None``), else None."""
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def test_help_lists_every_choice_and_the_presets_defaults(capsys):
    from mdm_hf.config import parse_dataclass_args
    from mdm_hf.students.config import METHODS, PRESETS

    hints = typing.get_type_hints(StudentConfig)
    literal = {name: _choices(hint) for name, hint in hints.items() if _choices(hint)}
    fixed = {"method", "track", "text_source", "text_model_pooling", "text_head", "optimizer", "lr_scheduler_type",
             "augment_mode", "preset", "text_pooling"}  # fmt: skip
    assert fixed <= set(literal)
    assert literal["method"] == (*METHODS, "mdm") and set(literal["preset"]) == set(PRESETS)
    with pytest.raises(SystemExit) as done:
        parse_dataclass_args(StudentConfig, ["--help"], prog="mdm-hf evaluate")
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, choices in literal.items():
        assert f"--{name} {{{','.join(map(str, choices))}}}" in text, name
    # the preset-filled fields show what each preset gives them, under their TrainingArguments names
    assert (
        "--per_device_train_batch_size" in text and "Default from --preset (paper: 256; small: 128)" in text
    )
    assert "Default from --preset (paper: step; small: constant)" in text
    assert "Deprecated alias of --lr_scheduler_type" in text
    with pytest.raises(SystemExit):  # refused while the line is parsed ...
        parse_dataclass_args(StudentConfig, ["--optimizer", "rmsprop"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(
        ValueError, match=r"optimizer='rmsprop' \(expected one of 'sgd', 'adamw', 'adam' or None\)"
    ):
        StudentConfig(optimizer="rmsprop")  # ... and by the Python API


def test_report_to_logging_steps_and_progress_reach_the_trainer(
    clip_evaluator, tmp_path, monkeypatch, capsys
):
    import transformers

    def arguments(**changes):
        cfg = dataclasses.replace(clip_evaluator.config, **changes)
        return student_trainer._training_arguments(cfg, str(tmp_path / "scratch"), 8, 4, 0, True)

    args = arguments(report_to="tensorboard", logging_steps=3, disable_tqdm=True)
    assert (args.report_to, args.logging_steps, args.disable_tqdm) == (["tensorboard"], 3, True)
    assert (
        args.eval_strategy == "no"
        and args.per_device_eval_batch_size == clip_evaluator.config.per_device_eval_batch_size
    )
    default = arguments()
    assert default.report_to == [] and default.logging_steps == 1
    # disable_tqdm=None is transformers' own default: bars shown unless its verbosity is above warning
    assert default.disable_tqdm is (transformers.logging.get_verbosity() > logging.WARNING)

    # the distiller's validation students hide their bars unless asked; evaluate's students follow the config
    seen = []
    original = student_evaluator.fit_student

    def spy(*args, **kwargs):
        seen.append(kwargs["disable_tqdm"])
        return original(*args, **kwargs)

    monkeypatch.setattr(student_evaluator, "fit_student", spy)
    clip_evaluator.train_student(clip_evaluator.pairs("random", 0), seed=0, method="random", max_steps=1)
    synthetic = real_pairs_as_synthetic(clip_evaluator)
    student_validation_fn(clip_evaluator.config, teacher=clip_evaluator.teacher, max_steps=1)(synthetic, 0)
    shown = dataclasses.replace(clip_evaluator.config, disable_tqdm=False)
    student_validation_fn(shown, teacher=clip_evaluator.teacher, max_steps=1)(synthetic, 0)
    assert seen == [None, True, False]

    # several students: one bar over them instead of a Trainer bar each; one student: the Trainer's bar
    seen.clear()
    capsys.readouterr()
    two = dataclasses.replace(
        clip_evaluator.config, method="random", num_seeds=2, max_steps=1, output_dir=None
    )
    evaluate_student(two, teacher=clip_evaluator.teacher)
    assert seen == [True, True] and "students: 100%" in capsys.readouterr().err
    evaluate_student(dataclasses.replace(two, num_seeds=1), teacher=clip_evaluator.teacher)
    assert seen == [True, True, None] and "students:" not in capsys.readouterr().err


def test_report_to_tensorboard_logs_the_loss_and_the_validation_scores(clip_evaluator, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = dataclasses.replace(
        clip_evaluator.config, report_to="tensorboard", output_dir=str(tmp_path / "out")
    )
    evaluator = StudentEvaluator(config, teacher=clip_evaluator.teacher)
    run = evaluator.train_student(evaluator.pairs("random", 0), seed=0, method="random")
    run_dir = tmp_path / "out" / "students" / "random-seed0"
    events = sorted(run_dir.rglob("events.out.tfevents.*"))
    assert events and all(p.relative_to(run_dir).parts[0] == "runs" for p in events)
    logged = EventAccumulator(str(events[0].parent))
    logged.Reload()
    assert {"train/loss", "eval/mean", "eval/ir@1"} <= set(logged.Tags()["scalars"])
    assert (
        [e.step for e in logged.Scalars("train/loss")]
        == [entry["step"] for entry in run.losses]
        == [1, 2, 3, 4]
    )
    scores = logged.Scalars("eval/mean")
    assert [e.step for e in scores] == [h["step"] for h in run.history] == [0, 2, 4]
    assert [e.value for e in scores] == pytest.approx([h["mean"] for h in run.history])
    assert not (run_dir / "config.json").exists()  # logged, not saved: --save_students is off


# ============================================================================================ saved students
def assert_no_pickle(directory: Path) -> None:
    """No file that ``torch.load`` / ``pickle`` would read: no .bin / .pt, no pickle or torch zip signature."""
    for path in directory.rglob("*"):
        if path.is_file():
            assert path.suffix not in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"), path
            head = path.read_bytes()[:2]
            assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), path
            assert head != b"PK", path  # torch.save's zip archive


def test_saved_students_load_with_automodel_and_give_the_same_embeddings(clip_evaluator, tmp_path):
    """--save_students: a CLIP-family student is a CLIPModel (AutoModel and CLIPModel load it), with its tokenizer and
    image processor, safetensors only; its image and text embeddings are the student's."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

    from mdm_hf.models import DualEncoder

    config = dataclasses.replace(clip_evaluator.config, save_students=True, output_dir=str(tmp_path / "out"))
    evaluator = StudentEvaluator(config, teacher=clip_evaluator.teacher)
    run = evaluator.train_student(evaluator.pairs("random", 0), seed=0, method="random", max_steps=2)
    saved = tmp_path / "out" / "students" / "random-seed0"
    files = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json", "README.md",
            "mdm_student.json"} <= files  # fmt: skip
    assert_no_pickle(saved)
    info = json.loads((saved / "mdm_student.json").read_text())
    assert (info["layout"], info["method"], info["seed"], info["best_step"]) == (
        "CLIPModel",
        "random",
        0,
        run.best_step,
    )
    assert "AutoModel.from_pretrained" in (saved / "README.md").read_text()

    train = evaluator.train_split()["data"]
    captions = list(train.captions[:5])
    images = evaluator.validation.images[:4]
    student = run.model.eval()
    with torch.no_grad():
        expected_images = student.encode_image(images)
        expected_texts = student.encode_text(evaluator.teacher.encode_text_features(captions))
        # the saved tokenizer truncates at the text tower's length (the teacher's needed max_length)
        tokens = AutoTokenizer.from_pretrained(saved)(
            captions, padding=True, truncation=True, return_tensors="pt"
        )
        for model in (AutoModel.from_pretrained(saved), CLIPModel.from_pretrained(saved)):
            assert type(model) is CLIPModel
            zv = F.normalize(model.get_image_features(pixel_values=images).pooler_output, dim=-1)
            zt = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
            torch.testing.assert_close(zv, expected_images, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(zt, expected_texts, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model.logit_scale.exp(), student.logit_scale.detach())
    # the processor gives the pixels the student was scored on, and mdm-hf can use the student as a teacher
    image = train.image(0)
    pixels = AutoImageProcessor.from_pretrained(saved)(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, evaluator.teacher.preprocess_images([image]))
    as_teacher = DualEncoder.from_pretrained(str(saved))
    torch.testing.assert_close(as_teacher.image_embeds(images), expected_images, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family, keep_head, layout",
    [("dual_encoder", False, "VisionTextDualEncoderModel"), ("siglip", True, "SiglipModel")],
)
def test_other_dual_encoder_students_are_saved_as_their_transformers_class(
    family, keep_head, layout, tiny_model_dirs, tiny_dataset_dir, tmp_path
):
    """A VisionTextDualEncoder student (mean-pooled MiniLM-style text tower, recorded as mdm_text_pooling) and a
    SigLIP student without a visual projection: AutoModel loads each, with the student's embeddings."""
    from transformers import AutoModel, AutoTokenizer

    from mdm_hf.models import DualEncoder

    config = small_config(tiny_model_dirs[family], tiny_dataset_dir, tmp_path, keep_pretrained_head=keep_head,
                          save_students=True)  # fmt: skip
    evaluator = StudentEvaluator(config)
    torch.manual_seed(0)
    student = evaluator.build_student().eval()
    run = student_trainer.StudentRun(student, 0, {"mean": 0.0}, [], [], 0, 0.0)
    saved = evaluator.save_student(run, "random", 0, pairs=8)
    assert_no_pickle(saved)
    model = AutoModel.from_pretrained(saved)
    assert type(model).__name__ == layout and model.config.mdm_text_pooling == evaluator.teacher.text_pooling
    captions = list(evaluator.train_split()["data"].captions[:5])
    images = evaluator.validation.images[:4]
    with torch.no_grad():
        expected_texts = student.encode_text(evaluator.teacher.encode_text_features(captions))
        zv = F.normalize(model.get_image_features(pixel_values=images).pooler_output, dim=-1)
        torch.testing.assert_close(zv, student.encode_image(images), atol=1e-5, rtol=1e-5)
        tokenizer = AutoTokenizer.from_pretrained(saved)
        if layout == "SiglipModel":  # SigLIP's text: padded to max_length, no attention mask
            length = model.config.text_config.max_position_embeddings
            ids = tokenizer(
                captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            )
            assert tokenizer.model_max_length == length
            zt = model.get_text_features(input_ids=ids["input_ids"]).pooler_output
        else:  # mean pooling with plain transformers, then the text projection
            tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
            hidden = model.text_model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).float()
            zt = model.text_projection((hidden * mask).sum(1) / mask.sum(1))
        torch.testing.assert_close(F.normalize(zt, dim=-1), expected_texts, atol=1e-5, rtol=1e-5)
        # mdm-hf's own loader applies the recorded pooling
        as_teacher = DualEncoder.from_pretrained(str(saved))
        torch.testing.assert_close(
            as_teacher.project_text(as_teacher.encode_text_features(captions)),
            expected_texts,
            atol=1e-5,
            rtol=1e-5,
        )


def test_a_student_no_transformers_class_represents_is_saved_as_its_state_dict(
    clip_evaluator, tmp_path, caplog
):
    """A ResNet image backbone has no single pooled feature size for a transformers dual encoder's projection: the
    student is saved as its state dict (safetensors), with a warning saying why, and rebuilds exactly."""
    from safetensors.torch import load_file

    resnet = '{"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 12], "depths": [1, 1]}'
    config = dataclasses.replace(clip_evaluator.config, vision_config=resnet, save_students=True,
                                 output_dir=str(tmp_path / "out"))  # fmt: skip
    evaluator = StudentEvaluator(config, teacher=clip_evaluator.teacher)
    torch.manual_seed(0)
    student = evaluator.build_student().eval()
    with caplog.at_level(logging.WARNING, logger="mdm_hf"):
        saved = evaluator.save_student(
            student_trainer.StudentRun(student, 0, {}, [], [], 0, 0.0), "kcenter", 1
        )
    assert "as a state dict" in caplog.text and "no single pooled feature size" in caplog.text
    assert saved == tmp_path / "out" / "students" / "kcenter-seed1"
    assert not (saved / "config.json").exists() and (saved / "tokenizer_config.json").exists()
    assert_no_pickle(saved)
    assert json.loads((saved / "mdm_student.json").read_text())["layout"] == "StudentModel"
    rebuilt = evaluator.build_student().eval()
    rebuilt.load_state_dict(load_file(saved / "student.safetensors"))
    images = evaluator.validation.images[:3]
    with torch.no_grad():
        assert torch.equal(rebuilt.encode_image(images), student.encode_image(images))


# ============================================================================================ the Hub
def test_evaluate_push_to_hub_uploads_the_set_with_its_results(
    clip_evaluator, tiny_clip_dir, tiny_dataset_dir, tmp_path, monkeypatch
):
    from mdm_hf import testing
    from mdm_hf.cli import evaluate_main
    from mdm_hf.synthetic import SyntheticSet

    hub_calls = testing.record_hub_calls(monkeypatch)
    synthetic_dir = tmp_path / "synthetic"
    real_pairs_as_synthetic(clip_evaluator, method="MDM").save_pretrained(synthetic_dir)
    common = ["--config", str(REPO / "recipes" / "configs" / "evaluate_tiny.yaml"), "--model_name_or_path",
              tiny_clip_dir, "--dataset_name", tiny_dataset_dir, "--cache_dir", str(tmp_path / "cache"),
              "--output_dir", str(tmp_path / "eval")]  # fmt: skip
    argv = [*common, "--synthetic", str(synthetic_dir), "--methods", "synthetic", "--push_to_hub",
            "--hub_dataset_id", "me/tiny-mdm-8", "--hub_private"]  # fmt: skip
    assert evaluate_main(argv) == 0
    (repo,) = hub_calls["create_repo"]
    assert (repo["repo_id"], repo["repo_type"], repo["private"]) == ("me/tiny-mdm-8", "dataset", True)
    (upload,) = hub_calls["upload_folder"]
    assert upload["repo_id"] == "me/tiny-mdm-8" and upload["folder_path"] == str(synthetic_dir)
    assert {"README.md", "mdm_synthetic.json"} <= set(upload["files"])
    # --push_to_hub implied --update_card: the local copy that was uploaded carries the results
    card = (synthetic_dir / "README.md").read_text()
    assert "| MDM | 8 |" in card and 'load_dataset("me/tiny-mdm-8"' in card
    assert [r["method"] for r in SyntheticSet.from_pretrained(synthetic_dir).results["rows"]] == ["MDM"]

    # checked while the line is parsed, before any student trains
    for extra, message in (
        (["--synthetic", str(synthetic_dir), "--push_to_hub"], "needs --hub_dataset_id"),
        (["--synthetic", str(synthetic_dir), "--push_to_hub", "--hub_dataset_id", "no-namespace"], "Invalid Hub repo"),
        (["--methods", "random", "--num_pairs", "8", "--push_to_hub", "--hub_dataset_id", "me/x"], "needs --synthetic"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            evaluate_main([*common, *extra])
    assert len(hub_calls["upload_folder"]) == 1
