"""Export of a trained student as a real low-bit model directory, and its loader.

An export directory (the denoiser's part of a diffusers model directory) holds::

    config.json                           the diffusers model config (``_class_name`` ...) + ``quantization_config``
    diffusion_pytorch_model.safetensors   packed codes, quantizer tensors, every full-precision tensor
    README.md                             model card (:mod:`qat.export_card`)

``quantization_config.modules`` records, by module name, every module of an exportable kind
(:mod:`qat.nn.exportable`) with the JSON entry it needs to be rebuilt (``{"kind": "quant_conv2d", "weight": {...},
"act": {...}}``). Tensors, all under the float model's state-dict names:

* quantized layer ``L`` with a weight quantizer: the codes of its weight in the quantizer's own packed form, e.g.
  ``L.weight.packed`` (affine: uint8 bitstream of ``u = q - q_min``, :mod:`qat.packing`, row-major over the
  weight's shape; binary: one bitstream per basis), and the quantizer's tensors ``L.weight_quantizer.*`` (affine
  zero-points stored rounded, the value the forward pass uses). There is no float copy of a quantized weight.
* input-activation quantizers: ``L.act_quantizer.*`` (static steps, or temporal ``(T, ...)`` tables with their
  ``(T,)`` grid), as trained; quantized attention processors likewise (``A.processor.{q,k,v,probs}_quantizer.*``).
* a method's own module kinds: whatever their :meth:`~qat.nn.exportable.Exportable.export_tensors` say.
* everything else (biases, norms, embeddings, full-precision layers) unchanged.

The ``initialized`` flags are not stored: every quantizer of an export is initialised by construction.

Loading (:func:`load_quantized`) rebuilds the float model from ``config.json``, installs each recorded module by
its kind (quantized layers swapped in with quantizers built from the recorded configs), and lets every module turn
its tensors back into state: a quantized layer's weight becomes ``Q(W)`` computed by its own quantizer from the
codes (affine: ``W = s (q - z)`` through :meth:`~qat.quantizers.AffineQuantizer.dequantize`), i.e. exactly the
weight the fake-quant forward of the student computes, so the loaded model reproduces the student's outputs. The
fake quantizers stay in place (simulated quantization): ``Q_w(W) = W`` for a stored weight (checked at export),
and activations are quantized on the fly with the loaded tables (``qat.timestep`` / ``qat.attach_timestep_hook``
work as on the student). No peft, no training code and no teacher are needed, and nothing is unpickled.

Format version 2; version-1 files (``layers`` / ``attention`` sections) still load.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from qat.export_card import model_card_text
from qat.export_format import (
    CARD_NAME,
    CONFIG_NAME,
    FORMAT_VERSION,
    PACKED_SUFFIX,
    QUANT_METHOD,
    REEXPORT_HINT,
    WEIGHTS_NAME,
    ExportError,
    read_export_config,
    resolve_export_dir,
    scheme_of,
)
from qat.families import apply_attention_heads
from qat.files import save_tensors
from qat.nn.exportable import EXPORTABLE, ExportTensorError
from qat.prepare import LAYER_MAPPING, convert
from qat.quantizers.base import Quantizer
from qat.timestep import temporal_quantizers

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "CONFIG_NAME",
    "CARD_NAME",
    "WEIGHTS_NAME",
    "PACKED_SUFFIX",
    "ExportError",
    "export_quantized",
    "load_quantized",
    "exportable_modules",
    "read_export_config",
    "resolve_export_dir",
]

# -- helpers --------------------------------------------------------------------------------------------------------
def _json_safe(value: Any, key: str) -> Any:
    """Plain JSON types for a model config value (tuples -> lists, paths -> str, numpy -> lists)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, key) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise ExportError(f"model config entry {key!r} of type {type(value).__name__} cannot be written to JSON")


