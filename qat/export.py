"""Export of a trained student as a real low-bit model directory, and its loader.

An export directory (the denoiser's part of a diffusers model directory) holds::

    config.json                           the diffusers model config (``_class_name`` ...) + ``quantization_config``
    diffusion_pytorch_model.safetensors   packed integer weights, quantizer tensors, every full-precision tensor
    README.md                             model card

Tensors, all under the float model's state-dict names:

* quantized layer ``L`` with weight quantizer: ``L.weight.packed`` (uint8, the integer codes
  ``q = clip(round(W / s) + z, q_min, q_max)`` stored as ``u = q - q_min`` in the bitstream of :mod:`qat.packing`,
  row-major over the weight's shape), ``L.weight_quantizer.step`` and ``L.weight_quantizer.zero_point``
  (``()``, ``(C_out,)`` or ``(C_out, G)``; the zero-point is stored rounded, the value the forward pass uses).
  There is no float copy of a quantized weight.
* input-activation quantizers: ``L.act_quantizer.step`` / ``.zero_point`` (static: ``()`` or ``(C,)``; temporal:
  ``(T, ...)`` tables) and ``L.act_quantizer.timesteps`` (the ``(T,)`` grid of a temporal table), as trained.
  Quantized attention processors likewise (``A.processor.{q,k,v,probs}_quantizer.*``).
* everything else (biases, norms, embeddings, full-precision layers) unchanged.

The ``initialized`` flags are not stored: every quantizer of an export is initialised by construction.

Loading (:func:`load_quantized`) rebuilds the float model from ``config.json``, swaps the recorded layers for
:class:`~qat.nn.QuantLinear` / :class:`~qat.nn.QuantConv2d` with quantizers built from the recorded configs, and
sets every quantized weight to

    W = s * (q - z)                                                                                        (1)

through the quantizer's own :meth:`~qat.quantizers.FakeQuantizer.dequantize`, i.e. exactly the weight the
fake-quant forward of the student computes, so the loaded model reproduces the student's outputs. The fake
quantizers stay in place (simulated quantization): ``Q_w(W) = W`` on the grid, and activations are quantized
on the fly with the loaded tables (``qat.timestep`` / ``qat.attach_timestep_hook`` work as on the student).
No peft, no training code and no teacher are needed, and nothing is unpickled.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qat.nn.attention import QuantAttnProcessor
from qat.nn.layers import QuantConv2d, QuantLinear
from qat.packing import SUPPORTED_BITS, from_unsigned, pack, packed_numel, to_unsigned, unpack
from qat.prepare import LAYER_MAPPING, convert, quant_layers
from qat.quantizers import FakeQuantizer, QuantizerConfig, TemporalLSQQuantizer, config_class

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "CONFIG_NAME",
    "CARD_NAME",
    "WEIGHTS_NAME",
    "PACKED_SUFFIX",
    "ExportError",
    "ExportSizes",
    "export_quantized",
    "load_quantized",
    "export_sizes",
    "model_card_text",
]

FORMAT_VERSION = 1
QUANT_METHOD = "diffqat"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CARD_NAME = "README.md"
PACKED_SUFFIX = ".weight.packed"
_ATTN_PARTS = ("q", "k", "v", "probs")
_REEXPORT = "re-export the student with qat.export.export_quantized (or `python export.py <run> <out>`)"


class ExportError(ValueError):
    """A malformed export directory or an unexportable model; the message names the file, the tensor and the fix."""


# -- quantizer configs <-> JSON --------------------------------------------------------------------------------------
def _quantizer_entry(q: FakeQuantizer) -> dict[str, Any]:
    """``{"quantizer": name, <every config field>}``: enough to rebuild the config exactly."""
    return {"quantizer": q.config.name, **dataclasses.asdict(q.config)}


def _config_from_entry(entry: Any, where: str, file: Path) -> QuantizerConfig:
    """The quantizer config recorded as ``entry`` (see :func:`_quantizer_entry`); ``where`` names it in errors."""
    if not isinstance(entry, dict) or "quantizer" not in entry:
        raise ExportError(f"{file}: {where} must be an object with a 'quantizer' name, got {entry!r}; {_REEXPORT}")
    try:
        cls = config_class(entry["quantizer"])
    except KeyError as err:
        raise ExportError(f"{file}: {where}: {err.args[0]}; {_REEXPORT}") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(entry) - fields - {"quantizer", "shape"})
    if unknown:
        raise ExportError(f"{file}: {where} has unknown fields {unknown} for quantizer {entry['quantizer']!r} "
                          f"(allowed: {sorted(fields)}); was it written by a newer DiffQAT? {_REEXPORT}")
    bits = entry.get("n_bits")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ExportError(f"{file}: {where}: declared bits n_bits={bits!r} are not supported (one of "
                          f"{list(SUPPORTED_BITS)}); fix n_bits in {file.name} or {_REEXPORT}")
    try:
        return cls(**{k: v for k, v in entry.items() if k in fields})
    except (TypeError, ValueError) as err:
        raise ExportError(f"{file}: {where}: invalid quantizer config: {err}; fix it in {file.name} or "
                          f"{_REEXPORT}") from None


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


# -- export ----------------------------------------------------------------------------------------------------------
def _check_exportable(model: nn.Module) -> None:
    """Every quantizer is initialised, enabled, and held by a quantized layer or a quantized attention processor."""
    owned: set[int] = set()
    for layer in quant_layers(model).values():
        owned.update(id(q) for q in (layer.weight_quantizer, layer.act_quantizer) if q is not None)
    for module in model.modules():
        if isinstance(module, QuantAttnProcessor):
            owned.update(id(getattr(module, f"{p}_quantizer")) for p in _ATTN_PARTS)
    for name, q in model.named_modules():
        if not isinstance(q, FakeQuantizer):
            continue
        if id(q) not in owned:
            raise ExportError(f"cannot export quantizer {name!r}: only QuantLinear / QuantConv2d quantizers and "
                              "QuantAttnProcessor quantizers are supported")
        if not bool(q.initialized):
            raise ExportError(f"quantizer {name!r} is not initialised: calibrate the student (qat.calibrate) or load "
                              "its trained state before exporting")
        if not q.enabled:
            raise ExportError(f"quantizer {name!r} is disabled: re-enable it (quantizer.enabled = True) or leave the "
                              "layer out of the quantization spec; an export stores what the enabled model computes")


def _quantizer_tensors(prefix: str, q: FakeQuantizer, round_zero: bool) -> dict[str, Tensor]:
    """The quantizer's state-dict tensors under ``prefix``, without the ``initialized`` flag."""
    out = {}
    for key, t in q.state_dict().items():
        if key == "initialized":
            continue
        t = t.detach()
        if round_zero and key == "zero_point":
            t = torch.round(t)  # the value the forward pass uses (round_ste): integer zero-points on disk
        out[f"{prefix}.{key}"] = t
    return out


