"""Expert banks: LoRA / full experts trained on the tiny fixtures, saved, reloaded, merged, validated, pushed; anchor
pre-training. The mixed teacher built from a reloaded bank is checked against peft's own ``merge_and_unload()``
weights merged by hand with ``model_stock_merge`` (an independent path from the bank's LowRankDelta conversion)."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mdm_hf import testing
from mdm_hf.bank import check_anchor, load_expert_bank, lora_epoch_deltas, push_expert_bank, read_manifest
from mdm_hf.cli import experts_main
from mdm_hf.experts import ExpertTrainingConfig, lora_target_regex
from mdm_hf.models import DualEncoder

RECIPE_CONFIG = Path(__file__).parents[1] / "recipes" / "configs" / "experts_tiny.yaml"


def _tiny_args(model_dir, dataset_dir, out, *extra) -> list[str]:
    return ["--config", str(RECIPE_CONFIG), "--model_name_or_path", str(model_dir), "--dataset_name",
            str(dataset_dir), "--output_dir", str(out), "--cache_dir", str(Path(out).parent / "cache"), *extra]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine spinning threads cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def banks(_one_thread, tiny_model_dirs, tiny_dataset_dir, tmp_path_factory) -> dict:
    """2 experts x 2 epochs for CLIP and SigLIP through the CLI entry point, plus a full-weight CLIP bank."""
    root = tmp_path_factory.mktemp("banks")
    out = {}
    for family in ("clip", "siglip"):
        assert experts_main(_tiny_args(tiny_model_dirs[family], tiny_dataset_dir, root / family)) == 0
        out[family] = root / family
    args = _tiny_args(tiny_model_dirs["clip"], tiny_dataset_dir, root / "full", "--full_finetune", "true",
                      "--learning_rate", "0.001", "--validation_split", "none")  # fmt: skip
    assert experts_main(args) == 0
    out["full"] = root / "full"
    return out


def _anchor(model_dir) -> DualEncoder:
    return DualEncoder.from_pretrained(str(model_dir))


# ---------------------------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("family", ["clip", "siglip", "dual_encoder"])
def test_lora_targets_are_the_vision_attention_layers_only(family, tiny_model_dirs):
    import re

    model = _anchor(tiny_model_dirs[family]).model
    regex = lora_target_regex(model)
    hits = [n for n, _ in model.named_modules() if re.fullmatch(regex, n)]
    expected = [
        f"vision_model.encoder.layers.{i}.self_attn.{p}"
        for i in range(2)
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    ]
    assert sorted(hits) == sorted(expected)  # not the text tower, not SigLIP's pooling head's out_proj
    with_mlp = [
        n for n, _ in model.named_modules() if re.fullmatch(lora_target_regex(model, ["fc1", "q_proj"]), n)
    ]
    assert sorted(with_mlp) == sorted(
        f"vision_model.encoder.layers.{i}.{p}" for i in range(2) for p in ("mlp.fc1", "self_attn.q_proj")
    )
    with pytest.raises(ValueError, match="query_proj"):
        lora_target_regex(model, ["query_proj"])


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="one seed per expert"):
        ExpertTrainingConfig(num_experts=3, seeds=[1, 2])
    with pytest.raises(ValueError, match="hub_model_id"):
        ExpertTrainingConfig(push_to_hub=True)
    assert ExpertTrainingConfig(num_experts=3, seed=5).expert_seeds == [5, 6, 7]


@pytest.mark.parametrize("cls", ["experts", "anchor"])
def test_old_flag_names_still_work_with_a_warning(cls, tmp_path, caplog):
    """num_epochs -> num_train_epochs (and experts' revision -> model_revision), as TrainingArguments names them:
    the old name works as a CLI flag, a YAML key and a Python keyword, with a warning; two values are refused."""
    from mdm_hf.anchor import AnchorPretrainingConfig
    from mdm_hf.config import parse_dataclass_args

    config_cls = ExpertTrainingConfig if cls == "experts" else AnchorPretrainingConfig
    required = [] if cls == "experts" else ["--dataset_name", "x"]
    with caplog.at_level("WARNING", logger="mdm_hf.config"):
        parsed = parse_dataclass_args(config_cls, [*required, "--num_epochs", "3"])
    assert (parsed.num_train_epochs, parsed.num_epochs) == (3, None)
    assert "--num_epochs is deprecated; use --num_train_epochs" in caplog.text
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text("num_epochs: 2\n")
    assert parse_dataclass_args(config_cls, ["--config", str(yaml_file), *required]).num_train_epochs == 2
    keyword = {} if cls == "experts" else {"dataset_name": "x"}
    assert config_cls(num_epochs=4, **keyword).num_train_epochs == 4
    assert (
        config_cls(num_epochs=4, num_train_epochs=4, **keyword).num_train_epochs == 4
    )  # the same value twice
    with pytest.raises(ValueError, match="--num_epochs=3 and --num_train_epochs=4: .* give the value once"):
        parse_dataclass_args(config_cls, [*required, "--num_epochs", "3", "--num_train_epochs", "4"])
    with pytest.raises(ValueError, match="deprecated alias of --num_train_epochs"):
        config_cls(num_epochs=3, num_train_epochs=4, **keyword)
    if cls == "experts":
        caplog.clear()
        with caplog.at_level("WARNING", logger="mdm_hf.config"):
            config = parse_dataclass_args(ExpertTrainingConfig, ["--revision", "v1"])
        assert (config.model_revision, config.revision) == (
            "v1",
            None,
        ) and "--revision is deprecated" in caplog.text
        assert ExpertTrainingConfig(revision="v2").model_revision == "v2"
        with pytest.raises(ValueError, match="deprecated alias of --model_revision"):
            ExpertTrainingConfig(revision="v1", model_revision="v2")
        assert not {"num_epochs", "revision"} & set(config.to_dict())  # the manifest records today's names


def test_help_lists_the_choices_and_wrong_choices_are_refused(capsys):
    from mdm_hf.anchor import AnchorPretrainingConfig
    from mdm_hf.config import parse_dataclass_args

    schedules = "{constant,constant_with_warmup,linear,cosine,cosine_with_restarts,polynomial,inverse_sqrt}"
    for config_cls in (ExpertTrainingConfig, AnchorPretrainingConfig):
        with pytest.raises(SystemExit):
            parse_dataclass_args(config_cls, ["--help"])
        shown = capsys.readouterr().out
        assert (
            f"--lr_scheduler_type {schedules}" in shown
            and "--report_to" in shown
            and "--disable_tqdm" in shown
        )
        assert "--num_epochs NUM_EPOCHS" in shown and "Deprecated alias of --num_train_epochs." in " ".join(
            shown.split()
        )
    assert "--text_pooling {mean,pooler,last}" in shown  # the anchor's
    with pytest.raises(
        ValueError, match="lr_scheduler_type='cosine_with_min_lr' .*expected one of 'constant'"
    ):
        ExpertTrainingConfig(lr_scheduler_type="cosine_with_min_lr")  # needs kwargs the configs do not pass
    with pytest.raises(ValueError, match="constant schedule has no warm-up.*constant_with_warmup"):
        ExpertTrainingConfig(warmup_ratio=0.1)
    with pytest.raises(ValueError, match="wrong type for text_pooling='auto'"):
        AnchorPretrainingConfig(dataset_name="x", text_pooling="auto")


# ---------------------------------------------------------------------------------------------- bank format
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_bank_layout_manifest_and_card(family, banks, tiny_model_dirs):
    bank = banks[family]
    manifest = read_manifest(bank)
    assert manifest["kind"] == "lora" and manifest["family"] == family
    assert manifest["anchor"]["name_or_path"] == tiny_model_dirs[family]
    assert manifest["seeds"] == [0, 1] and manifest["num_epochs"] == 2
    assert manifest["lora"]["r"] == 4 and manifest["lora"]["lora_alpha"] == 8
    expected_saved = ["text_model.head"] if family == "siglip" else ["visual_projection", "text_projection"]
    assert manifest["lora"]["modules_to_save"] == expected_saved
    for expert in manifest["experts"]:
        assert [e["epoch"] for e in expert["epochs"]] == [1, 2]
        for ep in expert["epochs"]:
            assert math.isfinite(ep["train_loss"]) and 0 <= ep["validation"]["mean"] <= 100
            files = sorted(p.name for p in (bank / ep["path"]).iterdir())
            assert files == [
                "adapter_config.json",
                "adapter_model.safetensors",
            ]  # no pickle, no peft stub card
            keys = load_file(str(bank / ep["path"] / "adapter_model.safetensors")).keys()
            assert not any(k.startswith("base_model.model.text_model.") and ".lora_" in k for k in keys)
            assert any(k.endswith(f"{expected_saved[0]}.weight") for k in keys)
    card = (bank / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "dataset-distillation" in card
    assert "| expert-1 | 1 | 2 |" in card
    # the experts moved away from the anchor and from each other
    a = load_file(str(bank / "expert-0" / "epoch-2" / "adapter_model.safetensors"))
    b = load_file(str(bank / "expert-1" / "epoch-2" / "adapter_model.safetensors"))
    lora_b = next(k for k in a if ".lora_B." in k)
    assert a[lora_b].abs().sum() > 0 and not torch.equal(a[lora_b], b[lora_b])


def test_interrupted_bank_resumes_to_the_uninterrupted_one(
    banks, tiny_model_dirs, tiny_dataset_dir, tmp_path
):
    """A run cut off after expert 0 (expert 1 half-written) resumes to exactly the straight 2-expert bank."""
    out = tmp_path / "bank"
    args = _tiny_args(tiny_model_dirs["clip"], tiny_dataset_dir, out)
    assert experts_main([*args, "--num_experts", "1"]) == 0
    partial = out / "expert-1" / "epoch-1"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"cut off")
    with pytest.raises(FileExistsError, match="not empty"):  # never overwritten silently
        experts_main(args)
    with pytest.raises(ValueError, match=r"other training\.learning_rate"):
        experts_main([*args, "--resume", "true", "--learning_rate", "0.02"])
    assert experts_main([*args, "--resume", "true"]) == 0
    straight, resumed = read_manifest(banks["clip"]), read_manifest(out)
    assert [e["seed"] for e in resumed["experts"]] == [0, 1]
    for a, b in zip(straight["experts"], resumed["experts"], strict=True):
        assert [e["train_loss"] for e in a["epochs"]] == [e["train_loss"] for e in b["epochs"]]
        for ea, eb in zip(a["epochs"], b["epochs"], strict=True):
            ta = load_file(str(banks["clip"] / ea["path"] / "adapter_model.safetensors"))
            tb = load_file(str(out / eb["path"] / "adapter_model.safetensors"))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(ValueError, match="already has 2 experts"):
        experts_main([*args, "--resume", "true", "--num_experts", "1"])
    # a bank written before num_epochs was renamed (and before the logging settings) resumes all the same
    manifest = json.loads((out / "manifest.json").read_text())
    training = manifest["training"]
    training["num_epochs"] = training.pop("num_train_epochs")
    for new_setting in ("logging_steps", "report_to", "disable_tqdm"):
        del training[new_setting]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert experts_main([*args, "--resume", "true"]) == 0  # refused as "other training.num_epochs" otherwise
    # cut off inside the first expert: no manifest yet, only its epochs (and its tracker logs) -> they are redone
    first = tmp_path / "first"
    (first / "expert-0" / "epoch-1").mkdir(parents=True)
    (first / "mdm-experts").mkdir()
    args = _tiny_args(
        tiny_model_dirs["clip"], tiny_dataset_dir, first, "--num_experts", "1", "--resume", "true"
    )
    assert experts_main(args) == 0 and len(read_manifest(first)["experts"]) == 1
    assert not (first / "mdm-experts").exists()  # the cut-off expert is redone, and so are its logs


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the TensorBoard event files in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_report_to_tensorboard_logs_the_bank_as_one_run(
    tiny_clip_dir, tiny_dataset_dir, tmp_path, caplog, capfd
):
    """2 experts x 2 epochs x 2 steps: every step's loss, learning rate and epoch, each epoch's loss and recall, in
    one run whose steps continue from expert to expert; the values agree with the manifest and a hand-worked
    linear schedule; log lines round floats; the progress bar shows on the main process."""
    from mdm_hf.checkpointing import prepare_output_dir
    from mdm_hf.experts import owns_bank_output

    out = tmp_path / "bank"
    args = _tiny_args(tiny_clip_dir, tiny_dataset_dir, out, "--report_to", "tensorboard", "--logging_steps", "1",
                      "--lr_scheduler_type", "linear")  # fmt: skip
    with caplog.at_level("INFO", logger="mdm_hf.training"):
        assert experts_main(args) == 0
    assert "expert-1: 100%" in capfd.readouterr().err
    scalars, manifest = _scalars(out / "mdm-experts"), read_manifest(out)
    for index, expert in enumerate(manifest["experts"]):
        tag = f"expert-{index}/"
        steps = [4 * index + s for s in (1, 2, 3, 4)]  # expert 1 continues where expert 0 ended
        assert [s for s, _ in scalars[tag + "train/loss"]] == steps
        assert [v for _, v in scalars[tag + "train/learning_rate"]] == pytest.approx(
            [0.0075, 0.005, 0.0025, 0.0]
        )
        assert scalars[tag + "train/epoch"] == list(zip(steps, [0.5, 1.0, 1.5, 2.0]))
        losses = [v for _, v in scalars[tag + "train/loss"]]
        epoch_losses = scalars[tag + "train/epoch_loss"]
        assert [s for s, _ in epoch_losses] == [steps[1], steps[3]]
        assert [v for _, v in epoch_losses] == pytest.approx(
            [(losses[0] + losses[1]) / 2, (losses[2] + losses[3]) / 2]
        )
        assert [v for _, v in epoch_losses] == pytest.approx([e["train_loss"] for e in expert["epochs"]])
        assert [v for _, v in scalars[tag + "eval/mean"]] == pytest.approx(
            [e["validation"]["mean"] for e in expert["epochs"]]
        )
    assert re.search(r"expert-1 step 5: train/loss \d\.\d{3}, train/learning_rate 0\.0075, train/epoch 0\.5$",
                     caplog.text, re.MULTILINE)  # fmt: skip
    assert owns_bank_output(out / "mdm-experts")  # --overwrite_output_dir may remove the logs with the bank
    prepare_output_dir(out, owned=owns_bank_output, overwrite=True)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_lora_offsets_equal_peft_merge_and_unload(family, banks, tiny_model_dirs):
    """Every converted checkpoint: anchor + offsets == peft's merge_and_unload() weights, tensor by tensor."""
    from peft import PeftModel

    anchor = _anchor(tiny_model_dirs[family])
    anchor_params = {n: p.detach().clone() for n, p in anchor.model.named_parameters()}
    manifest = read_manifest(banks[family])
    for expert in manifest["experts"]:
        for ep in expert["epochs"]:
            deltas = lora_epoch_deltas(banks[family] / ep["path"], anchor_params, manifest["anchor"])
            merged = PeftModel.from_pretrained(
                _anchor(tiny_model_dirs[family]).model, str(banks[family] / ep["path"])
            )
            merged = dict(merged.merge_and_unload().named_parameters())
            assert set(merged) == set(anchor_params)
            changed = {n for n in merged if not torch.equal(merged[n], anchor_params[n])}
            assert changed == set(deltas)  # exactly the LoRA layers and the projections
            for name, delta in deltas.items():
                dense = delta.dense() if hasattr(delta, "dense") else delta
                torch.testing.assert_close(anchor_params[name] + dense, merged[name], rtol=1e-5, atol=1e-6)


def _hand_merge_lora(family, bank, draws, tiny_model_dirs, alpha):
    """model_stock_merge over full state dicts from peft's merge_and_unload() of each drawn checkpoint."""
    from peft import PeftModel

    from mdm_hf.merge import model_stock_merge

    manifest = read_manifest(bank)
    anchor_sd = {n: p.detach().clone() for n, p in _anchor(tiny_model_dirs[family]).model.named_parameters()}
    experts = []
    for expert_index, epoch in draws:  # epochs are 1-based, as ExpertBank.sample draws them
        path = bank / manifest["experts"][expert_index]["epochs"][epoch - 1]["path"]
        model = PeftModel.from_pretrained(
            _anchor(tiny_model_dirs[family]).model, str(path)
        ).merge_and_unload()
        experts.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return anchor_sd, model_stock_merge(anchor_sd, experts, alpha)


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("draws", [[(0, 2), (1, 1)], [(1, 2), (1, 1)], [(0, 1), (1, 2), (0, 2)]])
def test_mixed_teacher_from_reloaded_bank_equals_hand_merge(family, draws, banks, tiny_model_dirs):
    alpha = 0.5
    anchor = _anchor(tiny_model_dirs[family])
    bank = load_expert_bank(str(banks[family]), anchor)
    state, _ = bank.merged_state(draws, alpha=alpha)
    anchor_sd, expected = _hand_merge_lora(family, banks[family], draws, tiny_model_dirs, alpha)
    for name, tensor in expected.items():
        got = state.get(name, anchor_sd[name])
        torch.testing.assert_close(got, tensor, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert any(not torch.equal(expected[n], anchor_sd[n]) for n in expected)  # the merge moved something
    # installing the mixed teacher puts exactly those weights into the anchor model
    bank.install(anchor.model, state)
    for name, param in anchor.model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-4, atol=1e-6)


def test_full_weight_experts_same_format_and_merge(banks, tiny_model_dirs):
    from mdm_hf.merge import model_stock_merge

    bank_dir = banks["full"]
    manifest = read_manifest(bank_dir)
    assert manifest["kind"] == "full" and manifest["lora"] is None
    anchor = _anchor(tiny_model_dirs["clip"])
    groups = anchor.parameter_groups()
    trained = set(manifest["trained_parameters"])
    assert trained == set(groups.vision) | {"visual_projection.weight", "text_projection.weight"}
    epoch_dir = bank_dir / "expert-0" / "epoch-1"
    assert sorted(p.name for p in epoch_dir.iterdir()) == ["expert_config.json", "model.safetensors"]
    assert set(load_file(str(epoch_dir / "model.safetensors"))) == trained
    assert (bank_dir / "README.md").read_text().count("full-weight") >= 1

    draws = [(0, 2), (1, 1)]
    bank = load_expert_bank(bank_dir, anchor)
    state, _ = bank.merged_state(draws, alpha=1.0)
    anchor_sd = {n: p.detach().clone() for n, p in anchor.model.named_parameters()}
    experts = []
    for e, k in draws:
        tensors = load_file(
            str(bank_dir / manifest["experts"][e]["epochs"][k - 1]["path"] / "model.safetensors")
        )
        experts.append({**anchor_sd, **tensors})
    expected = model_stock_merge(anchor_sd, experts, 1.0)
    for name, tensor in expected.items():
        torch.testing.assert_close(state.get(name, anchor_sd[name]), tensor, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(expected[n], anchor_sd[n]) for n in groups.text)  # the text tower is never touched


# ---------------------------------------------------------------------------------------------- validation
def test_bank_from_another_anchor_is_refused(banks, tiny_model_dirs, tmp_path):
    other_dir = testing.build_tiny_clip(tmp_path / "other-clip", seed=1)  # same architecture, other weights
    with pytest.raises(
        ValueError, match=r"trained from '.*clip'.*but the anchor is '.*other-clip'.*different weights"
    ):
        load_expert_bank(banks["clip"], _anchor(other_dir))
    with pytest.raises(ValueError, match="siglip bank cannot be applied to a clip model"):
        load_expert_bank(banks["siglip"], _anchor(tiny_model_dirs["clip"]))
    bigger = testing.build_tiny_clip(
        tmp_path / "clip-48px", image_size=48
    )  # other shapes (position embeddings)
    with pytest.raises(
        ValueError, match=r"differ in names or shapes.*position_embedding.weight \[17, 32\] vs \[37, 32\]"
    ):
        load_expert_bank(banks["clip"], _anchor(bigger))


def test_same_weights_under_another_name_are_accepted(banks, tiny_model_dirs, tmp_path):
    copy = Path(shutil.copytree(tiny_model_dirs["clip"], tmp_path / "snapshot"))
    bank = load_expert_bank(banks["clip"], _anchor(copy))
    assert len(bank.sample(torch.Generator().manual_seed(0), 2, None)) == 2


def test_adapter_problems_are_named(banks, tiny_model_dirs, tmp_path):
    bank = Path(shutil.copytree(banks["clip"], tmp_path / "bank"))
    epoch = bank / "expert-1" / "epoch-2"
    cfg = json.loads((epoch / "adapter_config.json").read_text())
    (epoch / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "someone/else"}))
    with pytest.raises(ValueError, match=r"expert-1/epoch-2: the adapter was trained from 'someone/else'"):
        load_expert_bank(bank, _anchor(tiny_model_dirs["clip"]))
    (epoch / "adapter_config.json").write_text(json.dumps(cfg))
    (epoch / "adapter_model.safetensors").rename(epoch / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickled adapter_model.bin, which is never loaded"):
        load_expert_bank(bank, _anchor(tiny_model_dirs["clip"]))


def test_offline_hub_id_gives_a_local_path_hint(tiny_clip_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"hf download someone/no-such-bank --local-dir .*--expert_bank"):
        load_expert_bank("someone/no-such-bank", _anchor(tiny_clip_dir))
    with pytest.raises(ValueError, match="is not an expert bank"):
        read_manifest(Path(tiny_clip_dir))


def test_rslora_and_rank_patterns_use_peft_scaling(tiny_clip_dir, tmp_path):
    """Non-zero random adapters with rsLoRA and per-module rank / alpha: offsets == merge_and_unload()."""
    from peft import LoraConfig, PeftModel, get_peft_model

    anchor = _anchor(tiny_clip_dir)
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=6, use_rslora=True, target_modules=lora_target_regex(anchor.model),
        rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}, init_lora_weights=False,
        base_model_name_or_path=tiny_clip_dir,
    )  # fmt: skip
    get_peft_model(_anchor(tiny_clip_dir).model, config).save_pretrained(str(tmp_path / "ad"))
    params = {n: p.detach().clone() for n, p in anchor.model.named_parameters()}
    deltas = lora_epoch_deltas(tmp_path / "ad", params, {"name_or_path": tiny_clip_dir, "revision": None})
    q = deltas["vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    v = deltas["vision_model.encoder.layers.0.self_attn.v_proj.weight"]
    assert q.lora_A.shape[0] == 2 and q.scale == pytest.approx(6 / math.sqrt(2))
    assert v.scale == pytest.approx(3 / math.sqrt(4))
    merged = dict(
        PeftModel.from_pretrained(_anchor(tiny_clip_dir).model, str(tmp_path / "ad"))
        .merge_and_unload()
        .named_parameters()
    )
    for name, delta in deltas.items():
        torch.testing.assert_close(params[name] + delta.dense(), merged[name], rtol=1e-5, atol=1e-6)


def test_check_anchor_accepts_its_own_fingerprint(tiny_siglip_dir):
    from mdm_hf.bank import anchor_fingerprint

    anchor = _anchor(tiny_siglip_dir)
    check_anchor({"name_or_path": "x", "family": "siglip", **anchor_fingerprint(anchor.model)}, anchor)


# ---------------------------------------------------------------------------------------------- Hub push
def test_push_uploads_a_model_repo_without_the_token(banks, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    bank = Path(shutil.copytree(banks["clip"], tmp_path / "bank"))
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = {"repo_id": repo_id, **kwargs, "token": self.token}

    def upload_folder(self, folder_path, repo_id, **kwargs):
        calls["upload"] = {"repo_id": repo_id, **kwargs}
        calls["files"] = sorted(
            str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()
        )
        calls["contents"] = b"".join(p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file())
        calls["card"] = (Path(folder_path) / "README.md").read_text()
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    token = "hf_SECRETtoken1234567890"
    url = push_expert_bank(bank, "someone/tiny-experts", private=True, token=token)
    assert url == "https://huggingface.co/someone/tiny-experts/commit/abc"
    assert calls["create"]["repo_type"] == "model" and calls["create"]["private"] is True
    assert calls["create"]["token"] == token  # handed to HfApi only
    assert calls["upload"]["repo_type"] == "model" and calls["upload"]["repo_id"] == "someone/tiny-experts"
    assert {"manifest.json", "README.md", "expert-0/epoch-1/adapter_model.safetensors",
            "expert-1/epoch-2/adapter_config.json"} <= set(calls["files"])  # fmt: skip
    assert token.encode() not in calls["contents"]
    assert 'load_expert_bank("someone/tiny-experts", anchor)' in calls["card"]  # rendered for the repo ...
    assert "someone/tiny-experts" not in (bank / "README.md").read_text()  # ... not written into the bank


# ---------------------------------------------------------------------------------------------- integration
def test_distiller_runs_from_a_bank_made_by_the_recipe(banks, tiny_clip_dir, tiny_dataset_dir, tmp_path):
    from mdm_hf.config import MDMConfig
    from mdm_hf.distill import MDMDistiller

    cfg = MDMConfig(
        model_name_or_path=tiny_clip_dir, dataset_name=tiny_dataset_dir, expert_bank=str(banks["clip"]), num_pairs=4,
        max_steps=3, real_batch_size=8, syn_batch_size=4, eval_steps=0, save_steps=0, output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    synthetic = MDMDistiller(cfg).distill()
    assert len(synthetic) == 4 and torch.isfinite(synthetic.pixel_values).all()


def _train_in_process(model_dir, dataset_dir, out_dir):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    from mdm_hf.experts import train_expert

    torch.set_num_threads(1)
    # A forked child inherits the parent's single-process accelerate state (other tests made an Accelerator).
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2
    cfg = ExpertTrainingConfig(
        model_name_or_path=model_dir, dataset_name=dataset_dir, num_experts=1, num_train_epochs=1, lora_r=4,
        learning_rate=1e-2, per_device_train_batch_size=4, max_train_images=16, validation_split=None,
        output_dir=str(out_dir / "bank"),
    )  # fmt: skip
    from mdm_hf.data import load_image_caption_dataset, preprocess_split_images

    anchor = _anchor(model_dir)
    data = load_image_caption_dataset(dataset_dir, "train", max_images=16)
    feats = anchor.encode_text_features(data.captions)
    _, encoder = train_expert(
        cfg, 0, anchor, data, feats, preprocess_split_images(anchor, data), acc, out_dir / "bank"
    )
    trained = {
        n: p.detach().cpu().contiguous() for n, p in encoder.model.named_parameters() if p.requires_grad
    }
    from safetensors.torch import save_file

    save_file(trained, str(out_dir / f"rank{acc.process_index}.safetensors"))


def test_two_process_data_parallel_keeps_ranks_in_sync(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    from accelerate import debug_launcher

    debug_launcher(_train_in_process, args=(tiny_clip_dir, tiny_dataset_dir, tmp_path), num_processes=2)
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and any(".lora_B." in k for k in rank0)
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], msg=key)  # DDP averaged the gradients
    assert any(rank0[k].abs().sum() > 0 for k in rank0 if ".lora_B." in k)
    assert (tmp_path / "bank" / "expert-0" / "epoch-1" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- anchor
def test_anchor_pretraining_gives_a_loadable_checkpoint_with_lower_loss(tiny_dataset_dir, tmp_path, capfd):
    from mdm_hf.anchor import (
        AnchorPretrainingConfig,
        default_text_model_path,
        owns_anchor_file,
        pretrain_anchor,
    )

    cfg = AnchorPretrainingConfig(
        dataset_name=tiny_dataset_dir, train_split="train", validation_split="validation", image_size=32,
        patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        projection_dim=32, num_train_epochs=6, per_device_train_batch_size=8, learning_rate=3e-3, warmup_ratio=0.0,
        grayscale_p=0.3, blur_p=0.3, output_dir=str(tmp_path / "anchor"), cache_dir=str(tmp_path / "cache"),
        report_to="tensorboard", logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    capfd.readouterr()
    result = pretrain_anchor(cfg)
    assert "anchor:" not in capfd.readouterr().err  # disable_tqdm: no progress bar
    scalars = _scalars(result.output_dir / "mdm-anchor")
    assert [v for _, v in scalars["train/epoch_loss"]] == pytest.approx(result.epoch_losses)
    assert [v for _, v in scalars["eval/mean"]] == pytest.approx([v["mean"] for v in result.validation])
    steps_per_epoch = scalars["train/epoch_loss"][0][0]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 6 * steps_per_epoch + 1))
    assert owns_anchor_file(result.output_dir / "mdm-anchor")  # --overwrite_output_dir may remove the logs
    assert result.final_loss < result.initial_loss - 0.05, (result.initial_loss, result.final_loss)
    anchor = DualEncoder.from_pretrained(str(result.output_dir))
    assert anchor.family == "dual_encoder" and anchor.text_pooling == "mean"
    assert anchor.image_size == 32 and anchor.model.config.text_config.model_type == "bert"
    # the text tower is MiniLM, untouched; mean pooling of MiniLM = sentence-transformers' embedding
    minilm = load_file(str(Path(default_text_model_path()) / "model.safetensors"))
    text_params = dict(anchor.model.text_model.named_parameters())
    key = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(text_params[key], minilm.get(key, minilm.get(f"bert.{key}")))
    assert len(result.epoch_losses) == 6 and all(v is not None for v in result.validation)
    record = json.loads((result.output_dir / "anchor_training.json").read_text())
    assert record["fixed_batch_loss"]["final"] == pytest.approx(result.final_loss)


def test_default_lora_targets_of_a_vit_bert_dual_encoder():
    """VisionTextDualEncoderModel with a ViT tower: transformers 5 names its attention q/k/v/o_proj."""
    import re

    from transformers import BertConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel, ViTConfig

    vit = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=16,
                    patch_size=8)  # fmt: skip
    bert = BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50
    )
    model = VisionTextDualEncoderModel(
        VisionTextDualEncoderConfig.from_vision_text_configs(vit, bert, projection_dim=8)
    )
    regex = lora_target_regex(model)
    hits = sorted(n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if re.fullmatch(regex, n))
    assert hits == ["k_proj", "o_proj", "q_proj", "v_proj"]  # the ViT attention of its one layer
    assert not any(n.startswith("text_model") for n, _ in model.named_modules() if re.fullmatch(regex, n))


def test_a_vision_tower_without_known_attention_names_is_refused_with_its_linear_names():
    from torch import nn

    block = nn.Module()
    block.qkv, block.proj = nn.Linear(4, 12), nn.Linear(4, 4)
    model = nn.Module()
    model.vision_model = nn.Module()
    model.vision_model.encoder = nn.Module()
    model.vision_model.encoder.layers = nn.ModuleList([block])
    with pytest.raises(
        ValueError, match=r"No default LoRA targets.*named \['proj', 'qkv'\]. Pass --target_modules"
    ):
        lora_target_regex(model)
    assert lora_target_regex(model, ["qkv"]).endswith("(?:qkv)$")