def _model_config(model: nn.Module, base_model_config: dict | None) -> dict[str, Any]:
    """The diffusers config of ``model`` (``_class_name`` included) or ``base_model_config``; no old quant config."""
    if base_model_config is not None:
        cfg = dict(base_model_config)
    elif hasattr(model, "config") and hasattr(model, "to_json_string"):
        cfg = json.loads(model.to_json_string())  # diffusers' own serialisation (adds _class_name)
    else:
        cfg = {}
    if "_class_name" not in cfg and hasattr(model, "config") and hasattr(model, "to_json_string"):
        cfg["_class_name"] = type(model).__name__
    cfg.pop("quantization_config", None)  # a stale entry (another scheme) must not survive
    return {k: _json_safe(v, k) for k, v in cfg.items()}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """All tensors of the safetensors file, on the CPU (never unpickles); unreadable files raise ExportError."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the export directory has {CONFIG_NAME} but no weights; "
                                f"{REEXPORT_HINT}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises SafetensorError / OSError on truncated or garbage files
        raise ExportError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); the file is "
                          f"corrupt or truncated: {REEXPORT_HINT}") from None


def _build_model(config: dict[str, Any], path: Path) -> nn.Module:
    """The float diffusers model of ``config`` (``quantization_config`` stripped: diffusers would act on it)."""
    import diffusers

    name = config.get("_class_name")
    if not name:
        raise ExportError(f"{path} has no _class_name: the export was written from a non-diffusers model; pass a "
                          "float model of the same architecture as load_quantized(path, model=...)")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ExportError(f"{path}: _class_name {name!r} is not a diffusers model class; pass a float model of the "
                          "same architecture as load_quantized(path, model=...)")
    init = {k: v for k, v in config.items() if k != "quantization_config"}
    model = cls.from_config(init)
    apply_attention_heads(model)  # per-level head counts of a converted CompVis UNet (no-op otherwise)
    return model


# -- export -------------------------------------------------------------------------------------------------------
def exportable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every module of a registered exportable kind that records itself (``exports()``)."""
    kinds = {EXPORTABLE.get(k) for k in EXPORTABLE.names()}
    return {n: m for n, m in model.named_modules() if n and type(m) in kinds and m.exports()}


