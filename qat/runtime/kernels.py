"""The low-bit GEMMs of the runtime: exact int8 x int8 -> int32 with zero-point correction, float8 with float32
accumulation, and int4 weight packing.

Integer GEMM with zero-points. An affine quantizer's value is ``s (q - z)`` (:mod:`qat.quantizers.affine`, Eq. 1),
with codes ``q`` in ``[q_min, q_max]`` and an integer zero-point ``z``. Codes of up to 8 bits are stored centred,
``c = q - o`` with ``o = q_min + 2^(b-1)``, so that they lie in ``[-2^(b-1), 2^(b-1) - 1]`` (int8) for signed and
unsigned grids alike, and ``q - z = c - z'`` with ``z' = z - o``. For activation codes ``a (M, K)`` with one
zero-point per row and weight codes ``w (N, K)`` with one per output channel::

    sum_k (a_mk - za_m)(w_nk - zw_n) = A_mn - zw_n Sa_m - za_m (Sw_n - K zw_n)                                 (1)

    A = a @ w^T (the int8 GEMM, int32 accumulation),  Sa_m = sum_k a_mk,  Sw_n = sum_k w_nk

Every term is an integer, so (1) is exact as long as nothing overflows its integer type (the callers check the
bound once, at conversion, and widen the correction to int64 when int32 could overflow).

Shapes that cuBLAS accepts. ``torch._int_mm`` on CUDA needs ``M > 16`` and ``K``, ``N`` multiples of 8 (and, as
torchao's wrapper notes, a contiguous second operand); on an H100 with CUDA 13 cuBLASLt also refused ``M = 17``
(``CUBLAS_STATUS_NOT_SUPPORTED``), so rows are padded to a multiple of 8 as well. ``torch._scaled_mm`` needs ``K``
and ``N`` multiples of 16 and a column-major second operand. The CPU kernels take any shape. Zero rows and columns
are appended here on every device, so that one code path runs everywhere and is tested on the CPU: a zero column of
``a`` meets a zero row of ``w^T`` and adds nothing; extra output rows and columns are sliced off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["INT8_MIN_ROWS", "INT8_ALIGN", "FP8_ALIGN", "FP8_DTYPE", "FP8_MAX", "round_up", "int8_matmul",
           "prepare_int8_weight", "zero_point_matmul", "fp8_matmul", "pack_int4", "unpack_int4"]

#: cuBLAS's int8 GEMM refuses ``M <= 16`` rows (and ``M`` that is not a multiple of :data:`INT8_ALIGN`)
INT8_MIN_ROWS = 17
#: ``M``, ``K`` and ``N`` multiples for ``torch._int_mm`` on CUDA
INT8_ALIGN = 8
#: ``K`` and ``N`` multiples for ``torch._scaled_mm`` on CUDA
FP8_ALIGN = 16
FP8_DTYPE = torch.float8_e4m3fn
#: the largest finite float8_e4m3fn value
FP8_MAX = 448.0


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= n`` (and at least ``multiple``)."""
    return max(-(-n // multiple) * multiple, multiple)


def int8_matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """``a @ b_t`` exactly, through ``torch._int_mm``: int8 ``(M, K)`` x int8 ``(K', N')`` -> int32 ``(M, N')``.

    ``b_t`` may be a weight padded once at conversion (``K' >= K``, rows past ``K`` zero); ``a`` is padded here with
    zero columns to ``K'`` and with zero rows to a multiple of 8 above 16, and ``b_t`` to multiples of 8 if it is not
    already (module docstring). The int32 accumulation is exact while ``K' * 128 * 128 < 2^31``.

    Args:
        a: ``(M, K)`` int8.
        b_t: ``(K', N')`` int8 with ``K' >= K`` (the transposed weight codes).

    Returns:
        ``(M, N')`` int32.
    """
    m, k = a.shape
    kb, n = b_t.shape
    kp, np_ = round_up(kb, INT8_ALIGN), round_up(n, INT8_ALIGN)
    if kp != kb or np_ != n:
        b_t = F.pad(b_t, (0, np_ - n, 0, kp - kb))
    rows = round_up(max(m, INT8_MIN_ROWS), INT8_ALIGN)
    if kp != k or rows != m:
        a = F.pad(a, (0, kp - k, 0, rows - m))
    out = torch._int_mm(a.contiguous(), b_t.contiguous())
    return out[:m, :n]


def prepare_int8_weight(codes: Tensor, zero: Tensor, wide: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The weight-side operands of (1) from centred weight codes, computed once at conversion.

    Args:
        codes: ``(N, K)`` integer codes ``c = q - o`` in ``[-128, 127]``.
        zero: ``(N,)`` integer zero-points ``z' = z - o``.
        wide: int64 zero-point terms (the accumulation bound of (1) exceeds int32).

    Returns:
        ``(w_t, w_zero, w_term)``: ``w_t`` int8 ``(K', N')``, contiguous, padded with zeros to multiples of 8;
        ``w_zero`` ``(1, N)`` = ``zw``; ``w_term`` ``(1, N)`` = ``Sw - K zw``; both int32 (int64 with ``wide``).
    """
    n, k = codes.shape
    c = codes.to(torch.int64)
    if int(c.min()) < -128 or int(c.max()) > 127:
        raise ValueError(f"centred weight codes must lie in [-128, 127], got [{int(c.min())}, {int(c.max())}]")
    kp, np_ = round_up(k, INT8_ALIGN), round_up(n, INT8_ALIGN)
    w_t = F.pad(c.t(), (0, np_ - n, 0, kp - k)).to(torch.int8).contiguous()
    z = zero.to(torch.int64).reshape(1, n)
    term = c.sum(1).reshape(1, n) - k * z
    dtype = torch.int64 if wide else torch.int32
    return w_t, z.to(dtype), term.to(dtype)


def zero_point_matmul(a: Tensor, a_zero: Tensor | None, w_t: Tensor, w_zero: Tensor | None, w_term: Tensor,
                      n: int, wide: bool = False) -> Tensor:
    """Eq. (1): ``sum_k (a_mk - za_m)(w_nk - zw_n)`` exactly, from an int8 GEMM and two rank-one corrections.

    Args:
        a: ``(M, K)`` int8 centred activation codes.
        a_zero: ``(M, 1)`` integer ``za`` (``z' = z - o`` of each row), or None when it is 0 for every row.
        w_t, w_term: from :func:`prepare_int8_weight`.
        w_zero: from :func:`prepare_int8_weight`, or None when ``zw`` is 0 for every channel.
        n: ``N``, the true output width (``w_t`` may be padded).
        wide: accumulate the corrections in int64.

    Returns:
        ``(M, N)`` int32 (int64 with ``wide``).
    """
    acc = int8_matmul(a, w_t)[:, :n]
    if wide:
        acc = acc.to(torch.int64)
    if w_zero is not None:
        acc = acc - w_zero.to(acc.dtype) * a.sum(1, keepdim=True, dtype=acc.dtype)
    if a_zero is not None:
        acc = acc - a_zero.to(acc.dtype) * w_term.to(acc.dtype)
    return acc


def fp8_matmul(a: Tensor, b_t: Tensor) -> Tensor:
    """``a @ b_t`` with float8_e4m3fn operands and float32 accumulation (``torch._scaled_mm``, unit scales).

    The scales stay outside the kernel (the caller multiplies by ``s_a s_w`` in float32): ``_scaled_mm`` with
    row-wise scales needs a bfloat16 output on CUDA, and a float32 output keeps the sum of integer products exact.

    Args:
        a: ``(M, K)`` float (integer values); cast to float8 here after zero columns pad ``K`` to ``K'``.
        b_t: ``(K', N')`` float8_e4m3fn, column-major (the transpose of a contiguous ``(N', K')``), ``K'`` and
            ``N'`` multiples of 16.

    Returns:
        ``(M, N')`` float32.
    """
    k, kb = a.shape[1], b_t.shape[0]
    if kb != k:
        a = F.pad(a, (0, kb - k))
    one = torch.ones((), device=a.device, dtype=torch.float32)
    return torch._scaled_mm(a.to(FP8_DTYPE).contiguous(), b_t, scale_a=one, scale_b=one, out_dtype=torch.float32)


def pack_int4(u: Tensor) -> Tensor:
    """Two 4-bit codes per byte along the last axis: ``(N, K)`` values in ``[0, 15]`` -> ``(N, ceil(K / 2))`` uint8,
    code ``2j`` in the low nibble of byte ``j`` and ``2j + 1`` in the high nibble (the layout of :mod:`qat.packing`
    at 4 bits, row by row)."""
    n, k = u.shape
    u = u.to(torch.uint8)
    if k % 2:
        u = F.pad(u, (0, 1))
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_int4`: ``(N, ceil(K / 2))`` uint8 -> ``(N, K)`` uint8 in ``[0, 15]``."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)[:, :k]
