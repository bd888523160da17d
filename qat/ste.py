"""Straight-through estimators: the only place in DiffQAT where a gradient is replaced.

Every estimator here is a named function with its own gradient test in ``tests/qat/test_ste.py``. Quantizers
call these functions instead of writing ``(x.round() - x).detach() + x`` inline, so that the gradient rule of
the whole library can be read (and changed) in one file.

References:
    Bengio et al., "Estimating or Propagating Gradients Through Stochastic Neurons", arXiv:1308.3432 (STE).
    Esser et al., "Learned Step Size Quantization", ICLR 2020, arXiv:1902.08153 (gradient scale).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["round_ste", "grad_scale", "sign_ste", "approx_sign_ste", "binarize_ste", "fake_quantize_ste",
           "fake_quantize_lowrank_ste", "fake_quantize_forward", "fake_quantize_backward"]


def round_ste(x: Tensor) -> Tensor:
    """Round to the nearest integer in the forward pass, identity in the backward pass.

    forward: ``round(x)`` (ties to even, as ``torch.round``); backward: ``d round_ste(x) / dx = 1``.
    """
    return x + (torch.round(x) - x).detach()


def grad_scale(x: Tensor, scale: float | Tensor) -> Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``scale`` in the backward pass.

    LSQ uses it on the step size with ``scale = 1 / sqrt(N * Q_p)`` (Esser et al. 2020, Sec. 2.2), where ``N`` is
    the number of elements that share one step and ``Q_p`` the largest positive integer level.
    """
    y = x * scale
    # ``x.detach() + (y - y.detach())`` is exactly ``x`` in floating point; ``(x - y).detach() + y`` can be 1 ulp off.
    return x.detach() + (y - y.detach())


def sign_ste(x: Tensor) -> Tensor:
    """``sign(x)`` mapped to {-1, +1} (0 goes to +1) forward; clipped identity backward.

    backward: ``d sign_ste(x) / dx = 1 if |x| <= 1 else 0`` (the hard-tanh STE of BinaryConnect / BNN).
    Used by the binarizers of BinaryDM and BiDM.
    """
    forward = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    clipped = x.clamp(-1.0, 1.0)
    return clipped + (forward - clipped).detach()


