"""Trajectory matching (MTT-VL / LoRS): the unrolled update against hand-worked and finite-difference cases, the
TESLA variant against its own closed form, the parameter-distance loss, the LoRS losses and similarity matrix, the
LoRS presets, and end-to-end distillation on the tiny CLIP fixture from recorded trajectories."""

import copy
import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mdm_hf.baselines.tm.buffer import TrajectoryBuffer, record_trajectory_buffer
from mdm_hf.baselines.tm.config import (
    LORS_PRESETS,
    MTT_VL_DEFAULTS,
    TrajectoryBufferConfig,
    TrajectoryMatchingConfig,
    lors_budget,
    lors_preset,
)
from mdm_hf.baselines.tm.distiller import EXTRAS_FILE, TrajectoryMatchingDistiller
from mdm_hf.baselines.tm.losses import (
    FullSimilarity,
    LowRankSimilarity,
    normalized_parameter_distance,
    soft_contrastive_loss,
)
from mdm_hf.baselines.tm.unroll import sgd_unroll, unrolled_matching_gradients
from mdm_hf.config import ModelArguments, parse_dataclass_args
from mdm_hf.data import load_image_caption_dataset
from mdm_hf.losses import clip_contrastive_loss
from mdm_hf.models import DualEncoder
from mdm_hf.profiling import SavedTensorsMeter
from tests.benchmark_modules import load_benchmark


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ============================================================================================ hand-worked unrolling
# Scalar model: loss ½ (w x − y)², gradient g = (w x − y) x. Two SGD steps on (x0, y0) then (x1, y1):
#   w1 = w0 − η g0,  w2 = w1 − η g1,  L = (w2 − w*)² / (w0 − w*)²
# With w0 = 0.5, (x0, y0) = (1, 2), (x1, y1) = (2, 1), η = 0.1, w* = 1:
#   g0 = −1.5, w1 = 0.65, g1 = 0.6, w2 = 0.59, L = 0.41² / 0.5² = 0.6724, dL/dw2 = 2 (w2 − w*) / (w0 − w*)² = −3.28
# Exact derivatives of w2:
#   dw2/dx1 = −η (2 w1 x1 − y1)                    = −0.16
#   dw2/dx0 = (1 − η x1²) · (−η (2 w0 x0 − y0))     = 0.6 · 0.1 = 0.06
#   dw2/dη  = −g0 (1 − η x1²) − g1                 = 0.9 − 0.6 = 0.3
# TESLA (g1 treated as not depending on x0 or η through w1):
#   dw2/dx0 = −η (2 w0 x0 − y0) = 0.1,  dw2/dx1 = −0.16,  dw2/dη = −(g0 + g1) = 0.9
W0, W_STAR, ETA = 0.5, 1.0, 0.1
HAND = {"w2": 0.59, "loss": 0.6724, "dL_dw2": -3.28}
EXACT = {"x0": 0.06, "x1": -0.16, "eta": 0.3}
TESLA = {"x0": 0.1, "x1": -0.16, "eta": 0.9}


def _scalar_case():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([2.0, 1.0], dtype=torch.float64)
    eta = torch.tensor(ETA, dtype=torch.float64, requires_grad=True)

    def loss_fn(params, idx):
        return 0.5 * ((params["w"] * x[idx] - y[idx]) ** 2).mean()

    start = {"w": torch.tensor(W0, dtype=torch.float64)}
    target = {"w": torch.tensor(W_STAR, dtype=torch.float64)}
    batches = [torch.tensor([0]), torch.tensor([1])]
    return x, eta, loss_fn, start, target, batches


def test_two_sgd_steps_match_the_hand_computed_parameters_and_gradients():
    x, eta, loss_fn, start, target, batches = _scalar_case()
    end = sgd_unroll(loss_fn, start, {"w": eta}, batches)
    assert float(end["w"].detach()) == pytest.approx(HAND["w2"], abs=1e-12)
    loss, parts = normalized_parameter_distance(end, start, target)
    assert float(loss.detach()) == pytest.approx(HAND["loss"], abs=1e-12)
    gx, geta = torch.autograd.grad(loss, [x, eta])
    assert gx.tolist() == pytest.approx(
        [HAND["dL_dw2"] * EXACT["x0"], HAND["dL_dw2"] * EXACT["x1"]], abs=1e-12
    )
    assert float(geta) == pytest.approx(HAND["dL_dw2"] * EXACT["eta"], abs=1e-12)
    # the same through the distiller's entry point
    meta = lambda e: normalized_parameter_distance(e, start, target)[0]  # noqa: E731
    loss2, end2, grads = unrolled_matching_gradients(
        loss_fn, start, {"w": eta}, batches, meta, [x, eta], "full"
    )
    assert float(loss2) == pytest.approx(HAND["loss"], abs=1e-12) and float(end2["w"]) == pytest.approx(
        HAND["w2"]
    )
    assert torch.allclose(grads[0], gx) and torch.allclose(grads[1], geta)
    assert start["w"].item() == W0 and not start["w"].requires_grad  # the start is not modified


