"""Keeping the synthetic set where real data lives (issue 14): the projection, the drift statistics, the defaults
and the learning-rate search, each against a hand computation."""

import math

import pytest
import torch

from mdm_hf.config import MDMConfig
from mdm_hf.distill import MDMDistiller
from mdm_hf.support import SupportProjection, drift_statistics, valid_pixel_box
from tests.test_distill import tiny_config

MEAN, STD = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)


def test_valid_pixel_box_by_hand():
    low, high = valid_pixel_box(MEAN, STD)
    assert low.flatten().tolist() == [-1.0, -1.0, 0.0] and high.flatten().tolist() == [1.0, 3.0, 1.0]


def test_projection_keeps_initial_norms_and_the_pixel_box():
    initial = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # norms 5 and 2
    projection = SupportProjection.build("initial", "clamp", initial, initial, MEAN, STD)
    text = torch.tensor([[6.0, 8.0], [1.0, 0.0]])
    pixels = torch.tensor([-5.0, 2.0, 0.5]).view(1, 3, 1, 1).repeat(2, 1, 2, 2)
    projection(pixels, text)
    assert torch.allclose(text, torch.tensor([[3.0, 4.0], [2.0, 0.0]]))  # direction kept, norm restored
    assert pixels[0, :, 0, 0].tolist() == [-1.0, 2.0, 0.5]  # clamped per channel
    real = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # mean norm 2
    mean_norm = SupportProjection.build("real_mean", "free", initial, real, MEAN, STD)
    text = torch.tensor([[6.0, 8.0], [1.0, 0.0]])
    mean_norm(pixels, text)
    assert torch.allclose(text.norm(dim=-1), torch.tensor([2.0, 2.0]))
    free = SupportProjection.build("free", "free", initial, real, MEAN, STD)
    before = text.clone()
    free(pixels * 100, text)
    assert torch.equal(text, before)


def test_drift_statistics_by_hand():
    initial = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    learned = torch.tensor([[0.0, 2.0], [0.0, 1.0]])  # the first turned 90 degrees and doubled
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    pixels = torch.zeros(2, 3, 1, 1)
    pixels[0, 0] = 5.0  # 1 of 6 values outside [-1, 1] on channel 0
    stats = drift_statistics(pixels, learned, initial, real, MEAN, STD)
    assert stats["text_norm_mean"] == pytest.approx(1.5) and stats["real_text_norm_mean"] == pytest.approx(
        1.0
    )
    assert stats["cosine_to_start_mean"] == pytest.approx(0.5) and stats[
        "cosine_to_start_min"
    ] == pytest.approx(0.0)
    assert stats["relative_movement_mean"] == pytest.approx((math.sqrt(5) + 0.0) / 2)
    assert stats["pixels_outside_fraction"] == pytest.approx(1 / 6)


def test_defaults_keep_the_set_on_the_real_support(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    assert (MDMConfig().text_norm, MDMConfig().pixel_range, MDMConfig().lr_text) == ("initial", "clamp", 10.0)
    cfg = tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "out", lr_pixels=1000.0, lr_text=1000.0)
    distiller = MDMDistiller(cfg)
    distiller.setup()
    start_norms = distiller.text_features[distiller.initialize()].float().norm(dim=-1)
    synthetic = distiller.distill()
    assert torch.allclose(synthetic.text_features.norm(dim=-1), start_norms, rtol=1e-4)
    low, high = valid_pixel_box(distiller.teacher.image_mean, distiller.teacher.image_std)
    assert (synthetic.pixel_values >= low - 1e-5).all() and (synthetic.pixel_values <= high + 1e-5).all()
    assert not torch.equal(synthetic.text_features, distiller.text_features[synthetic.source_indices].float())


def test_lr_search_runs_each_candidate_and_keeps_the_best(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    calls = []

    def hook(synthetic, step):  # scores the candidate by how far its pixels moved: a known best
        calls.append(step)
        return {"mean": -float((synthetic.pixel_values - start).abs().mean()) if start is not None else 0.0}

    start = None
    cfg = tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "out", lr_search=[1.0, 100.0], lr_search_steps=3,
                      eval_steps=5, lr_pixels=10.0, lr_text=1.0)  # fmt: skip
    probe = MDMDistiller(cfg)
    probe.setup()
    start = probe.real_pixels(probe.initialize()).cpu()
    distiller = MDMDistiller(cfg, validation_fn=hook)
    distiller.distill()
    assert distiller.config.lr_pixels == 1.0 and distiller.config.lr_text == pytest.approx(0.1)  # ratio kept
    assert calls[:2] == [3, 3]  # one score per candidate, at its last step
    assert sorted(p.name for p in (tmp_path / "out" / "lr-search").iterdir()) == ["lr-1", "lr-100"]
    with pytest.raises(ValueError, match="lr_search with --resume_from_checkpoint"):
        MDMDistiller(tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "out", lr_search=[1.0],
                                 resume_from_checkpoint="latest")).distill()  # fmt: skip