class _ApproxSignSTE(torch.autograd.Function):
    """One autograd node for :func:`approx_sign_ste` (keeps ``x`` only)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad_out * (2.0 - 2.0 * x.abs()).clamp_min(0.0)


def approx_sign_ste(x: Tensor) -> Tensor:
    """``sign(x)`` mapped to {-1, +1} (0 goes to +1) forward; Bi-Real Net's ApproxSign gradient backward.

    backward: ``d approx_sign_ste(x) / dx = 2 - 2 |x|`` for ``|x| < 1``, 0 otherwise: the derivative of the
    piecewise quadratic ``2x + x^2`` (``-1 <= x < 0``), ``2x - x^2`` (``0 <= x < 1``), ``sign(x)`` elsewhere
    (Liu et al., "Bi-Real Net", ECCV 2018, arXiv:1808.00278, Eq. 6). BiDM's activation binarizer uses it
    (Zheng et al., NeurIPS 2024, dossier Sec. 2.2). Keeps only ``x`` for the backward.
    """
    return _ApproxSignSTE.apply(x)


class _BinarizeSTE(torch.autograd.Function):
    """One autograd node for the residual multi-basis binarizer, see :func:`binarize_ste`."""

    @staticmethod
    def forward(ctx, x: Tensor, scales: Tensor, shape: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, scales)
        ctx.shape = shape
        r, out = x.float(), None
        for k in range(scales.shape[0]):
            y = scales[k].float().reshape(shape) * torch.where(r >= 0, 1.0, -1.0)
            out = y if out is None else out + y
            if k + 1 < scales.shape[0]:
                r = r - y
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, scales = ctx.saved_tensors
        shape, n = ctx.shape, scales.shape[0]
        residuals, r = [], x.float()
        for k in range(n):  # r_0 .. r_{K-1} again: only x and the scales were kept
            residuals.append(r)
            if k + 1 < n:
                r = r - scales[k].float().reshape(shape) * torch.where(r >= 0, 1.0, -1.0)
        g = grad_out.float()
        grad_r: Tensor | None = None  # dL/dr_{k+1}; r_K feeds nothing
        grad_s = torch.empty_like(scales, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for k in reversed(range(n)):
            r = residuals[k]
            s = scales[k].float().reshape(shape)
            grad_y = g if grad_r is None else g - grad_r  # y_k enters out (+) and r_{k+1} (-)
            if grad_s is not None:
                grad_s[k] = (grad_y * torch.where(r >= 0, 1.0, -1.0)).sum_to_size(shape).reshape(scales.shape[1:])
            through = torch.where(r.abs() <= 1.0, grad_y * s, 0.0)  # the clipped STE of sign_ste
            grad_r = through if grad_r is None else grad_r + through
        grad_x = grad_r.to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None if grad_s is None else grad_s.to(scales.dtype), None


def binarize_ste(x: Tensor, scales: Tensor, channel_axis: int | None = 0) -> Tensor:
    """The residual multi-basis binarizer of BinaryDM (Zheng et al., ICLR 2025, Eq. 1) as one autograd node:

        Q(x) = sum_k s_k b_k,    b_k = sign_ste(r_k),    r_0 = x,    r_{k+1} = r_k - s_k b_k

    with ``sign_ste``'s values ({-1, +1}, 0 to +1) and its clipped gradient (1 where ``|r_k| <= 1``); the value and
    both gradients are those of the composition through :func:`sign_ste` (``tests/qat/test_ste.py``), computed in
    float32 and returned in ``x.dtype``. Composed, autograd keeps ``r_k``, ``b_k`` and their products for every
    basis, several weight-sized float32 tensors per layer; this node keeps ``x`` and the scales only and recomputes
    the signs in backward.

    Args:
        x: any shape (a weight: ``(C_out, ...)``).
        scales: ``(K, C)`` with ``C = x.shape[channel_axis]``, or ``(K,)`` with ``channel_axis=None`` (one scale
            per basis for the whole tensor).
        channel_axis: the axis of ``x`` the scales run along.
    """
    shape = [1] * x.dim()
    if channel_axis is not None:
        shape[channel_axis] = x.shape[channel_axis]
    return _BinarizeSTE.apply(x, scales, tuple(shape))


class _FakeQuantizeSTE(torch.autograd.Function):
    """One autograd node for ``Q(x; s, z)`` (and QALoRA's integer-domain update), see :func:`fake_quantize_ste`."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, zero_point: Tensor, delta: Tensor | None,  # type: ignore[override]
                q_min: int, q_max: int, compiled: bool) -> Tensor:
        ctx.save_for_backward(x, step, zero_point, delta)
        ctx.q_min, ctx.q_max, ctx.compiled = q_min, q_max, compiled
        return _kernel("value", compiled)(x, step, zero_point, delta, q_min, q_max).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, step, zero_point, delta = ctx.saved_tensors
        grads = fake_quantize_backward(grad_out, x, step, zero_point, delta, ctx.q_min, ctx.q_max,
                                       ctx.needs_input_grad[:4], compiled=ctx.compiled)
        return (*grads, None, None, None)


