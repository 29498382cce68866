"""RepBlend as a trajectory-matching preset: the blend against a hand-worked case and replayed in both unrolling
passes, projection-only unrolling against finite differences, projection-only buffers (small, refused by the other
kind of run), the presets, the renamed buffer flags, trackers, and `mdm-hf tm-buffer` + `mdm-hf tm --preset
repblend` end to end on the tiny CLIP fixture."""

import copy
import logging
from pathlib import Path

import pytest
import torch

from mdm_hf.baselines.tm import (
    REPBLEND_PRESETS,
    Blend,
    TrajectoryBuffer,
    TrajectoryBufferConfig,
    TrajectoryMatchingConfig,
    TrajectoryMatchingDistiller,
    draw_blend,
    normalized_parameter_distance,
    record_trajectory_buffer,
    repblend_preset,
    sgd_unroll,
    unrolled_matching_gradients,
)
from mdm_hf.config import parse_dataclass_args
from mdm_hf.data import load_image_caption_dataset
from mdm_hf.models import DualEncoder

PROJECTIONS = ["visual_projection.weight", "text_projection.weight"]


# ============================================================================================ the blend itself
def test_blend_mixes_pairs_by_the_formula_on_a_hand_worked_case():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    y = torch.tensor([[1.0], [2.0], [3.0]])
    # λ = 0.25, π = (2, 0, 1): x' = 0.25 x + 0.75 x[π], x[π] = [[2, 2], [1, 0], [0, 1]], y[π] = [3, 1, 2]
    bx, by = Blend(0.25, torch.tensor([2, 0, 1]))(x, y)
    assert bx.tolist() == [[1.75, 1.5], [0.75, 0.25], [0.5, 1.25]]
    assert by.tolist() == [[2.5], [1.25], [2.25]]
    ix, iy = Blend(1.0, torch.tensor([2, 0, 1]))(x, y)  # λ = 1: the pairs themselves
    assert torch.equal(ix, x) and torch.equal(iy, y)


def test_draw_blend_is_reproducible_off_at_alpha_zero_and_beta_distributed():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert draw_blend(5, 0.0, gen) is None and torch.equal(gen.get_state(), state)  # nothing drawn when off
    a, b = (
        draw_blend(5, 1.0, torch.Generator().manual_seed(3)),
        draw_blend(5, 1.0, torch.Generator().manual_seed(3)),
    )
    assert a.lam == b.lam and torch.equal(a.permutation, b.permutation)
    assert sorted(a.permutation.tolist()) == [0, 1, 2, 3, 4]
    for alpha in (1.0, 0.2):  # Beta(α, α): mean 1/2, variance 1 / (4 (2α + 1))
        lams = torch.tensor([draw_blend(3, alpha, gen).lam for _ in range(4000)])
        assert float(lams.mean()) == pytest.approx(0.5, abs=0.03)
        assert float(lams.var()) == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.1)
    with pytest.raises(ValueError, match="blend_alpha"):
        draw_blend(3, -1.0, gen)


