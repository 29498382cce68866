"""The one command-line / YAML reading of configs: deprecated aliases, Literal choices, presets, bare bool flags."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import pytest

from mdm_hf.config import MDMConfig, check_field_types, deprecated_alias, parse_dataclass_args, trackers
from mdm_hf.config import config_field as _f


@dataclass
class _Toy:
    num_train_epochs: int = _f(3, "Epochs.")
    mode: Literal["fast", "slow"] = _f("fast", "Speed.")
    num_epochs: int | None = deprecated_alias("num_train_epochs")

    def __post_init__(self) -> None:
        check_field_types(self)


def test_deprecated_alias_moves_its_value_on_every_path(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mdm_hf.config"):
        from_keyword = _Toy(num_epochs=7)
    assert (from_keyword.num_train_epochs, from_keyword.num_epochs) == (7, None)
    assert "--num_epochs is deprecated; use --num_train_epochs" in caplog.text
    assert parse_dataclass_args(_Toy, ["--num_epochs", "5"]).num_train_epochs == 5
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text("num_epochs: 4\n")
    assert parse_dataclass_args(_Toy, ["--config", str(yaml_file)]).num_train_epochs == 4
    # the same value twice is accepted; two different values are refused, naming both flags
    assert _Toy(num_epochs=6, num_train_epochs=6).num_train_epochs == 6
    with pytest.raises(ValueError, match="--num_epochs=6 and --num_train_epochs=8.*deprecated alias"):
        _Toy(num_epochs=6, num_train_epochs=8)


def test_literal_choices_are_listed_in_help_and_refused_otherwise(capsys):
    with pytest.raises(SystemExit):
        parse_dataclass_args(_Toy, ["--help"], prog="toy")
    out = capsys.readouterr().out
    assert "{fast,slow}" in out and "Deprecated alias of --num_train_epochs." in out
    with pytest.raises(SystemExit):
        parse_dataclass_args(_Toy, ["--mode", "medium"])
    with pytest.raises(ValueError, match=r"mode='medium' \(expected one of 'fast', 'slow'\)"):
        _Toy(mode="medium")
    with pytest.raises(SystemExit):  # every MDM choice field is a Literal now
        parse_dataclass_args(MDMConfig, ["--help"], prog="mdm-hf distill")
    help_text = capsys.readouterr().out
    for choices in ("{kmeans,random,herding,kcenter,kmeans_image,kmeans_text}", "{sgd,adam}", "{fresh,pooled}", "{initial,real_mean,free}",
                    "{auto,pooler,mean,last}", "{auto,clip,siglip}"):  # fmt: skip
        assert choices in help_text, choices


def test_presets_are_overridden_by_yaml_and_flags(tmp_path):
    from mdm_hf.demo import QUICK_PRESET, DemoConfig

    presets = {"quick": ("small", QUICK_PRESET)}
    assert parse_dataclass_args(DemoConfig, [], presets=presets) == DemoConfig()
    quick = parse_dataclass_args(DemoConfig, ["--quick"], presets=presets)
    assert quick == DemoConfig.quick() and quick.image_size == 32
    assert (
        parse_dataclass_args(DemoConfig, ["--quick", "--image_size", "48"], presets=presets).image_size == 48
    )
    yaml_file = tmp_path / "demo.yaml"
    yaml_file.write_text("distill_steps: 7\n")
    mixed = parse_dataclass_args(DemoConfig, ["--quick", "--config", str(yaml_file)], presets=presets)
    assert (mixed.distill_steps, mixed.student_seeds) == (7, 1)


def test_hub_private_is_a_bare_flag_and_report_to_reads_one_way():
    base = ["--push_to_hub", "--hub_dataset_id", "me/set"]
    assert parse_dataclass_args(MDMConfig, [*base, "--hub_private"]).hub_private is True
    assert parse_dataclass_args(MDMConfig, base).hub_private is False
    assert trackers("none") is None and trackers(None) is None
    assert trackers("tensorboard, wandb") == ["tensorboard", "wandb"]
