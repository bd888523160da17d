"""Disk sizes and the model card of an export directory (:mod:`qat.export`)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from safetensors import safe_open

from qat.export_format import (
    CONFIG_NAME,
    PACKED_SUFFIX,
    QUANT_METHOD,
    WEIGHTS_NAME,
    ExportError,
    read_export_config,
    resolve_export_dir,
    scheme_of,
)

__all__ = ["ExportSizes", "export_sizes", "model_card_text"]


@dataclass
class ExportSizes:
    """Disk sizes of an export (bytes), read from the safetensors header without loading tensor data.

    Attributes:
        quantized_layers: layers with packed weights.
        quantized_params: elements of those weights.
        packed_bytes: bytes of their packed codes (``sum ceil(n b / 8)``).
        weight_quantizer_bytes: bytes of their steps and zero-points.
        act_quantizer_bytes: bytes of activation quantizer tensors (tables, grids, static steps).
        fp_bytes: bytes of every other tensor (full-precision parameters and buffers).
        file_bytes: size of the safetensors file (tensors + header).
        fp32_model_bytes: size of a safetensors FP32 save of the same float model (quantized weights and other
            floating-point tensors at 4 bytes per element, no quantizer tensors), computed from the shapes.
    """

    quantized_layers: int
    quantized_params: int
    packed_bytes: int
    weight_quantizer_bytes: int
    act_quantizer_bytes: int
    fp_bytes: int
    file_bytes: int
    fp32_model_bytes: int

    @property
    def fp32_weight_bytes(self) -> int:
        """The quantized layers' weights in FP32."""
        return 4 * self.quantized_params

    @property
    def fp16_weight_bytes(self) -> int:
        """The quantized layers' weights in FP16."""
        return 2 * self.quantized_params

    @property
    def weight_ratio_fp32(self) -> float:
        """FP32 weight bytes / packed bytes of the quantized layers (``32 / b`` for one bit-width ``b``)."""
        return self.fp32_weight_bytes / max(self.packed_bytes, 1)

    @property
    def weight_ratio_fp16(self) -> float:
        """FP16 weight bytes / packed bytes of the quantized layers (``16 / b``)."""
        return self.fp16_weight_bytes / max(self.packed_bytes, 1)

    @property
    def file_ratio_fp32(self) -> float:
        """FP32 save / this file."""
        return self.fp32_model_bytes / max(self.file_bytes, 1)

    def __str__(self) -> str:
        mib = 1 / 2**20
        return "\n".join([
            f"quantized layers: {self.quantized_layers} ({self.quantized_params:,} weights)",
            f"  packed codes {self.packed_bytes * mib:.3f} MiB vs fp32 {self.fp32_weight_bytes * mib:.3f} MiB "
            f"({self.weight_ratio_fp32:.2f}x) / fp16 {self.fp16_weight_bytes * mib:.3f} MiB "
            f"({self.weight_ratio_fp16:.2f}x); weight steps + zero-points {self.weight_quantizer_bytes * mib:.3f} MiB",
            f"activation quantizers {self.act_quantizer_bytes * mib:.3f} MiB; full-precision tensors "
            f"{self.fp_bytes * mib:.3f} MiB",
            f"file {self.file_bytes * mib:.3f} MiB vs fp32 save {self.fp32_model_bytes * mib:.3f} MiB "
            f"({self.file_ratio_fp32:.2f}x smaller)",
        ])


