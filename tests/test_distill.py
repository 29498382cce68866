"""MDMDistiller end to end on the tiny fixtures: objective goes down, resume is exact, DDP equals one process,
NaN stops cleanly with a usable checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mdm_hf.checkpointing import CheckpointError
from mdm_hf.config import MDMConfig
from mdm_hf.distill import MDMDistiller, NonFiniteLossError


def tiny_config(model_dir: str, dataset_dir: str, output_dir: Path, **overrides) -> MDMConfig:
    values = dict(
        model_name_or_path=model_dir,
        dataset_name=dataset_dir,
        num_pairs=8,
        max_steps=20,
        real_batch_size=16,
        syn_batch_size=8,
        lr_pixels=10.0,
        lr_text=10.0,
        eval_steps=0,
        save_steps=10,
        logging_steps=5,
        output_dir=str(output_dir),
        cache_dir=str(output_dir.parent / "cache"),
        seed=0,
    )
    values.update(overrides)
    return MDMConfig(**values)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_distillation_lowers_the_objective(family, tiny_model_dirs, tiny_dataset_dir, tmp_path):
    cfg = tiny_config(tiny_model_dirs[family], tiny_dataset_dir, tmp_path / "out")
    distiller = MDMDistiller(cfg)
    distiller.setup()
    distiller.initialize()
    fixed_real = torch.arange(distiller.train_data.num_captions)
    before = distiller.objective(fixed_real)
    synthetic = distiller.distill()
    distiller.teacher.model.eval()
    distiller.syn_pixels.data.copy_(synthetic.pixel_values)
    distiller.syn_text.data.copy_(synthetic.text_features)
    after = distiller.objective(fixed_real)
    assert after < before, (family, before, after)
    assert len(synthetic) == 8
    assert synthetic.pixel_values.shape == (8, 3, 32, 32)
    assert torch.isfinite(synthetic.pixel_values).all()
    # each synthetic pair started from a distinct real pair and names its nearest real captions
    assert len(set(synthetic.source_indices)) == 8
    assert all(caps for caps in synthetic.captions)


def test_resume_equals_uninterrupted_run(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    straight = MDMDistiller(tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "a")).distill()

    first = tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "b", max_steps=10)
    MDMDistiller(first).distill()
    resumed_cfg = tiny_config(
        tiny_clip_dir, tiny_dataset_dir, tmp_path / "b", resume_from_checkpoint="latest"
    )
    resumed = MDMDistiller(resumed_cfg).distill()

    assert torch.equal(straight.pixel_values, resumed.pixel_values)
    assert torch.equal(straight.text_features, resumed.text_features)
    state = json.loads((tmp_path / "b" / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["step"] == 20


def test_output_dir_is_never_overwritten_silently(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        MDMDistiller(tiny_config(tiny_clip_dir, tiny_dataset_dir, out)).distill()
    assert (out / "keep.txt").read_text() == "precious"


def test_budget_larger_than_dataset_is_refused(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    cfg = tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "out", num_pairs=10_000)
    with pytest.raises(ValueError, match="larger than the dataset"):
        MDMDistiller(cfg).distill()


def test_nan_loss_saves_last_good_state_and_explains(tiny_clip_dir, tiny_dataset_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "out", save_steps=0)
    distiller = MDMDistiller(cfg)
    distiller.setup()
    real_loss = distiller.loss_fn.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 6:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(distiller.loss_fn, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="last good state is saved"):
        distiller.distill()
    ckpt = tmp_path / "out" / "checkpoint-5"
    tensors = load_file(str(ckpt / "synthetic.safetensors"))
    assert torch.isfinite(tensors["pixel_values"]).all()
    assert torch.equal(tensors["pixel_values"], distiller.syn_pixels.detach())
    # the saved state is usable: a resumed run (without the poison) continues from step 5
    resumed = MDMDistiller(
        tiny_config(
            tiny_clip_dir, tiny_dataset_dir, tmp_path / "out", save_steps=0, resume_from_checkpoint=str(ckpt)
        )
    )
    synthetic = resumed.distill()
    assert resumed.state.step == 20 and torch.isfinite(synthetic.pixel_values).all()


def test_validation_hook_keeps_best_state_and_stops_early(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    scores = iter([5.0, 9.0, 7.0, 6.0, 1.0, 1.0])
    seen = []

    def hook(synthetic, step):
        seen.append((step, synthetic.pixel_values.clone()))
        return {"mean": next(scores)}

    cfg = tiny_config(
        tiny_clip_dir,
        tiny_dataset_dir,
        tmp_path / "out",
        eval_steps=2,
        early_stopping_patience=2,
        eval_on_start=False,
    )
    distiller = MDMDistiller(cfg, validation_fn=hook)
    best = distiller.distill()
    assert [s for s, _ in seen] == [2, 4, 6, 8]  # stopped after two evaluations without improvement
    assert distiller.state.best_step == 4
    assert torch.equal(best.pixel_values, seen[1][1])


def test_eval_on_start_can_keep_the_initial_coreset(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    """When distillation never beats the k-means coreset on validation, eval_on_start returns the coreset itself."""
    scores = iter([9.0, 5.0, 4.0, 3.0, 2.0])
    seen = []

    def hook(synthetic, step):
        seen.append(step)
        return {"mean": next(scores)}

    cfg = tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "out", eval_steps=5, eval_on_start=True)
    distiller = MDMDistiller(cfg, validation_fn=hook)
    distiller.setup()
    initial_pixels = distiller.real_pixels(distiller.initialize()).cpu()
    best = distiller.distill()
    assert seen == [0, 5, 10, 15, 20] and distiller.state.best_step == 0
    assert torch.equal(best.pixel_values, initial_pixels)
    assert not torch.equal(distiller.syn_pixels.detach().cpu(), initial_pixels)  # the run itself did move


def _random_lora_bank(teacher, num_experts=2, num_epochs=2, rank=2):
    from mdm_hf.merge import ExpertBank, LowRankDelta

    params = dict(teacher.model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    targets = [n for n in params if n.startswith("vision_model.") and n.endswith("q_proj.weight")]
    experts = []
    for _ in range(num_experts):
        epochs = []
        for _ in range(num_epochs):
            deltas = {
                n: LowRankDelta(
                    torch.randn(rank, params[n].shape[1], generator=gen) * 0.1,
                    torch.randn(params[n].shape[0], rank, generator=gen) * 0.1,
                    scale=2.0,
                )
                for n in targets
            }
            proj = "visual_projection.weight" if "visual_projection.weight" in params else targets[0]
            deltas[proj] = torch.randn(params[proj].shape, generator=gen) * 0.05
            epochs.append(deltas)
        experts.append(epochs)
    return ExpertBank({k: v.detach().clone() for k, v in params.items()}, experts)


@pytest.mark.parametrize("mode", ["fresh", "pooled"])
def test_mixed_teachers_from_an_expert_bank(mode, tiny_clip_dir, tiny_dataset_dir, tmp_path):
    from mdm_hf.models import DualEncoder

    teacher = DualEncoder.from_pretrained(tiny_clip_dir)
    anchor = {k: v.detach().clone() for k, v in teacher.model.named_parameters()}
    bank = _random_lora_bank(teacher)
    cfg = tiny_config(
        tiny_clip_dir, tiny_dataset_dir, tmp_path / "out", teacher_mode=mode, teacher_pool_size=3
    )
    distiller = MDMDistiller(cfg, teacher=teacher, expert_bank=bank)
    synthetic = distiller.distill()
    assert torch.isfinite(synthetic.pixel_values).all()
    # the teacher now holds a mixed state: touched tensors moved away from the anchor, untouched ones did not
    params = dict(teacher.model.named_parameters())
    touched = set(bank.touched_keys)
    assert any(not torch.equal(params[k], anchor[k]) for k in touched)
    assert all(torch.equal(params[k], anchor[k]) for k in anchor if k not in touched)
    if mode == "pooled":
        assert len(distiller.pool) == 3
        assert distiller.pool[0]["zv"].shape[0] == distiller.train_data.num_captions


def test_report_to_tensorboard_logs_the_losses(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    MDMDistiller(
        tiny_config(tiny_clip_dir, tiny_dataset_dir, out, max_steps=10, report_to="tensorboard")
    ).distill()
    tags = set()
    for path in out.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert any("loss" in tag for tag in tags), tags


# ============================================================================================ blending (§7)
def _blend_distiller(tmp_path, model_dir, dataset_dir, **overrides) -> MDMDistiller:
    distiller = MDMDistiller(tiny_config(model_dir, dataset_dir, tmp_path / "out", **overrides))
    distiller.setup()
    distiller.initialize()
    return distiller


def _step_loss(distiller: MDMDistiller, syn_idx: torch.Tensor, gen: torch.Generator):
    real = torch.arange(distiller.train_data.num_captions)
    real_zv, real_zt = distiller.embed_real(real)
    syn_zv, syn_zt, pairs = distiller._embed_synthetic(syn_idx, gen)
    return distiller._matching_loss(real_zv, real_zt, syn_zv, syn_zt, pairs)


def test_blend_alpha_zero_is_the_unblended_loss_and_draws_nothing(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    distiller = _blend_distiller(tmp_path, tiny_clip_dir, tiny_dataset_dir)
    assert distiller.config.blend_alpha == 0  # off by default
    idx, gen = torch.tensor([0, 3, 5, 6]), torch.Generator().manual_seed(3)
    before = gen.get_state()
    out = _step_loss(distiller, idx, gen)
    assert torch.equal(
        gen.get_state(), before
    )  # no draw: the run's later draws are those of an unblended run
    teacher = distiller.teacher
    real = torch.arange(distiller.train_data.num_captions)
    expected = distiller.loss_fn(
        *distiller.embed_real(real),
        teacher.image_embeds(distiller.syn_pixels[idx]),
        teacher.project_text(distiller.syn_text[idx]),
    )
    assert torch.equal(out.loss, expected.loss)


@pytest.mark.parametrize("terms", ["contrastive", "all"])
def test_blended_loss_is_the_loss_of_hand_blended_pairs(
    terms, tiny_clip_dir, tiny_dataset_dir, tmp_path, monkeypatch
):
    import mdm_hf.distill as distill_module
    from mdm_hf.losses import clip_contrastive_loss

    distiller = _blend_distiller(
        tmp_path, tiny_clip_dir, tiny_dataset_dir, blend_alpha=1.0, blend_terms=terms
    )
    idx, perm = torch.tensor([1, 2, 4, 7]), torch.tensor([2, 0, 3, 1])
    monkeypatch.setattr(distill_module, "draw_blend", lambda n, alpha, gen: (0.3, perm))
    out = _step_loss(distiller, idx, torch.Generator())
    teacher = distiller.teacher
    features, text = teacher.image_features(distiller.syn_pixels[idx]), distiller.syn_text[idx]
    zv = teacher.project_image(0.3 * features + 0.7 * features[perm])  # blended before the projections
    zt = teacher.project_text(0.3 * text + 0.7 * text[perm])
    assert torch.allclose(out.contrastive, clip_contrastive_loss(zv, zt, 1 / 0.07), atol=1e-6)
    real = torch.arange(distiller.train_data.num_captions)
    plain = distiller.loss_fn(
        *distiller.embed_real(real), teacher.project_image(features), teacher.project_text(text)
    )
    blended = distiller.loss_fn(*distiller.embed_real(real), zv, zt)
    gke_source = blended if terms == "all" else plain
    assert torch.allclose(out.agreement, gke_source.agreement, atol=1e-6)
    assert torch.allclose(out.discrepancy, gke_source.discrepancy, atol=1e-6)
    if terms == "contrastive":
        assert not torch.allclose(out.contrastive, plain.contrastive)
    # λ = 1 blends every pair with itself only: exactly the unblended loss
    monkeypatch.setattr(distill_module, "draw_blend", lambda n, alpha, gen: (1.0, perm))
    assert torch.equal(_step_loss(distiller, idx, torch.Generator()).loss, plain.loss)


@pytest.mark.parametrize("terms", ["contrastive", "all"])
def test_blended_loss_reaches_pixels_and_text_features(terms, tiny_clip_dir, tiny_dataset_dir, tmp_path):
    distiller = _blend_distiller(
        tmp_path,
        tiny_clip_dir,
        tiny_dataset_dir,
        blend_alpha=1.0,
        blend_terms=terms,
        lambda_agreement=0.0,
        lambda_discrepancy=0.0,
    )  # fmt: skip  (the contrastive term alone: for terms=contrastive its gradient passes only the blended pairs)
    idx = torch.tensor([0, 2, 5, 6])
    out = _step_loss(distiller, idx, torch.Generator().manual_seed(0))
    out.loss.backward()
    for grad in (distiller.syn_pixels.grad, distiller.syn_text.grad):
        assert torch.isfinite(grad).all()
        assert all(grad[i].abs().sum() > 0 for i in idx)  # every pair of the mini-batch takes part
        untouched = [i for i in range(8) if i not in idx.tolist()]
        assert grad[untouched].abs().sum() == 0


def test_blended_run_is_reproducible_resumable_and_differs(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    def run(name, **overrides):
        cfg = tiny_config(
            tiny_clip_dir, tiny_dataset_dir, tmp_path / name, **{"blend_alpha": 1.0, **overrides}
        )
        return MDMDistiller(cfg).distill()

    straight = run("a")
    again = run("b")
    assert torch.equal(straight.pixel_values, again.pixel_values)  # the same seed: the same draws
    run("c", max_steps=10)
    resumed = run("c", resume_from_checkpoint="latest")
    assert torch.equal(
        straight.pixel_values, resumed.pixel_values
    )  # the draws come from the restored generator
    assert torch.equal(straight.text_features, resumed.text_features)
    unblended = MDMDistiller(tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "d")).distill()
    assert not torch.equal(straight.pixel_values, unblended.pixel_values)
    assert (
        "blend_alpha" not in MDMConfig.resume_free_fields
        and "blend_terms" not in MDMConfig.resume_free_fields
    )
    with pytest.raises(CheckpointError, match="blend_alpha"):  # another alpha is another run: no resume
        run("c", blend_alpha=0.5, max_steps=30, resume_from_checkpoint="latest")


def test_blend_settings_are_checked(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="blend_alpha"):
            tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "x", blend_alpha=bad)
    with pytest.raises(ValueError, match="blend_terms all"):
        tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "x", blend_alpha=1.0, lambda_contrastive=0.0)
    with pytest.raises(ValueError, match="blend_terms"):
        tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "x", blend_terms="gke")
    tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "x", blend_alpha=1.0, lambda_contrastive=0.0,
                blend_terms="all")  # fmt: skip
