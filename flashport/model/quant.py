"""The checkpoint's weight formats (spec §8.3), as plain torch: encode, decode, convert.

- FP8 dense: E4M3 values, one UE8M0 scale per (bo x bi) block (128 x 128 in V4-Flash):
  W[i, j] = e4m3(q[i, j]) * 2^(S[i // bo, j // bi] - 127).
- FP4 experts: E2M1 codes packed two per byte (low nibble = even column), one UE8M0 scale per
  1 x 32 group: W[i, j] = e2m1(code[i, j]) * 2^(S[i, j // 32] - 127).

Scales are kept as raw uint8 exponents (the UE8M0 bits). Decoding multiplies by exact powers of
two, so a decoded value is exact in fp32 and bf16 (both have the exponent range of fp32).
"""

from __future__ import annotations

import torch

FP4_GROUP = 32  # values per UE8M0 scale in the FP4 expert format
E8M0_BIAS = 127
# E2M1 magnitudes by 3-bit code; bit 3 of a nibble is the sign.
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Raw UE8M0 bytes (uint8 or float8_e8m0fnu) -> fp32 powers of two."""
    bits = scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale
    return torch.ldexp(torch.ones_like(bits, dtype=torch.float32), bits.to(torch.int32) - E8M0_BIAS)


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # [..., R, C] block scales -> [..., rows, cols]; block sizes come from the grid as HF derives them
    # (rows / R, cols / C, rounded up), which is 128 for every real V4-Flash dim.
    r, c = scale.shape[-2], scale.shape[-1]
    br, bc = -(-rows // r), -(-cols // c)
    full = scale.repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)
    return full[..., :rows, :cols]


def dequant_fp8_blocks(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 [..., out, in] (e4m3fn or e4m3fnuz) with uint8 block scales [..., R, C] -> dtype."""
    rows, cols = weight.shape[-2], weight.shape[-1]
    s = _expand_blocks(e8m0_to_float(scale), rows, cols)
    return (weight.to(torch.float32) * s).to(dtype)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed E2M1 uint8/int8 [..., out, in/2] with uint8 scales [..., out, in/32] -> dtype [..., out, in]."""
    bits = packed.view(torch.uint8)
    codes = torch.stack((bits & 0x0F, bits >> 4), dim=-1).flatten(-2)  # [..., out, in], even column = low nibble
    table = torch.tensor(_E2M1_VALUES + tuple(-v for v in _E2M1_VALUES), dtype=torch.float32, device=packed.device)
    values = table[codes.long()]
    s = e8m0_to_float(scale).repeat_interleave(FP4_GROUP, dim=-1)[..., : values.shape[-1]]
    return (values * s).to(dtype)


def _pow2_exponent(amax: torch.Tensor, fmt_max: float) -> torch.Tensor:
    # Smallest e with amax / 2^e <= fmt_max (all-zero blocks get e = 0), clamped to the E8M0 range.
    ratio = (amax.to(torch.float32) / fmt_max).clamp(min=torch.finfo(torch.float32).tiny)
    e = torch.ceil(torch.log2(ratio))
    e = torch.where(amax > 0, e, torch.zeros_like(e))
    return e.clamp(-E8M0_BIAS, 127).to(torch.int32)


def quant_fp8_blocks(w: torch.Tensor, block: tuple[int, int] = (128, 128),
                     fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] -> (FP8 [..., out, in], uint8 scales [..., ceil(out/bo), ceil(in/bi)])."""
    rows, cols = w.shape[-2], w.shape[-1]
    R, C = -(-rows // block[0]), -(-cols // block[1])
    # Blocks as the decoder derives them from the grid (rows / R rounded up): equal to `block`
    # whenever the dims are multiples of it, as in every V4-Flash weight.
    bo, bi = -(-rows // R), -(-cols // C)
    padded = torch.zeros(*w.shape[:-2], R * bo, C * bi, dtype=torch.float32, device=w.device)
    padded[..., :rows, :cols] = w.float()
    blocks = padded.unflatten(-1, (C, bi)).unflatten(-3, (R, bo))  # [..., R, bo, C, bi]
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., R, C]
    e = _pow2_exponent(amax, FP8_E4M3_MAX)
    scaled = w.float() / _expand_blocks(torch.ldexp(torch.ones_like(amax), e), rows, cols)
    q = scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(fp8_dtype)
    return q, (e + E8M0_BIAS).to(torch.uint8)


def quant_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] (in % 32 == 0) -> (packed uint8 [..., out, in/2], uint8 scales [..., out, in/32])."""
    cols = w.shape[-1]
    if cols % FP4_GROUP:
        raise ValueError(f"FP4 quantization needs the input dim to be a multiple of {FP4_GROUP}, got {cols}")
    groups = w.float().unflatten(-1, (cols // FP4_GROUP, FP4_GROUP))
    e = _pow2_exponent(groups.abs().amax(dim=-1), FP4_E2M1_MAX)  # [..., out, in/32]
    scaled = groups / torch.ldexp(torch.ones_like(groups[..., :1]), e.unsqueeze(-1))
    table = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=w.device)
    # Round to the nearest representable magnitude (ties to the lower code; any fixed rule is fine
    # for synthetic weights: decode(encode(x)) is what is compared).
    mag = (scaled.abs().unsqueeze(-1) - table).abs().argmin(dim=-1)
    sign = ((scaled < 0) & (mag > 0)).to(torch.int64) << 3
    codes = (mag | sign).flatten(-2).to(torch.uint8)  # [..., out, in]
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (e + E8M0_BIAS).to(torch.uint8)


def fp8_fn_to_fnuz(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fn (NVIDIA, MI355X) -> e4m3fnuz (MI300X) keeping the bits.

    The same bits mean half the value in e4m3fnuz (exponent bias 8 instead of 7), so the block
    exponent goes up by one. 0x80 (-0 in fn) is NaN in fnuz and becomes +0.
    """
    bits = weight.view(torch.uint8).clone()
    bits[bits == 0x80] = 0
    if int(scale.max()) >= 254:
        raise ValueError("an FP8 block scale is at the top of the UE8M0 range and cannot be raised for e4m3fnuz")
    return bits.view(torch.float8_e4m3fnuz), scale + 1


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 E4M3 flavour (448 for e4m3fn, 240 for e4m3fnuz)."""
    return float(torch.finfo(dtype).max)


def to_fp8_storage(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x -> FP8 `dtype` for a state pool (kv_cache_dtype="fp8", no scale): values beyond the
    format's largest finite value saturate to it (torch would give NaN on e4m3fnuz), then
    round to nearest even."""
    m = fp8_max(dtype)
    return x.float().clamp(-m, m).to(dtype)
