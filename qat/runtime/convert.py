"""Conversion of a reloaded export to a runtime backend, the per-layer report, and the one-call loader."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from qat.export import load_quantized
from qat.nn.attention import QuantAttnProcessor
from qat.nn.exportable import EXPORTABLE
from qat.nn.layers import QuantConv2d, QuantLinear
from qat.nn.qalora import qalora_layers
from qat.quantizers.affine import AffineQuantizer
from qat.quantizers.base import Quantizer
from qat.runtime.kernels import FP8_MAX
from qat.runtime.layers import LAYER_CLASSES, RuntimeLayer, weight_codes, zero_range

__all__ = ["BACKENDS", "RuntimeRow", "RuntimeReport", "to_backend", "load_for_inference"]

#: the backends :func:`to_backend` knows, in the order of the docs
BACKENDS = ("fake", "int8", "fp8", "int4wo")
#: device types whose torch has the int8 / float8 GEMMs used here
_KERNEL_DEVICES = ("cpu", "cuda")
#: why a non-affine activation quantizer has no static integer grid, by quantizer name
_DYNAMIC_WHY = {
    "dynamic_token": "its step is computed per token from each input (QVGen), there is no exported static step",
    "sign_act": "binary (sign) activations: codes of +-1 with a per-call scale, not an affine grid",
}


@dataclass
class RuntimeRow:
    """One module of the report: where it runs and why."""

    name: str
    kind: str
    scheme: str
    backend: str
    reason: str


@dataclass
class RuntimeReport:
    """What :func:`to_backend` did, one row per quantized module (module order); attached as
    ``model.runtime_report``."""

    backend: str
    rows: list[RuntimeRow] = field(default_factory=list)

    def on(self, backend: str) -> list[str]:
        """Names of the modules that run on ``backend``."""
        return [r.name for r in self.rows if r.backend == backend]

    @property
    def fake(self) -> dict[str, str]:
        """Module name -> why it stays on the fake-quant path."""
        return {r.name: r.reason for r in self.rows if r.backend == "fake"}

    def counts(self) -> dict[str, int]:
        """``{backend: modules}``."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.backend] = out.get(r.backend, 0) + 1
        return out

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [6])
        lines = [f"{'module':<{width}} {'kind':<15} {'scheme':<7} {'backend':<7} why"]
        lines += [f"{r.name:<{width}} {r.kind:<15} {r.scheme:<7} {r.backend:<7} {r.reason}" for r in self.rows]
        lines.append(f"requested {self.backend!r}: {self.counts()}")
        return "\n".join(lines)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: {list(BACKENDS)}")


