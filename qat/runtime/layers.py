"""Runtime layers: a quantized linear or conv of a reloaded export, computed with real low-bit kernels.

Each layer is built from a :class:`~qat.nn.QuantLinear` / :class:`~qat.nn.QuantConv2d` of
:func:`qat.load_quantized` (:meth:`RuntimeLayer.from_quant`) and replaces it in the model; it is inference-only
(no autograd through the kernels). The weight's integer codes are read back from the reloaded weight ``Q(W)`` with
its own quantizer (``q = clip(round(W / s) + z)``) and checked against it (``s (q - z) == W`` bit for bit), so they
are the codes of the export file.

    int8    y = s_a s_w * sum_k (q_a - z_a)(q_w - z_w) + b     integer GEMM, Eq. (1) of :mod:`.kernels`
    fp8     y = s_a s_w * sum_k e4m3(q_a - z_a) e4m3(q_w - z_w) + b                 float8 GEMM, fp32 accumulation
    int4wo  y = f(x, s_w (q_w - z_w)) + b                      weight-only: codes dequantized per call, x in float

``q_a = clip(round(x / s_a) + z_a)`` are the activation codes of the exported static step ``s_a`` and zero-point
``z_a`` (a temporal quantizer's row for the timestep set with :func:`qat.timestep`: the quantizer module itself is
kept as the layer's ``act_quantizer``, so the model's timestep helpers and hooks still reach it). They are exactly
the codes the fake-quant forward computes (the same float32 operations), so the int8 layer is exact up to the float
rounding of its final rescale; the fake path's float GEMM rounds where this one does not.

Convolutions: a 1x1 conv without padding is a GEMM over channels (rows = pixels); a k x k conv runs the same GEMM
on the im2col matrix of the centred codes (``F.unfold``, zero padding = code ``z_a`` = the value 0 of the fake
path). Grouped convolutions stay on the fake path (the converter's report says so).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.nn.layers import QuantConv2d, QuantLinear
from qat.quantizers.affine import AffineQuantizer
from qat.runtime.kernels import (
    FP8_ALIGN,
    FP8_DTYPE,
    fp8_matmul,
    pack_int4,
    prepare_int8_weight,
    round_up,
    unpack_int4,
    zero_point_matmul,
)

__all__ = ["RuntimeLayer", "Int8Layer", "Float8Layer", "WeightOnlyLayer", "weight_codes", "code_offset",
           "zero_range"]


def code_offset(q: AffineQuantizer) -> int:
    """``o = q_min + 2^(b-1)``: ``q - o`` of every code of the grid lies in ``[-2^(b-1), 2^(b-1) - 1]``."""
    return q.q_min + 2 ** (q.config.n_bits - 1)


@torch.no_grad()
def zero_range(q: AffineQuantizer) -> tuple[int, int]:
    """``(min, max)`` of the rounded zero-points the quantizer can use. A temporal table's interpolated zero-point
    lies between two rows before rounding, and rounding is monotone, so the rows bound every timestep's value."""
    z = torch.round(q.zero_point.detach().float())
    return int(z.min()), int(z.max())


@torch.no_grad()
def weight_codes(layer: QuantLinear | QuantConv2d) -> tuple[Tensor, Tensor, Tensor]:
    """The integer codes of a reloaded layer's weight, with its steps and rounded zero-points.

    Returns:
        ``(q, s, z)``: ``q`` ``(N, K)`` float32 integer codes (``K`` = the weight's elements per output channel, in
        the row-major order of ``F.unfold``); ``s`` and ``z`` ``(N, 1)`` (tensor and channel granularity) or
        ``(N, G, 1)`` (groups), float32, such that ``s (q - z)`` (groups: over ``q.reshape(N, G, -1)``) is the
        weight.

    Raises:
        ValueError: the weight is not on its quantizer's grid (``s (q - z) != W``): not a model of
            :func:`qat.load_quantized`, or cast to a lower precision before conversion.
    """
    wq = layer.weight_quantizer
    w = layer.weight.detach()
    q = wq.integer_codes(w.float())
    if not torch.equal(wq.dequantize(q).to(w.dtype), w):
        raise ValueError("the weight is not on its quantizer's grid (s (q - z) != W): convert the float32 model that "
                         "qat.load_quantized returns, before any cast (load_for_inference(..., dtype=...) casts "
                         "after converting)")
    _, step, zero = wq.broadcast_params(w.float())
    n = w.shape[0]
    if wq.config.granularity == "group":
        s, z = step.float().reshape(n, -1, 1), torch.round(zero.float()).reshape(n, -1, 1)
    else:  # one value (tensor) or one per output channel, as (N, 1)
        s = step.float().reshape(-1, 1).expand(n, 1)
        z = torch.round(zero.float()).reshape(-1, 1).expand(n, 1)
    return q.reshape(n, -1), s.contiguous(), z.contiguous()


