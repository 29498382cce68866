"""Checkpoints of distillation runs: safetensors + JSON, written atomically, rotated, resumable (no pickle).

Shared by :class:`~mdm_hf.distill.MDMDistiller` and the trajectory-matching baseline, whose checkpoints have the
same layout: ``<output_dir>/checkpoint-<step>/`` with ``*.safetensors`` files and ``trainer_state.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


def prepare_output_dir(
    output_dir: str | os.PathLike,
    *,
    owned: Callable[[Path], bool],
    overwrite: bool,
    resuming: bool = False,
    accelerator=None,
) -> Path:
    """Create ``output_dir`` for a run; the one place a run decides what it may delete.

    A non-empty folder is refused unless the run resumes in it or ``overwrite`` is set. Overwriting removes only
    the entries ``owned(entry)`` recognises as written by an earlier run of the same command (its checkpoints,
    manifest, config file, synthetic set); anything else in the folder is an error that names it, raised before
    anything is deleted -- a run never removes a file it cannot prove it wrote. With an ``accelerator``, only the
    main process touches the folder and the others wait for it.
    """
    out = Path(output_dir)
    if accelerator is not None and accelerator.num_processes > 1:
        if accelerator.is_main_process:
            prepare_output_dir(out, owned=owned, overwrite=overwrite, resuming=resuming)
        accelerator.wait_for_everyone()
        return out
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir '{out}' is a file. Choose a directory for --output_dir.")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not resuming:
        if not overwrite:
            raise FileExistsError(
                f"output_dir '{out}' is not empty. Resume with --resume_from_checkpoint latest (distillation) or "
                "--resume true (experts), pass --overwrite_output_dir true to replace an earlier run's outputs, or "
                "choose another --output_dir."
            )
        foreign = [p.name for p in entries if not owned(p)]
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise FileExistsError(
                f"--overwrite_output_dir removes only what an earlier run of this command wrote, but output_dir "
                f"'{out}' also holds {shown}. Move those away or choose another --output_dir; nothing was deleted."
            )
        for entry in entries:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        logger.info("Removed the earlier run's outputs in %s (--overwrite_output_dir).", out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def is_checkpoint_dir(path: Path) -> bool:
    """A ``checkpoint-<step>`` folder (or its ``.tmp`` staging copy) holding the run state file."""
    name = path.name.removesuffix(".tmp")
    step = name.removeprefix(CHECKPOINT_PREFIX)
    staging = path.name.endswith(".tmp")
    return (
        name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and (staging or (path / STATE_FILE).is_file())
    )


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-<step>`` directories of a run, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (torn or tampered with) or was made by a run with another config."""


def resume_candidates(spec: str | None, output_dir: str | os.PathLike, marker: str) -> list[Path]:
    """The checkpoints to try, in order, for ``--resume_from_checkpoint spec``: for ``"latest"`` every checkpoint of
    ``output_dir``, newest first (a torn newest one falls back to the one before); else the one directory given.

    Refuses (never silently starts over) when there is nothing to resume from.
    """
    if not spec:
        return []
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: there is no checkpoint in '{output_dir}'. Drop the flag to start "
                "a new run (add --overwrite_output_dir true to replace an earlier run's outputs there)."
            )
        return found[::-1]
    path = Path(spec)
    if not (path / marker).exists():
        raise FileNotFoundError(f"'{path}' is not a checkpoint of this kind of run (no {marker}).")
    return [path]


def check_resume_config(saved: dict, current: dict, free: Sequence[str], checkpoint: Path) -> None:
    """Refuse to resume when a field that changes the result differs between the checkpoint's run and this one.

    ``free`` lists the fields that may change on resume (loop length, logging, saving, output paths).
    """
    differing = [
        f"{key}: {saved[key]!r} in the checkpoint, {current[key]!r} now"
        for key in sorted(set(saved) & set(current))
        if key not in free and saved[key] != current[key]
    ]
    if differing:
        raise CheckpointError(
            f"Checkpoint {checkpoint} was made by a run with other settings ({'; '.join(differing)}). Resume with "
            "the same settings (only these may change: "
            + ", ".join(sorted(free))
            + "), or start a new run in "
            "another --output_dir."
        )


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk (directories: where the OS allows it)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    path: Path, files: dict[str, dict[str, torch.Tensor]], state: dict, keep: int | None = None
) -> Path:
    """Write ``{file name: tensors}`` and ``state`` into ``path`` atomically, then keep the ``keep`` newest."""

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensors in files.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    for entry in (*tmp.iterdir(), tmp):  # on disk before the rename makes the checkpoint visible
        _fsync(entry)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # a crash mid-write never corrupts the previous checkpoint
    _fsync(path.parent)
    if keep:
        for old in list_checkpoints(path.parent)[:-keep]:
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
    return path


def read_checkpoint(
    path: str | os.PathLike, pixel_shape: torch.Size, text_shape: torch.Size
) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(synthetic tensors, loop state, optimiser state dict)`` of a checkpoint made for tensors of these shapes."""

    path = Path(path)
    try:
        tensors = load_file(str(path / "synthetic.safetensors"))
        state = json.loads((path / STATE_FILE).read_text())
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except Exception as err:  # noqa: BLE001 - torn, truncated or missing: all mean "cannot resume from this one"
        raise CheckpointError(f"Checkpoint {path} cannot be read ({type(err).__name__}: {err}).") from err
    if tensors["pixel_values"].shape != pixel_shape or tensors["text_features"].shape != text_shape:
        raise CheckpointError(
            f"Checkpoint {path} holds tensors of shape {tuple(tensors['pixel_values'].shape)} / "
            f"{tuple(tensors['text_features'].shape)}, but this run expects {tuple(pixel_shape)} / "
            f"{tuple(text_shape)}. Resume with the config the checkpoint was made with."
        )
    optimizer = unflatten_optimizer_state(opt_tensors, state.pop("optimizer"))
    return tensors, state, optimizer


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into safetensors-storable tensors and JSON metadata."""
    tensors, meta = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for pid, pstate in state_dict["state"].items():
        meta["state"][str(pid)] = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
                meta["state"][str(pid)][key] = "__tensor__"
            else:
                meta["state"][str(pid)][key] = value
    return tensors, meta


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state = {}
    for pid, pstate in meta["state"].items():
        state[int(pid)] = {k: tensors[f"{pid}.{k}"] if v == "__tensor__" else v for k, v in pstate.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def write_json_atomic(path: Path, value: dict) -> None:
    """Write JSON so a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=False))
    os.replace(tmp, path)