def _check_exportable(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Every quantizer is initialised, enabled, and held by an exportable module."""
    owners = [n + "." for n in modules]
    for name, q in model.named_modules():
        if not isinstance(q, Quantizer):
            continue
        if not any(name.startswith(o) for o in owners):
            raise ExportError(f"cannot export quantizer {name!r}: it is not held by a module of an exportable kind "
                              f"({EXPORTABLE.names()}); register its module with qat.nn.exportable."
                              "register_exportable")
        if not bool(q.initialized):
            raise ExportError(f"quantizer {name!r} is not initialised: calibrate the student (qat.calibrate) or load "
                              "its trained state before exporting")
        if not q.enabled:
            raise ExportError(f"quantizer {name!r} is disabled: re-enable it (quantizer.enabled = True) or leave the "
                              "layer out of the quantization spec; an export stores what the enabled model computes")


def _check_stored_weight(name: str, module: nn.Module) -> None:
    """``Q(Q(W)) == Q(W)``: the reloaded layer, whose weight is ``Q(W)``, must compute what the student computed."""
    wq = getattr(module, "weight_quantizer", None)
    if wq is None:
        return
    once = wq(module.weight.detach())
    if not torch.equal(wq(once), once):
        raise ExportError(f"{name}: its weight quantizer ({wq.config.name}) does not reproduce its own output "
                          "(Q(Q(W)) != Q(W)), so a reloaded model would differ from the student; for a binary "
                          "quantizer every basis scale must be positive and smaller than the one before")


@torch.no_grad()
def export_quantized(model: nn.Module, out_dir: str | os.PathLike, *, base_model_config: dict | None = None,
                     model_card: dict | None = None, convert_fn: Callable[[nn.Module], Any] = convert,
                     progress: bool = False) -> Path:
    """Writes ``model`` (a prepared student, QALoRA or already converted) as a low-bit model directory.

    The caller's model is not modified: a deep copy is converted (QALoRA merged in the integer domain,
    :func:`qat.convert`), then every exportable module writes its own tensors (a quantized layer: its weight's
    packed codes and its quantizers' tensors), and every other tensor is written as it is (layout: module docstring).

    Args:
        model: the student; every quantizer must be initialised, enabled and held by an exportable module.
        out_dir: directory to write (created; existing export files are replaced).
        base_model_config: the denoiser's diffusers config (with ``_class_name``), written to ``config.json``;
            defaults to ``model.config`` for diffusers models. Without either, :func:`load_quantized` needs a float
            skeleton (``model=``).
        model_card: optional model-card fields (:func:`qat.export_card.model_card_text`).
        convert_fn: finalises the working copy in place before it is written (a method's
            :meth:`~qat.methods.Method.convert`); default :func:`qat.convert`, which merges QALoRA.
        progress: a progress bar over the layers packed.

    Returns:
        the export directory.

    Raises:
        ExportError: a quantizer is not initialised, disabled or held by an unexportable module, or a weight
            quantizer does not reproduce its own output.
    """
    out = Path(out_dir)
    _check_exportable(model, exportable_modules(model))  # before merging: the merge needs initialised quantizers
    work = copy.deepcopy(model)
    convert_fn(work)  # e.g. merges QALoRA (a no-op when already converted) and drops the peft wrappers
    work.eval()
    modules = exportable_modules(work)

    state = {k: v.detach() for k, v in work.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, module in tqdm(modules.items(), desc="export", unit="layer", disable=not progress):
        _check_stored_weight(name, module)
        try:
            own, replaced = module.export_tensors()
        except ValueError as err:
            raise ExportError(f"{name}: {err}") from None
        tensors.update({f"{name}.{k}": v.detach() for k, v in own.items()})
        for key in replaced:
            state.pop(f"{name}.{key}", None)
        entries[name] = {"kind": module.export_kind, **module.export_entry()}
    tensors.update({k: v for k, v in state.items() if k not in tensors})

    layers = {n: e for n, e in entries.items() if "weight" in e and "act" in e}
    fp_layers = [n for n, m in work.named_modules()
                 if n and n not in modules and any(isinstance(m, t) for t in LAYER_MAPPING)]
    temporal = [m for m in temporal_quantizers(work) if isinstance(getattr(m, "timesteps", None), Tensor)]
    grid = None
    if temporal and all(torch.equal(q.timesteps, temporal[0].timesteps) for q in temporal):
        grid = [int(v) if float(v).is_integer() else float(v) for v in temporal[0].timesteps.tolist()]
    counts = Counter(scheme_of(e) for e in layers.values())
    qconfig = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "packing": {"suffix": PACKED_SUFFIX, "bit_order": "lsb_first", "stored_code": "q - q_min",
                    "layout": "row-major over the weight shape, ceil(numel * n_bits / 8) bytes"},
        "scheme": counts.most_common(1)[0][0] if counts else "fp",
        "layer_counts": dict(sorted(counts.items())),
        "modules": entries,
        "fp_layers": fp_layers,
        "timestep_grid": grid,
        "num_timesteps": len(temporal[0].timesteps) if temporal else None,
    }
    config = _model_config(work, base_model_config)
    config["quantization_config"] = qconfig

    out.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, out / WEIGHTS_NAME, metadata={"format": "pt", "quant_method": QUANT_METHOD,
                                                        "format_version": str(FORMAT_VERSION)})
    _atomic_write(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    _atomic_write(out / CARD_NAME, model_card_text(out, model_card))
    return out


# -- load -----------------------------------------------------------------------------------------------------------
def _install(model: nn.Module, qcfg: dict[str, Any], path: Path) -> dict[str, nn.Module]:
    """Installs every recorded module by its kind (in the file's order); returns name -> installed module."""
    installed = {}
    for name, entry in qcfg["modules"].items():
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in EXPORTABLE:
            raise ExportError(f"{path}: quantization_config.modules[{name!r}] has kind {kind!r}; known kinds: "
                              f"{EXPORTABLE.names()} (a method's own kinds register when its module is imported); "
                              f"{REEXPORT_HINT}")
        try:
            installed[name] = EXPORTABLE.get(kind).install_exported(model, name, entry)
        except ValueError as err:
            raise ExportError(f"{path}: modules[{name!r}]: {err}; {REEXPORT_HINT}") from None
    return installed


def _check_keys(tensors: dict[str, Tensor], expected: set[str], replaced: set[str], path: Path) -> None:
    missing = sorted(expected - set(tensors))
    if missing:
        raise ExportError(f"{path}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more: "
                          f"{missing[1:4]})" if len(missing) > 1 else "") + f" required by the model that "
                          f"{CONFIG_NAME} describes; the file is incomplete or belongs to another model: "
                          f"{REEXPORT_HINT}")
    extra = sorted(set(tensors) - expected)
    if extra:
        hint = ("a float copy of a quantized weight (the format stores packed codes only)" if extra[0] in replaced
                else "a LoRA / peft tensor (exports hold merged weights)" if "lora_" in extra[0]
                else f"not part of the model that {CONFIG_NAME} describes")
        raise ExportError(f"{path}: unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more: {extra[1:4]})"
                          if len(extra) > 1 else "") + f": {hint}; remove it or {REEXPORT_HINT}")


