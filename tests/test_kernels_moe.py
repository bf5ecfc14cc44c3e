"""Fused MoE kernels (flashport/kernels/moe*.py) against the torch twin (flashport/ops/moe.py), the
twin against MoE._routed, and an ahead-of-time compile for the four GPU targets.

Kernels run in the Triton interpreter on the CPU (conftest sets TRITON_INTERPRET=1) in fp32.
Shapes are small (the interpreter runs programs one by one) but cross the tile sizes of the
"interpret" configs: 16-row (decode) and 32-row (prefill) row tiles; gate/up K steps of 64 over
H = 96 (the last step has a masked scale group; the prefetch of the step past K is masked off);
down column tiles of 64 over H = 96 (one partial).
Partial gate/up column tiles and K steps of any length: the plain-weight test (H 80, I 40).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
import triton.language as tl

from flashport.kernels.moe_gemm import _fp4_code, _fp4_planes, _fp4_scales, _fp4_words_unpack, _fp4_x2_bits
from flashport.model.quant import dequant_fp4
from flashport.ops.moe import clamped_swiglu, fused_moe, fused_moe_torch

LIMIT = 10.0
H, I, E = 96, 32, 6

# One spec per target covers both kernels and both forms; the project-wide AOT test compiles all.
_AOT_PICKS = {"sm_90": "moe_gate_up[decode,fp4]", "gfx942": "moe_down[decode,fp4]",
              "gfx950": "moe_gate_up[prefill,fp4]", "sm_100": "moe_down[prefill,fp4]"}


def _fp4(g: torch.Generator, rows: int, cols: int, exps: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # Random codes (every nibble value, signs, zeros) and UE8M0 scales drawn from `exps`.
    packed = torch.randint(0, 256, (E, rows, cols // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    pick = torch.randint(0, len(exps), (E, rows, cols // 32), generator=g)
    return packed, torch.tensor(exps, dtype=torch.uint8)[pick]


def _experts(g: torch.Generator, low: int = 124, high: int = 126):
    w13, s13 = _fp4(g, 2 * I, H, tuple(range(low, high + 1)))
    w2, s2 = _fp4(g, H, I, tuple(range(low, high + 1)))
    return w13, s13, w2, s2


def _hash_routing(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    # Experts 0-3 get many pairs (several 16-row tiles), expert 4 exactly one, expert 5 none;
    # picks repeat within a token as tid2eid rows can.
    experts = torch.randint(0, 4, (n, k), generator=g)
    experts[0] = 2
    experts[n // 2, k - 1] = 4
    return experts


def _dense(x, weights, experts, w13, s13, w2, s2) -> tuple[torch.Tensor, float]:
    # Fully dequantized, per pair, fp32, no intermediate rounding -> (output, max |gate/up|).
    W13, W2 = dequant_fp4(w13, s13, torch.float32), dequant_fp4(w2, s2, torch.float32)
    gu = torch.einsum("nh,nkoh->nko", x.float(), W13[experts])
    h = clamped_swiglu(gu[..., :I], gu[..., I:], LIMIT)
    y = torch.einsum("nki,nkoi->nko", h, W2[experts])
    return (y * weights.float().unsqueeze(-1)).sum(dim=1), float(gu.abs().max())


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 2e-5) -> None:
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * float(ref.abs().max()))


@pytest.mark.parametrize("n,form", [(1, "decode"), (3, "decode"), (37, "decode"), (1, "prefill"), (37, "prefill")])
def test_fp4_hash_routing(n: int, form: str) -> None:
    # Experts with many rows, exactly one, none; repeated picks; odd token counts; both forms.
    from flashport.kernels.moe import fused_moe_triton

    g = torch.Generator().manual_seed(100 + n)
    w13, s13, w2, s2 = _experts(g)
    x = torch.randn(n, H, generator=g)
    experts = _hash_routing(g, n, 3)
    weights = torch.rand(n, 3, generator=g)
    got = fused_moe_triton(x, weights, experts, w13, s13, w2, s2, LIMIT, form=form)
    ref = fused_moe(x, weights, experts, w13, s13, w2, s2, LIMIT, impl="torch")
    _close(got, ref)
    dense, gate_up_max = _dense(x, weights, experts, w13, s13, w2, s2)
    _close(got, dense)
    assert gate_up_max > LIMIT  # the clamps are exercised


def test_fp4_auto_form_dispatch() -> None:
    # fused_moe picks the decode form below the interpreter's threshold (64 tokens).
    g = torch.Generator().manual_seed(41)
    n = 2
    w13, s13, w2, s2 = _experts(g)
    x = torch.randn(n, H, generator=g)
    experts = _hash_routing(g, n, 3)
    weights = torch.rand(n, 3, generator=g)
    got = fused_moe(x, weights, experts, w13, s13, w2, s2, LIMIT, impl="triton")
    _close(got, fused_moe(x, weights, experts, w13, s13, w2, s2, LIMIT, impl="torch"))


def test_fp4_topk_routing_prefill_form() -> None:
    from flashport.kernels.moe import fused_moe_triton

    g = torch.Generator().manual_seed(7)
    n, k = 37, 3
    w13, s13, w2, s2 = _experts(g)
    x = torch.randn(n, H, generator=g)
    # Biased scores: experts 0 and 1 get (nearly) every token (two 32-row tiles each), 2-4 share
    # the third pick, 5 gets none. Distinct picks per token, int32 ids.
    scores = torch.randn(n, E, generator=g) + torch.tensor([3.0, 3.0, 0.0, 0.0, 0.0, -9.0])
    experts = torch.topk(scores, k, dim=-1, sorted=False).indices.to(torch.int32)
    weights = torch.rand(n, k, generator=g)
    got = fused_moe_triton(x, weights, experts, w13, s13, w2, s2, LIMIT, form="prefill")
    _close(got, fused_moe_torch(x, weights, experts.long(), w13, s13, w2, s2, LIMIT))


def _use_variant(monkeypatch, form: str, **over) -> None:
    from flashport.kernels import moe_gemm

    for table in (moe_gemm.GATE_UP_CONFIGS, moe_gemm.DOWN_CONFIGS):
        monkeypatch.setitem(table["interpret"], form, {**table["interpret"][form], **over})


@pytest.mark.parametrize("form,planes,prefetch,decode,one_loop", [
    ("decode", 8, False, "f32", False), ("decode", 2, True, "f16", False), ("decode", 1, False, "f32", False),
    ("prefill", 8, True, "f16", False), ("prefill", 2, False, "f32", False), ("prefill", 1, True, "f32", False),
    ("decode", 4, False, "x2", True), ("decode", 4, True, "x2", False), ("prefill", 4, False, "f32", False)])
def test_fp4_kernel_variants(form: str, planes: int, prefetch: bool, decode: str, one_loop: bool,
                             monkeypatch) -> None:
    # The sweep's constexpr variants (word planes, byte planes, interleaved, pair-order word tiles
    # as the left operand, gate and up rows in one K loop or two; prefetched K steps or not; codes
    # decoded through fp16 or fp32 bits; "x2" is the per-code fp16 decode for fp32 activations),
    # both kernels, with a top-k routing of distinct picks. The interpreter tables' own choices run
    # in the tests above.
    from flashport.kernels.moe import fused_moe_triton

    _use_variant(monkeypatch, form, PLANES=planes, PREFETCH=prefetch, DECODE=decode, ONE_LOOP=one_loop)
    g = torch.Generator().manual_seed(17 + planes + prefetch + len(decode) + 2 * one_loop)
    n, k = 19, 2
    w13, s13, w2, s2 = _experts(g)
    x = torch.randn(n, H, generator=g)
    experts = torch.topk(torch.randn(n, E, generator=g), k, dim=-1).indices
    weights = torch.rand(n, k, generator=g)
    got = fused_moe_triton(x, weights, experts, w13, s13, w2, s2, LIMIT, form=form)
    _close(got, fused_moe_torch(x, weights, experts, w13, s13, w2, s2, LIMIT))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # silu(-big) = -0, as in torch
@pytest.mark.parametrize("form,decode", [("decode", "f16"), ("prefill", "f16"), ("decode", "f32"), ("prefill", "f32")])
def test_fp4_extreme_scale_exponents(form: str, decode: str, monkeypatch) -> None:
    # The kernels apply 2^(s - 127) to the decoded weights exactly for every scale byte, as the
    # twin's dequantization does. Per 32-column group of H (gate/up weights): group 0 has scale
    # bytes 0 and 1 (weights down to the fp32 subnormal 2^-128) against x scaled up by 2^124,
    # group 1 scale byte 254 (2^127; codes of magnitude <= 1.5, larger ones overflow in the twin
    # too) against x near 2^-125, group 2 scale byte 127 (2^0) against plain x. Every product is
    # finite and normal in fp32.
    from flashport.kernels.moe import fused_moe_triton

    _use_variant(monkeypatch, form, DECODE=decode)
    g = torch.Generator().manual_seed(11 if form == "decode" else 12)
    n = 5
    w13, s13, w2, s2 = _experts(g)
    s13[:, :, 0] = torch.randint(0, 2, (E, 2 * I), generator=g).to(torch.uint8)
    s13[:, :, 1] = 254
    s13[:, :, 2] = 127
    w13[:, :, 16:32] &= 0xBB  # group 1: exponent bits <= 1 in both nibbles (|e2m1| <= 1.5)
    x = torch.randn(n, H, generator=g)
    sign = torch.where(x < 0, -1.0, 1.0)
    x[:, :32] *= 2.0**124
    x[:, 32:64] = sign[:, 32:64] * (1 + x[:, 32:64].abs()) * 2.0**-125
    experts = _hash_routing(g, n, 3)
    weights = torch.rand(n, 3, generator=g)
    got = fused_moe_triton(x, weights, experts, w13, s13, w2, s2, LIMIT, form=form)
    ref = fused_moe_torch(x, weights, experts, w13, s13, w2, s2, LIMIT)
    _close(got, ref)
    dense, _ = _dense(x, weights, experts, w13, s13, w2, s2)
    _close(got, dense)


_SCALE_BYTES = (0, 1, 2, 100, 127, 200, 240, 241, 253, 254)


@triton.jit
def _decode_probe(b_ptr, s_ptr, even_ptr, odd_ptr, words_ptr, BN: tl.constexpr, G: tl.constexpr,
                  DECODE: tl.constexpr):
    # Byte tiles [BN, G, 16] -> the two planes (_fp4_planes); the same bytes as int32 words
    # [BN, G, 4] -> eight planes (_fp4_code at shifts 0, 4, ..., 28), written back in input order.
    dt: tl.constexpr = even_ptr.dtype.element_ty
    n = tl.arange(0, BN)
    g = tl.arange(0, G)
    b = tl.load(b_ptr + n[:, None, None] * (16 * G) + (16 * g)[None, :, None] + tl.arange(0, 16)[None, None, :])
    s = tl.load(s_ptr + n[:, None, None] * G + g[None, :, None])
    w_even, w_odd = _fp4_planes(b, s, dt, DECODE)
    offs = n[:, None] * (16 * G) + tl.arange(0, 16 * G)[None, :]
    tl.store(even_ptr + offs, w_even)
    tl.store(odd_ptr + offs, w_odd)
    w32 = b_ptr.to(tl.pointer_type(tl.int32))
    words = tl.load(w32 + n[:, None, None] * (4 * G) + (4 * g)[None, :, None] + tl.arange(0, 4)[None, None, :])
    lo, hi = _fp4_scales(s, dt, DECODE)
    q = tl.arange(0, 4 * G)
    for p in tl.static_range(8):
        w = tl.reshape(_fp4_code(words, lo, hi, 4 * p, dt, DECODE), (BN, 4 * G))
        tl.store(words_ptr + n[:, None] * (32 * G) + (8 * q + p)[None, :], w)


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply")  # scale 2^127 x 6 = inf, as in the twin
@pytest.mark.parametrize("dtype,decode", [(torch.float32, "f16"), (torch.float32, "f32"), (torch.float32, "bf16"),
                                          (torch.bfloat16, "f16"), (torch.bfloat16, "f32")])
def test_fp4_decode_bit_exact(dtype: torch.dtype, decode: str) -> None:
    # Every byte value (both nibbles), scale bytes across the range (0: 2^-127, 254: 2^127, where
    # the larger codes overflow to inf as in the twin): the decoded, scaled weights equal the twin's
    # dequantization bit for bit, in every decode mode (bf16 products only for bf16 activations).
    # bf16: scale bytes >= 2 only (every result normal): the interpreter's fp32 -> bf16 conversion
    # mishandles subnormals (the GPU's does not). DECODE "bf16" with bf16 activations (bf16 bit
    # casts and products) does not run in the interpreter: scripts/gpu/bench_moe.py checks it on
    # the GPU against the table's config; for other dtypes it is the "f16" decode.
    BN, G = 8, 2
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(BN, 16 * G)
    scales = _SCALE_BYTES if dtype == torch.float32 else tuple(b for b in _SCALE_BYTES if b >= 2)
    for i in range(0, len(scales), 2):
        scale = torch.tensor(scales * 3, dtype=torch.uint8)[i:i + BN * G].reshape(BN, G)
        ref = dequant_fp4(packed, scale, dtype)  # [BN, 32 G]
        even = torch.empty(BN, 16 * G, dtype=dtype)
        odd = torch.empty_like(even)
        words = torch.empty(BN, 32 * G, dtype=dtype)
        _decode_probe[(1,)](packed, scale, even, odd, words, BN=BN, G=G, DECODE=decode)
        assert torch.equal(even, ref[:, 0::2]) and torch.equal(odd, ref[:, 1::2])
        assert torch.equal(words, ref)


@triton.jit
def _x2_probe(w_ptr, out_ptr, Q: tl.constexpr):
    # int32 words [Q] -> _fp4_x2_bits at i = 0..3, stored [4, Q].
    q = tl.arange(0, Q)
    w = tl.load(w_ptr + q)
    for i in tl.static_range(4):
        tl.store(out_ptr + i * Q + q, _fp4_x2_bits(w, i))


def test_fp4_x2_bits() -> None:
    # Every byte value in every byte of a word: the packed decode's integer step gives, in the low
    # / high half of word i, the bf16 bits of code i / i + 4 times 2^-126 (torch's own bf16 of
    # that value, subnormals included), two codes per op. (The bf16 bit casts and products that
    # follow do not run in the interpreter: test_fp4_words_unpack_bit_exact runs them on a GPU.)
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    packed = torch.stack([b, b.roll(1), b.roll(7), b.roll(100)], 1).reshape(-1)  # [1024] bytes
    words = packed.view(torch.int32)  # [256]: nibble p of word j = input column 8j + p
    out = torch.empty(4, 256, dtype=torch.int32)
    _x2_probe[(1,)](words, out, Q=256)
    codes = dequant_fp4(packed[None], torch.full((1, 64), 1, dtype=torch.uint8), torch.float32)  # e2m1 * 2^-126
    bits = codes.reshape(256, 8).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    want = (bits[:, :4] | (bits[:, 4:] << 16)).T.contiguous()  # [4, 256]: codes i and i + 4
    assert torch.equal(out, want)


@triton.jit
def _unpack_probe(w_ptr, s_ptr, out_ptr, BN: tl.constexpr, G: tl.constexpr, DECODE: tl.constexpr):
    # Word tile [BN, G, 4] + scales [BN, G, 1] -> _fp4_words_unpack (pair order), written back in
    # input column order [BN, 32 G].
    dt: tl.constexpr = out_ptr.dtype.element_ty
    n = tl.arange(0, BN)
    g = tl.arange(0, G)
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    b = tl.load(w32 + n[:, None, None] * (4 * G) + (4 * g)[None, :, None] + tl.arange(0, 4)[None, None, :])
    s = tl.load(s_ptr + n[:, None, None] * G + g[None, :, None])
    w = _fp4_words_unpack(b, s, dt, DECODE)
    k = tl.arange(0, 32 * G)  # pair-order position 8j + 2i + h holds input column 8j + i + 4h
    tl.store(out_ptr + n[:, None] * (32 * G) + ((k & ~7) + ((k >> 1) & 3) + 4 * (k & 1))[None, :], w)


@pytest.mark.filterwarnings("ignore:overflow encountered in multiply")  # scale 2^127 x 6 = inf, as in the twin
@pytest.mark.parametrize("dtype,decode", [
    (torch.float32, "x2"), (torch.float32, "f32"),
    pytest.param(torch.bfloat16, "x2", marks=pytest.mark.gpu), pytest.param(torch.bfloat16, "f16", marks=pytest.mark.gpu)])
def test_fp4_words_unpack_bit_exact(dtype: torch.dtype, decode: str) -> None:
    # The pair-order word tile of PLANES 4, back in input order, equals the twin's dequantization
    # bit for bit: every byte value, scale bytes across the whole range. bf16 (on a GPU): the packed
    # "x2" decode (bf16 bit casts, packed bf16 products, subnormal weights at scale bytes 0 and 1).
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors
    BN, G = 8, 4
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(2).reshape(BN, 16 * G)
    for i in range(0, len(_SCALE_BYTES), 3):
        scale = torch.tensor(_SCALE_BYTES * 5, dtype=torch.uint8)[i:i + BN * G].reshape(BN, G)
        ref = dequant_fp4(packed, scale, dtype)  # [BN, 32 G]
        out = torch.empty(BN, 32 * G, dtype=dtype, device=dev)
        _unpack_probe[(1,)](packed.to(dev), scale.to(dev), out, BN=BN, G=G, DECODE=decode)
        assert torch.equal(out.cpu().view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_fp4_fp16_rounding_flow() -> None:
    # Half precision (bf16 dots are wrong in the interpreter; fp16 ones are not): the kernel rounds
    # where the twin rounds (projections, silu, product, weighted pair), so nearly all outputs
    # agree bit for bit; the rest differ only by accumulation order.
    g = torch.Generator().manual_seed(13)
    n = 6
    w13, s13, w2, s2 = _experts(g, 123, 124)
    x = torch.randn(n, H, generator=g).half()
    experts = _hash_routing(g, n, 3)
    weights = torch.rand(n, 3, generator=g).half()
    got = fused_moe(x, weights, experts, w13, s13, w2, s2, LIMIT, impl="triton")
    ref = fused_moe_torch(x, weights, experts, w13, s13, w2, s2, LIMIT)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-3, atol=2e-3 * float(ref.abs().max()))
    assert (got == ref).float().mean() > 0.95


def test_plain_weights() -> None:
    g = torch.Generator().manual_seed(5)
    n, k, h, i = 9, 3, 80, 40
    w13 = torch.randn(E, 2 * i, h, generator=g) * 0.3
    w2 = torch.randn(E, h, i, generator=g) * 0.1
    x = torch.randn(n, h, generator=g)
    experts = torch.randint(0, E - 1, (n, k), generator=g)  # last expert unused
    weights = torch.rand(n, k, generator=g)
    got = fused_moe(x, weights, experts, w13, None, w2, None, LIMIT, impl="triton")
    _close(got, fused_moe(x, weights, experts, w13, None, w2, None, LIMIT, impl="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_equals_model_routed(dtype: torch.dtype) -> None:
    # The twin is MoE._routed's reference, bit for bit (FP4 experts of the tiny config).
    from flashport.model.moe import MoE
    from flashport.model.tiny import tiny_config

    cfg = dataclasses.replace(tiny_config(), num_experts_per_tok=3)
    moe = MoE(cfg, layer=2, dtype=dtype, fp8_dtype=torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(3)
    for w in (moe.experts.w13, moe.experts.w2):
        w.weight.copy_(torch.randint(0, 256, w.weight.shape, generator=g, dtype=torch.int32).to(torch.uint8))
        w.scale.copy_(torch.randint(122, 126, w.scale.shape, generator=g, dtype=torch.int32).to(torch.uint8))
    n = 9
    x = torch.randn(n, cfg.hidden_size, generator=g).to(dtype)
    experts = torch.randint(0, cfg.n_routed_experts, (n, 3), generator=g)
    weights = torch.rand(n, 3, generator=g).to(dtype)
    ref = moe._routed(x, weights, experts)
    e = moe.experts
    got = fused_moe(x, weights, experts, e.w13.weight, e.w13.scale, e.w2.weight, e.w2.scale, moe.limit)
    assert torch.equal(got, ref)


def test_input_checks() -> None:
    from flashport.kernels.moe import fused_moe_triton

    g = torch.Generator().manual_seed(1)
    w13, s13, w2, s2 = _experts(g)
    x = torch.randn(4, H, generator=g)
    experts = torch.zeros(4, 2, dtype=torch.int64)
    weights = torch.rand(4, 2, generator=g)
    with pytest.raises(ValueError, match="weights"):
        fused_moe_triton(x, weights.half(), experts, w13, s13, w2, s2, LIMIT)
    with pytest.raises(ValueError, match="w13_scale"):
        fused_moe_triton(x, weights, experts, w13, s13[:, :, :1], w2, s2, LIMIT)
    with pytest.raises(ValueError, match="x must"):  # not contiguous
        fused_moe_triton(torch.randn(H, 4, generator=g).t(), weights, experts, w13, s13, w2, s2, LIMIT)
    with pytest.raises(ValueError, match="experts"):
        fused_moe_triton(x, weights, experts[:3], w13, s13, w2, s2, LIMIT)
    with pytest.raises(ValueError, match="impl"):
        fused_moe(x, weights, experts, w13, s13, w2, s2, LIMIT, impl="cuda")




# ---------------------------------------------------------------------------- the tiled FP4 layout
def _tileable_experts(g: torch.Generator, h: int = 128, i: int = 64):
    def fp4(rows: int, cols: int):
        packed = torch.randint(0, 256, (E, rows, cols // 2), generator=g, dtype=torch.int32).to(torch.uint8)
        return packed, torch.randint(123, 127, (E, rows, cols // 32), generator=g, dtype=torch.int32).to(torch.uint8)

    return (*fp4(2 * i, h), *fp4(h, i))


def test_tile_fp4_layout_and_round_trip() -> None:
    from flashport.ops.moe import FP4_TILE, tile_fp4_, untile_fp4

    g = torch.Generator().manual_seed(61)
    w, s, _, _ = _tileable_experts(g)
    tw, ts = w.clone(), s.clone()
    tile_fp4_(tw, ts)
    C = w.shape[2]
    e, r, byte = 3, 77, 45  # row 77 = chunk row 1, row 13 in it; byte 45 = chunk column 1, byte 13 in it
    chunk = (r // FP4_TILE) * (2 * C // FP4_TILE) + byte // 32
    assert tw[e].view(-1)[chunk * 2048 + (r % 64) * 32 + byte % 32] == w[e, r, byte]
    grp = 3  # scale group 3 = chunk column 1, group 1 in it
    assert ts[e].view(-1)[((r // 64) * (2 * C // 64) + grp // 2) * 128 + (r % 64) * 2 + grp % 2] == s[e, r, grp]
    for k in range(E):
        back_w, back_s = untile_fp4(tw[k], ts[k])
        assert torch.equal(back_w, w[k]) and torch.equal(back_s, s[k])
    assert not torch.equal(tw, w) and tw.shape == w.shape
    with pytest.raises(ValueError, match="multiples of 64"):
        tile_fp4_(w[:, :96].clone(), s[:, :96].clone())


@pytest.mark.parametrize("form,planes,one_loop", [("decode", 4, True), ("decode", 4, False), ("decode", 8, False),
                                                  ("prefill", 1, False), ("prefill", 2, False)])
def test_fp4_kernels_read_the_tiled_layout(form: str, planes: int, one_loop: bool, monkeypatch) -> None:
    # The engine's layout: kernels on tiled weights == the twin on the row layout (and the twin on
    # the tiled layout), hash routing with repeats, both forms, the table's and the sweep's tiles.
    from flashport.kernels.moe import fused_moe_triton
    from flashport.ops.moe import tile_fp4_

    _use_variant(monkeypatch, form, PLANES=planes, ONE_LOOP=one_loop, PREFETCH=planes != 2,
                 DECODE="x2" if planes == 4 else "f32")
    g = torch.Generator().manual_seed(70 + planes + one_loop)
    w13, s13, w2, s2 = _tileable_experts(g)
    n = 11
    x = torch.randn(n, 128, generator=g)
    experts = _hash_routing(g, n, 3)
    weights = torch.rand(n, 3, generator=g)
    ref = fused_moe_torch(x, weights, experts, w13, s13, w2, s2, LIMIT)
    tiled = [t.clone() for t in (w13, s13, w2, s2)]
    tile_fp4_(tiled[0], tiled[1])
    tile_fp4_(tiled[2], tiled[3])
    got = fused_moe_triton(x, weights, experts, *tiled, LIMIT, form=form, tiled=True)
    _close(got, ref)
    assert torch.equal(fused_moe_torch(x, weights, experts, *tiled, LIMIT, tiled=True), ref)
    with pytest.raises(ValueError, match="multiples of 64"):
        fused_moe_triton(x[:, :96].contiguous(), weights, experts, w13[:, :, :48].contiguous(),
                         s13[:, :, :3].contiguous(), w2, s2, LIMIT, tiled=True)


def test_expert_weight_tiles_for_the_kernels() -> None:
    # ExpertWeight.tile_for_kernels: dense() (the reference path) is unchanged by the layout.
    from flashport.model.moe import ExpertWeight

    g = torch.Generator().manual_seed(62)
    w = ExpertWeight(E, 128, 128, torch.float32, "fp4", None, torch.float8_e4m3fn)
    w.weight.copy_(torch.randint(0, 256, w.weight.shape, generator=g, dtype=torch.int32).to(torch.uint8))
    w.scale.copy_(torch.randint(122, 126, w.scale.shape, generator=g, dtype=torch.int32).to(torch.uint8))
    before = [w.dense(e, torch.float32) for e in range(E)]
    assert w.tile_for_kernels() and w.tiled and w.tile_for_kernels()  # once; a second call is a no-op
    assert all(torch.equal(w.dense(e, torch.float32), d) for e, d in enumerate(before))
    odd = ExpertWeight(E, 96, 128, torch.float32, "fp4", None, torch.float8_e4m3fn)
    assert not odd.tile_for_kernels() and not odd.tiled  # 96 rows: stays in the row layout