def _fq_backward(grad_out: Tensor, x: Tensor, step: Tensor, zero_point: Tensor, delta: Tensor | None, q_min: int,
                 q_max: int, needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The math of :func:`fake_quantize_backward` (eager, or compiled by :func:`_kernel` with ``compiled``)."""
    if torch.compiler.is_compiling():
        # Traced, this backward's ``x / s`` is the forward's expression, and graph CSE merges the two; AOTAutograd's
        # partitioner then keeps ``x / s`` in float32 for backward, one per quantizer, where the quantizers that read
        # one normalisation's output (to_q, to_k, to_v) could share that input instead (its "used far apart" rule
        # forbids recomputing them). A copy of the small step makes the backward's a distinct expression, recomputed
        # from the shared input; inductor drops the copy. CPU check: tests/qat/test_fast_path.py. It saves memory
        # kept for backward (CPU: 68.4 -> 62.4 MiB per attention block); on an H200 no speed change was measured.
        step = step.clone()
    q, zr, v, d, inside1, inside2 = _fq_parts(x, step, zero_point, delta, q_min, q_max)
    g = grad_out.float()
    pass_x = inside1 if inside2 is None else inside1 & inside2
    grad_x = torch.where(pass_x, g, 0.0).to(x.dtype) if needs[0] else None
    grad_step = grad_zero = grad_delta = None
    if needs[1]:
        # dQ/ds = (q - z) - d(q)/d(x/s) * x/s - d(q)/d(delta/s) * delta/s, in integer units
        moved = torch.where(inside1, v, 0.0)
        if inside2 is not None:
            moved = torch.where(inside2, moved + d, 0.0)
        grad_step = _sum_to(g * ((q - zr) - moved), step.shape).to(step.dtype)
    if needs[2]:
        grad_zero = _sum_to(g * step.float() * (pass_x.float() - 1.0), zero_point.shape).to(zero_point.dtype)
    if delta is not None and needs[3]:
        grad_delta = torch.where(inside2, g, 0.0).to(delta.dtype)
    return grad_x, grad_step, grad_zero, grad_delta


#: most elements per row of the first stage of :func:`_sum_to`
_ROW_LIMIT = 65536


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """``t.sum_to_size(shape)`` in two stages: first over the innermost dimensions that ``shape`` broadcasts
    (while a row holds at most ``_ROW_LIMIT`` elements), then over the rest of the, now small, tensor.

    Why: a per-tensor or per-sample step sums a whole activation into one or ``B`` numbers, and inductor splits
    such a reduction into a kernel of its own that reads the activation and the gradient once more. Reduced first
    per row (per token over channels, per channel over the pixels), the sum has the shape of the neighbouring
    normalisation's backward and the elementwise mask, and inductor computes all three in one pass (on an H200 the
    W4A4 step/FP step GPU-time ratio of single blocks fell from 1.045-1.143 to 1.029-1.075, ``docs/performance.md``).
    Only while compiling: eagerly it would be one more kernel launch per reduction and nothing is fused. The value
    is the same sum in another order (float32 rounding).
    """
    if not torch.compiler.is_compiling():
        return t.sum_to_size(shape)
    full = (1,) * (t.dim() - len(shape)) + tuple(shape)
    dims, row = [], 1
    for d in range(t.dim() - 1, 0, -1):  # never dimension 0: that would be the one-stage sum again
        if full[d] != 1 or t.shape[d] == 1 or row * t.shape[d] > _ROW_LIMIT:
            break
        dims.append(d)
        row *= t.shape[d]
    if dims:
        t = t.sum(dims, keepdim=True)
    return t.sum_to_size(shape)


def fake_quantize_backward(grad_out: Tensor, x: Tensor, step: Tensor, zero_point: Tensor, delta: Tensor | None,
                           q_min: int, q_max: int, needs: tuple[bool, ...] = (True, True, True, True),
                           compiled: bool = False,
                           ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`fake_quantize_ste` w.r.t. ``(x, step, zero_point, delta)`` from ``dL/dQ``.

    Recomputes the forward pieces from ``x`` (nothing but the input is kept between forward and backward). Also used
    by the fused quantized layers (:mod:`qat.nn.fused`), which save ``x`` instead of ``Q(x)``. ``compiled``: run the
    math as one compiled kernel (see :func:`fake_quantize_ste`).
    """
    return _kernel("backward", compiled)(grad_out, x, step, zero_point, delta, q_min, q_max, tuple(needs))