def export_sizes(path: str | os.PathLike) -> ExportSizes:
    """Disk sizes of the export at ``path`` (see :class:`ExportSizes`)."""
    root = resolve_export_dir(path)
    _, qcfg = read_export_config(root / CONFIG_NAME)
    weights = root / WEIGHTS_NAME
    layers = {n: e for n, e in qcfg["modules"].items() if isinstance(e.get("weight"), dict)}
    try:
        with safe_open(str(weights), framework="pt") as f:
            info = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:
        raise ExportError(f"{weights}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    itemsize = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}
    floats = ("F16", "BF16", "F32", "F64")
    packed = wq = aq = fp = 0
    fp32_tensors: dict[str, tuple[list[int], int]] = {}  # what an FP32 save of the float model would hold
    packed_prefixes = tuple(f"{name}.weight." for name in layers)  # every packed tensor of a quantized weight
    for key, (shape, dtype) in info.items():
        n = math.prod(shape)
        nbytes = n * itemsize.get(dtype, 4)
        if key.startswith(packed_prefixes):
            packed += nbytes
        elif ".weight_quantizer." in key:
            wq += nbytes
        elif "_quantizer." in key:
            aq += nbytes
        else:
            fp += nbytes
            fp32_tensors[key] = (list(shape), 4 * n if dtype in floats else nbytes)
    params = 0
    for name, entry in layers.items():
        shape = list(entry["weight"]["shape"])
        params += math.prod(shape)
        fp32_tensors[f"{name}.weight"] = (shape, 4 * math.prod(shape))
    file_bytes = weights.stat().st_size
    return ExportSizes(len(layers), params, packed, wq, aq, fp, file_bytes, _safetensors_bytes(fp32_tensors))


def _safetensors_bytes(tensors: dict[str, tuple[list[int], int]]) -> int:
    """Size of a safetensors file of FP32 tensors ``name -> (shape, bytes)``: 8 + JSON header (padded to 8) + data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key in sorted(tensors):
        shape, nbytes = tensors[key]
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    n = len(json.dumps(header, separators=(",", ":")))
    return 8 + n + (-n) % 8 + offset


def _render_evaluation(evaluation: Any) -> list[str]:
    if not isinstance(evaluation, dict) or not evaluation:
        return [str(evaluation)]
    fmt = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)  # noqa: E731
    if all(isinstance(v, dict) for v in evaluation.values()):  # column -> {metric -> value}
        cols = list(evaluation)
        metrics = list(dict.fromkeys(m for v in evaluation.values() for m in v))
        lines = ["| metric | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for m in metrics:
            lines.append(f"| {m} | " + " | ".join(fmt(evaluation[c].get(m, "")) for c in cols) + " |")
        return lines
    return ["| metric | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in evaluation.items()]


def _describe(entry: dict[str, Any] | None, timesteps: bool = False) -> str:
    if entry is None:
        return "full precision"
    parts = [f"{entry['n_bits']}-bit {entry['quantizer']}"]
    if "symmetric" in entry:
        parts.append("symmetric" if entry["symmetric"] else "asymmetric")
    if "num_bases" in entry:
        parts.append(f"{entry['num_bases']} bases")
    if "granularity" in entry:
        group = f" (group size {entry['group_size']})" if entry["granularity"] == "group" else ""
        parts.append(f"per-{entry['granularity']}{group}")
    if timesteps and "num_timesteps" in entry:
        parts.append(f"{entry['num_timesteps']} timestep rows")
    return ", ".join(parts)


def model_card_text(export_dir: str | os.PathLike, info: dict | None = None, subfolder: str | None = None) -> str:
    """The model card (Markdown) of the export at ``export_dir``.

    Args:
        export_dir: the export directory (its ``config.json`` and weights are read).
        info: the ``model_card`` fields of :func:`export_quantized`.
        subfolder: where the export lies relative to the card (``"unet"`` for a full model directory), for the
            loading instructions.
    """
    root = resolve_export_dir(export_dir)
    config, qcfg = read_export_config(root / CONFIG_NAME)
    info = dict(info or {})
    sizes = export_sizes(root)
    layers = {n: e for n, e in qcfg["modules"].items() if "weight" in e and "act" in e}
    others = {n: e for n, e in qcfg["modules"].items() if n not in layers}
    groups: dict[str, list[str]] = {}
    for name, entry in layers.items():
        key = f"{scheme_of(entry)}: weights {_describe(entry.get('weight'))}; input activations " \
              f"{_describe(entry.get('act'), timesteps=True)}"
        groups.setdefault(key, []).append(name)
    class_name = config.get("_class_name") or "model"
    title = info.pop("title", None) or f"DiffQAT {qcfg['scheme']} {class_name}"
    base = info.pop("base_model", None)
    method = info.pop("method", None)
    evaluation = info.pop("evaluation", None)
    notes = info.pop("notes", None)
    lines = [f"# {title}", "",
             f"A {qcfg['scheme']} quantized `{class_name}` exported by DiffQAT (`quant_method: \"{QUANT_METHOD}\"`, "
             f"format {qcfg['format_version']})" + (f", trained with {method}" if method else "")
             + (f" from the base model `{base}`." if base else "."), "",
             "## Quantization scheme", ""]
    for key, names in groups.items():
        shown = ", ".join(f"`{n}`" for n in names) if len(names) <= 8 else f"{len(names)} layers"
        lines.append(f"- **{key}** ({len(names)} layers): {shown}")
    fp_layers = qcfg["fp_layers"]
    lines.append(f"- **Full precision** ({len(fp_layers)} linear/conv layers): "
                 + (", ".join(f"`{n}`" for n in fp_layers) if fp_layers else "none")
                 + "; norms, embeddings, biases and attention matmuls stay in full precision"
                 + (" except the quantized attention processors of "
                    + ", ".join(f"`{n.rpartition('.')[0]}`" for n, e in others.items()
                                if e.get("kind") == "quant_attention")
                    if any(e.get("kind") == "quant_attention" for e in others.values()) else "") + ".")
    own = {n: e for n, e in others.items() if e.get("kind") != "quant_attention"}
    if own:
        kinds = Counter(e.get("kind") for e in own.values())
        lines.append("- **Other quantized modules**: " + ", ".join(f"{k} ({n})" for k, n in sorted(kinds.items()))
                     + ".")
    if qcfg.get("timestep_grid") is not None:
        grid = qcfg["timestep_grid"]
        lines.append(f"- Temporal activation tables: {len(grid)} rows on the sampler timesteps "
                     f"{grid[:3]} ... {grid[-1]} (other timesteps interpolate between the nearest rows).")
    lines += ["", "## Size", "", "```", str(sizes), "```", ""]
    if evaluation is not None:
        lines += ["## Evaluation", "", *_render_evaluation(evaluation), ""]
    if notes:
        lines += ["## Notes", "", str(notes), ""]
    if info:
        lines += ["## Details", "", *(f"- {k}: {v}" for k, v in info.items()), ""]
    where = f'"<this directory>/{subfolder}"' if subfolder else '"<this directory>"'
    lines += ["## How to load", "",
              f"The weights are stored as packed integer codes (`<layer>{PACKED_SUFFIX}`, `u = q - q_min` in an "
              "LSB-first bitstream) with their steps and zero-points; loading unpacks them into "
              "`W = s * (q - z)` and keeps the fake quantizers, so the model computes exactly what the trained "
              "student did. No peft, no teacher and no training code are needed.", "",
              "```python", "import qat", "from qat.export import load_quantized", "",
              f"unet = load_quantized({where}, device=\"cuda\")",
              "qat.attach_timestep_hook(unet)  # temporal activation quantizers read each call's timestep",
              "# or: with qat.timestep(unet, t): eps = unet(x_t, t, ...).sample", "```", ""]
    if subfolder:
        lines += ["The scheduler (`scheduler/`) and, for class conditioning, the class embedder (`class_embedder/`) "
                  "load with diffusers' `from_pretrained(<this directory>, subfolder=...)`.", ""]
    return "\n".join(lines)
