"""Fake-quantized ``nn.Linear`` and ``nn.Conv2d`` that reuse the float layer's parameters.

    y = f(Q_a(x), Q_w(W)) + b                                   (f = linear or conv2d; b stays full precision)

``QuantLinear`` / ``QuantConv2d`` subclass the float layers and share their ``weight`` and ``bias`` Parameter
objects, so the float model's state-dict keys stay valid; the quantizers add ``weight_quantizer.*`` and
``act_quantizer.*`` keys only. A quantizer slot is ``None`` when that side stays in full precision, and may hold
any registered quantizer (affine, binary, one defined by a method). Activation quantization applies to the layer
*input*, as in EfficientDM (He et al. 2024, Sec. 3.3 of the dossier).

Both layers are exportable (:mod:`qat.nn.exportable`): the weight is stored as its quantizer's packed codes
(``<layer>.weight.<name>``, :meth:`~qat.quantizers.Quantizer.pack_weight`), the quantizers' tensors next to it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.nn.exportable import ExportTensorError, register_exportable
from qat.nn.fused import quant_input_conv2d, quant_input_linear
from qat.quantizers.affine import AffineQuantizer
from qat.quantizers.base import Quantizer, QuantizerConfig, build_quantizer, config_from_entry, quantizer_entry
from qat.timestep import TimestepAware

__all__ = ["QuantLinear", "QuantConv2d", "QuantLayer", "build_weight_quantizer", "build_act_quantizer"]


def build_weight_quantizer(weight: Tensor, config: QuantizerConfig | None, name: str = "") -> Quantizer | None:
    """Weight quantizer for a ``(C_out, ...)`` weight: channels along axis 0, groups over the flattened rest."""
    if config is None:
        return None
    c_out = weight.shape[0]
    per_channel = weight[0].numel()
    groups = None
    if getattr(config, "granularity", None) == "group":
        if per_channel % config.group_size:
            raise ValueError(f"{name}: {per_channel} weights per output channel are not divisible by "
                             f"group_size {config.group_size}")
        groups = per_channel // config.group_size
    q = build_quantizer(config, num_channels=c_out, channel_axis=0, group_count=groups)
    if isinstance(q, TimestepAware):
        raise ValueError(f"{name}: weights cannot use a timestep-dependent quantizer ({config.name} is for "
                         "activations)")
    return q.to(weight.device)


def build_act_quantizer(config: QuantizerConfig | None, channels: int, channel_axis: int, device: torch.device,
                        name: str = "") -> Quantizer | None:
    """Input-activation quantizer; ``channel`` granularity uses ``channel_axis`` (1 for conv, -1 for linear)."""
    if config is None:
        return None
    if getattr(config, "granularity", None) == "group":
        raise ValueError(f"{name}: activation quantizers support granularity 'tensor' or 'channel', not 'group'")
    return build_quantizer(config, num_channels=channels, channel_axis=channel_axis).to(device)


_SLOTS = ("weight_quantizer", "act_quantizer")


class _QuantMixin:
    """Shared behaviour of the quantized layers (mixed into the ``nn.Linear`` / ``nn.Conv2d`` subclasses)."""

    weight: nn.Parameter
    weight_quantizer: Quantizer | None
    act_quantizer: Quantizer | None
    _float_type: type[nn.Module]

    def quantized_weight(self, delta: Tensor | None = None) -> Tensor:
        """``Q_w(W)``, or QALoRA's ``s (clip(W_int + round(delta / s)) - z)`` when ``delta`` is given.

        Args:
            delta: an update of the weight's shape (e.g. the LoRA product ``scaling * B A``), or None.
        """
        q = self.weight_quantizer
        if q is None or not q.enabled:
            return self.weight if delta is None else self.weight + delta.to(self.weight.dtype)
        if delta is None:
            return q(self.weight)
        if not isinstance(q, AffineQuantizer):
            raise TypeError(f"a weight update in the integer domain (QALoRA) needs an affine weight quantizer, not "
                            f"{type(q).__name__}")
        return q.forward_with_delta(self.weight, delta)

    def _fused_input(self) -> bool:
        """Whether the input quantizer runs inside the layer's own autograd node (:mod:`qat.nn.fused`): an affine
        quantizer on its fused path, and no hooks watching it (calibration, telemetry must see it called)."""
        a = self.act_quantizer
        return (isinstance(a, AffineQuantizer) and a.enabled and a.fused
                and not (a._forward_hooks or a._forward_pre_hooks))

    def quantize_input(self, x: Tensor) -> Tensor:
        """``Q_a(x)`` (identity when there is no activation quantizer)."""
        return x if self.act_quantizer is None else self.act_quantizer(x)

    def _bits(self) -> str:
        w = "fp" if self.weight_quantizer is None else str(self.weight_quantizer.config.n_bits)
        a = "fp" if self.act_quantizer is None else str(self.act_quantizer.config.n_bits)
        return f"W{w}A{a}"

    # -- export (qat.nn.exportable) ----------------------------------------------------------------------------------
    def exports(self) -> bool:
        return self.weight_quantizer is not None or self.act_quantizer is not None

    def export_entry(self) -> dict[str, Any]:
        wq, aq = self.weight_quantizer, self.act_quantizer
        return {"weight": None if wq is None else {**quantizer_entry(wq), "shape": list(self.weight.shape)},
                "act": None if aq is None else quantizer_entry(aq)}

    def _quantizer_keys(self) -> list[str]:
        return [f"{slot}.{k}" for slot in _SLOTS if getattr(self, slot) is not None
                for k in getattr(self, slot).state_dict()]

    @torch.no_grad()
    def export_tensors(self) -> tuple[dict[str, Tensor], list[str]]:
        tensors: dict[str, Tensor] = {}
        wq = self.weight_quantizer
        if wq is not None:
            tensors.update({f"weight.{n}": t for n, t in wq.pack_weight(self.weight.detach()).items()})
        for slot in _SLOTS:
            q = getattr(self, slot)
            if q is not None:
                tensors.update({f"{slot}.{k}": v for k, v in q.export_state().items()})
        return tensors, (["weight"] if wq is not None else []) + self._quantizer_keys()

    @classmethod
    def install_exported(cls, root: nn.Module, name: str, entry: dict[str, Any]) -> nn.Module:
        try:
            module = root.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantized layer {name!r} does not exist in the {type(root).__name__} built from the "
                             "config: the config and the model disagree") from None
        if not isinstance(module, cls._float_type) or isinstance(module, _QuantMixin):
            raise ValueError(f"layer {name!r} is recorded as {cls.__name__} but the model has "
                             f"{type(module).__name__} there")
        configs = {}
        for side in ("weight", "act"):
            if entry.get(side) is None:
                configs[side] = None
                continue
            try:
                configs[side] = config_from_entry(entry[side])
            except ValueError as err:
                raise ValueError(f"{side}: {err}") from None
        if configs["weight"] is not None and entry["weight"].get("shape") != list(module.weight.shape):
            raise ValueError(f"weight.shape is {entry['weight'].get('shape')} but the model's {name}.weight is "
                             f"{list(module.weight.shape)}; the config does not match the model")
        qmod = cls.from_float(module, configs["weight"], configs["act"], name=name)
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, qmod)
        return qmod

    def exported_keys(self) -> tuple[list[str], list[str]]:
        stored = []
        wq = self.weight_quantizer
        if wq is not None:
            stored += [f"weight.{n}" for n in wq.packed_names()]
        for slot in _SLOTS:
            q = getattr(self, slot)
            if q is not None:
                stored += [f"{slot}.{k}" for k in q.state_dict() if k != "initialized"]
        return stored, (["weight"] if wq is not None else []) + self._quantizer_keys()

    @torch.no_grad()
    def load_exported(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        state: dict[str, Tensor] = {}
        for slot in _SLOTS:
            q = getattr(self, slot)
            if q is None:
                continue
            own = {k: tensors[f"{slot}.{k}"] for k in q.state_dict() if k != "initialized"}
            own["initialized"] = torch.tensor(True)
            for key, value in own.items():
                expected = q.state_dict()[key].shape
                if value.shape != expected:
                    raise ExportTensorError(f"{slot}.{key}", f"has shape {list(value.shape)} but the layer built "
                                            f"from the config needs {list(expected)}")
            q.load_state_dict(own, strict=True)  # the weight quantizer's scales are needed to unpack the codes
            state.update({f"{slot}.{k}": v for k, v in own.items()})
        wq = self.weight_quantizer
        if wq is not None:
            names = wq.packed_names()
            try:
                weight = wq.unpack_weight({n: tensors[f"weight.{n}"] for n in names}, self.weight.shape)
            except ValueError as err:
                # the message names the packed tensor or the quantizer's state key at fault ("<name>: why")
                head, _, why = str(err).partition(": ")
                key = (f"weight.{head}" if head in names else f"weight_quantizer.{head}"
                       if head in wq.state_dict() else f"weight.{names[0]}")
                raise ExportTensorError(key, why if key.endswith(head) else str(err)) from None
            state["weight"] = weight.to(self.weight.dtype)
        return state


@register_exportable("quant_linear")
class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with input-activation and weight fake quantization (shapes as ``nn.Linear``).

    Built with :meth:`from_float`; constructed directly (``nn.Linear`` arguments) it has no quantizers.
    """

    _float_type = nn.Linear

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer = None
        self.act_quantizer = None

    def forward(self, x: Tensor, weight_delta: Tensor | None = None, quantized_weight: Tensor | None = None) -> Tensor:
        """``weight_delta``: an update of the weight (QALoRA); ``quantized_weight``: ``Q_w(W + delta)`` computed by
        the caller (QALoRA's recomputed form); at most one of them."""
        w = self.quantized_weight(weight_delta) if quantized_weight is None else quantized_weight
        if self._fused_input():
            a = self.act_quantizer
            _, step, zero = a.broadcast_params(x)
            return quant_input_linear(x, step, zero, a.q_min, a.q_max, w, self.bias, compiled=a.compiled_kernels)
        return F.linear(self.quantize_input(x), w, self.bias)

    @classmethod
    def from_float(cls, mod: nn.Linear, weight_config: QuantizerConfig | None,
                   act_config: QuantizerConfig | None, name: str = "") -> QuantLinear:
        """Wraps ``mod``; the new layer shares ``mod.weight`` and ``mod.bias`` (no copy)."""
        new = cls(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        new.weight = mod.weight
        new.bias = mod.bias
        new.weight_quantizer = build_weight_quantizer(mod.weight, weight_config, name)
        new.act_quantizer = build_act_quantizer(act_config, mod.in_features, -1, mod.weight.device, name)
        new.train(mod.training)
        return new

    def to_float(self) -> nn.Linear:
        """The float layer with the same (shared) parameters; quantizers are dropped."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight, out.bias = self.weight, self.bias
        return out.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._bits()}"


@register_exportable("quant_conv2d")
class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with input-activation (channel axis 1) and weight fake quantization.

    Built with :meth:`from_float`; constructed directly (``nn.Conv2d`` arguments) it has no quantizers.
    """

    _float_type = nn.Conv2d

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer = None
        self.act_quantizer = None

    def forward(self, x: Tensor, weight_delta: Tensor | None = None, quantized_weight: Tensor | None = None) -> Tensor:
        """``weight_delta`` / ``quantized_weight``: as :meth:`QuantLinear.forward`."""
        w = self.quantized_weight(weight_delta) if quantized_weight is None else quantized_weight
        if self._fused_input() and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            a = self.act_quantizer
            _, step, zero = a.broadcast_params(x)
            return quant_input_conv2d(x, step, zero, a.q_min, a.q_max, w, self.bias, self.stride, self.padding,
                                      self.dilation, self.groups, compiled=a.compiled_kernels)
        return self._conv_forward(self.quantize_input(x), w, self.bias)

    @staticmethod
    def _conv_kwargs(mod: nn.Conv2d) -> dict:
        return dict(in_channels=mod.in_channels, out_channels=mod.out_channels, kernel_size=mod.kernel_size,
                    stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                    bias=mod.bias is not None, padding_mode=mod.padding_mode, device="meta")

    @classmethod
    def from_float(cls, mod: nn.Conv2d, weight_config: QuantizerConfig | None,
                   act_config: QuantizerConfig | None, name: str = "") -> QuantConv2d:
        """Wraps ``mod``; the new layer shares ``mod.weight`` and ``mod.bias`` (no copy)."""
        new = cls(**cls._conv_kwargs(mod))
        new.weight = mod.weight
        new.bias = mod.bias
        new.weight_quantizer = build_weight_quantizer(mod.weight, weight_config, name)
        new.act_quantizer = build_act_quantizer(act_config, mod.in_channels, 1, mod.weight.device, name)
        new.train(mod.training)
        return new

    def to_float(self) -> nn.Conv2d:
        """The float layer with the same (shared) parameters; quantizers are dropped."""
        out = nn.Conv2d(**self._conv_kwargs(self))
        out.weight, out.bias = self.weight, self.bias
        return out.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._bits()}"


QuantLayer = QuantLinear | QuantConv2d