def _scheme(entry: dict[str, Any]) -> str:
    w, a = entry.get("weight"), entry.get("act")
    return f"W{w['n_bits'] if w else 'fp'}A{a['n_bits'] if a else 'fp'}"


@torch.no_grad()
def export_quantized(model: nn.Module, out_dir: str | os.PathLike, *, base_model_config: dict | None = None,
                     model_card: dict | None = None) -> Path:
    """Writes ``model`` (a prepared student, QALoRA or already converted) as a low-bit model directory.

    The caller's model is not modified: a deep copy is converted (QALoRA merged in the integer domain,
    :func:`qat.convert`), then each quantized layer's integer codes ``q = clip(round(W / s) + z)`` are computed with
    its own weight quantizer (the codes of the fake-quant forward), packed at the quantizer's bit-width, and written
    with the quantizer tensors and every full-precision tensor (layout: module docstring).

    Args:
        model: the student; every quantizer must be initialised and enabled.
        out_dir: directory to write (created; existing export files are replaced).
        base_model_config: the denoiser's diffusers config (with ``_class_name``), written to ``config.json``;
            defaults to ``model.config`` for diffusers models. Without either, :func:`load_quantized` needs a float
            skeleton (``model=``).
        model_card: optional model-card fields: ``title``, ``base_model``, ``method``, ``evaluation`` (metric ->
            value, or column -> {metric -> value}), ``notes``; other keys are listed under "Details".

    Returns:
        the export directory.

    Raises:
        ExportError: a quantizer is not initialised or disabled, or is held by an unsupported module.
    """
    out = Path(out_dir)
    _check_exportable(model)  # before merging: the merge itself needs initialised weight quantizers
    work = copy.deepcopy(model)
    convert(work)  # merges QALoRA (a no-op when already converted) and drops the peft wrappers
    work.eval()

    state = {k: v.detach() for k, v in work.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, layer in quant_layers(work).items():
        wq, aq = layer.weight_quantizer, layer.act_quantizer
        entry: dict[str, Any] = {"module": "Conv2d" if isinstance(layer, QuantConv2d) else "Linear",
                                 "weight": None, "act": None}
        if wq is not None:
            codes = wq.integer_codes(layer.weight.detach())  # float tensor of exact integers, shape of W
            stored = to_unsigned(codes, wq.config.n_bits, wq.config.signed)
            tensors[name + PACKED_SUFFIX] = pack(stored, wq.config.n_bits)
            tensors.update(_quantizer_tensors(f"{name}.weight_quantizer", wq, round_zero=True))
            entry["weight"] = {**_quantizer_entry(wq), "shape": list(layer.weight.shape)}
            del state[f"{name}.weight"]
        if aq is not None:
            tensors.update(_quantizer_tensors(f"{name}.act_quantizer", aq, round_zero=False))
            entry["act"] = _quantizer_entry(aq)  # temporal configs carry num_timesteps
        layers[name] = entry

    attention: dict[str, dict[str, Any]] = {}
    for name, module in work.named_modules():
        if isinstance(module, QuantAttnProcessor):
            entries = {p: _quantizer_entry(getattr(module, f"{p}_quantizer")) for p in _ATTN_PARTS}
            if not entries["q"] == entries["k"] == entries["v"]:
                raise ExportError(f"{name}: q, k and v quantizers with different configs cannot be rebuilt by "
                                  "QuantAttnProcessor(config, probs_config)")
            attention[name.rpartition(".")[0]] = entries  # the Attention module that owns the processor
            for p in _ATTN_PARTS:
                tensors.update(_quantizer_tensors(f"{name}.{p}_quantizer", getattr(module, f"{p}_quantizer"), False))

    quantizer_keys = {k for k in state if k.endswith(".initialized") or k in tensors}
    for key, value in state.items():
        if key not in quantizer_keys:
            tensors[key] = value

    quantized = set(layers)
    fp_layers = [n for n, m in work.named_modules()
                 if n and n not in quantized and any(isinstance(m, t) for t in LAYER_MAPPING)]
    temporal = [m for m in work.modules() if isinstance(m, TemporalLSQQuantizer)]
    grid = None
    if temporal and all(torch.equal(q.timesteps, temporal[0].timesteps) for q in temporal):
        grid = [int(v) if float(v).is_integer() else float(v) for v in temporal[0].timesteps.tolist()]
    counts = Counter(_scheme(e) for e in layers.values())
    qconfig = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "packing": {"suffix": PACKED_SUFFIX, "bit_order": "lsb_first", "stored_code": "q - q_min",
                    "layout": "row-major over the weight shape, ceil(numel * n_bits / 8) bytes"},
        "scheme": counts.most_common(1)[0][0] if counts else "fp",
        "layer_counts": dict(sorted(counts.items())),
        "layers": layers,
        "attention": attention,
        "fp_layers": fp_layers,
        "timestep_grid": grid,
        "num_timesteps": temporal[0].config.num_timesteps if temporal else None,
    }
    config = _model_config(work, base_model_config)
    config["quantization_config"] = qconfig

    out.mkdir(parents=True, exist_ok=True)
    _save_tensors(tensors, out / WEIGHTS_NAME)
    _atomic_write(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    _atomic_write(out / CARD_NAME, model_card_text(out, model_card))
    return out


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """safetensors save (CPU, contiguous, no shared storage), written to a temporary name first."""
    seen: set[int] = set()
    clean = {}
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        if t.numel() and t.data_ptr() in seen:
            t = t.clone()  # safetensors refuses tensors that share memory (tied weights)
        seen.add(t.data_ptr())
        clean[key] = t
    tmp = path.with_name(path.name + ".tmp")
    save_file(clean, str(tmp), metadata={"format": "pt", "quant_method": QUANT_METHOD,
                                         "format_version": str(FORMAT_VERSION)})
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- load ------------------------------------------------------------------------------------------------------------
def _resolve_dir(path: Path) -> Path:
    """The directory holding ``config.json``: ``path`` itself, or its ``unet/`` subfolder (a full model directory)."""
    if path.is_file():
        path = path.parent
    if not (path / CONFIG_NAME).is_file() and (path / "unet" / CONFIG_NAME).is_file():
        return path / "unet"
    return path


def _read_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, quantization_config)`` from ``config.json``, validated at the top level."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an export directory needs {CONFIG_NAME} and {WEIGHTS_NAME}; "
                                f"{_REEXPORT}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err}); {_REEXPORT}") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(config).__name__}; {_REEXPORT}")
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise ExportError(f"{path} has no quantization_config entry: it is a plain (full-precision) model config, "
                          f"not a DiffQAT export; load it with diffusers' from_pretrained, or {_REEXPORT}")
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise ExportError(f"{path}: quantization_config.quant_method is {qcfg.get('quant_method')!r}, not "
                          f"{QUANT_METHOD!r}: this is not a DiffQAT export (bitsandbytes / gguf / torchao models load "
                          "with diffusers' from_pretrained)")
    version = qcfg.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ExportError(f"{path}: quantization_config.format_version {version!r} is not supported (this DiffQAT "
                          f"reads 1..{FORMAT_VERSION}); update DiffQAT or {_REEXPORT}")
    for key, kind, json_kind in (("layers", dict, "object"), ("attention", dict, "object"),
                                 ("fp_layers", list, "list")):
        if not isinstance(qcfg.get(key), kind):
            raise ExportError(f"{path}: quantization_config.{key} must be a JSON {json_kind}, got "
                              f"{qcfg.get(key)!r}; {_REEXPORT}")
    return config, qcfg


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """All tensors of the safetensors file, on the CPU (never unpickles); unreadable files raise ExportError."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the export directory has {CONFIG_NAME} but no weights; "
                                f"{_REEXPORT}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises SafetensorError / OSError on truncated or garbage files
        raise ExportError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); the file is "
                          f"corrupt or truncated: {_REEXPORT}") from None


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
    return cls.from_config(init)


def _install(model: nn.Module, qcfg: dict[str, Any], path: Path) -> None:
    """Swaps the recorded layers for quantized ones and installs the recorded attention processors. In place."""
    float_types = {t.__name__: t for t in LAYER_MAPPING}
    for name, entry in qcfg["layers"].items():
        if not isinstance(entry, dict) or entry.get("module") not in float_types:
            raise ExportError(f"{path}: quantization_config.layers[{name!r}] must record 'module' (one of "
                              f"{sorted(float_types)}), 'weight' and 'act', got {entry!r}; {_REEXPORT}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ExportError(f"{path}: quantized layer {name!r} does not exist in the {type(model).__name__} built "
                              f"from the config: the config and the model disagree; {_REEXPORT}") from None
        kind = float_types[entry["module"]]
        if not isinstance(module, kind) or isinstance(module, (QuantLinear, QuantConv2d)):
            raise ExportError(f"{path}: layer {name!r} is recorded as {entry['module']} but the model has "
                              f"{type(module).__name__} there; {_REEXPORT}")
        wcfg = acfg = None
        if entry.get("weight") is not None:
            wcfg = _config_from_entry(entry["weight"], f"layers[{name!r}].weight", path)
            shape = entry["weight"].get("shape")
            if shape != list(module.weight.shape):
                raise ExportError(f"{path}: layers[{name!r}].weight.shape is {shape} but the model's {name}.weight "
                                  f"is {list(module.weight.shape)}; the config does not match the model")
        if entry.get("act") is not None:
            acfg = _config_from_entry(entry["act"], f"layers[{name!r}].act", path)
        try:
            qmod = LAYER_MAPPING[kind].from_float(module, wcfg, acfg, name=name)
        except ValueError as err:
            raise ExportError(f"{path}: layers[{name!r}]: {err}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, qmod)
    for name, entry in qcfg["attention"].items():
        try:
            attn = model.get_submodule(name)
        except AttributeError:
            attn = None
        if attn is None or not hasattr(attn, "set_processor"):
            raise ExportError(f"{path}: quantization_config.attention names {name!r}, which is not a diffusers "
                              f"Attention module of the model; {_REEXPORT}")
        if not isinstance(entry, dict) or set(entry) != set(_ATTN_PARTS):
            raise ExportError(f"{path}: attention[{name!r}] must record {list(_ATTN_PARTS)}; {_REEXPORT}")
        cfgs = {p: _config_from_entry(entry[p], f"attention[{name!r}].{p}", path) for p in _ATTN_PARTS}
        attn.set_processor(QuantAttnProcessor(cfgs["q"], cfgs["probs"]))


def _expected_file_keys(model: nn.Module, qcfg: dict[str, Any]) -> tuple[dict[str, Tensor], set[str]]:
    """``(model state, keys the file must hold)``: the state minus quantized weights and flags, plus packed codes."""
    state = model.state_dict()
    flags = {f"{n}.initialized" for n, m in model.named_modules() if isinstance(m, FakeQuantizer)}
    weights = {f"{n}.weight" for n, e in qcfg["layers"].items() if e.get("weight") is not None}
    packed = {n + PACKED_SUFFIX for n, e in qcfg["layers"].items() if e.get("weight") is not None}
    return state, (set(state) - flags - weights) | packed


def _check_keys(tensors: dict[str, Tensor], expected: set[str], path: Path, qcfg: dict[str, Any]) -> None:
    missing = sorted(expected - set(tensors))
    if missing:
        raise ExportError(f"{path}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more: "
                          f"{missing[1:4]})" if len(missing) > 1 else "") + f" required by the model that "
                          f"{CONFIG_NAME} describes; the file is incomplete or belongs to another model: {_REEXPORT}")
    extra = sorted(set(tensors) - expected)
    if extra:
        quantized = {f"{n}.weight" for n, e in qcfg["layers"].items() if e.get("weight") is not None}
        hint = ("a float copy of a quantized weight (the format stores packed codes only)" if extra[0] in quantized
                else "a LoRA / peft tensor (exports hold merged weights)" if "lora_" in extra[0]
                else f"not part of the model that {CONFIG_NAME} describes")
        raise ExportError(f"{path}: unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more: {extra[1:4]})"
                          if len(extra) > 1 else "") + f": {hint}; remove it or {_REEXPORT}")


def _packed_codes(tensors: dict[str, Tensor], name: str, wcfg: QuantizerConfig, shape: torch.Size,
                  path: Path) -> Tensor:
    """Integer codes ``q`` (float32, shape of the weight) of layer ``name``, validated against the declared bits."""
    key = name + PACKED_SUFFIX
    packed = tensors[key]
    numel = math.prod(shape)
    expected = packed_numel(numel, wcfg.n_bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ExportError(f"{path}: tensor {key!r} must be 1-D uint8 packed codes, got {packed.dtype} "
                          f"{tuple(packed.shape)}; {_REEXPORT}")
    if packed.numel() != expected:
        raise ExportError(f"{path}: tensor {key!r} has {packed.numel()} bytes but {CONFIG_NAME} declares n_bits="
                          f"{wcfg.n_bits} for a weight of shape {list(shape)}: ceil({numel} * {wcfg.n_bits} / 8) = "
                          f"{expected} bytes; the declared bits or shape are wrong, or the file is from another "
                          f"export: {_REEXPORT}")
    try:
        u = unpack(packed, wcfg.n_bits, numel)
    except ValueError as err:
        raise ExportError(f"{path}: tensor {key!r} (n_bits={wcfg.n_bits}, shape {list(shape)}): {err}; "
                          f"{_REEXPORT}") from None
    return from_unsigned(u, wcfg.n_bits, wcfg.signed).to(torch.float32).reshape(shape)


def _check_weight_quantizer(tensors: dict[str, Tensor], name: str, path: Path) -> None:
    step, zero = (tensors.get(f"{name}.weight_quantizer.{k}") for k in ("step", "zero_point"))
    if step is not None and not bool((torch.isfinite(step) & (step > 0)).all()):
        raise ExportError(f"{path}: tensor {name}.weight_quantizer.step has non-positive or non-finite steps; "
                          f"the file is corrupt: {_REEXPORT}")
    if zero is not None and not bool((torch.isfinite(zero) & (zero == torch.round(zero))).all()):
        raise ExportError(f"{path}: tensor {name}.weight_quantizer.zero_point must hold integers (exports store "
                          f"the rounded zero-point); the file is corrupt: {_REEXPORT}")


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
        the model in eval mode with no trainable parameters: recorded layers are ``QuantLinear`` /
        ``QuantConv2d`` with initialised quantizers, quantized weights are ``s (q - z)`` (Eq. 1), temporal tables
        and their grids loaded (use ``qat.timestep`` / ``qat.attach_timestep_hook``).

    Raises:
        FileNotFoundError: ``config.json`` or the weights file is missing.
        ExportError: no ``quantization_config``; unsupported bits or invalid quantizer configs; a missing, extra
            or wrongly shaped tensor; packed codes whose length disagrees with the declared bits and shape; an
            unreadable or corrupt safetensors file. Each message names the file and the tensor or entry.
    """
    root = _resolve_dir(Path(path))
    cfg_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    config, qcfg = _read_config(cfg_path)
    tensors = _read_tensors(weights_path)
    if model is None:
        model = _build_model(config, cfg_path)
    _install(model, qcfg, cfg_path)
    state, expected = _expected_file_keys(model, qcfg)
    _check_keys(tensors, expected, weights_path, qcfg)
    for key in sorted(expected):
        if key.endswith(PACKED_SUFFIX):
            continue
        if tuple(tensors[key].shape) != tuple(state[key].shape):
            raise ExportError(f"{weights_path}: tensor {key!r} has shape {list(tensors[key].shape)} but the model "
                              f"built from {CONFIG_NAME} needs {list(state[key].shape)}; {_REEXPORT}")

    new_state = {k: tensors[k] for k in expected if not k.endswith(PACKED_SUFFIX)}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer):
            new_state[f"{name}.initialized"] = torch.tensor(True)
    for name, layer in quant_layers(model).items():
        wq = layer.weight_quantizer
        if wq is None:
            continue
        _check_weight_quantizer(tensors, name, weights_path)
        wq.load_state_dict({k: new_state[f"{name}.weight_quantizer.{k}"] for k in wq.state_dict()}, strict=True)
        codes = _packed_codes(tensors, name, wq.config, layer.weight.shape, weights_path)
        # Eq. (1) through the quantizer itself: the same float ops as the student's fake-quant forward.
        new_state[f"{name}.weight"] = wq.dequantize(codes).to(layer.weight.dtype)
    model.load_state_dict(new_state, strict=True)  # copies into the existing tensors, keeping their dtypes
    return model.requires_grad_(False).eval().to(device)


