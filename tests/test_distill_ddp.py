"""Two CPU processes (accelerate.debug_launcher, real gloo DDP) give the same synthetic set as one process with the
same global real batch: every rank embeds its shard of the real batch, the shards are gathered, and the synthetic
tensors stay identical on all ranks."""

import torch
from accelerate import debug_launcher

from mdm_hf.distill import MDMDistiller

from .test_distill import tiny_config


def _distill_in_process(model_dir, dataset_dir, out_dir):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    # Forked workers inherit the parent's (single-process) accelerate singleton: start from a clean one.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    cfg = tiny_config(model_dir, dataset_dir, out_dir / "run", max_steps=6, save_steps=0)
    synthetic = MDMDistiller(cfg, accelerator=accelerator).distill()
    rank = accelerator.process_index
    save_file(
        {"pixel_values": synthetic.pixel_values, "text_features": synthetic.text_features},
        str(out_dir / f"rank{rank}-of-{accelerator.num_processes}.safetensors"),
    )


def test_two_processes_match_one(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    from safetensors.torch import load_file

    single = tmp_path / "single"
    single.mkdir()
    _distill_in_process(tiny_clip_dir, tiny_dataset_dir, single)
    multi = tmp_path / "multi"
    multi.mkdir()
    debug_launcher(_distill_in_process, args=(tiny_clip_dir, tiny_dataset_dir, multi), num_processes=2)

    one = load_file(str(single / "rank0-of-1.safetensors"))
    rank0 = load_file(str(multi / "rank0-of-2.safetensors"))
    rank1 = load_file(str(multi / "rank1-of-2.safetensors"))
    for key in one:
        assert torch.equal(rank0[key], rank1[key]), f"{key} diverged between ranks"
        torch.testing.assert_close(rank0[key], one[key], rtol=1e-4, atol=1e-5)
    assert not torch.equal(one["pixel_values"], torch.zeros_like(one["pixel_values"]))