@torch.no_grad()
def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                   model: nn.Module | None = None) -> nn.Module:
    """Loads an export directory (or a model directory with a ``unet/`` export) as a quantized model.

    Args:
        path: the export directory (``config.json`` + ``diffusion_pytorch_model.safetensors``), a file in it, or
            the parent directory of a ``unet/`` export.
        device: where the model goes.
        model: a float model of the exported architecture to fill **in place** instead of building the diffusers
            class named by ``config.json`` (needed for exports of non-diffusers models).

    Returns:
        the model in eval mode with no trainable parameters: recorded modules installed with initialised
        quantizers, quantized weights equal to the student's ``Q(W)``, temporal tables and their grids loaded (use
        ``qat.timestep`` / ``qat.attach_timestep_hook``).

    Raises:
        FileNotFoundError: ``config.json`` or the weights file is missing.
        ExportError: no ``quantization_config``; an unknown module kind; unsupported bits or invalid quantizer
            configs; a missing, extra or wrongly shaped tensor; packed codes that disagree with the declared bits
            and shape; an unreadable or corrupt safetensors file. Each message names the file and the tensor or
            entry.
    """
    root = resolve_export_dir(path)
    cfg_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    config, qcfg = read_export_config(cfg_path)
    tensors = _read_tensors(weights_path)
    if model is None:
        model = _build_model(config, cfg_path)
    installed = _install(model, qcfg, cfg_path)
    state = model.state_dict()
    stored: set[str] = set()
    replaced: set[str] = set()
    for name, module in installed.items():
        own, gone = module.exported_keys()
        stored.update(f"{name}.{k}" for k in own)
        replaced.update(f"{name}.{k}" for k in gone)
    plain = set(state) - replaced
    _check_keys(tensors, plain | stored, replaced, weights_path)
    for key in sorted(plain):
        if tuple(tensors[key].shape) != tuple(state[key].shape):
            raise ExportError(f"{weights_path}: tensor {key!r} has shape {list(tensors[key].shape)} but the model "
                              f"built from {CONFIG_NAME} needs {list(state[key].shape)}; {REEXPORT_HINT}")
    new_state = {k: tensors[k] for k in plain}
    for name, module in installed.items():
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k in stored}
        try:
            loaded = module.load_exported(own)
        except ExportTensorError as err:
            raise ExportError(f"{weights_path}: tensor '{prefix}{err.key}' {err}; {REEXPORT_HINT}") from None
        new_state.update({prefix + k: v for k, v in loaded.items()})
    model.load_state_dict(new_state, strict=True)  # copies into the existing tensors, keeping their dtypes
    return model.requires_grad_(False).eval().to(device)