class RuntimeLayer(nn.Module):
    """Base of the runtime layers: the geometry of the replaced linear / conv, its bias, and the output layout.

    Attributes:
        kind: ``linear`` or ``conv2d``.
        scheme: ``W<bits>A<bits>`` of the replaced layer.
        in_features: ``K``, weight elements per output channel (``C_in kh kw / groups`` for a conv).
        out_features: ``N``.
    """

    backend: ClassVar[str] = ""

    def __init__(self, layer: QuantLinear | QuantConv2d) -> None:
        super().__init__()
        self.bias = layer.bias  # the float layer's own Parameter (state-dict key unchanged)
        self.kind = "conv2d" if isinstance(layer, nn.Conv2d) else "linear"
        self.scheme = layer._bits()
        self.weight_shape = tuple(layer.weight.shape)
        self.out_features = self.weight_shape[0]
        self.in_features = math.prod(self.weight_shape[1:])
        if self.kind == "conv2d":
            self.kernel_size, self.stride = tuple(layer.kernel_size), tuple(layer.stride)
            self.padding, self.dilation = layer.padding, tuple(layer.dilation)
            self.groups, self.padding_mode = layer.groups, layer.padding_mode
            self._reversed_padding_repeated_twice = layer._reversed_padding_repeated_twice
            self.pointwise = self.kernel_size == (1, 1) and self.padding == (0, 0)

    @classmethod
    def from_quant(cls, layer: QuantLinear | QuantConv2d) -> RuntimeLayer:
        """The runtime form of ``layer`` (a layer of a :func:`qat.load_quantized` model)."""
        return cls(layer).to(layer.weight.device)

    def describe(self) -> str:
        """One line for the conversion report."""
        return self.backend

    def extra_repr(self) -> str:
        return f"{self.kind} {self.in_features} -> {self.out_features}, {self.scheme}, backend={self.backend}"