# ============================================================================================ tiny CLIP fixtures
@pytest.fixture(scope="module")
def tiny(tiny_clip_dir, tiny_dataset_dir, tmp_path_factory):
    """The tiny CLIP anchor, its train split and two 1-expert x 2-epoch SGD buffers: projections only and full."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("repblend")
    anchor = DualEncoder.from_pretrained(tiny_clip_dir)
    train = load_image_caption_dataset(tiny_dataset_dir, "train")
    common = dict(num_experts=1, num_epochs=2, learning_rate=0.1, batch_size=8, cache_dir=str(root / "cache"))
    buffers = {
        kind: record_trajectory_buffer(anchor, train, root / kind, trainable=kind, **common)
        for kind in ("projections", "full")
    }
    yield {"anchor": anchor, "train": train, "root": root, "model": tiny_clip_dir, "data": tiny_dataset_dir,
           **buffers}  # fmt: skip
    torch.set_num_threads(before)


def _distiller(tiny, out, teacher=None, buffer=None, **kw) -> TrajectoryMatchingDistiller:
    values = dict(
        model_name_or_path=tiny["model"], dataset_name=tiny["data"], trajectory_buffer=str(tiny["projections"]),
        cache_dir=str(tiny["root"] / "cache"), preset="repblend", num_pairs=6, syn_steps=3, mini_batch_size=4,
        max_start_epoch=1, max_steps=2, eval_steps=0, save_steps=0, output_dir=str(out), logging_steps=0,
        device="cpu", lr_pixels=1.0, lr_text=1.0,
    )  # fmt: skip
    values.update(kw)
    return TrajectoryMatchingDistiller(
        TrajectoryMatchingConfig(**values), teacher=teacher or tiny["anchor"], train_data=tiny["train"],
        buffer=buffer,
    )  # fmt: skip


# ============================================================================================ buffers
def test_projection_only_buffer_records_the_two_projections_and_is_much_smaller(tiny):
    projections = TrajectoryBuffer(tiny["projections"], tiny["anchor"])
    full = TrajectoryBuffer(tiny["full"], tiny["anchor"])
    assert (projections.trainable, full.trainable) == ("projections", "full")
    assert sorted(projections.names) == sorted(PROJECTIONS) and len(full.names) > 40
    params = dict(tiny["anchor"].model.named_parameters())
    for name in PROJECTIONS:  # the projections moved along the trajectory
        assert not torch.equal(projections.checkpoint(0, 2)[name], params[name].detach())

    def weight_bytes(directory) -> int:
        return sum(p.stat().st_size for p in Path(directory).rglob("model.safetensors"))

    data_bytes = 2 * sum(params[n].numel() for n in PROJECTIONS) * 4  # 2 epochs of two float32 matrices
    small, large = weight_bytes(tiny["projections"]), weight_bytes(tiny["full"])
    assert data_bytes <= small < data_bytes + 2 * 1024  # plus a safetensors header per file
    assert small < 0.1 * large
    assert projections.size_bytes() < full.size_bytes() / 3  # whole folders, manifests and configs included


def test_each_kind_of_run_refuses_the_other_kind_of_buffer(tiny, tmp_path, tiny_siglip_dir):
    with pytest.raises(ValueError, match=r"projections only \(RepBlend\).*tm-buffer --trainable full"):
        _distiller(tiny, tmp_path / "a", preset="lors").setup()
    with pytest.raises(ValueError, match=r"vision tower and both projections.*--trainable projections"):
        _distiller(tiny, tmp_path / "b", trajectory_buffer=str(tiny["full"])).setup()
    siglip = DualEncoder.from_pretrained(tiny_siglip_dir)
    with pytest.raises(ValueError, match="no image projection"):
        record_trajectory_buffer(siglip, tiny["train"], tmp_path / "siglip", trainable="projections")
    assert not (tmp_path / "siglip").exists()


# ============================================================================================ blending in the unrolling
def test_both_unrolling_passes_blend_with_the_same_lambda_and_permutation(tiny, tmp_path, monkeypatch):
    d = _distiller(tiny, tmp_path / "out", unroll="tesla")
    d.initialize()
    seen = []
    original = Blend.__call__

    def recording(self, image_features, text_features):
        out = original(self, image_features, text_features)
        seen.append((self, image_features.detach().clone(), *(t.detach().clone() for t in out)))
        return out

    monkeypatch.setattr(Blend, "__call__", recording)
    probe = torch.Generator().manual_seed(5)
    d.sample_trajectory(probe)
    batches = d.sample_batches(probe)  # the draws training_step makes from the same seed
    assert len({b.blend.lam for b in batches}) == 3  # one λ per step
    with torch.no_grad():  # the frozen encoder's features of each step's synthetic pairs, before they move
        features = [
            (tiny["anchor"].image_features(d.syn_pixels[b.indices]), d.syn_text[b.indices].clone())
            for b in batches
        ]
    d.training_step(torch.Generator().manual_seed(5))
    assert len(seen) == 6  # TESLA: every step is evaluated twice
    for step, (batch, (x, y)) in enumerate(zip(batches, features)):
        first, second = seen[step], seen[3 + step]
        assert first[0].lam == second[0].lam == batch.blend.lam
        assert torch.equal(first[0].permutation, batch.blend.permutation)
        assert all(torch.equal(a, b) for a, b in zip(first[1:], second[1:]))  # identical blended inputs
        lam, perm = batch.blend.lam, batch.blend.permutation  # ... and they are the formula
        assert torch.allclose(first[2], lam * x + (1 - lam) * x[perm], atol=1e-6)
        assert torch.allclose(first[3], lam * y + (1 - lam) * y[perm], atol=1e-6)
    assert not torch.equal(seen[0][2], seen[1][2])  # steps differ


@pytest.mark.parametrize("mode,steps", [("full", 2), ("tesla", 1)])
def test_projection_only_unrolling_gradient_matches_finite_differences(tiny, tmp_path, mode, steps):
    """float64; with one step TESLA is exact, so a blend redrawn in its second pass would fail the check."""
    teacher = copy.deepcopy(tiny["anchor"])
    teacher.model.double()
    buffer = TrajectoryBuffer(tiny["projections"], tiny["anchor"])
    d = _distiller(tiny, tmp_path / mode, teacher=teacher, buffer=buffer, similarity="none", inner_loss="infonce",
                   syn_steps=steps)  # fmt: skip
    d.initialize()
    d.syn_pixels = d.syn_pixels.detach().double().requires_grad_(True)
    d.syn_text = d.syn_text.detach().double().requires_grad_(True)
    batches = d.sample_batches(torch.Generator().manual_seed(1))
    assert all(b.blend is not None for b in batches)
    start, target = (
        {n: t.double() for n, t in d.buffer.checkpoint(0, e).items()} for e in (0, 1)
    )  # fmt: skip
    lrs = {n: torch.tensor(0.5, dtype=torch.float64, requires_grad=True) for n in d.names}
    meta = lambda end: normalized_parameter_distance(end, start, target, d.groups)[0]  # noqa: E731
    inputs = [d.syn_pixels, d.syn_text]
    _, _, grads = unrolled_matching_gradients(d.inner_loss, start, lrs, batches, meta, inputs, mode)

    def value() -> float:  # the matching loss at the current synthetic data (same batches, same blends)
        with torch.enable_grad():
            return float(meta(sgd_unroll(d.inner_loss, start, lrs, batches, create_graph=False)).detach())

    gen = torch.Generator().manual_seed(0)
    used = batches[0].indices.tolist()
    for tensor, grad in zip(inputs, grads):
        rows = grad.reshape(len(grad), -1)
        assert rows.abs().max() > 1e-4  # a real signal, through the frozen encoder and the blend
        largest = divmod(int(rows.abs().argmax()), rows.shape[1])
        picks = [largest] + [
            (used[i], int(torch.randint(rows.shape[1], (1,), generator=gen))) for i in range(3)
        ]
        for row, col in picks:
            entry = tensor.data[row].view(-1)
            old, eps = float(entry[col]), 1e-6
            entry[col] = old + eps
            up = value()
            entry[col] = old - eps
            down = value()
            entry[col] = old
            assert float(rows[row, col]) == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


# ============================================================================================ presets and flags
def test_repblend_presets_follow_the_released_scripts_and_explicit_values_win():
    cfg = TrajectoryMatchingConfig(preset="repblend", num_pairs=480)
    expected = {"trainable": "projections", "blend_alpha": 1.0, "mini_batch_size": 20, "lr_pixels": 1000.0,
                "lr_text": 1000.0, "sim_rank": 20, "sim_alpha": 0.01, "max_start_epoch": 3, "syn_steps": 8,
                "expert_epochs": 1, "similarity": "lowrank", "inner_loss": "wbce", "unroll": "tesla",
                "init": "random", "min_syn_lr": 1e-3}  # fmt: skip
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.lr_sim == pytest.approx(100.0 * 1e-2) and cfg.lr_lr == pytest.approx(
        1e-2 * 1e-2
    )  # TM_STABILITY
    faithful = TrajectoryMatchingConfig(preset="repblend_faithful", num_pairs=100)
    assert (faithful.lr_lr, faithful.lr_sim, faithful.min_syn_lr, faithful.sim_alpha) == (
        1e-2,
        10.0,
        None,
        3.0,
    )
    assert (
        repblend_preset(200, faithful=True)["lr_pixels"] == 1000.0 and REPBLEND_PRESETS[100]["sim_rank"] == 10
    )
    assert TrajectoryMatchingConfig(preset="repblend", blend_alpha=0.0).blend_alpha == 0.0  # explicit wins
    lors = TrajectoryMatchingConfig(preset="lors")
    assert (lors.trainable, lors.blend_alpha) == ("full", 0.0)
    parsed = parse_dataclass_args(TrajectoryMatchingConfig, ["--preset", "repblend", "--blend_alpha", "0.5"])
    assert (parsed.trainable, parsed.blend_alpha) == ("projections", 0.5)
    with pytest.raises(ValueError, match="wrong type for preset='repblend2'"):
        TrajectoryMatchingConfig(preset="repblend2")
    with pytest.raises(SystemExit):  # --help lists the choices; others are refused while parsing
        parse_dataclass_args(TrajectoryMatchingConfig, ["--trainable", "vision"])
    with pytest.raises(ValueError, match=r"blend_alpha=-1\.0, device='gpu0'"):
        TrajectoryMatchingConfig(blend_alpha=-1.0, device="gpu0")


def test_old_buffer_flag_names_warn_and_work(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="mdm_hf"):
        cfg = TrajectoryBufferConfig(num_epochs=4, batch_size=16)
    assert (cfg.num_train_epochs, cfg.per_device_train_batch_size) == (4, 16)
    assert (cfg.num_epochs, cfg.batch_size) == (None, None)
    assert "--num_epochs is deprecated; use --num_train_epochs" in caplog.text
    assert "--batch_size is deprecated; use --per_device_train_batch_size" in caplog.text
    yaml_file = tmp_path / "buffer.yaml"
    yaml_file.write_text("num_epochs: 5\n")
    parsed = parse_dataclass_args(TrajectoryBufferConfig, ["--config", str(yaml_file), "--batch_size", "8"])
    assert (parsed.num_train_epochs, parsed.per_device_train_batch_size) == (5, 8)
    with pytest.raises(ValueError, match="deprecated alias of --num_train_epochs"):
        TrajectoryBufferConfig(num_epochs=2, num_train_epochs=5)


# ============================================================================================ the command line
def _event_tags(directory: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in directory.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    return tags


def test_repblend_end_to_end_from_the_command_line(caplog, capsys, tiny_clip_dir, tiny_dataset_dir, tmp_path):
    """`mdm-hf tm-buffer --trainable projections` (old flag names, tensorboard) then `mdm-hf tm --preset repblend`:
    the set loads with SyntheticSet.from_pretrained and datasets.load_dataset."""
    import datasets

    from mdm_hf.bank import read_manifest
    from mdm_hf.cli import main
    from mdm_hf.synthetic import SyntheticSet

    common = ["--model_name_or_path", tiny_clip_dir, "--dataset_name", tiny_dataset_dir,
              "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    buffer = tmp_path / "buffer"
    buffer_flags = [*common, "--trainable", "projections", "--num_experts", "1", "--num_epochs", "2",
                    "--batch_size", "8", "--max_validation_images", "8", "--report_to", "tensorboard",
                    "--output_dir", str(buffer)]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="mdm_hf"):
        assert main(["tm-buffer", *buffer_flags]) == 0
    assert "--num_epochs is deprecated" in caplog.text
    assert "--preset repblend" in capsys.readouterr().out
    manifest = read_manifest(buffer)
    assert manifest["training"]["trainable"] == "projections" and manifest["training"]["num_epochs"] == 2
    assert manifest["training"]["per_device_train_batch_size"] == 8
    assert sorted(manifest["trained_parameters"]) == sorted(PROJECTIONS)
    assert {"train_loss", "validation/mean"} <= _event_tags(buffer / "tm-buffer")
    assert main(["tm-buffer", *buffer_flags, "--overwrite_output_dir"]) == 0  # its tracker logs are its own
    out = tmp_path / "tm-run"
    assert main(["tm", *common, "--trajectory_buffer", str(buffer), "--preset", "repblend", "--num_pairs", "6",
                 "--syn_steps", "2", "--max_steps", "2", "--eval_steps", "0", "--lr_pixels", "1.0", "--lr_text",
                 "1.0", "--logging_steps", "1", "--report_to", "tensorboard", "--device", "cpu",
                 "--output_dir", str(out)]) == 0  # fmt: skip
    synthetic = SyntheticSet.from_pretrained(out / "synthetic")
    synthetic.validate()
    assert len(synthetic) == 6 and synthetic.provenance["method"].startswith("RepBlend")
    assert synthetic.provenance["config"]["trainable"] == "projections"
    assert synthetic.provenance["config"]["blend_alpha"] == 1.0
    rows = datasets.load_dataset(str(out / "synthetic"), cache_dir=str(tmp_path / "ds-cache"))["train"]
    assert rows.num_rows == 6 and "pixel_values" in rows.column_names
    assert {"loss", "loss/image", "loss/text", "syn_lr/image"} <= _event_tags(out / "tm")
    # a full-network run is refused on this buffer, as one line and exit code 2
    assert main(["tm", *common, "--trajectory_buffer", str(buffer), "--preset", "lors", "--num_pairs", "6",
                 "--max_steps", "1", "--device", "cpu", "--output_dir", str(tmp_path / "lors")]) == 2  # fmt: skip
    assert "--trainable full" in capsys.readouterr().err
