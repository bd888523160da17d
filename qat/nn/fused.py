"""Quantized-input conv and linear as one autograd node that keeps ``x`` instead of ``Q_a(x)``.

    y = f(Q_a(x), W_q) + b          f = conv2d or linear, W_q the (already fake-quantized) weight

Composed from two nodes (``Q_a`` then ``f``), backward needs both ``x`` (for the LSQ step gradient and the clip
mask) and ``Q_a(x)`` (for ``dL/dW_q``): two activation-sized tensors per layer where a float layer keeps one. Here
only ``x`` and the weight in its compute dtype are saved; ``Q_a(x)`` is recomputed in backward (one elementwise
pass), ``dL/dQ_a(x)`` and ``dL/dW_q`` come from ``aten.convolution_backward`` / two matmuls, and the quantizer's
gradients from :func:`qat.ste.fake_quantize_backward`, the same rule as :func:`qat.ste.fake_quantize_ste` (tested
against the composed form in ``tests/qat/test_fast_path.py``).

Mixed precision: under autocast the op runs in the autocast dtype (as ``F.conv2d`` / ``F.linear`` would); inside
the node autocast is off and the casts are explicit, so backward uses the same dtypes as forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qat.ste import fake_quantize_backward, fake_quantize_forward

__all__ = ["quant_input_conv2d", "quant_input_linear"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _QuantInputOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, zero: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                q_min: int, q_max: int, conv: tuple | None, compiled: bool) -> Tensor:
        dtype = _compute_dtype(x)
        q = fake_quantize_forward(x, step, zero, q_min, q_max, compiled).to(dtype)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = torch.nn.functional.linear(q, w, b) if conv is None else torch.nn.functional.conv2d(q, w, b, *conv)
        ctx.save_for_backward(x, step, zero, w)
        ctx.q_min, ctx.q_max, ctx.conv, ctx.dtype, ctx.compiled = q_min, q_max, conv, dtype, compiled
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, step, zero, w = ctx.saved_tensors
        needs = ctx.needs_input_grad
        q = fake_quantize_forward(x, step, zero, ctx.q_min, ctx.q_max, ctx.compiled).to(ctx.dtype)
        g = grad_y.to(ctx.dtype)
        if ctx.conv is None:
            grad_q = g @ w if any(needs[:3]) else None
            g2, q2 = g.reshape(-1, g.shape[-1]), q.reshape(-1, q.shape[-1])
            grad_w = g2.t() @ q2 if needs[3] else None
            grad_b = g2.sum(0) if ctx.bias_dtype is not None and needs[4] else None
        else:
            stride, padding, dilation, groups = ctx.conv
            bias_sizes = [w.shape[0]] if ctx.bias_dtype is not None else None
            grad_q, grad_w, grad_b = torch.ops.aten.convolution_backward(
                g, q, w, bias_sizes, list(stride), list(padding), list(dilation), False, [0, 0], groups,
                [any(needs[:3]), needs[3], ctx.bias_dtype is not None and needs[4]])
        grad_x = grad_step = grad_zero = None
        if grad_q is not None:
            grad_x, grad_step, grad_zero, _ = fake_quantize_backward(grad_q, x, step, zero, None, ctx.q_min,
                                                                     ctx.q_max, (*needs[:3], False), ctx.compiled)
        grad_w = None if grad_w is None else grad_w.to(ctx.weight_dtype)
        grad_b = None if grad_b is None else grad_b.to(ctx.bias_dtype)
        return grad_x, grad_step, grad_zero, grad_w, grad_b, None, None, None, None


def quant_input_conv2d(x: Tensor, step: Tensor, zero: Tensor, q_min: int, q_max: int, weight: Tensor,
                       bias: Tensor | None, stride: tuple[int, int], padding: tuple[int, int] | str,
                       dilation: tuple[int, int], groups: int, compiled: bool = False) -> Tensor:
    """``conv2d(Q(x; step, zero), weight, bias)`` (zero padding), saving ``x`` only. ``x``: ``(B, C, H, W)``;
    ``compiled``: the quantizer math as compiled kernels (:func:`qat.ste.fake_quantize_ste`)."""
    return _QuantInputOp.apply(x, step, zero, weight, bias, q_min, q_max, (stride, padding, dilation, groups),
                               compiled)


def quant_input_linear(x: Tensor, step: Tensor, zero: Tensor, q_min: int, q_max: int, weight: Tensor,
                       bias: Tensor | None, compiled: bool = False) -> Tensor:
    """``linear(Q(x; step, zero), weight, bias)``, saving ``x`` only. ``x``: ``(..., C_in)``; ``compiled``: as
    :func:`quant_input_conv2d`."""
    return _QuantInputOp.apply(x, step, zero, weight, bias, q_min, q_max, None, compiled)
