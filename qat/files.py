"""Integrity checks of weight files, so that a truncated or corrupt file is reported by name before it is loaded.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (tensor name -> dtype, shape
and ``data_offsets``) and the data; a complete file is exactly ``8 + n + max(end offset)`` bytes. Checking that
reads the header only, not the tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["safetensors_problem", "require_intact", "save_tensors"]


def safetensors_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (missing, truncated, corrupt header), or None."""
    path = Path(path)
    if not path.is_file():
        return f"{path} does not exist"
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path} is truncated ({size} bytes, no safetensors header)"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"{path} is truncated or not a safetensors file (a header of {n} bytes in a file of {size})"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError):
            return f"{path} is corrupt (its safetensors header is not a valid tensor table)"
    if 8 + n + end != size:
        return (f"{path} is truncated or corrupt (its header describes {8 + n + end} bytes, the file has {size})")
    return None


def require_intact(paths: Iterable[str | Path], what: str) -> None:
    """Raises ``ValueError`` naming the first safetensors file of ``paths`` that is not complete.

    Args:
        what: what the files are, for the message (e.g. ``"teacher weights (teacher.path)"``).
    """
    for path in paths:
        if str(path).endswith(".safetensors") and (problem := safetensors_problem(path)):
            raise ValueError(f"{what}: {problem}; restore or re-create the file")


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Writes ``tensors`` as safetensors (on the CPU, contiguous, no shared storage) to a temporary name first and
    renames it: a process killed while writing leaves the previous file or none, never a truncated one."""
    path = Path(path)
    seen: set[int] = set()
    clean = {}
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        if t.numel() and t.data_ptr() in seen:
            t = t.clone()  # safetensors refuses tensors that share memory (tied weights)
        seen.add(t.data_ptr())
        clean[key] = t
    tmp = path.with_name(path.name + ".tmp")
    save_file(clean, str(tmp), metadata=metadata)
    os.replace(tmp, path)