# -- sizes and model card --------------------------------------------------------------------------------------------
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
    root = _resolve_dir(Path(path))
    _, qcfg = _read_config(root / CONFIG_NAME)
    weights = root / WEIGHTS_NAME
    layers = {n: e for n, e in qcfg["layers"].items() if e.get("weight") is not None}
    try:
        with safe_open(str(weights), framework="pt") as f:
            info = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:
        raise ExportError(f"{weights}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    itemsize = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}
    floats = ("F16", "BF16", "F32", "F64")
    packed = wq = aq = fp = 0
    fp32_tensors: dict[str, tuple[list[int], int]] = {}  # what an FP32 save of the float model would hold
    for key, (shape, dtype) in info.items():
        n = math.prod(shape)
        nbytes = n * itemsize.get(dtype, 4)
        if key.endswith(PACKED_SUFFIX):
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
    kind = "symmetric" if entry["symmetric"] else "asymmetric"
    gran = entry["granularity"] + (f" (group size {entry['group_size']})" if entry["granularity"] == "group" else "")
    extra = f", {entry['num_timesteps']} timestep rows" if timesteps and "num_timesteps" in entry else ""
    return f"{entry['n_bits']}-bit {entry['quantizer']}, {kind}, per-{gran}{extra}"


def model_card_text(export_dir: str | os.PathLike, info: dict | None = None, subfolder: str | None = None) -> str:
    """The model card (Markdown) of the export at ``export_dir``.

    Args:
        export_dir: the export directory (its ``config.json`` and weights are read).
        info: the ``model_card`` fields of :func:`export_quantized`.
        subfolder: where the export lies relative to the card (``"unet"`` for a full model directory), for the
            loading instructions.
    """
    root = _resolve_dir(Path(export_dir))
    config, qcfg = _read_config(root / CONFIG_NAME)
    info = dict(info or {})
    sizes = export_sizes(root)
    layers = qcfg["layers"]
    groups: dict[str, list[str]] = {}
    for name, entry in layers.items():
        key = f"{_scheme(entry)}: weights {_describe(entry.get('weight'))}; input activations " \
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
                    + ", ".join(f"`{n}`" for n in qcfg["attention"]) if qcfg["attention"] else "") + ".")
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
