"""FP8 E4M3 storage codes computed with integer and fp32 arithmetic, for pools kept in FP8.

Kernels that write an FP8 pool store through a uint8 view of it and compute the code here, so the
same source is exact on every target and in the CPU interpreter (whose own fp32 -> fp8 cast does
not round to nearest even, and which has no e4m3fnuz type). FMT: 1 = e4m3fn (OCP: bias 7, max 448,
-0 = 0x80), 2 = e4m3fnuz (MI300X: bias 8, max 240, no -0). Matches `quant.to_fp8_storage`:
saturate to the largest finite value, round to nearest even (subnormals included).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_NONE, FP8_E4M3FN, FP8_E4M3FNUZ = 0, 1, 2
FP8_FORMATS = {torch.float8_e4m3fn: FP8_E4M3FN, torch.float8_e4m3fnuz: FP8_E4M3FNUZ}


def fp8_format(dtype: torch.dtype) -> int:
    """The FMT constexpr of a pool dtype: FP8_NONE for a float pool."""
    return FP8_FORMATS.get(dtype, FP8_NONE)


@triton.jit
def f32_to_e4m3_bits(x, FMT: tl.constexpr):
    """fp32 tensor -> uint8 E4M3 codes (saturating, round to nearest even)."""
    BIAS: tl.constexpr = 7 if FMT == 1 else 8
    MAX: tl.constexpr = 448.0 if FMT == 1 else 240.0
    a = tl.minimum(tl.abs(x), MAX)
    bits = a.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127 + BIAS  # biased E4M3 exponent of a before rounding
    # Normal: keep 3 of the 23 mantissa bits, ties to even (a carry into the exponent is right).
    r = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = ((r >> 23) - 127 + BIAS) * 8 + ((r >> 20) & 7)
    # Subnormal (e <= 0): code = a / 2^(1 - BIAS - 3), rounded to nearest even by the fp32 add of
    # 1.5 * 2^23 (exact for these magnitudes); code 8 is the smallest normal, as it should be.
    sub = ((a * (2.0 ** (BIAS + 2)) + 12582912.0) - 12582912.0).to(tl.int32)
    code = tl.where(e > 0, normal, sub)
    neg = x.to(tl.int32, bitcast=True) < 0  # the sign bit: -0.0 included
    if FMT == 1:
        code = tl.where(neg, code | 0x80, code)
    else:
        code = tl.where(neg & (code != 0), code | 0x80, code)
    return code.to(tl.uint8)


@triton.jit
def e4m3_bits_to_f32(c, FMT: tl.constexpr):
    """uint8 E4M3 codes -> fp32 values (exact). NaN codes are not special-cased (pools hold none)."""
    BIAS: tl.constexpr = 7 if FMT == 1 else 8
    c = c.to(tl.int32)
    e = (c >> 3) & 0xF
    m = (c & 7).to(tl.float32)
    m = tl.where(e == 0, m, m + 8.0)  # subnormals have no implicit leading one
    # value = m * 2^(max(e, 1) - BIAS - 3), the power of two built from its fp32 bits (exact).
    mag = m * ((tl.maximum(e, 1) - BIAS - 3 + 127) << 23).to(tl.float32, bitcast=True)
    if FMT == 1:
        return tl.where((c & 0x80) != 0, -mag, mag)
    else:
        return tl.where(c == 0x80, float("nan"), tl.where((c & 0x80) != 0, -mag, mag))
