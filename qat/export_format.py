"""The export format's names and its ``config.json`` reader, shared by :mod:`qat.export` and :mod:`qat.export_card`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME", "PACKED_SUFFIX",
           "REEXPORT_HINT", "ExportError", "resolve_export_dir", "read_export_config", "scheme_of"]

FORMAT_VERSION = 2
QUANT_METHOD = "diffqat"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CARD_NAME = "README.md"
PACKED_SUFFIX = ".weight.packed"
REEXPORT_HINT = "re-export the student with qat.export.export_quantized (or `python export.py <run> <out>`)"
#: format-1 layer module names -> kinds
_V1_KINDS = {"Linear": "quant_linear", "Conv2d": "quant_conv2d"}


class ExportError(ValueError):
    """A malformed export directory or an unexportable model; the message names the file, the tensor and the fix."""


def resolve_export_dir(path: str | os.PathLike) -> Path:
    """The directory holding ``config.json``: ``path`` itself, or its ``unet/`` subfolder (a full model directory)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not (path / CONFIG_NAME).is_file() and (path / "unet" / CONFIG_NAME).is_file():
        return path / "unet"
    return path


def _v1_modules(qcfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """A format-1 ``layers`` / ``attention`` pair as format-2 ``modules``."""
    for key in ("layers", "attention"):
        if not isinstance(qcfg.get(key), dict):
            raise ExportError(f"{path}: quantization_config.{key} must be a JSON object, got {qcfg.get(key)!r}; "
                              f"{REEXPORT_HINT}")
    modules = {}
    for name, entry in qcfg["layers"].items():
        if not isinstance(entry, dict) or entry.get("module") not in _V1_KINDS:
            raise ExportError(f"{path}: quantization_config.layers[{name!r}] must record 'module' (one of "
                              f"{sorted(_V1_KINDS)}), 'weight' and 'act', got {entry!r}; {REEXPORT_HINT}")
        modules[name] = {"kind": _V1_KINDS[entry["module"]], "weight": entry.get("weight"), "act": entry.get("act")}
    for name, entry in qcfg["attention"].items():
        modules[f"{name}.processor"] = {"kind": "quant_attention", **(entry if isinstance(entry, dict) else {})}
    return modules


def read_export_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, quantization_config)`` from ``config.json``, validated at the top level (``modules`` always
    present, format-1 files translated)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an export directory needs {CONFIG_NAME} and {WEIGHTS_NAME}; "
                                f"{REEXPORT_HINT}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err}); {REEXPORT_HINT}") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(config).__name__}; {REEXPORT_HINT}")
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise ExportError(f"{path} has no quantization_config entry: it is a plain (full-precision) model config, "
                          f"not a DiffQAT export; load it with diffusers' from_pretrained, or {REEXPORT_HINT}")
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise ExportError(f"{path}: quantization_config.quant_method is {qcfg.get('quant_method')!r}, not "
                          f"{QUANT_METHOD!r}: this is not a DiffQAT export (bitsandbytes / gguf / torchao models load "
                          "with diffusers' from_pretrained)")
    version = qcfg.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ExportError(f"{path}: quantization_config.format_version {version!r} is not supported (this DiffQAT "
                          f"reads 1..{FORMAT_VERSION}); update DiffQAT or {REEXPORT_HINT}")
    if version == 1:
        qcfg = {**qcfg, "modules": _v1_modules(qcfg, path)}
    for key, kind, json_kind in (("modules", dict, "object"), ("fp_layers", list, "list")):
        if not isinstance(qcfg.get(key), kind):
            raise ExportError(f"{path}: quantization_config.{key} must be a JSON {json_kind}, got "
                              f"{qcfg.get(key)!r}; {REEXPORT_HINT}")
    return config, qcfg


def scheme_of(entry: dict[str, Any]) -> str:
    """``W<bits>A<bits>`` of a quantized layer's entry (``fp`` for a side without quantizer)."""
    w, a = entry.get("weight"), entry.get("act")
    return f"W{w['n_bits'] if w else 'fp'}A{a['n_bits'] if a else 'fp'}"