class _StaticInputLayer(RuntimeLayer):
    """A runtime layer whose input is quantized with the exported static step (int8 and fp8)."""

    def __init__(self, layer: QuantLinear | QuantConv2d) -> None:
        super().__init__(layer)
        self.act_quantizer = layer.act_quantizer  # the same module: qat.timestep still sets its table row
        # reads the `initialized` flag now, once, so that no call reads a tensor on the host (compiled graphs)
        self.act_quantizer.check_ready()
        self.act_offset = code_offset(layer.act_quantizer)

    def _matrix(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
        """The GEMM's left operand: centred codes ``d = q_a - z_a`` as ``(M, K)`` (float, integer values), with the
        step ``(M, 1)`` and rounded zero-point ``(M, 1)`` of each row, and the output's leading shape.

        Rows: the ``prod(x.shape[:-1])`` vectors of a linear's input; the ``B H' W'`` output pixels of a conv.
        """
        aq = self.act_quantizer
        if self.kind == "conv2d" and self.pointwise and self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]  # a strided 1x1 conv reads these pixels only
        _, step, zero = aq.broadcast_params(x)  # the fake quantizer's own lookup (temporal row, per-sample rows)
        s, z = step.float(), torch.round(zero.float())
        q = (torch.round(x.float() / s) + z).clamp(aq.q_min, aq.q_max)  # Eq. (1) codes, as the fake forward
        d = q - z
        if self.kind == "linear":
            lead = tuple(x.shape[:-1])
            rows = (*lead, 1)
            return d.reshape(-1, d.shape[-1]), s.expand(rows).reshape(-1, 1), z.expand(rows).reshape(-1, 1), lead
        b = x.shape[0]
        if self.pointwise:
            h, w = x.shape[-2:]
            mat = d.permute(0, 2, 3, 1).reshape(-1, d.shape[1])  # (B H W, C)
        else:
            h, w = (
                (x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
                // self.stride[i] + 1 for i in (0, 1))
            # bfloat16 holds every integer up to 256 exactly: |q - z| <= 255 (zero-point checked at conversion);
            # zero padding is d = 0, the fake path's zero-padded Q(x)
            cols = F.unfold(d.to(torch.bfloat16), self.kernel_size, self.dilation, self.padding, self.stride)
            mat = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B L, C kh kw)
        # (1 | B, 1, 1, 1) -> one value per output pixel, (B H' W', 1)
        s_rows, z_rows = (t.reshape(-1, 1).expand(b, h * w).reshape(-1, 1) for t in (s, z))
        return mat, s_rows, z_rows, (b, h, w)

    def _restore(self, y: Tensor, lead: tuple[int, ...]) -> Tensor:
        """``(M, N)`` -> the layer's output layout (``(..., N)`` or ``(B, N, H', W')``)."""
        if self.kind == "linear":
            return y.reshape(*lead, self.out_features)
        b, h, w = lead
        return y.reshape(b, h, w, self.out_features).permute(0, 3, 1, 2).contiguous()

    def _epilogue(self, acc: Tensor, s_rows: Tensor, x: Tensor, lead: tuple[int, ...]) -> Tensor:
        """``acc * s_a s_w + b`` in float32, in the input's dtype and the layer's layout."""
        y = acc.float() * (s_rows * self.w_scale)
        if self.bias is not None:
            y = y + self.bias.float()
        return self._restore(y.to(x.dtype), lead)


class Int8Layer(_StaticInputLayer):
    """W<=8 A<=8 with an exact integer GEMM (``torch._int_mm``) and the zero-point correction of
    :mod:`qat.runtime.kernels` (Eq. 1); bias and scales in float32::

        y_mn = s_a[m] s_w[n] * (A_mn - zw_n Sa_m - za_m (Sw_n - K zw_n)) + b_n

    Buffers: ``w_t`` ``(K', N')`` int8 centred weight codes (padded), ``w_zero`` / ``w_term`` ``(1, N)``,
    ``w_scale`` ``(1, N)`` float32. Terms that are 0 for every row or channel (symmetric signed grids) are dropped at
    conversion, not tested per call.
    """

    backend: ClassVar[str] = "int8"

    def __init__(self, layer: QuantLinear | QuantConv2d) -> None:
        super().__init__(layer)
        wq, aq = layer.weight_quantizer, layer.act_quantizer
        q, s, z = weight_codes(layer)
        o_w = code_offset(wq)
        zw = z.reshape(-1) - o_w
        za_lo, za_hi = (v - self.act_offset for v in zero_range(aq))
        k = self.in_features
        za_max, zw_max = max(abs(za_lo), abs(za_hi)), int(zw.abs().max())
        # Eq. (1) term by term, |c| <= 128: A, zw Sa, za (Sw - K zw); int32 if their sum cannot overflow
        bound = k * 128 * 128 + zw_max * k * 128 + za_max * k * (128 + zw_max)
        self.wide = bound >= 2**31
        w_t, w_zero, w_term = prepare_int8_weight(q - o_w, zw, self.wide)
        self.register_buffer("w_t", w_t)
        self.register_buffer("w_zero", w_zero)
        self.register_buffer("w_term", w_term)
        self.register_buffer("w_scale", s.reshape(1, -1).clone())
        self.has_w_zero = zw_max > 0
        self.has_a_zero = za_max > 0

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., K)`` or ``(B, C, H, W)`` -> the layer's output, in ``x.dtype``."""
        d, s_rows, z_rows, lead = self._matrix(x)
        za = z_rows - self.act_offset  # (M, 1) integer values
        a = (d + za).to(torch.int8)  # q - o, in [-128, 127] (padding: z - o)
        acc_dtype = torch.int64 if self.wide else torch.int32
        acc = zero_point_matmul(a, za.to(acc_dtype) if self.has_a_zero else None, self.w_t,
                                self.w_zero if self.has_w_zero else None, self.w_term, self.out_features, self.wide)
        return self._epilogue(acc, s_rows, x, lead)

    def describe(self) -> str:
        how = "GEMM" if self.kind == "linear" or self.pointwise else "im2col GEMM"
        return f"int8 {how} (torch._int_mm), exact integer sum" + (", int64 zero-point terms" if self.wide else "")


