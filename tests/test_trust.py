"""What the package refuses and what it keeps (issue 13): a run never deletes what it did not write, never
resumes another run's state, never starts over when asked to resume, and saves its last good state before any
error it raises mid-run."""

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from mdm_hf import testing
from mdm_hf.checkpointing import CheckpointError, list_checkpoints
from mdm_hf.data import DataError
from mdm_hf.distill import MDMDistiller
from tests.test_data import write_parquet_dataset
from tests.test_distill import tiny_config


def _run(tiny_clip_dir, data, out, **kw):
    return MDMDistiller(tiny_config(tiny_clip_dir, data, out, **kw)).distill()


def test_overwrite_removes_only_the_earlier_runs_own_files(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "o"
    _run(tiny_clip_dir, tiny_dataset_dir, out, max_steps=10)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt.*nothing was deleted"):
        _run(tiny_clip_dir, tiny_dataset_dir, out, max_steps=10, overwrite_output_dir=True)
    assert (out / "notes.txt").read_text() == "mine" and list_checkpoints(out)  # nothing removed
    (out / "notes.txt").unlink()
    _run(tiny_clip_dir, tiny_dataset_dir, out, max_steps=5, save_steps=5, overwrite_output_dir=True)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-5"]  # the old run's checkpoint-10 is gone


def test_resume_refuses_a_checkpoint_made_with_other_settings(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "o"
    _run(tiny_clip_dir, tiny_dataset_dir, out, max_steps=10)
    with pytest.raises(
        CheckpointError, match=r"lr_pixels: 10.0 in the checkpoint, 1.0 now.*seed: 0 .* 3 now"
    ):
        _run(tiny_clip_dir, tiny_dataset_dir, out, resume_from_checkpoint="latest", lr_pixels=1.0, seed=3)
    # what may change does change: a longer run, other logging / saving
    _run(tiny_clip_dir, tiny_dataset_dir, out, resume_from_checkpoint="latest", max_steps=15, logging_steps=1)
    assert list_checkpoints(out)[-1].name == "checkpoint-15"


def test_resume_latest_without_a_checkpoint_refuses(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "synthetic").mkdir()
    (out / "synthetic" / "mdm_synthetic.json").write_text("{}")  # a finished set that must survive
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        _run(tiny_clip_dir, tiny_dataset_dir, out, resume_from_checkpoint="latest")
    assert (out / "synthetic" / "mdm_synthetic.json").exists()


def test_a_torn_newest_checkpoint_falls_back_to_the_one_before(
    tiny_clip_dir, tiny_dataset_dir, tmp_path, caplog
):
    straight = _run(tiny_clip_dir, tiny_dataset_dir, tmp_path / "a", max_steps=30)
    out = tmp_path / "b"
    _run(tiny_clip_dir, tiny_dataset_dir, out, max_steps=20)  # checkpoint-10, checkpoint-20
    newest = out / "checkpoint-20" / "synthetic.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    resumed = _run(tiny_clip_dir, tiny_dataset_dir, out, max_steps=30, resume_from_checkpoint="latest")
    assert "checkpoint-20 cannot be read" in caplog.text
    assert torch.equal(straight.pixel_values, resumed.pixel_values)  # from checkpoint-10, exactly
    (out / "checkpoint-30" / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match="checkpoint-30 cannot be read"
    ):  # named explicitly: no fallback
        _run(tiny_clip_dir, tiny_dataset_dir, out, resume_from_checkpoint=str(out / "checkpoint-30"))


def test_a_corrupt_image_in_lazy_mode_saves_the_last_good_state(tiny_clip_dir, tmp_path):
    good = io.BytesIO()
    testing.toy_image("red", "square", 32).save(good, format="PNG")
    cells = [{"bytes": good.getvalue(), "path": None}] * 11 + [{"bytes": b"broken", "path": None}]
    data = write_parquet_dataset(
        tmp_path / "data", {"image": cells, "caption": [f"a red square {i}" for i in range(12)]},
        {"image": datasets.Image(), "caption": datasets.Value("string")},
    )  # fmt: skip
    out = tmp_path / "o"
    with pytest.raises(DataError, match=r"row 11 of .*last good state \(step \d+\) is saved in"):
        _run(tiny_clip_dir, data, out, init="random", num_pairs=4, max_cached_images=0, max_steps=50)
    assert list_checkpoints(out), "nothing was saved before the error"


def test_a_run_that_fails_at_once_leaves_no_empty_output_dir(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="larger than the dataset"):
        _run(tiny_clip_dir, tiny_dataset_dir, out, num_pairs=10_000)
    assert not out.exists()


def test_checkpoint_state_records_the_data_fingerprint(tiny_clip_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "o"
    _run(tiny_clip_dir, tiny_dataset_dir, out, max_steps=10)
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    assert len(state["data_fingerprint"]) == 16 and state["config"]["lr_pixels"] == 10.0


def test_prepare_output_dir_rule(tmp_path):
    from mdm_hf.checkpointing import prepare_output_dir

    out = tmp_path / "d"
    out.mkdir()
    (out / "ours.json").write_text("{}")
    (out / "theirs").mkdir()
    owned = lambda p: p.name == "ours.json"  # noqa: E731
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_output_dir(out, owned=owned, overwrite=False)
    with pytest.raises(FileExistsError, match="theirs"):
        prepare_output_dir(out, owned=owned, overwrite=True)
    assert (out / "ours.json").exists() and (out / "theirs").exists()
    (out / "theirs").rmdir()
    prepare_output_dir(out, owned=owned, overwrite=True)
    assert list(out.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        prepare_output_dir(tmp_path / "f", owned=owned, overwrite=True)
    assert Path(tmp_path / "f").read_text() == "x"


def test_experts_overwrite_never_removes_a_file_the_run_did_not_write(
    tiny_clip_dir, tiny_dataset_dir, tmp_path
):
    from mdm_hf.cli import experts_main
    from tests.test_experts import _tiny_args

    out = tmp_path / "shared"
    out.mkdir()
    (out / "anchor.safetensors").write_bytes(
        b"the user's anchor"
    )  # the case: the anchor in the folder
    args = _tiny_args(tiny_clip_dir, tiny_dataset_dir, out, "--num_experts", "1", "--num_train_epochs", "1")
    with pytest.raises(FileExistsError, match="anchor.safetensors"):
        experts_main([*args, "--overwrite_output_dir", "true"])
    assert (out / "anchor.safetensors").read_bytes() == b"the user's anchor"
    bank = tmp_path / "bank"
    assert experts_main(_tiny_args(tiny_clip_dir, tiny_dataset_dir, bank, "--num_experts", "1")) == 0
    assert experts_main(_tiny_args(tiny_clip_dir, tiny_dataset_dir, bank, "--num_experts", "1",
                                   "--overwrite_output_dir", "true")) == 0  # fmt: skip
    assert (bank / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------- silent wrong results
def _adapter(tiny_clip_dir, directory, init_lora_weights=False):
    from peft import LoraConfig, get_peft_model

    from mdm_hf.experts import lora_target_regex
    from mdm_hf.models import DualEncoder

    anchor = DualEncoder.from_pretrained(tiny_clip_dir)
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=lora_target_regex(anchor.model),
                        init_lora_weights=init_lora_weights, base_model_name_or_path=tiny_clip_dir)  # fmt: skip
    get_peft_model(DualEncoder.from_pretrained(tiny_clip_dir).model, config).save_pretrained(str(directory))
    return {n: p.detach().clone() for n, p in anchor.model.named_parameters()}


def test_adapters_that_would_be_silent_no_op_experts_are_refused(tiny_clip_dir, tmp_path):
    from safetensors.torch import save_file

    from mdm_hf.bank import lora_epoch_deltas

    anchor = {"name_or_path": tiny_clip_dir, "revision": None}
    params = _adapter(tiny_clip_dir, tmp_path / "good")
    assert lora_epoch_deltas(tmp_path / "good", params, anchor)  # the control: a real adapter loads
    weights = "adapter_model.safetensors"
    for name, damage in {
        "empty": lambda p: save_file({}, str(p)),  # a valid file with an empty header
        "truncated": lambda p: p.write_bytes(p.read_bytes()[:50]),
    }.items():
        _adapter(tiny_clip_dir, tmp_path / name)
        damage(tmp_path / name / weights)
        with pytest.raises(ValueError, match=rf"{name}/{weights}"):
            lora_epoch_deltas(tmp_path / name, params, anchor)
    _adapter(tiny_clip_dir, tmp_path / "untrained", init_lora_weights=True)  # B = 0: ΔW = 0 everywhere
    with pytest.raises(ValueError, match="every offset is zero"):
        lora_epoch_deltas(tmp_path / "untrained", params, anchor)


def test_a_pickle_only_checkpoint_is_never_unpickled(tiny_clip_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from mdm_hf.models import DualEncoder

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_clip_dir, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        DualEncoder.from_pretrained(str(pickled))


@pytest.mark.parametrize("dtype", ["float16", "int64"])
def test_a_tampered_column_dtype_is_refused_on_load(tmp_path, dtype):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mdm_hf.synthetic import SyntheticSet
    from tests.test_synthetic import make_set

    out = tmp_path / "set"
    make_set(k=3).save_pretrained(out)
    (shard,) = (out / "data").glob("*.parquet")
    table = pq.read_table(shard)
    i = table.schema.get_field_index("text_features")
    values = np.clip(np.nan_to_num(np.array(table["text_features"].to_pylist())), -1e4, 1e4).astype(dtype)
    column = pa.array(list(values), type=pa.list_(pa.from_numpy_dtype(np.dtype(dtype))))
    pq.write_table(table.set_column(i, "text_features", column), shard)
    with pytest.raises(
        ValueError, match=f"'text_features' holds ({dtype}|halffloat) values, expected float32"
    ):
        SyntheticSet.from_pretrained(out)


# ---------------------------------------------------------------------------------------------- clear errors
@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        ("{not json", "is not valid JSON"),
        ('{"kind": "lora", "experts": []}', "no 'anchor' object"),
        ('{"kind": "lora", "anchor": {}, "experts": [{"epochs": [{"epoch": "one", "path": "e"}]}]}',
         "epoch 'one', not an integer"),
    ],
)  # fmt: skip
def test_a_damaged_manifest_is_named(tmp_path, manifest, expected):
    from mdm_hf.bank import read_manifest

    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(ValueError, match=expected):
        read_manifest(tmp_path)


def test_non_utf8_metadata_is_a_clear_error(tmp_path):
    from mdm_hf import testing
    from mdm_hf.data import load_image_caption_dataset

    root = testing.write_imagefolder_dataset(tmp_path / "folder")
    metadata = Path(root) / "train" / "metadata.jsonl"
    metadata.write_bytes(metadata.read_bytes().replace(b'"', b'"\xff', 1))
    with pytest.raises(DataError, match="not UTF-8"):
        load_image_caption_dataset(str(root), "train")


@pytest.mark.parametrize("damage", ["no_mean", "no_pixels"])
def test_a_set_missing_what_loading_needs_is_named(tmp_path, damage):
    import pyarrow.parquet as pq

    from mdm_hf.synthetic import SyntheticSet
    from tests.test_synthetic import make_set

    out = tmp_path / "set"
    make_set(k=3).save_pretrained(out)
    if damage == "no_mean":
        meta = json.loads((out / "mdm_synthetic.json").read_text())
        del meta["image_mean"]
        (out / "mdm_synthetic.json").write_text(json.dumps(meta))
        expected = "lacks \\['image_mean'\\]"
    else:
        (shard,) = (out / "data").glob("*.parquet")
        pq.write_table(pq.read_table(shard).drop(["pixel_values"]), shard)
        expected = "lacks the column\\(s\\) \\['pixel_values'\\]"
    with pytest.raises(ValueError, match=expected):
        SyntheticSet.from_pretrained(out)