def _why_fake(layer: QuantLinear | QuantConv2d, backend: str) -> str | None:
    """Why ``layer`` cannot run on ``backend`` (None: it can). Decided once, from the layer's configs and tables."""
    wq, aq = layer.weight_quantizer, layer.act_quantizer
    if wq is None:
        return "no weight quantizer (activation-only layer): its weight has no integer codes"
    if not isinstance(wq, AffineQuantizer):
        return (f"{wq.config.name} weight quantizer: binary / multi-basis codes (BinaryDM, BiDM) are not integers of "
                "one affine grid")
    if wq.config.n_bits > 8:
        return f"{wq.config.n_bits}-bit weights exceed int8"
    if layer.weight.device.type not in _KERNEL_DEVICES:
        return f"no int8 / float8 GEMM kernel on device {layer.weight.device.type!r}"
    if backend == "int4wo":
        return None
    if wq.config.granularity == "group":
        return "per-group weight steps vary along the reduction axis: one GEMM needs one step per output channel"
    if aq is None:
        return ("no activation quantizer (weight-only layer): an integer GEMM needs integer activations; the int4wo "
                "backend serves it")
    if not isinstance(aq, AffineQuantizer):
        why = _DYNAMIC_WHY.get(aq.config.name, "not a static affine activation grid")
        return f"{aq.config.name} activation quantizer: {why}"
    if aq.config.n_bits > 8:
        return f"{aq.config.n_bits}-bit activations exceed int8"
    if aq.config.granularity != "tensor":
        return "per-channel activation steps vary along the reduction axis: one GEMM needs one step per row"
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups}): not one GEMM"
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            return f"padding {layer.padding!r} / padding_mode {layer.padding_mode!r}: only explicit zero padding"
    z_lo, z_hi = zero_range(aq)
    im2col = isinstance(layer, nn.Conv2d) and not (tuple(layer.kernel_size) == (1, 1) and layer.padding == (0, 0))
    if (im2col or backend == "fp8") and max(aq.q_max - z_lo, z_hi - aq.q_min) > 256:
        # im2col runs on bfloat16 values q - z (exact up to 256); float8 holds up to 448
        return (f"activation zero-point range [{z_lo}, {z_hi}] lies far outside the code range [{aq.q_min}, "
                f"{aq.q_max}]: q - z exceeds 256")
    if backend == "int8" and im2col and (z_lo < aq.q_min or z_hi > aq.q_max):
        return (f"activation zero-point range [{z_lo}, {z_hi}] leaves the code range [{aq.q_min}, {aq.q_max}]: the "
                "zero-padding code z - o of im2col would not fit int8")
    k = layer.weight[0].numel()
    if backend == "int8" and k * 128 * 128 >= 2**31:
        return f"reduction length {k} can overflow the int32 accumulator of torch._int_mm"
    if backend == "fp8":
        q, _, z = weight_codes(layer)
        if float((q - z).abs().max()) > FP8_MAX:
            return "weight zero-point far outside the code range: q - z exceeds float8_e4m3fn's range"
    return None


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def to_backend(model: nn.Module, backend: str) -> nn.Module:
    """Swaps, in place, every quantized layer that ``backend`` can run for its runtime layer (:mod:`.layers`).

    Backends:
        ``fake``: nothing changes (the fake-quant model of :func:`qat.load_quantized`).
        ``int8``: ``QuantLinear`` / ``QuantConv2d`` with affine weights and activations of <= 8 bits (W8A8, W4A8,
            W4A4, ...), per-tensor or per-channel weight steps, per-tensor static or temporal activation steps: an
            exact integer GEMM (``torch._int_mm``) with zero-point correction; 1x1 convs as a GEMM, k x k convs
            through im2col.
        ``fp8``: the same layers and codes with float8_e4m3fn operands (``torch._scaled_mm``); approximate for codes
            beyond +-16.
        ``int4wo``: every ``QuantLinear`` / ``QuantConv2d`` with an affine weight quantizer (any granularity, any
            conv): packed weight codes dequantized per call, activations NOT quantized.

    Everything else stays as it is, on the fake path, and is listed in the report with the reason: binary and
    multi-basis layers, dynamic per-token activation quantizers, per-channel activation steps, per-group weight
    steps (int8 / fp8), weight-only or activation-only layers (int8 / fp8), grouped convs (int8 / fp8), attention
    matmul quantizers and a method's own module kinds.

    The activation quantizers are kept inside the runtime layers (the same modules), so ``qat.timestep`` and
    ``qat.attach_timestep_hook`` keep selecting the temporal rows.

    Args:
        model: a model of :func:`qat.load_quantized` (float32, as returned; QALoRA merged).
        backend: one of :data:`BACKENDS`.

    Returns:
        ``model``, with ``model.runtime_report`` (:class:`RuntimeReport`) attached.

    Raises:
        ValueError: an unknown backend (the message lists the known ones); a model with unmerged QALoRA adapters; a
            weight that is not on its quantizer's grid (a model cast to a lower precision before conversion).
    """
    _check_backend(backend)
    if qalora_layers(model):
        raise ValueError("the model has unmerged QALoRA adapters: export it (qat.export_quantized) and reload it, or "
                         "merge them first (qat.convert)")
    kinds = {EXPORTABLE.get(k): k for k in EXPORTABLE.names()}
    report = RuntimeReport(backend)
    swaps: list[tuple[str, QuantLinear | QuantConv2d]] = []
    for name, m in model.named_modules():
        if isinstance(m, RuntimeLayer):
            report.rows.append(RuntimeRow(name, f"{m.kind} (runtime)", m.scheme, m.backend,
                                          "converted earlier; reload the export for another backend"))
        elif type(m) in (QuantLinear, QuantConv2d) and m.exports():
            why = "backend 'fake' requested" if backend == "fake" else _why_fake(m, backend)
            if why is None:
                swaps.append((name, m))
                report.rows.append(RuntimeRow(name, kinds[type(m)], m._bits(), backend, ""))
            else:
                report.rows.append(RuntimeRow(name, kinds[type(m)], m._bits(), "fake", why))
        elif isinstance(m, QuantAttnProcessor):
            report.rows.append(RuntimeRow(name, "quant_attention", f"A{m.q_quantizer.config.n_bits}", "fake",
                                          "attention-matmul quantizers (q, k, v, softmax) have no real-kernel path "
                                          "here"))
        elif type(m) in kinds and getattr(m, "exports", lambda: False)():
            report.rows.append(RuntimeRow(name, kinds[type(m)], "-", "fake",
                                          f"a method's own module kind ({kinds[type(m)]}): no real-kernel path"))
    rows = {r.name: r for r in report.rows}
    # every runtime layer is built before the first swap: a layer that refuses leaves the model as it was
    built = [(name, LAYER_CLASSES[backend].from_quant(layer)) for name, layer in swaps]
    for name, new in built:
        _swap(model, name, new)
        rows[name].reason = new.describe()
    model.runtime_report = report
    return model


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """Casts floating parameters and buffers to ``dtype``, except those of quantizers and the steps of runtime
    layers: codes are computed in float32 from float32 steps on every path (a cast step would move the grid)."""
    for module in model.modules():
        if isinstance(module, Quantizer):
            continue
        names = ["bias"] if isinstance(module, RuntimeLayer) else list(module._parameters) + list(module._buffers)
        for key in names:
            t = getattr(module, key, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)


@torch.no_grad()
def load_for_inference(path: str | os.PathLike, backend: str = "fake", device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None, *, model: nn.Module | None = None) -> nn.Module:
    """:func:`qat.load_quantized` then :func:`to_backend`, then an optional cast of the float tensors.

    Args:
        path: the export directory (as :func:`qat.load_quantized`).
        backend: one of :data:`BACKENDS`.
        device: where the model goes (conversion happens there).
        dtype: compute dtype of the float tensors (e.g. ``torch.bfloat16``); quantizer steps and the runtime layers'
            scales stay float32, so activation codes are the float32 ones on every path. The cast comes after the
            conversion, which reads the weight codes from the float32 weights.
        model: a float skeleton of the exported architecture (exports of non-diffusers models), as
            :func:`qat.load_quantized`.

    Returns:
        the model in eval mode, with ``model.runtime_report``.
    """
    _check_backend(backend)  # before the (slow) load
    loaded = load_quantized(path, device, model=model)
    to_backend(loaded, backend)
    if dtype is not None:
        _cast_floating(loaded, dtype)
    return loaded
