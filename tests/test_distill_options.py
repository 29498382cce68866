"""The ablation options of MDMConfig reach the distiller: ``init`` kmeans_image / kmeans_text (docs/method.md §1)
and ``merge_method`` mean (docs/method.md §2)."""

import pytest
import torch

from mdm_hf.distill import MDMDistiller
from mdm_hf.merge import ExpertBank
from mdm_hf.models import DualEncoder
from mdm_hf.selection import kmeans_select

from .test_distill import _random_lora_bank, tiny_config


@pytest.mark.parametrize("init", ["kmeans_image", "kmeans_text"])
def test_single_modality_init_is_kmeans_on_that_modality(init, tiny_clip_dir, tiny_dataset_dir, tmp_path):
    distiller = MDMDistiller(tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "out", init=init))
    chosen = distiller.initialize()  # no expert bank: the anchor embeds the pairs
    zv, zt = distiller.embed_all_pairs()
    expected = kmeans_select(zv if init == "kmeans_image" else zt, 8, seed=0)
    torch.testing.assert_close(chosen, expected)


@pytest.mark.parametrize("mode", ["fresh", "pooled"])
def test_merge_method_reaches_every_teacher(mode, tiny_clip_dir, tiny_dataset_dir, tmp_path, monkeypatch):
    teacher = DualEncoder.from_pretrained(tiny_clip_dir)
    bank = _random_lora_bank(teacher)
    methods = []
    original = ExpertBank.merged_state

    def spy(self, draws, alpha=1.0, method="model_stock"):
        methods.append((method, alpha))
        return original(self, draws, alpha, method)

    monkeypatch.setattr(ExpertBank, "merged_state", spy)
    cfg = tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "out", teacher_mode=mode, teacher_pool_size=2,
                      merge_method="mean", merge_alpha=1.0, max_steps=3, save_steps=0)  # fmt: skip
    MDMDistiller(cfg, teacher=teacher, expert_bank=bank).distill()
    assert methods and set(methods) == {("mean", 1.0)}
    with pytest.raises(ValueError, match="merge_method"):
        tiny_config(tiny_clip_dir, tiny_dataset_dir, tmp_path / "bad", merge_method="sum")
