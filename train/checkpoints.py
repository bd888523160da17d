"""Training checkpoints that survive faults: written atomically beside their final name, checked cheaply before a
resume, and the newest intact one found when the last is damaged."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "checkpoint_problem", "newest_intact", "copy_atomic", "remove_partial_files"]

#: the suffix of a checkpoint being written (``<name>.ckpt.partial``)
PARTIAL = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but the file is written under a temporary name in the checkpoint's own
    directory, synced and renamed: a process killed at any point leaves the previous checkpoint or the new one,
    and no stray file elsewhere (Lightning's default writes a temporary file in the system's temporary directory
    and moves it, which copies when that directory is on another file system). Remote paths (``s3://`` and the
    like) keep Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if "://" in str(path) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + PARTIAL)
        with tmp.open("wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def remove_partial_files(directory: Path) -> list[str]:
    """Removes checkpoints left half-written by a killed process (``*.ckpt*.partial``); returns their names."""
    removed = []
    for partial in sorted(directory.glob(f"*.ckpt*{PARTIAL}")):
        partial.unlink(missing_ok=True)
        removed.append(partial.name)
    return removed


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a loadable checkpoint archive (truncated, corrupt), or None. Cheap: it reads the zip
    archive's directory at the end of the file, not the tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {err})"
    if not any(n.endswith("/data.pkl") for n in names):
        return f"checkpoint {path} is a zip archive but not a torch checkpoint"
    return None


def newest_intact(directory: Path) -> Path | None:
    """The step checkpoint (``step=N.ckpt``) with the highest ``N`` that passes :func:`checkpoint_problem`."""
    def step(p: Path) -> int:
        try:
            return int(p.stem.split("=", 1)[1])
        except (IndexError, ValueError):
            return -1

    for candidate in sorted(directory.glob("step=*.ckpt"), key=step, reverse=True):
        if step(candidate) >= 0 and checkpoint_problem(candidate) is None:
            return candidate
    return None


def copy_atomic(src: Path, dst: Path) -> None:
    """Copies ``src`` to ``dst`` through a temporary name of this process (the processes of one job may race)."""
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}{PARTIAL}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