def _fq_parts(x: Tensor, step: Tensor, zero_point: Tensor, delta: Tensor | None, q_min: int,
              q_max: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """Backward's view of the forward, in float32: clipped codes, rounded zero, x/s, delta/s, the two in-range
    masks."""
    s = step.float()
    zr = torch.round(zero_point.float())
    v = x.float() / s
    q1 = torch.round(v) + zr
    q = q1.clamp(q_min, q_max)
    inside1 = q == q1  # the clip left the code alone: one comparison instead of two bounds and an "and"
    d = inside2 = None
    if delta is not None:
        d = delta.float() / s
        q2 = q + torch.round(d)
        q = q2.clamp(q_min, q_max)
        inside2 = q == q2
    return q, zr, v, d, inside1, inside2


def _fq_value(x: Tensor, step: Tensor, zero_point: Tensor, delta: Tensor | None, q_min: int, q_max: int) -> Tensor:
    """The forward value of :func:`_fq_parts` alone (no masks: fewer kernels on the forward path), float32."""
    s = step.float()
    zr = torch.round(zero_point.float())
    q = (torch.round(x.float() / s) + zr).clamp(q_min, q_max)
    if delta is not None:
        q = (q + torch.round(delta.float() / s)).clamp(q_min, q_max)
    return (q - zr) * s


def fake_quantize_forward(x: Tensor, step: Tensor, zero_point: Tensor, q_min: int, q_max: int,
                          compiled: bool = False) -> Tensor:
    """Forward value of :func:`fake_quantize_ste` (no autograd node), in ``x.dtype``."""
    return _kernel("value", compiled)(x, step, zero_point, None, q_min, q_max).to(x.dtype)


def fake_quantize_ste(x: Tensor, step: Tensor, zero_point: Tensor, q_min: int, q_max: int,
                      delta: Tensor | None = None, compiled: bool = False) -> Tensor:
    """Uniform fake quantization with LSQ / LSQ+ gradients as a single autograd node (the fast path).

    forward (computed in float32, returned in ``x.dtype``), with ``z = round(zero_point)``::

        q = clip(round(x / s) + z, q_min, q_max)                      (without delta)
        q = clip(q + round(delta / s), q_min, q_max)                  (QALoRA: an update in the integer domain)
        Q = s * (q - z)

    backward: the same gradients as the composite STE form ``clip(round_ste(x / s) + round_ste(z))`` (tested
    against it): ``dQ/dx = 1`` where no clip is active, ``dQ/ds = (q - z) - [x/s] - [delta/s]`` (bracketed terms
    only where their clip is inactive; LSQ, Esser et al. Eq. 3), ``dQ/dz = -s`` where clipped (LSQ+),
    ``dQ/d delta = 1`` where the outer clip is inactive. Only ``x`` (in its own dtype) and the small parameters are
    saved; the masks are recomputed, so activation memory per layer is one copy of the input.

    Args:
        x: any shape; ``step`` / ``zero_point`` (and ``delta``, same shape as ``x``) broadcast against it.
        compiled: run the forward and backward math through ``torch.compile`` (one fused kernel each instead of
            about ten and twenty elementwise ones; the model around it stays eager). Values are the eager ones
            (forward bit-identical; the step gradient's sum may be reduced in another order: float32 rounding).
            Needs what inductor needs: a C++ compiler on a CPU, Triton on a GPU; the first call per tensor rank,
            dtype and bit width compiles (seconds).
    """
    return _FakeQuantizeSTE.apply(x, step, zero_point, delta, q_min, q_max, compiled)


class _FakeQuantizeLowRankSTE(torch.autograd.Function):
    """One autograd node for QALoRA's ``Q(W; s, z, delta = scaling * B A)``, see :func:`fake_quantize_lowrank_ste`."""

    @staticmethod
    def forward(ctx, w: Tensor, delta: Tensor, lora_b: Tensor, lora_a: Tensor,  # type: ignore[override]
                step: Tensor, zero_point: Tensor, scaling: float, q_min: int, q_max: int) -> Tensor:
        c = w.shape[0]
        s, zr = step.float().reshape(-1, 1), torch.round(zero_point.float()).reshape(-1, 1)
        q = (torch.round(w.reshape(c, -1).float() / s) + zr).clamp(q_min, q_max)
        r = torch.round(delta.reshape(c, -1).float() / s)
        q = (q + r).clamp(q_min, q_max)
        # Beyond +-span the outer clip gives the same code and mask, so a narrow integer keeps r exactly.
        span = q_max - q_min + 1
        code = r.clamp(-span, span).to(torch.int8 if span < 127 else torch.int16 if span < 32767 else torch.int32)
        ctx.save_for_backward(w, lora_b, lora_a, step, zero_point, code)
        ctx.scaling, ctx.q_min, ctx.q_max = scaling, q_min, q_max
        return ((q - zr) * s).reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        w, lora_b, lora_a, step, zero_point, code = ctx.saved_tensors
        needs = ctx.needs_input_grad
        c, rank = w.shape[0], lora_a.shape[0]
        s, zr = step.float().reshape(-1, 1), torch.round(zero_point.float()).reshape(-1, 1)
        g = grad_out.reshape(c, -1).float()
        v = w.reshape(c, -1).float() / s
        q1 = torch.round(v) + zr
        q = q1.clamp(ctx.q_min, ctx.q_max)
        q2 = q + code.float()
        qf = q2.clamp(ctx.q_min, ctx.q_max)
        inside = qf == q2  # the outer clip left the code alone: the gradient reaches delta
        passed = inside & (q == q1)  # and the inner one too: it reaches w / s
        grad_delta = torch.where(inside, g, 0.0)
        b2, a2 = lora_b.reshape(c, rank).float(), lora_a.reshape(rank, -1).float()
        grad_b = (grad_delta @ a2.t()) * ctx.scaling  # (C, r)
        grad_a = (b2.t() @ grad_delta) * ctx.scaling if needs[3] else None  # (r, K)
        grad_step = grad_zero = None
        if needs[4]:
            # dQ/ds summed per row: sum_k g (q - z) - sum_k [passed] g w/s - sum_k [inside] g delta/s, where the last
            # sum is (1/s) sum_r B_cr dL/dB_cr (delta = scaling B A), so delta itself is never recomputed.
            row = (g * (qf - zr) - torch.where(passed, g * v, 0.0)).sum(1, keepdim=True)
            row = row - (b2 * grad_b).sum(1, keepdim=True) / s
            grad_step = row.sum_to_size(s.shape).reshape(step.shape).to(step.dtype)
        if needs[5]:
            grad_zero = (torch.where(passed, 0.0, g).sum(1, keepdim=True) * -s).sum_to_size(s.shape)
            grad_zero = grad_zero.reshape(zero_point.shape).to(zero_point.dtype)
        grad_b = grad_b.reshape(lora_b.shape).to(lora_b.dtype) if needs[2] else None
        grad_a = None if grad_a is None else grad_a.reshape(lora_a.shape).to(lora_a.dtype)
        return None, None, grad_b, grad_a, grad_step, grad_zero, None, None, None


def fake_quantize_lowrank_ste(w: Tensor, delta: Tensor, lora_b: Tensor, lora_a: Tensor, step: Tensor,
                              zero_point: Tensor, scaling: float, q_min: int, q_max: int) -> Tensor:
    """QALoRA's quantized weight as one node: :func:`fake_quantize_ste` of a frozen ``w`` with
    ``delta = scaling * B A`` (EfficientDM Sec. 3.1), whose backward needs neither ``delta`` nor ``B A``.

    forward (the values of ``fake_quantize_ste(w, step, zero_point, q_min, q_max, delta)``)::

        q = clip(clip(round(w / s) + z, q_min, q_max) + round(delta / s), q_min, q_max);   Q = s (q - z)

    backward: the same straight-through gradients, reaching ``B`` and ``A`` through ``dL/d delta = [inside] g``
    (``dL/dB = scaling (dL/d delta) A^T``, ``dL/dA = scaling B^T (dL/d delta)``), and the step through

        dL/ds_c = sum_k g (q - z) - sum_k [passed] g w / s_c - (1 / s_c) sum_r B_cr dL/dB_cr

    where the last term is ``sum_k [inside] g delta / s_c`` rewritten with ``delta = scaling B A``. So the
    backward reads ``w`` and one small integer per element (``round(delta / s)``, clipped to the code range; int8
    up to 6 bits), not the float32 ``B A`` that recomputing the forward (``torch.utils.checkpoint``) writes and
    reads again. The sums run in another order than the composite form's (float32 rounding). The two matmuls
    run as autocast runs them where backward is traced with the forward's autocast state (``torch.compile``: bf16
    under bf16 autocast, as peft's product and its gradients are), else in float32 (TF32 where enabled).

    Args:
        w: the frozen weight, ``(C_out, ...)``; no gradient is returned for it.
        delta: ``scaling * B A`` in ``w``'s shape (computed by the caller, e.g. peft's ``get_delta_weight``, so
            that forward values are those of the layer's own product); no gradient is returned for it.
        lora_b: ``(C_out, r, ...)``; ``lora_a``: ``(r, ...)``, with ``B.reshape(C_out, r) @ A.reshape(r, -1)`` equal
            to ``delta / scaling`` in ``w.reshape(C_out, -1)``'s layout (peft's linear and ``groups=1`` conv LoRA).
        step, zero_point: one value per output channel or one per tensor (any shape of that many elements that
            broadcasts against ``w``).
    """
    if step.numel() not in (1, w.shape[0]) or zero_point.numel() != step.numel():
        raise ValueError(f"fake_quantize_lowrank_ste: step and zero_point need one value per tensor or per output "
                         f"channel ({w.shape[0]}), got {tuple(step.shape)} and {tuple(zero_point.shape)}")
    return _FakeQuantizeLowRankSTE.apply(w, delta, lora_b, lora_a, step, zero_point, scaling, q_min, q_max)


# -- compiled kernels -----------------------------------------------------------------------------------------------
# Eagerly, one fake quantizer is about ten elementwise kernels forward and twenty backward, each a full pass over
# the tensor; compiled, each becomes one fused loop (a Triton kernel on a GPU, C++ on a CPU). Only these small
# functions are compiled (with dynamic shapes: one compilation serves every layer of a rank and dtype), so the
# model itself stays eager, hooks and all. Whether a call uses them is the caller's choice (``compiled=``, set per
# quantizer by ``qat.set_fast_path``); this dict only caches the compiled functions.
_EAGER = {"value": _fq_value, "backward": _fq_backward}
_COMPILED: dict[str, object] = {}


def _plain(a: object) -> object:
    # dynamo keeps parameters' shapes static (a new graph per weight shape) and guards on the Parameter class: a
    # view is the same data as a plain tensor, so one dynamic-shape graph serves every layer of a rank and dtype
    return a.view_as(a) if isinstance(a, torch.nn.Parameter) else a


def _with_plain_args(fn):  # noqa: ANN001, ANN202
    return lambda *args: fn(*(_plain(a) for a in args))


def _kernel(name: str, compiled: bool = False):  # noqa: ANN202 - returns one of the two callables above
    if not compiled:
        return _EAGER[name]
    if not _COMPILED:
        import torch._dynamo

        # every rank, dtype and bit width of the quantizers is a variant: none may fall back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED.update({k: _with_plain_args(torch.compile(fn, dynamic=True)) for k, fn in _EAGER.items()})
    return _COMPILED[name]
