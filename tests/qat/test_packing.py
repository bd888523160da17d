"""``qat.packing`` against a naive per-element, per-bit Python reference of the documented bitstream layout.

Reference layout (written out independently of the implementation): code ``i`` occupies stream bits
``[i b, (i + 1) b)``, least significant bit first, and stream bit ``k`` is bit ``k mod 8`` of byte ``k // 8``.
"""

from __future__ import annotations

import math

import pytest
import torch

from qat.packing import SUPPORTED_BITS, from_unsigned, pack, packed_numel, qrange, to_unsigned, unpack

BITS = (1, 2, 3, 4, 8)
LENGTHS = (1, 3, 5, 7, 13, 101, 1001)  # none a multiple of 8


def naive_pack(codes: list[int], bits: int) -> list[int]:
    out = [0] * ((len(codes) * bits + 7) // 8)
    k = 0
    for code in codes:
        for j in range(bits):
            if (code >> j) & 1:
                out[k // 8] |= 1 << (k % 8)
            k += 1
    return out


def naive_unpack(data: list[int], bits: int, n: int) -> list[int]:
    codes = []
    k = 0
    for _ in range(n):
        code = 0
        for j in range(bits):
            if (data[k // 8] >> (k % 8)) & 1:
                code |= 1 << j
            k += 1
        codes.append(code)
    return codes


def random_codes(n: int, bits: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=gen)
    codes[0] = 2**bits - 1  # both extremes occur
    if n > 1:
        codes[-1] = 0
    return codes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n", LENGTHS)
def test_pack_matches_the_naive_bit_loop_and_round_trips(bits: int, n: int) -> None:
    codes = random_codes(n, bits, seed=n * 10 + bits)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8) == packed_numel(n, bits)
    assert packed.tolist() == naive_pack(codes.tolist(), bits)
    # unpack is checked against the reference decoder and as the inverse of pack
    assert unpack(packed, bits, n).tolist() == naive_unpack(packed.tolist(), bits, n) == codes.tolist()
    ref = torch.tensor(naive_pack(codes.tolist(), bits), dtype=torch.uint8)
    assert torch.equal(unpack(ref, bits, n).long(), codes)


@pytest.mark.parametrize("bits", BITS)
def test_documented_byte_layouts(bits: int) -> None:
    per_byte = {1: 8, 2: 4, 4: 2, 8: 1}
    if bits in per_byte:  # whole codes per byte, first code in the lowest bits
        k = per_byte[bits]
        codes = random_codes(8 * k, bits, seed=bits)
        packed = pack(codes, bits)
        assert packed.numel() == 8
        for j in range(8):
            expect = sum(int(codes[j * k + m]) << (m * bits) for m in range(k))
            assert int(packed[j]) == expect
    else:  # int3: 8 codes fill exactly 3 bytes; a 24-bit little-endian word
        codes = random_codes(16, 3, seed=3)
        packed = pack(codes, 3)
        assert packed.numel() == 6
        for w in range(2):
            word = sum(int(codes[w * 8 + m]) << (3 * m) for m in range(8))
            assert packed[3 * w: 3 * w + 3].tolist() == [(word >> (8 * i)) & 0xFF for i in range(3)]


def test_int4_nibbles_and_padding_bits_are_zero() -> None:
    assert pack(torch.tensor([1, 2, 15]), 4).tolist() == [0x21, 0x0F]
    assert pack(torch.tensor([5]), 3).tolist() == [5]
    assert pack(torch.tensor([1, 0, 1]), 1).tolist() == [0b101]


def test_shapes_dtypes_and_empty_input() -> None:
    codes = random_codes(35, 3, seed=0)
    grid = codes.reshape(5, 7)
    # multi-dimensional input is flattened row-major; every integer dtype and integer-valued floats are accepted
    for variant in (grid, grid.to(torch.int8), grid.to(torch.int16), grid.to(torch.int32), grid.to(torch.uint8),
                    grid.float(), grid.double()):
        assert torch.equal(pack(variant, 3), pack(codes, 3))
    assert pack(torch.tensor([True, False, True]), 1).tolist() == [0b101]
    assert pack(torch.zeros(0, dtype=torch.long), 4).numel() == 0
    assert unpack(torch.zeros(0, dtype=torch.uint8), 4, 0).numel() == 0


@pytest.mark.parametrize("bits", BITS)
def test_out_of_range_codes_raise(bits: int) -> None:
    with pytest.raises(ValueError, match=rf"out of the unsigned {bits}-bit range"):
        pack(torch.tensor([0, 2**bits]), bits)
    with pytest.raises(ValueError, match="out of the unsigned"):
        pack(torch.tensor([-1, 0]), bits)
    with pytest.raises(ValueError, match="must be integers"):
        pack(torch.tensor([0.5]), bits)
    with pytest.raises(ValueError, match="must be integers"):
        pack(torch.tensor([float("nan")]), bits)


@pytest.mark.parametrize("bits", [0, 9, 16, -1, 2.0, True])
def test_unsupported_bits_raise(bits) -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.tensor([0]), bits)
    with pytest.raises(ValueError, match="bits must be one of"):
        unpack(torch.zeros(1, dtype=torch.uint8), bits, 1)


def test_unpack_rejects_a_wrong_length_or_dtype() -> None:
    packed = pack(random_codes(13, 3, seed=1), 3)  # ceil(39 / 8) = 5 bytes
    assert packed.numel() == 5
    with pytest.raises(ValueError, match=r"expected ceil\(13 \* 3 / 8\) = 5 bytes"):
        unpack(packed[:4], 3, 13)
    with pytest.raises(ValueError, match=r"expected ceil\(13 \* 4 / 8\) = 7 bytes"):
        unpack(packed, 4, 13)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack(packed.to(torch.int32), 3, 13)
    # 13 codes x 3 bits = 39 bits: the top bit of byte 5 is padding and must be zero
    bad = packed.clone()
    bad[-1] |= 0x80
    with pytest.raises(ValueError, match="non-zero padding bits"):
        unpack(bad, 3, 13)
    # a 4-bit code read as 2 bits fits the same single byte, but its high bits land in the padding
    with pytest.raises(ValueError, match="non-zero padding bits"):
        unpack(pack(torch.tensor([13]), 4), 2, 1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_signed_codes_are_stored_offset_binary(bits: int, signed: bool) -> None:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    assert qrange(bits, signed) == (lo, hi)  # the integer range of a code lives next to its storage
    q = torch.arange(lo, hi + 1).repeat(3)[:-1]  # every code, awkward length
    u = to_unsigned(q, bits, signed)
    assert u.tolist() == [int(v) - lo for v in q]  # u = q - q_min: signed codes offset by 2^(b-1)
    assert int(u.min()) == 0 and int(u.max()) == 2**bits - 1
    back = from_unsigned(unpack(pack(u, bits), bits, q.numel()), bits, signed)
    assert back.tolist() == q.tolist()
    with pytest.raises(ValueError, match="out of the"):
        to_unsigned(torch.tensor([hi + 1]), bits, signed)
    with pytest.raises(ValueError, match="out of the"):
        to_unsigned(torch.tensor([lo - 1]), bits, signed)
