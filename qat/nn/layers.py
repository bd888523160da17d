"""Fake-quantized ``nn.Linear`` and ``nn.Conv2d`` that reuse the float layer's parameters.

    y = f(Q_a(x), Q_w(W)) + b                                   (f = linear or conv2d; b stays full precision)

``QuantLinear`` / ``QuantConv2d`` subclass the float layers and share their ``weight`` and ``bias`` Parameter
objects, so the float model's state-dict keys stay valid; the quantizers add ``weight_quantizer.*`` and
``act_quantizer.*`` keys only. A quantizer slot is ``None`` when that side stays in full precision.
Activation quantization applies to the layer *input*, as in EfficientDM (He et al. 2024, Sec. 3.3 of the dossier).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.nn.fused import quant_input_conv2d, quant_input_linear
from qat.quantizers import FakeQuantizer, QuantizerConfig, TemporalLSQConfig, build_quantizer

__all__ = ["QuantLinear", "QuantConv2d", "QuantLayer", "build_weight_quantizer", "build_act_quantizer"]


def build_weight_quantizer(weight: Tensor, config: QuantizerConfig | None, name: str = "") -> FakeQuantizer | None:
    """Weight quantizer for a ``(C_out, ...)`` weight: channels along axis 0, groups over the flattened rest."""
    if config is None:
        return None
    if isinstance(config, TemporalLSQConfig):
        raise ValueError(f"{name}: weights cannot use a temporal quantizer (temporal_lsq is for activations)")
    c_out = weight.shape[0]
    per_channel = weight[0].numel()
    groups = None
    if config.granularity == "group":
        if per_channel % config.group_size:
            raise ValueError(f"{name}: {per_channel} weights per output channel are not divisible by "
                             f"group_size {config.group_size}")
        groups = per_channel // config.group_size
    return build_quantizer(config, num_channels=c_out, channel_axis=0, group_count=groups).to(weight.device)


def build_act_quantizer(config: QuantizerConfig | None, channels: int, channel_axis: int, device: torch.device,
                        name: str = "") -> FakeQuantizer | None:
    """Input-activation quantizer; ``channel`` granularity uses ``channel_axis`` (1 for conv, -1 for linear)."""
    if config is None:
        return None
    if config.granularity == "group":
        raise ValueError(f"{name}: activation quantizers support granularity 'tensor' or 'channel', not 'group'")
    return build_quantizer(config, num_channels=channels, channel_axis=channel_axis).to(device)


class _QuantMixin:
    """Shared behaviour of the quantized layers (mixed into the ``nn.Linear`` / ``nn.Conv2d`` subclasses)."""

    weight: nn.Parameter
    weight_quantizer: FakeQuantizer | None
    act_quantizer: FakeQuantizer | None

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
        return q.forward_with_delta(self.weight, delta)

    def _fused_input(self) -> bool:
        """Whether the input quantizer runs inside the layer's own autograd node (:mod:`qat.nn.fused`).

        Not while hooks watch the quantizer (calibration, telemetry): they must see it called.
        """
        a = self.act_quantizer
        return a is not None and a.enabled and a.fused and not (a._forward_hooks or a._forward_pre_hooks)

    def quantize_input(self, x: Tensor) -> Tensor:
        """``Q_a(x)`` (identity when there is no activation quantizer)."""
        return x if self.act_quantizer is None else self.act_quantizer(x)

    def _bits(self) -> str:
        w = "fp" if self.weight_quantizer is None else str(self.weight_quantizer.config.n_bits)
        a = "fp" if self.act_quantizer is None else str(self.act_quantizer.config.n_bits)
        return f"W{w}A{a}"


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with input-activation and weight fake quantization (shapes as ``nn.Linear``).

    Built with :meth:`from_float`; constructed directly (``nn.Linear`` arguments) it has no quantizers.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer = None
        self.act_quantizer = None

    def forward(self, x: Tensor, weight_delta: Tensor | None = None, quantized_weight: Tensor | None = None) -> Tensor:
        """``weight_delta``: an update of the weight (QALoRA); ``quantized_weight``: ``Q_w(W + delta)`` computed by
        the caller (QALoRA's recomputed form); at most one of them."""
        w = self.quantized_weight(weight_delta) if quantized_weight is None else quantized_weight
        if self._fused_input():
            _, step, zero = self.act_quantizer._params(x)
            return quant_input_linear(x, step, zero, self.act_quantizer.q_min, self.act_quantizer.q_max, w, self.bias)
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


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with input-activation (channel axis 1) and weight fake quantization.

    Built with :meth:`from_float`; constructed directly (``nn.Conv2d`` arguments) it has no quantizers.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quantizer = None
        self.act_quantizer = None

    def forward(self, x: Tensor, weight_delta: Tensor | None = None, quantized_weight: Tensor | None = None) -> Tensor:
        """``weight_delta`` / ``quantized_weight``: as :meth:`QuantLinear.forward`."""
        w = self.quantized_weight(weight_delta) if quantized_weight is None else quantized_weight
        if self._fused_input() and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            a = self.act_quantizer
            _, step, zero = a._params(x)
            return quant_input_conv2d(x, step, zero, a.q_min, a.q_max, w, self.bias, self.stride, self.padding,
                                      self.dilation, self.groups)
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
