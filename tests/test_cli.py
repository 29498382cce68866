"""The command line: `mdm-hf --help`, every subcommand's help, and `mdm-hf distill` / recipes/distill.py end to end
from a YAML config plus CLI overrides."""

import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from mdm_hf.cli import COMMANDS, main, parse_dataclass_args
from mdm_hf.config import MDMConfig

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["no-such-command"]) == 2


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_yaml_then_cli_overrides(tmp_path):
    cfg = parse_dataclass_args(
        MDMConfig, ["--config", str(ROOT / "recipes/configs/tiny_offline.yaml"), "--num_pairs", "5"]
    )
    assert (cfg.num_pairs, cfg.max_steps, cfg.lr_pixels) == (5, 20, 10.0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_pair: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        parse_dataclass_args(MDMConfig, ["--config", str(bad)])


@pytest.mark.parametrize("config", sorted((ROOT / "recipes/configs").glob("*_mdm_*.yaml")))
def test_shipped_distill_configs_parse(config):
    cfg = parse_dataclass_args(MDMConfig, ["--config", str(config)])
    # contrastive (CLIP / SigLIP) anchors: the anchor alone is the teacher, as the ablations measured (README)
    assert cfg.num_pairs > 0 and cfg.expert_bank is None
    with_bank = parse_dataclass_args(MDMConfig, ["--config", str(config), "--expert_bank", "out/experts"])
    assert with_bank.expert_bank == "out/experts"


def test_import_needs_no_network():
    # In a fresh interpreter, any socket use during import raises; the lazy top-level names must still resolve.
    code = (
        "import socket\n"
        "class NoNetwork(socket.socket):\n"
        "    def connect(self, *a):\n        raise OSError('network access attempted during import')\n"
        "    connect_ex = connect\n"
        "socket.socket = NoNetwork\n"
        "import mdm_hf\nfrom mdm_hf import MDMConfig, MDMDistiller, SyntheticSet\n"
        "import mdm_hf.cli, mdm_hf.merge, mdm_hf.losses, mdm_hf.selection\nprint(mdm_hf.__version__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "0.1.0"


def test_recipe_distills_from_yaml_and_overrides(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, str(ROOT / "recipes/distill.py"), "--config", str(ROOT / "recipes/configs/tiny_offline.yaml"),
        "--model_name_or_path", tiny_clip_dir, "--dataset_name", tiny_dataset_dir, "--output_dir", str(out),
        "--cache_dir", str(tmp_path / "cache"), "--max_steps", "4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "load_dataset" in proc.stdout
    ds = datasets.load_dataset(str(out / "synthetic"))["train"]
    assert len(ds) == 8
    saved = (out / "mdm_config.json").read_text()
    assert '"max_steps": 4' in saved and "token" not in saved.lower()


def test_config_values_are_checked_with_the_field_and_the_fix():
    from mdm_hf.baselines.tm import TrajectoryMatchingConfig
    from mdm_hf.config import MDMConfig

    with pytest.raises(ValueError, match=r"Invalid MDMConfig values: num_pairs=0, max_steps=-1"):
        MDMConfig(num_pairs=0, max_steps=-1)
    with pytest.raises(ValueError, match=r"Invalid MDMConfig values: sigma=0\.0"):
        MDMConfig(sigma=0.0)
    with pytest.raises(ValueError, match=r"teacher_mode='cached' \(expected one of 'fresh', 'pooled'\)"):
        MDMConfig(teacher_mode="cached")
    with pytest.raises(ValueError, match=r"Invalid TrajectoryMatchingConfig values: num_pairs=0"):
        TrajectoryMatchingConfig(num_pairs=0)  # the shared run fields are checked for every method
    with pytest.raises(ValueError, match="Unknown TrajectoryMatchingConfig keys: \\['lr'\\]"):
        TrajectoryMatchingConfig.from_dict({"lr": 1.0})


@pytest.mark.parametrize(
    ("flags", "yaml_text", "expected"),
    [
        (["--lr_pixels", "-1"], "", "lr_pixels=-1.0"),
        (["--lr_pixels", "0"], "", "lr_pixels=0.0"),
        (["--max_grad_norm", "-1"], "", "max_grad_norm=-1.0"),
        (["--save_steps", "-5"], "", "save_steps=-5"),
        (["--pool_real_size", "-3"], "", "pool_real_size=-3"),
        ([], "num_pairs: 8.7\n", "num_pairs=8.7 (expected int)"),
        ([], "num_pairs: [8]\n", "num_pairs=[8] (expected int)"),
        (["--push_to_hub"], "", "--push_to_hub needs --hub_dataset_id"),
    ],
)
def test_bad_values_are_one_line_errors_before_anything_loads(flags, yaml_text, expected, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text or "seed: 0\n")
    # the model and data do not exist: the error must come from the value, before any loading
    argv = ["distill", "--config", str(config), "--model_name_or_path", str(tmp_path / "none"),
            "--dataset_name", str(tmp_path / "none"), "--output_dir", str(tmp_path / "out"), *flags]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(
        ValueError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        main([*argv, "--debug"])  # --debug: the exception itself, with its traceback


def test_synthetic_path_that_is_a_file_fails_at_start(tiny_clip_dir, tiny_dataset_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "synthetic").write_text("not a folder")
    argv = ["distill", "--config", str(ROOT / "recipes/configs/tiny_offline.yaml"), "--model_name_or_path",
            tiny_clip_dir, "--dataset_name", tiny_dataset_dir, "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 2
    assert "is a file" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["synthetic"]  # nothing ran


def _distill_argv(tiny_clip_dir, dataset_dir, out, *extra) -> list[str]:
    return ["distill", "--config", str(ROOT / "recipes/configs/tiny_offline.yaml"), "--model_name_or_path",
            tiny_clip_dir, "--dataset_name", dataset_dir, "--output_dir", str(out), "--cache_dir",
            str(out.parent / "cache"), *extra]  # fmt: skip


def test_distill_command_validates_and_keeps_the_best_state(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    import json

    import torch
    from safetensors.torch import load_file

    from mdm_hf.synthetic import SyntheticSet

    out = tmp_path / "run"
    argv = _distill_argv(
        tiny_clip_dir, tiny_dataset_dir, out, "--eval_steps", "5", "--student_max_steps", "3"
    )
    assert main(argv) == 0
    state = json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["history"]] == [0, 5, 10, 15, 20]  # eval_on_start is on by default
    best = max(state["history"], key=lambda h: h["mean"])
    assert state["best_step"] == best["step"]
    kept = load_file(str(out / "checkpoint-20" / "synthetic.safetensors"))["best_pixel_values"]
    assert torch.equal(SyntheticSet.from_pretrained(out / "synthetic").pixel_values, kept)


def test_distill_command_returns_the_start_when_distilling_only_hurts(
    tiny_clip_dir, tiny_dataset_dir, tmp_path
):
    import json

    import torch
    from safetensors.torch import load_file

    from mdm_hf.synthetic import SyntheticSet

    out = tmp_path / "run"
    # a learning rate that wrecks the set: every distilled state scores at most the k-means start on validation
    argv = _distill_argv(tiny_clip_dir, tiny_dataset_dir, out, "--eval_steps", "10", "--student_max_steps", "3",
                         "--lr_pixels", "1e6", "--lr_text", "1e6", "--max_grad_norm", "1e6")  # fmt: skip
    assert main(argv) == 0
    state = json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())
    start = state["history"][0]["mean"]
    assert state["history"][0]["step"] == 0 and all(h["mean"] <= start for h in state["history"][1:])
    assert state["best_step"] == 0
    synthetic = SyntheticSet.from_pretrained(out / "synthetic")
    assert synthetic.provenance["best_step"] == 0
    tensors = load_file(str(out / "checkpoint-20" / "synthetic.safetensors"))
    assert torch.equal(
        synthetic.pixel_values, tensors["best_pixel_values"]
    )  # the set returned is the start ...
    assert not torch.equal(
        tensors["best_pixel_values"], tensors["pixel_values"]
    )  # ... not the wrecked last state


def test_distill_without_a_validation_split_says_so(tiny_clip_dir, tmp_path, caplog):
    from mdm_hf import testing

    data = testing.write_caption_list_dataset(tmp_path / "data", splits={"train": 16})  # no validation split
    out = tmp_path / "run"
    assert main(_distill_argv(tiny_clip_dir, str(data), out, "--eval_steps", "5")) == 0
    assert "No validation" in caplog.text and "--validation_split none" in caplog.text
    caplog.clear()
    assert main(_distill_argv(tiny_clip_dir, str(data), tmp_path / "b", "--eval_steps", "5",
                              "--validation_split", "none")) == 0  # fmt: skip
    assert "No validation" not in caplog.text


def test_log_level_and_debug_are_global_flags(capsys):
    from mdm_hf.cli import _global_flags

    rest, flags = _global_flags(["--num_pairs", "5", "--log_level", "WARNING", "--debug", "--seed=1"])
    assert rest == ["--num_pairs", "5", "--seed=1"] and flags == {"debug": True, "log_level": "warning"}
    assert _global_flags(["--log_level=debug"])[1]["log_level"] == "debug"
    with pytest.raises(SystemExit, match="--log_level must be one of"):
        _global_flags(["--log_level", "loud"])