class Float8Layer(_StaticInputLayer):
    """The same codes as :class:`Int8Layer` in float8_e4m3fn, GEMM by ``torch._scaled_mm`` with float32
    accumulation; scales and bias in float32::

        y_mn = s_a[m] s_w[n] * sum_k e4m3(q_a - z_a)_mk e4m3(q_w - z_w)_nk + b_n

    e4m3 holds every integer of magnitude <= 16 exactly (so 4-bit codes are exact, and the sum then is exact in
    float32 while below 2^24); larger codes are rounded to 4 significant bits, a relative error of at most 2^-4 per
    operand. Buffers: ``w8`` ``(N', K')`` float8 (padded to multiples of 16), ``w_scale`` ``(1, N)`` float32.
    """

    backend: ClassVar[str] = "fp8"

    def __init__(self, layer: QuantLinear | QuantConv2d) -> None:
        super().__init__(layer)
        q, s, z = weight_codes(layer)
        d = q - z  # (N, K) integer values
        n, k = d.shape
        w = F.pad(d, (0, round_up(k, FP8_ALIGN) - k, 0, round_up(n, FP8_ALIGN) - n))
        self.register_buffer("w8", w.to(FP8_DTYPE).contiguous())
        self.register_buffer("w_scale", s.reshape(1, -1).clone())
        aq = layer.act_quantizer
        z_lo, z_hi = zero_range(aq)
        #: both operands hold integers of magnitude <= 16 only: each product, and the sum, is exact
        self.exact_operands = max(aq.q_max - z_lo, z_hi - aq.q_min) <= 16 and float(d.abs().max()) <= 16

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., K)`` or ``(B, C, H, W)`` -> the layer's output, in ``x.dtype``."""
        d, s_rows, _, lead = self._matrix(x)
        out = fp8_matmul(d.float(), self.w8.t())[:, : self.out_features]
        return self._epilogue(out, s_rows, x, lead)

    def describe(self) -> str:
        how = "GEMM" if self.kind == "linear" or self.pointwise else "im2col GEMM"
        codes = "codes exact in e4m3" if self.exact_operands else "codes > 16 rounded to e4m3 (<= 2^-4 relative)"
        return f"fp8 {how} (torch._scaled_mm), {codes}"


class WeightOnlyLayer(RuntimeLayer):
    """Weight-only low-bit storage: codes of <= 4 bits packed two per byte (:func:`~qat.runtime.kernels.pack_int4`),
    of 5 to 8 bits one per byte, stored as ``u = q - q_min``; each call dequantizes ``W = s (u - (z - q_min))``,
    bit for bit the reloaded ``Q(W)``, casts it to the input's dtype and runs the float linear / conv.

    The input is NOT quantized: a W4A4 student served this way computes ``f(x, Q(W))``, not the trained
    ``f(Q_a(x), Q(W))``. This mode saves weight memory; it does not reproduce the student's activation numerics.
    """

    backend: ClassVar[str] = "int4wo"

    def __init__(self, layer: QuantLinear | QuantConv2d) -> None:
        super().__init__(layer)
        wq = layer.weight_quantizer
        q, s, z = weight_codes(layer)
        self.bits = wq.config.n_bits
        u = (q - wq.q_min).to(torch.uint8)  # [0, 2^b - 1]
        self.register_buffer("packed", pack_int4(u) if self.bits <= 4 else u.contiguous())
        n = self.out_features  # (N, G, 1) steps and zero-points, G = 1 unless the quantizer has groups
        self.register_buffer("w_scale", s.reshape(n, -1, 1).clone())
        self.register_buffer("w_zero", (z - wq.q_min).reshape(n, -1, 1).clone())  # u - (z - q_min) = q - z exactly

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``s (q - z)`` in the weight's shape, float32 (the reloaded ``Q(W)`` bit for bit), then cast to
        ``dtype``."""
        u = unpack_int4(self.packed, self.in_features) if self.bits <= 4 else self.packed
        n = self.out_features
        w = (u.float().reshape(n, self.w_scale.shape[1], -1) - self.w_zero) * self.w_scale
        w = w.reshape(self.weight_shape)
        return w if dtype is None else w.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., K)`` or ``(B, C, H, W)`` -> the float layer's output with the dequantized weight."""
        w = self.dequantized_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.kind == "linear":
            return F.linear(x, w, b)
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def describe(self) -> str:
        store = "int4 packed" if self.bits <= 4 else "int8"
        return f"int4wo: {store} weight codes dequantized per call; activations in floating point (not quantized)"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight bits={self.bits}"


#: backend name -> runtime layer class
LAYER_CLASSES: dict[str, type[RuntimeLayer]] = {c.backend: c for c in (Int8Layer, Float8Layer, WeightOnlyLayer)}