def test_tesla_matches_its_hand_computed_first_order_gradients():
    x, eta, loss_fn, start, target, batches = _scalar_case()
    meta = lambda e: normalized_parameter_distance(e, start, target)[0]  # noqa: E731
    loss, end, (gx, geta) = unrolled_matching_gradients(
        loss_fn, start, {"w": eta}, batches, meta, [x, eta], "tesla"
    )
    assert float(end["w"]) == pytest.approx(HAND["w2"], abs=1e-12)  # the same trajectory
    assert float(loss) == pytest.approx(HAND["loss"], abs=1e-12)
    assert gx.tolist() == pytest.approx(
        [HAND["dL_dw2"] * TESLA["x0"], HAND["dL_dw2"] * TESLA["x1"]], abs=1e-12
    )
    assert float(geta) == pytest.approx(HAND["dL_dw2"] * TESLA["eta"], abs=1e-12)
    assert TESLA["x0"] != EXACT["x0"]  # the case separates the two schemes


def _linear_case(steps: int, seed: int = 0):
    """A tanh-linear model with two tensors and two step sizes, float64; batches overlap."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    y = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    start = {
        "W": torch.randn(2, 3, generator=gen, dtype=torch.float64),
        "b": torch.randn(2, generator=gen, dtype=torch.float64),
    }
    target = {k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in start.items()}
    lrs = {"W": torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
           "b": torch.tensor(0.2, dtype=torch.float64, requires_grad=True)}  # fmt: skip

    def loss_fn(params, idx):
        return 0.5 * ((torch.tanh(x[idx] @ params["W"].T + params["b"]) - y[idx]) ** 2).sum(1).mean()

    batches = [torch.tensor(b) for b in ([0, 1, 2], [2, 3], [4, 0, 1], [1, 3, 4])[:steps]]
    groups = {"W": ["W"], "b": ["b"]}
    meta = lambda e: normalized_parameter_distance(e, start, target, groups)[0]  # noqa: E731
    return x, lrs, loss_fn, start, meta, batches


def test_full_unroll_gradients_match_central_finite_differences():
    x, lrs, loss_fn, start, meta, batches = _linear_case(steps=3)
    inputs = [x, lrs["W"], lrs["b"]]
    _, _, grads = unrolled_matching_gradients(loss_fn, start, lrs, batches, meta, inputs, "full")

    def value() -> float:
        with torch.enable_grad():
            return float(meta(sgd_unroll(loss_fn, start, lrs, batches)).detach())

    eps = 1e-6
    for tensor, grad in zip(inputs, grads):
        flat = tensor.data.view(-1)
        numeric = torch.zeros_like(flat)
        for i in range(flat.numel()):
            old = float(flat[i])
            flat[i] = old + eps
            up = value()
            flat[i] = old - eps
            down = value()
            flat[i] = old
            numeric[i] = (up - down) / (2 * eps)
        assert torch.allclose(grad.reshape(-1), numeric, rtol=1e-6, atol=1e-8)
        assert numeric.abs().max() > 1e-3  # a real signal, not zeros matching zeros


def test_tesla_is_exact_for_one_step_and_approximate_for_several():
    for steps, same in ((1, True), (3, False)):
        x, lrs, loss_fn, start, meta, batches = _linear_case(steps)
        inputs = [x, lrs["W"], lrs["b"]]
        full = unrolled_matching_gradients(loss_fn, start, lrs, batches, meta, inputs, "full")
        tesla = unrolled_matching_gradients(loss_fn, start, lrs, batches, meta, inputs, "tesla")
        assert float(full[0]) == pytest.approx(float(tesla[0]), abs=1e-12)  # same trajectory, same loss
        close = all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(full[2], tesla[2]))
        assert close is same


# ============================================================================================ losses and similarity
def test_normalized_parameter_distance_per_branch_and_merged():
    start = {"a": torch.tensor([0.0, 0.0]), "t": torch.tensor([1.0])}
    target = {"a": torch.tensor([3.0, 4.0]), "t": torch.tensor([3.0])}  # dens: 25 and 4
    end = {"a": torch.tensor([3.0, 1.0]), "t": torch.tensor([2.0])}  # nums: 9 and 1
    groups = {"image": ["a"], "text": ["t"]}
    loss, parts = normalized_parameter_distance(end, start, target, groups)
    assert float(loss) == pytest.approx(9 / 25 + 1 / 4)
    assert float(parts["image"]) == pytest.approx(9 / 25) and float(parts["text"]) == pytest.approx(1 / 4)
    merged, _ = normalized_parameter_distance(end, start, target, groups, merge_groups=True)
    assert float(merged) == pytest.approx(10 / 29)
    assert float(normalized_parameter_distance(target, start, target, groups)[0]) == 0.0
    with pytest.raises(ValueError, match="identical"):
        normalized_parameter_distance(end, target, target, groups)


def test_soft_infonce_with_identity_targets_is_the_clip_loss_and_uses_soft_targets():
    gen = torch.Generator().manual_seed(1)
    zv, zt = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    scale = torch.tensor(1 / 0.07)
    ours = soft_contrastive_loss(zv, zt, torch.eye(6), scale, "infonce")
    assert float(ours) == pytest.approx(float(clip_contrastive_loss(zv, zt, scale)), rel=1e-6)
    soft = torch.rand(6, 6, generator=gen)
    logits = scale * torch.nn.functional.normalize(zv, dim=-1) @ torch.nn.functional.normalize(zt, dim=-1).T
    lsm_rows, lsm_cols = logits.log_softmax(1), logits.log_softmax(0)
    i2t = -sum(float(soft[i, j] * lsm_rows[i, j]) for i in range(6) for j in range(6)) / 6
    t2i = -sum(float(soft[i, j] * lsm_cols[i, j]) for i in range(6) for j in range(6)) / 6
    assert float(soft_contrastive_loss(zv, zt, soft, scale, "infonce")) == pytest.approx(
        (i2t + t2i) / 2, rel=1e-5
    )


def test_wbce_matches_a_brute_force_loop():
    import math

    gen = torch.Generator().manual_seed(2)
    zv, zt = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    targets = torch.eye(5) * 0.9 + 0.05 * torch.rand(5, 5, generator=gen)
    targets[1, 3] = 0.7  # an off-diagonal positive
    scale = 10.0
    zvn, ztn = torch.nn.functional.normalize(zv, dim=-1), torch.nn.functional.normalize(zt, dim=-1)
    pos, neg = [], []
    for i in range(5):
        for j in range(5):
            p = 1 / (1 + math.exp(-scale * float(zvn[i] @ ztn[j])))
            t = float(targets[i, j])
            (pos if t > 0.5 else neg).append(-(t * math.log(p) + (1 - t) * math.log(1 - p)))
    expected = 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))
    assert float(soft_contrastive_loss(zv, zt, targets, scale, "wbce")) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="targets must be"):
        soft_contrastive_loss(zv, zt, torch.eye(4), scale, "wbce")


def test_low_rank_similarity_starts_at_identity_and_indexes_like_its_full_matrix():
    sim = LowRankSimilarity(7, rank=3, alpha=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sim(), torch.eye(7))  # R = 0 at the start
    with torch.no_grad():
        sim.right.normal_()
        sim.diag.uniform_()
    idx = torch.tensor([5, 1, 3])
    full = torch.diag(sim.diag) + (2.0 / 3) * sim.left @ sim.right.T  # S = diag(a) + (alpha / r) L R^T
    assert torch.allclose(sim(idx), full[idx][:, idx])
    assert torch.equal(FullSimilarity(4)(torch.tensor([2, 0])), torch.eye(2))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="syn_steps"):
        TrajectoryMatchingConfig(syn_steps=0)
    with pytest.raises(ValueError, match="unroll"):
        TrajectoryMatchingConfig(unroll="scan")
    with pytest.raises(ValueError, match="preset='mtt'"):
        TrajectoryMatchingConfig(preset="mtt")
    with pytest.raises(ValueError, match="syn_steps"):  # a preset's value is checked like an explicit one
        TrajectoryMatchingConfig(preset="lors", syn_steps=0)
    with pytest.raises(ValueError, match=r"lr_pixels=0\.0, momentum=1\.0, min_syn_lr=-1\.0"):
        TrajectoryMatchingConfig(lr_pixels=0.0, momentum=1.0, min_syn_lr=-1.0)
    with pytest.raises(ValueError, match="wrong type for syn_steps"):
        TrajectoryMatchingConfig(syn_steps=2.5)
    with pytest.raises(ValueError, match=r"momentum=1\.5, weight_decay=-1\.0"):
        TrajectoryBufferConfig(momentum=1.5, weight_decay=-1.0)
    with pytest.raises(ValueError, match="wrong type for num_train_epochs"):
        TrajectoryBufferConfig(num_train_epochs="3")
    assert TrajectoryMatchingConfig(lr_text=0.0, lr_lr=0.0).lr_text == 0.0  # freezing is allowed


# ============================================================================================ configuration and presets
def test_without_a_preset_the_fields_are_mtt_vl_defaults_and_the_model_fields_are_shared():
    cfg = TrajectoryMatchingConfig()
    assert {k: getattr(cfg, k) for k in MTT_VL_DEFAULTS} == MTT_VL_DEFAULTS
    assert (cfg.lr_pixels, cfg.similarity, cfg.inner_loss, cfg.unroll, cfg.min_syn_lr) == (
        100.0, "none", "infonce", "full", None
    )  # fmt: skip
    assert issubclass(TrajectoryMatchingConfig, ModelArguments)
    assert cfg.model_name_or_path == ModelArguments().model_name_or_path
    assert TrajectoryMatchingConfig.from_dict(cfg.to_dict()) == cfg  # a saved config reads back unchanged


def test_lors_preset_fills_what_is_not_given_for_the_nearest_budget_and_explicit_values_win():
    cfg = TrajectoryMatchingConfig(preset="lors", num_pairs=480, lr_pixels=5.0, unroll="full")
    expected = lors_preset(480)
    assert lors_budget(480) == 500
    for key, value in expected.items():
        if key not in ("lr_pixels", "unroll"):
            assert getattr(cfg, key) == value, key
    assert (cfg.lr_pixels, cfg.unroll) == (5.0, "full")  # explicit, even where it equals no preset value
    assert (cfg.similarity, cfg.inner_loss, cfg.sim_rank, cfg.mini_batch_size) == ("lowrank", "wbce", 20, 40)
    assert cfg.lr_sim == pytest.approx(100.0 * 1e-2) and cfg.min_syn_lr == 1e-3  # the stability changes
    faithful = TrajectoryMatchingConfig(preset="lors_faithful", num_pairs=100)
    assert (faithful.lr_lr, faithful.lr_sim, faithful.min_syn_lr) == (1e-2, 10.0, None)
    # an explicit value equal to the MTT-VL default still wins over the preset's (1000 at K = 200)
    assert TrajectoryMatchingConfig(preset="lors", num_pairs=200, lr_text=100.0).lr_text == 100.0
    assert TrajectoryMatchingConfig(preset="lors", num_pairs=200).lr_text == 1000.0
    saved = cfg.to_dict()
    assert TrajectoryMatchingConfig.from_dict(saved) == cfg  # resolved once: the saved config is the run


def test_command_line_preset_and_flags(tmp_path):
    yaml_file = tmp_path / "tm.yaml"
    yaml_file.write_text("preset: lors\nnum_pairs: 200\nlr_sim: 3.0\n")
    cfg = parse_dataclass_args(TrajectoryMatchingConfig, ["--config", str(yaml_file), "--sim_rank", "7"])
    assert (cfg.preset, cfg.lr_sim, cfg.sim_rank) == ("lors", 3.0, 7)  # YAML and flags win over the preset
    assert cfg.lr_pixels == LORS_PRESETS[200]["lr_pixels"] and cfg.unroll == "tesla"
    plain = parse_dataclass_args(TrajectoryMatchingConfig, ["--num_pairs", "200"])
    assert plain.lr_pixels == 100.0 and plain.similarity == "none"
    none = parse_dataclass_args(TrajectoryMatchingConfig, ["--num_pairs", "200", "--preset", "none"])
    assert none == plain


def test_the_old_import_path_still_works_and_says_it_is_deprecated():
    import mdm_hf.baselines as baselines
    import mdm_hf.baselines.tm as tm

    with pytest.warns(DeprecationWarning, match="mdm_hf.baselines.tm"):
        old = importlib.reload(importlib.import_module("mdm_hf.baselines.trajectory_matching"))
    for name in old.__all__:
        assert getattr(old, name) is getattr(tm, name), name
    assert set(old.__all__) <= set(tm.__all__)
    assert baselines.TrajectoryMatchingDistiller is tm.TrajectoryMatchingDistiller


# ============================================================================================ the distiller on tiny CLIP
@pytest.fixture(scope="module")
def tiny(_one_thread, tiny_clip_dir, tiny_dataset_dir, tmp_path_factory):
    """The tiny CLIP anchor, its train split and an SGD trajectory buffer: 1 expert x 2 epochs (LoRS recipe, lr 0.1)."""
    root = tmp_path_factory.mktemp("tm")
    anchor = DualEncoder.from_pretrained(tiny_clip_dir)
    train = load_image_caption_dataset(tiny_dataset_dir, "train")
    buffer = record_trajectory_buffer(anchor, train, root / "buffer", num_experts=1, num_epochs=2, learning_rate=0.1,
                                      batch_size=8, cache_dir=str(root / "cache"))  # fmt: skip
    return {"anchor": anchor, "train": train, "buffer": buffer, "root": root, "model": tiny_clip_dir,
            "data": tiny_dataset_dir}  # fmt: skip


def _config(tiny, out, **kw) -> TrajectoryMatchingConfig:
    values = dict(
        model_name_or_path=tiny["model"], dataset_name=tiny["data"], trajectory_buffer=str(tiny["buffer"]),
        cache_dir=str(tiny["root"] / "cache"), num_pairs=6, syn_steps=2, mini_batch_size=4, max_start_epoch=1,
        max_steps=3, eval_steps=0, save_steps=0, output_dir=str(out), logging_steps=0, device="cpu",
        # small outer steps: the tiny model's meta-loss is steep (LoRS' lr_sim = 10 blows it up in two steps)
        lr_pixels=1.0, lr_text=1.0, lr_lr=1e-3, lr_sim=0.01,
    )  # fmt: skip
    values.update(kw)
    return TrajectoryMatchingConfig(**values)


def _distiller(tiny, out, **kw) -> TrajectoryMatchingDistiller:
    return TrajectoryMatchingDistiller(
        _config(tiny, out, **kw), teacher=tiny["anchor"], train_data=tiny["train"]
    )


def test_recorded_buffer_is_a_full_bank_both_readers_accept(tiny):
    from mdm_hf.bank import load_expert_bank, read_manifest

    manifest = read_manifest(tiny["buffer"])
    assert manifest["kind"] == "full" and manifest["training"]["optimizer"] == "sgd"
    buffer = TrajectoryBuffer(tiny["buffer"], tiny["anchor"])
    assert buffer.num_experts == 1 and buffer.num_epochs(0) == 2 and buffer.learning_rate == 0.1
    anchor_params = dict(tiny["anchor"].model.named_parameters())
    frozen = [n for n in buffer.names if n.startswith("text_model.") or n == "logit_scale"]
    assert frozen == []  # the text tower and the temperature are not trained
    assert all(torch.equal(buffer.checkpoint(0, 0)[n], anchor_params[n].detach()) for n in buffer.names)
    moved = sum(
        float((buffer.checkpoint(0, 1)[n] - anchor_params[n].detach()).abs().sum()) for n in buffer.names
    )
    assert moved > 0
    assert len(load_expert_bank(tiny["buffer"], tiny["anchor"]).touched_keys) == len(buffer.names)


def test_matching_loss_is_zero_when_the_synthetic_set_reproduces_the_expert_step(tiny, tmp_path):
    """Write a buffer whose epoch 1 IS the result of the unrolled steps on the synthetic set: loss 0, gradient 0."""
    d = _distiller(tiny, tmp_path / "probe", similarity="lowrank", syn_steps=3)
    d.initialize()
    gen = torch.Generator().manual_seed(123)
    probe = torch.Generator().manual_seed(123)
    expert, start_epoch = d.sample_trajectory(probe)
    batches = d.sample_batches(probe)
    start = d.buffer.checkpoint(expert, start_epoch)
    end = {n: t.detach() for n, t in sgd_unroll(d.inner_loss, start, d.step_sizes(), batches).items()}
    # a buffer with that end point as epoch 1
    fake = tmp_path / "fake-buffer"
    shutil.copytree(tiny["buffer"], fake)
    save_file(
        {n: t.contiguous() for n, t in end.items()}, str(fake / "expert-0" / "epoch-1" / "model.safetensors")
    )
    d2 = _distiller(tiny, tmp_path / "zero", similarity="lowrank", syn_steps=3, trajectory_buffer=str(fake))
    d2.initialize()
    before = d2.syn_pixels.detach().clone()
    logs, _ = d2.training_step(gen)
    assert logs["loss"] < 1e-10 and logs["grad_norm"] < 1e-8
    assert torch.allclose(d2.syn_pixels.detach(), before)
    # a target displaced by δ gives exactly ||δ||² / ||θ_0 − θ_N − δ||² per branch
    delta = {n: 0.01 * torch.ones_like(t) for n, t in end.items()}
    target = {n: end[n] + delta[n] for n in end}
    loss, parts = d.matching_loss(end, start, target)
    for group, names in d.groups.items():
        num = sum(float((delta[n] ** 2).sum()) for n in names)
        den = sum(float(((start[n] - target[n]) ** 2).sum()) for n in names)
        assert float(parts[group]) == pytest.approx(num / den, rel=1e-4)
    assert float(loss) > 0


@pytest.mark.parametrize("unroll,similarity", [("full", "none"), ("tesla", "lowrank")])
def test_end_to_end_distill_gives_a_valid_synthetic_set(tiny, tmp_path, unroll, similarity):
    scores = iter([1.0, 3.0, 2.0])
    seen = []

    def validate(synthetic, step):
        synthetic.validate()
        seen.append(step)
        return {"mean": next(scores)}

    cfg = _config(tiny, tmp_path / "out", unroll=unroll, similarity=similarity, inner_loss="wbce" if similarity != "none" else "infonce",
                  eval_steps=1, save_steps=2, eval_on_start=False)  # fmt: skip
    d = TrajectoryMatchingDistiller(
        cfg, validation_fn=validate, teacher=tiny["anchor"], train_data=tiny["train"]
    )
    synthetic = d.distill()
    synthetic.validate()
    assert len(synthetic) == 6 and synthetic.image_shape == (3, 32, 32) and seen == [1, 2, 3]
    assert d.state.best_step == 2  # the best validation score is kept, not the last state
    assert synthetic.provenance["best_step"] == 2
    assert synthetic.provenance["method"].startswith("LoRS" if similarity != "none" else "MTT-VL")
    initial = d.real_pixels(d.source_indices).cpu()
    assert not torch.equal(synthetic.pixel_values, initial)  # learned
    assert d.syn_lrs["image"].item() != 0.1  # the step size is learned too
    extras = load_file(str(tmp_path / "out" / EXTRAS_FILE))
    assert ("similarity" in extras) is (similarity != "none")
    assert (tmp_path / "out" / "checkpoint-3" / "synthetic.safetensors").exists()
    assert all(t.unroll > 0 for t in d.timings)


def test_end_to_end_from_an_experts_full_finetune_bank(tiny, tmp_path):
    """A 2-epoch full-finetune bank from mdm_hf.experts (AdamW) is read as a trajectory (syn_lr_init must be set)."""
    from mdm_hf.experts import ExpertTrainingConfig, train_expert_bank

    bank = train_expert_bank(
        ExpertTrainingConfig(model_name_or_path=tiny["model"], dataset_name=tiny["data"], full_finetune=True,
                             num_experts=1, num_train_epochs=2, learning_rate=1e-3, per_device_train_batch_size=8,
                             validation_split=None, output_dir=str(tmp_path / "bank"),
                             cache_dir=str(tiny["root"] / "cache")),
        anchor=tiny["anchor"],
    )  # fmt: skip
    with pytest.raises(ValueError, match="syn_lr_init"):
        _distiller(tiny, tmp_path / "a", trajectory_buffer=str(bank)).initialize()
    d = _distiller(
        tiny, tmp_path / "b", trajectory_buffer=str(bank), syn_lr_init=0.01, max_start_epoch=2, max_steps=2
    )
    synthetic = d.distill()
    synthetic.validate()
    assert len(synthetic) == 6


def test_unrolling_copies_no_module_and_never_writes_the_teacher(tiny, tmp_path, monkeypatch):
    d = _distiller(tiny, tmp_path / "out", syn_steps=3)
    d.initialize()
    params = dict(tiny["anchor"].model.named_parameters())
    snapshot = {n: (p.data_ptr(), p.detach().clone()) for n, p in params.items()}
    created, copied = [], []
    original_init, original_deepcopy = torch.nn.Module.__init__, copy.deepcopy

    def counting_init(self, *a, **k):
        created.append(type(self).__name__)
        original_init(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "__init__", counting_init)
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: copied.append(a) or original_deepcopy(*a, **k))
    for _ in range(2):
        d.training_step(torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert created == [] and copied == []
    for n, p in tiny["anchor"].model.named_parameters():
        assert (
            p.data_ptr() == snapshot[n][0] and torch.equal(p.detach(), snapshot[n][1]) and not p.requires_grad
        )


def test_saved_tensors_meter_counts_what_backward_keeps():
    x = torch.randn(1000, requires_grad=True)
    with SavedTensorsMeter() as meter:
        y = torch.exp(x)  # exp saves its output: 1000 float32 = 4000 bytes
        assert meter.live == meter.peak == 4000
        y.sum().backward()
        del y
    assert meter.live == 0 and meter.peak == 4000


def test_full_unroll_memory_grows_with_steps_and_tesla_stays_flat(tiny, tmp_path):
    peaks = {}
    for unroll in ("full", "tesla"):
        for steps in (2, 6):
            d = _distiller(tiny, tmp_path / f"{unroll}{steps}", syn_steps=steps, unroll=unroll)
            d.initialize()
            with SavedTensorsMeter() as meter:
                d.training_step(torch.Generator().manual_seed(0))
            assert meter.live == 0  # every graph is released after the step
            peaks[unroll, steps] = meter.peak
    assert peaks["full", 6] > 2.5 * peaks["full", 2]  # MTT keeps every step's graph
    assert peaks["tesla", 6] < 1.2 * peaks["tesla", 2]  # TESLA keeps one step's graph at a time
    assert peaks["tesla", 6] < peaks["full", 6] / 2


def test_resume_continues_bit_for_bit(tiny, tmp_path):
    straight = _distiller(tiny, tmp_path / "straight", max_steps=4, similarity="lowrank").distill()
    first = _distiller(tiny, tmp_path / "resumed", max_steps=2, similarity="lowrank")
    first.distill()
    with pytest.raises(ValueError, match="other settings"):  # a result-changing field differs: refused
        _distiller(tiny, tmp_path / "resumed", max_steps=4, similarity="lowrank", lr_pixels=2.0,
                   resume_from_checkpoint="latest").distill()  # fmt: skip
    # the same values, now written as a preset plus explicit fields, and no trajectory cache: resumes
    same = {k: getattr(first.config, k) for k in MTT_VL_DEFAULTS}
    second = _distiller(
        tiny, tmp_path / "resumed", **{**same, "max_steps": 4, "preset": "lors_faithful"},
        cache_trajectories=False, resume_from_checkpoint="latest",
    )  # fmt: skip
    resumed = second.distill()
    assert second.state.step == 4
    assert torch.equal(straight.pixel_values, resumed.pixel_values)
    assert torch.equal(straight.text_features, resumed.text_features)


def test_clear_errors_for_a_lora_bank_and_too_short_trajectories(tiny, tmp_path):
    lora = tmp_path / "lora-bank"
    shutil.copytree(tiny["buffer"], lora)
    manifest = json.loads((lora / "manifest.json").read_text())
    manifest["kind"] = "lora"
    (lora / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="full per-epoch"):
        TrajectoryBuffer(lora, tiny["anchor"])
    with pytest.raises(ValueError, match="shortest has 2"):
        _distiller(tiny, tmp_path / "x", max_start_epoch=2, expert_epochs=2).setup()
    with pytest.raises(ValueError, match="trajectory_buffer is not set"):
        _distiller(tiny, tmp_path / "y", trajectory_buffer=None).setup()


# ============================================================================================ the benchmark's helpers
def test_benchmark_time_to_95_percent_and_lors_presets():
    bench = load_benchmark("tm_vs_mdm")
    records = [{"step": 25, "seconds": 10.0, "mean": 4.0}, {"step": 50, "seconds": 20.0, "mean": 9.6},
               {"step": 75, "seconds": 30.0, "mean": 10.0}, {"step": 100, "seconds": 40.0, "mean": 9.0}]  # fmt: skip
    got = bench.time_to_fraction(records)
    # best 10.0 at step 75; the first point >= 9.5 is step 50 (9.6), not step 100 (9.0 < 9.5)
    assert got["best_step"] == 75 and got["steps_to_95pct"] == 50 and got["seconds_to_95pct"] == 20.0
    faithful = lors_preset(480, faithful=True)
    assert lors_budget(480) == 500 and faithful["lr_sim"] == 100.0 and "min_syn_lr" not in faithful
    assert lors_budget(150) == 100  # tie between 100 and 200 goes to the smaller
    stable = lors_preset(100)
    assert stable["lr_lr"] == pytest.approx(1e-4) and stable["lr_sim"] == pytest.approx(0.1)
    TrajectoryMatchingConfig(**stable)  # valid fields
    assert not hasattr(bench, "LORS_PRESETS") and not hasattr(
        bench, "lors_preset"
    )  # the library's, not a copy


def test_benchmark_time_to_beat_the_strongest_baseline():
    bench = load_benchmark("tm_vs_mdm")

    def run(*points):
        records = [{"step": st, "seconds": sec, "mean": m} for st, sec, m in points]
        return {"validation": records, "best_mean": max(r["mean"] for r in records)}

    entry = {
        "quality_mdm": run((0, 5.0, 12.0), (5, 6.0, 12.5), (10, 7.0, 13.1)),
        "quality_mdm_blend": run((0, 5.0, 12.0), (5, 8.0, 11.0)),
        "quality_tm": run((0, 1.0, 6.0), (25, 90.0, 8.5)),
        "quality_repblend": run((0, 1.0, 6.0), (25, 30.0, 13.0)),
    }
    got = bench.time_to_beat(entry)
    # RepBlend's 13.0 beats the k-means start (12.0) and LoRS (8.5); MDM first exceeds it at step 10, blending never
    assert (got["baseline"], got["target"]) == ("repblend", 13.0)
    assert got["methods"]["mdm"] == {"step": 10, "seconds": 7.0}
    assert got["methods"]["mdm_blend"] is None and got["methods"]["repblend"] is None
    entry["quality_repblend"] = run((0, 1.0, 6.0), (25, 30.0, 11.0))
    got = bench.time_to_beat(
        entry
    )  # now the coreset (MDM's step 0) is the strongest: strict improvement counts
    assert (got["baseline"], got["target"]) == ("kmeans", 12.0) and got["methods"]["mdm"]["step"] == 5


def test_benchmark_runs_the_library_preset_fitted_to_its_buffer():
    from types import SimpleNamespace

    bench = load_benchmark("tm_vs_mdm")
    args = SimpleNamespace(mdm_teacher_mode="fresh", mdm_steps=5, eval_steps=0, tag="", tm_faithful=False,
                           tm_unroll="full", tm_steps=7, tm_override={"lr_sim": 1.0}, mdm_override=None,
                           tm_presets=["lors", "repblend"], mdm_eval_steps=None, methods=["mdm", "tm", "repblend"])  # fmt: skip
    demo = SimpleNamespace(seed=0, lr_pixels=100.0, lr_text=100.0, expert_epochs=2)
    paths = {"anchor": "a", "data_dir": "d", "lora_bank": "b", "buffer": "t", "projection_buffer": "p"}
    got = bench.method_configs(args, demo, paths, 480, Path("/tmp/w"))
    tm = got["tm"]
    assert got["lors_preset_budget"] == 500 and tm["preset"] == "lors"
    assert tm["max_start_epoch"] == 2 and tm["mini_batch_size"] == 40  # 3 -> the 2-epoch buffer's 2
    assert (tm["unroll"], tm["max_steps"], tm["lr_sim"]) == ("full", 7, 1.0)  # the command line wins
    cfg = TrajectoryMatchingConfig(**tm)
    assert cfg.lr_pixels == 1000.0 and cfg.min_syn_lr == 1e-3 and cfg.lr_lr == pytest.approx(1e-4)
    assert (tm["trajectory_buffer"], tm["trainable"], tm["blend_alpha"]) == ("t", "full", 0.0)
    repblend = got["repblend"]  # RepBlend: its own preset and the projection-only buffer
    assert (repblend["preset"], repblend["trajectory_buffer"], repblend["trainable"]) == (
        "repblend",
        "p",
        "projections",
    )
    assert (repblend["blend_alpha"], repblend["mini_batch_size"], repblend["max_start_epoch"]) == (1.0, 20, 2)
    assert repblend["output_dir"] == "/tmp/w/repblend-480" and repblend["lr_sim"] == 1.0
    TrajectoryMatchingConfig(**repblend)
    args.tm_faithful = True
    faithful = bench.method_configs(args, demo, paths, 480, Path("/tmp/w"))
    assert (faithful["tm"]["preset"], faithful["repblend"]["preset"]) == (
        "lors_faithful",
        "repblend_faithful",
    )
    args.tm_presets = ["lors"]
    assert "repblend" not in bench.method_configs(args, demo, paths, 480, Path("/tmp/w"))


def test_benchmark_ratios_and_partial_results_render(tmp_path):
    bench = load_benchmark("tm_vs_mdm")
    cost = {
        "tm": {"seconds_per_iteration": 4.0, "autograd_saved_peak_mb": 220.0, "loop_rss_above_setup_mb": 400.0,
               "setup_seconds": 4.0},
        "mdm_fresh": {"seconds_per_iteration": 1.0, "autograd_saved_peak_mb": 140.0, "loop_rss_above_setup_mb": 200.0,
                      "setup_seconds": 12.0},
        "mdm_pooled": {"seconds_per_iteration": 0.25, "autograd_saved_peak_mb": 140.0,
                       "loop_rss_above_setup_mb": 100.0, "setup_seconds": 40.0},
    }  # fmt: skip
    quality = lambda s, n: {"seconds_to_95pct": s, "steps_to_95pct": n, "iterations": 2 * n, "best_mean": 9.0,  # noqa: E731
                            "best_step": n, "median_seconds_per_iteration": 1.0}  # fmt: skip
    done = {"cost": cost, "quality_mdm": quality(50.0, 50), "quality_tm": quality(400.0, 100)}
    bench._ratios(done)
    r = done["ratios"]
    assert r["tm_over_mdm_fresh_seconds_per_iteration"] == 4.0
    assert r["tm_over_mdm_pooled_seconds_per_iteration"] == 16.0
    assert r["tm_over_mdm_seconds_to_95pct"] == 8.0 and r["tm_over_mdm_iterations_to_95pct"] == 2.0
    assert r["tm_over_mdm_pooled_loop_rss_above_setup"] == 4.0
    pending = {
        "cost": {"mdm_fresh": cost["mdm_fresh"]}
    }  # a crash-safe write happens before every budget is done
    storage = {"experts": 2, "epochs": 3, "lora_bank_bytes": 2**20, "trajectory_buffer_bytes": 10 * 2**20,
               "lora_checkpoint_bytes": 2**18, "full_checkpoint_bytes": 2**21, "buffer_over_bank": 10.0}  # fmt: skip
    text = bench.render_markdown({"budgets": {"100": done, "200": pending},
                                  "prepare": {"storage": storage, "seconds": {}}})  # fmt: skip
    assert "| 100 | 4.000 | 1.000 | 4.00 | 0.250 | 16.00 |" in text
    main_table, per_variant = text.split("## Time to quality")[0].split("Every variant measured")
    assert "| 200 |" not in main_table  # the comparison needs every variant of a budget
    assert "| 200 | MDM fresh | 1.000 | 140 | 200 | 12.0 |" in per_variant  # what was measured is shown
    done["quality_mdm"]["validation"] = [{"step": 25, "seconds": 30.0, "mean": 13.5}]
    assert bench.plot_time_to_quality({"budgets": {"100": done, "200": pending}}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert not bench.plot_time_to_quality({"budgets": {"200": pending}}, tmp_path / "none.png")
    # RepBlend next to LoRS: its own ratios and table row, the full-network rows unchanged
    cost["repblend"] = {"seconds_per_iteration": 1.0, "autograd_saved_peak_mb": 20.0,
                        "loop_rss_above_setup_mb": 50.0, "setup_seconds": 3.0}  # fmt: skip
    bench._ratios(done)
    assert done["ratios"]["repblend_over_tm_seconds_per_iteration"] == 0.25
    assert done["ratios"]["repblend_over_mdm_fresh_seconds_per_iteration"] == 1.0
    storage.update(
        projection_buffer_bytes=2**20, projection_checkpoint_bytes=2**16, projection_buffer_over_buffer=0.1
    )
    text = bench.render_markdown({"budgets": {"100": done}, "prepare": {"storage": storage, "seconds": {}}})
    assert "| 100 | 1.000 | 4.000 | 0.25 | 20 / 220 | 50 / 400 |" in text
    assert "| 100 | 4.000 | 1.000 | 4.00 | 0.250 | 16.00 |" in text and "0.100 of the full buffer" in text


def test_command_line_records_a_buffer_and_distils_from_it(capsys, tiny_clip_dir, tiny_dataset_dir, tmp_path):
    """`mdm-hf tm-buffer` then `mdm-hf tm`, as a user runs the baseline; the set opens with load_dataset."""
    import datasets

    from mdm_hf.bank import read_manifest
    from mdm_hf.cli import main

    common = ["--model_name_or_path", tiny_clip_dir, "--dataset_name", tiny_dataset_dir,
              "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    buffer = tmp_path / "buffer"
    assert main(["tm-buffer", *common, "--num_experts", "1", "--num_train_epochs", "2", "--per_device_train_batch_size", "8",
                 "--max_validation_images", "8", "--output_dir", str(buffer)]) == 0  # fmt: skip
    manifest = read_manifest(buffer)
    assert manifest["training"]["optimizer"] == "sgd" and len(manifest["experts"][0]["epochs"]) == 2
    assert "validation" in manifest["experts"][0]["epochs"][0]
    assert main(["tm-buffer", *common, "--output_dir", str(buffer)]) == 2  # never overwritten silently
    assert "not empty" in capsys.readouterr().err
    out = tmp_path / "tm-run"
    assert main(["tm", *common, "--trajectory_buffer", str(buffer), "--num_pairs", "6", "--syn_steps", "2",
                 "--mini_batch_size", "4", "--max_start_epoch", "1", "--max_steps", "2", "--eval_steps", "0",
                 "--lr_pixels", "1.0", "--lr_text", "1.0", "--device", "cpu", "--output_dir", str(out)]) == 0  # fmt: skip
    rows = datasets.load_dataset(str(out / "synthetic"), cache_dir=str(tmp_path / "ds-cache"))["train"]
    assert rows.num_rows == 6 and "pixel_values" in rows.column_names


def test_benchmark_resume_refuses_other_arguments_and_missing_sets(tmp_path):
    bench = load_benchmark("tm_vs_mdm")

    def parsed(*extra):
        args = bench._parser().parse_args(["--results_dir", str(tmp_path), "--tag", "t", *extra])
        args.tag = f"-{args.tag}"
        bench._fill_defaults(args)
        return args

    with pytest.raises(SystemExit, match="no recorded run"):
        bench.resume(parsed("--resume"), [], tmp_path)
    recorded = parsed()
    kept = tmp_path / "sets" / "mdm-100-t"
    kept.mkdir(parents=True)
    results = {"arguments": json.loads(json.dumps(vars(recorded), default=str)),
               "budgets": {"100": {"cost": {}, "quality_mdm": {"synthetic_dir": str(kept)}}}}  # fmt: skip
    (tmp_path / "tm_vs_mdm-t.json").write_text(json.dumps(results))
    # the same run (other --jobs and a subset of budgets are free): continued, the continuation recorded
    got = bench.resume(parsed("--resume", "--jobs", "3", "--budgets", "100"), ["--resume"], tmp_path)
    assert got["resumed_by"] == ["python benchmarks/tm_vs_mdm.py --resume"]
    with pytest.raises(SystemExit, match=r"mdm_steps: 300 recorded, 50 now"):
        bench.resume(parsed("--resume", "--mdm_steps", "50"), [], tmp_path)
    kept.rmdir()
    with pytest.raises(SystemExit, match="K=100 mdm set .* is gone"):
        bench.resume(parsed("--resume"), [], tmp_path)
