"""Packing of b-bit unsigned integer codes into a dense little-endian bitstream of bytes, and back.

Layout (one convention for every bit-width): code ``i`` of a flat sequence occupies bits ``[i b, (i + 1) b)`` of the
stream, least significant bit first, and stream bit ``k`` is bit ``k mod 8`` of byte ``k // 8``:

    byte[k // 8] bit (k mod 8)  =  bit (k - i b) of code i,      i = k // b                               (1)

so a run of ``n`` codes takes ``ceil(n b / 8)`` bytes, the unused high bits of the last byte are zero, and

    b = 8: one code per byte (the byte is the code);
    b = 4: two codes per byte, code ``2j`` in the low nibble of byte ``j``, code ``2j + 1`` in the high nibble;
    b = 2: four codes per byte, code ``4j + m`` in bits ``2m, 2m + 1`` of byte ``j``;
    b = 1: eight codes per byte, code ``8j + m`` in bit ``m`` of byte ``j``;
    b = 3 (and 5, 6, 7): a dense stream, every 8 codes fill exactly ``b`` bytes (8 int3 codes in 3 bytes); codes
        straddle byte boundaries.

Signed codes: :func:`pack` takes unsigned codes in ``[0, 2^b - 1]`` only. A signed code ``q`` in
``[-2^(b-1), 2^(b-1) - 1]`` is stored in offset-binary form ``u = q - q_min = q + 2^(b-1)`` (:func:`to_unsigned`)
and recovered as ``q = u + q_min`` (:func:`from_unsigned`); unsigned codes have ``q_min = 0`` and are stored as is.
This is how :mod:`qat.export` stores every quantized weight: ``u = q - q_min`` with the quantizer's own ``q_min``.

Everything is vectorised in torch (no per-element Python loops) and runs on the codes' device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SUPPORTED_BITS", "qrange", "pack", "unpack", "packed_numel", "to_unsigned", "from_unsigned"]

#: bit-widths :func:`pack` / :func:`unpack` handle (quantizers use 2..8; 1-bit codes are packable too)
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def qrange(n_bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(q_min, q_max)`` of a ``n_bits`` code."""
    if signed:
        return -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    return 0, 2**n_bits - 1


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {bits!r}")


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def to_unsigned(codes: Tensor, bits: int, signed: bool) -> Tensor:
    """Offset-binary storage form ``u = q - q_min`` (int64) of integer codes ``q`` of a ``bits``-bit range.

    Raises:
        ValueError: a code lies outside ``[q_min, q_max]`` or is not an integer.
    """
    _check_bits(bits)
    q_min, q_max = qrange(bits, signed)
    q = _as_int64(codes)
    if q.numel() and (int(q.min()) < q_min or int(q.max()) > q_max):
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"codes out of the {kind} {bits}-bit range [{q_min}, {q_max}]: "
                         f"min {int(q.min())}, max {int(q.max())}")
    return q - q_min


def from_unsigned(u: Tensor, bits: int, signed: bool) -> Tensor:
    """Integer codes ``q = u + q_min`` (int64) from their offset-binary storage form ``u``."""
    _check_bits(bits)
    return u.to(torch.int64) + qrange(bits, signed)[0]


def _as_int64(codes: Tensor) -> Tensor:
    """``codes`` as int64; float codes must hold exact integers (the quantizers return float codes)."""
    if codes.dtype == torch.bool:
        return codes.to(torch.int64)
    if codes.dtype.is_floating_point:
        if not bool(torch.isfinite(codes).all()) or not bool((codes == torch.round(codes)).all()):
            raise ValueError("codes must be integers; got non-integer or non-finite floating-point values")
        return codes.to(torch.int64)
    if codes.dtype.is_complex:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    return codes.to(torch.int64)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Packs unsigned ``bits``-bit codes (any shape, flattened in row-major order) into bytes, layout (1).

    Args:
        codes: integer (or integer-valued float) tensor with values in ``[0, 2^bits - 1]``.
        bits: 1 to 8.

    Returns:
        ``(ceil(n * bits / 8),)`` uint8 tensor on the codes' device, ``n = codes.numel()``.

    Raises:
        ValueError: unsupported ``bits``, or a code outside ``[0, 2^bits - 1]`` (signed codes must be offset first,
            see :func:`to_unsigned`).
    """
    _check_bits(bits)
    flat = _as_int64(codes).flatten()
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes out of the unsigned {bits}-bit range [0, {(1 << bits) - 1}]: "
                         f"min {int(flat.min())}, max {int(flat.max())}; store signed codes offset by -q_min "
                         "(qat.packing.to_unsigned)")
    n_bytes = packed_numel(n, bits)
    if bits == 8:
        return flat.to(torch.uint8)
    # Every 8 codes fill exactly `bits` bytes, so pad to a multiple of 8 codes and pack whole 8-code words
    # (8 * bits <= 56 bits: the word fits an int64 without touching the sign bit).
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.reshape(-1, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    word = (words << shifts).sum(dim=1)  # disjoint bit fields: the sum is a bitwise OR
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    out = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).flatten()
    return out[:n_bytes]


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes of a ``bits``-bit stream, as a flat uint8 tensor.

    Args:
        packed: ``(ceil(numel * bits / 8),)`` uint8 tensor.
        bits: 1 to 8.
        numel: number of codes to read.

    Returns:
        ``(numel,)`` uint8 codes in ``[0, 2^bits - 1]`` (apply :func:`from_unsigned` for signed codes).

    Raises:
        ValueError: unsupported ``bits``, a non-uint8 or non-1-D input, a length other than
            ``ceil(numel * bits / 8)``, or non-zero padding bits after the last code.
    """
    _check_bits(bits)
    expected = packed_numel(numel, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != expected:
        raise ValueError(f"{packed.numel()} packed bytes do not hold {numel} codes of {bits} bits: expected "
                         f"ceil({numel} * {bits} / 8) = {expected} bytes")
    used = numel * bits % 8
    if used and int(packed[-1]) >> used:
        raise ValueError(f"non-zero padding bits after the last of {numel} {bits}-bit codes (pack writes zeros): "
                         "the stream was packed with other bits or another length, or it is corrupt")
    if bits == 8:
        return packed.clone()
    n_words = math.ceil(numel / 8)
    raw = packed.to(torch.int64)
    pad = n_words * bits - raw.numel()
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    byte_shifts = torch.arange(bits, device=raw.device, dtype=torch.int64) * 8
    word = (raw.reshape(n_words, bits) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=raw.device, dtype=torch.int64) * bits
    codes = (word[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.flatten()[:numel].to(torch.uint8)
