"""Grouped expert GEMMs of the fused MoE (spec §5.8, §5.11, §8.3), FP4 or plain expert weights.

The (token, pick) pairs are sorted by expert (`moe.moe_route`): `order[p]` is the pair at sorted
position p and `offsets[e]:offsets[e + 1]` are expert e's positions. A program owns one row tile
(BLOCK_M sorted positions of ONE expert) and one column tile. The row tiles are laid out expert by
expert, each expert's rows cut into ceil(count / BLOCK_M) tiles; every program derives its
(expert, rows) from `offsets` itself, so the grid is the bound ceil(M / BLOCK_M) + min(E, M)
known from the shapes alone (no host sync) and programs past the last real tile exit at once.

- gate/up: h[p] = silu(min(g, limit)) * clamp(u, +-limit), g / u = x[token(p)] @ w13[e, j / I+j]^T
- down:    y[pair] = round(h[p] @ w2[e]^T) * weight[pair], written at the pair's own row [N * k, H]

FP4 weights (uint8, low nibble = even column) are streamed as [BLOCK_N, BLOCK_K / 2] byte tiles
(long contiguous runs of each weight row) and decoded in the kernel, a whole tile per K step, into
the activation dtype with their UE8M0 scales applied: the nibble goes straight into float bits (a
few integer ops, no table; DECODE picks fp16 bits widened to fp32, fp32 bits, or bf16 bits with
packed bf16 products), then two exact power-of-two products give e2m1 * 2^(s - 127), the very
value the torch twin's dequantization rounds to the activation dtype (so the kernel is exact for
every scale byte, wherever that value is representable). DECODE "x2" (bf16 activations, 32-bit word
tiles) decodes two codes per integer op into bf16 bits and applies the scale as packed bf16
products: ~5 instructions per weight value where the per-code decodes take ~12.

PLANES picks how the decoded codes meet the activations: 2, the even and odd nibble planes of a
byte tile multiply strided even / odd activation columns (two dots per K step); 1, the planes are
interleaved back into input order (one dot on contiguous activations); 8, the tile is loaded as
32-bit words (a quarter of the registers of a byte tile) whose eight nibble planes multiply
activation columns of stride 8; 4, word tiles in PAIR ORDER (codes i and i + 4 of each word side by
side, the halves of one "x2" word) against the activations reordered the same way in registers, the
weights as the left operand (acc^T = W @ a^T: the weight rows are the matrix units' M side, which
Hopper's wgmma needs >= 64 of; the decode tables); 0 (experimental, in no table), Triton's
tl.dot_scaled. Products run in the activation dtype with fp32 accumulation; results are rounded
where transformers rounds (each projection output, silu, the SwiGLU product, the weighted output).
PREFETCH issues the next K step's loads before the current step's decode and dots (two tiles of
bytes in flight per program); num_stages > 1 instead lets the compiler stream them through shared
memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashport.kernels.spec import TARGETS, AotSpec, target_of

FP4_GROUP = 32  # values per UE8M0 scale

# BLOCK_K input columns (BLOCK_K / 2 bytes, BLOCK_K / 32 scale groups of each weight row) per K step.
# sm_90 entries: the best of scripts/gpu/bench_moe.py --sweep / --short-sweep on an H200 (each GEMM
# kernel timed alone at N = 1, 8, 64, 256 and 8192; docs/perf/kernels.md, docs/perf/speed-notes.md).
# Decode (few rows per expert): pair-order word tiles as the left operand (PLANES 4: 64 weight rows
# are the wgmma M side, the 16-row token tile its N side), codes decoded two per integer op
# (DECODE "x2"), the next K step's bytes prefetched, 64-column K steps (2-4% faster than 128 at N = 8 to
# 256); fused MoE at N = 64: 3,410 -> 2,531 us (rounds s3a -> s3e, docs/perf/speed-notes.md).
# Session 4: the FP4 weights in the tiled layout (flashport/ops/moe.py FP4_TILE; Nsight Compute had
# the decode kernels at 88-91% of L1/TEX throughput, 16% of DRAM, from 64 scattered 32-byte row
# pieces per K step) and gate/up in one K loop (ONE_LOOP; 1,370 -> 1,268 us at N = 64 on the tiled
# layout, 2% slower on the row layout): fused N = 64 2,574 -> 1,938 us (graph); the prefill kernels
# on the tiled layout 11% slower (N = 8192 12.3 -> 13.6 ms; no better tile in round s4f).
# Prefill: 128-row tiles, one dot per K step, GROUP_M row tiles sweeping the columns together (L2
# reuse); gate/up with one warp group (its two accumulators), down with two; DECODE "bf16" (packed
# bf16 scale products; 2-7% faster than "f16" at N = 8192, bit-identical). sm_100: the sm_90
# entries (not measured).
_GU_DECODE = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, PLANES=4, PREFETCH=True, DECODE="x2",
                  ONE_LOOP=True, num_warps=4, num_stages=1)
_GU_PREFILL = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, PLANES=1, PREFETCH=False, DECODE="bf16",
                   num_warps=4, num_stages=3)
_DOWN_DECODE = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, PLANES=4, PREFETCH=True, DECODE="x2",
                    num_warps=4, num_stages=1)
_DOWN_PREFILL = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, PLANES=1, PREFETCH=False, DECODE="bf16",
                     num_warps=8, num_stages=3)
# AMD entries: the NVIDIA tiles with AMD launch options (not measured on an AMD device) and DECODE
# "f16" (the "x2" and "bf16" decodes rely on bf16 subnormal inputs, which AMD code may flush).
_AMD = dict(num_stages=2, waves_per_eu=0, matrix_instr_nonkdim=16, kpack=1, DECODE="f16")


def _table(decode: dict, prefill: dict, interpret: dict) -> dict[str, dict[str, dict]]:
    nv = {"decode": decode, "prefill": prefill}
    amd = {"decode": {**decode, **_AMD}, "prefill": {**prefill, **_AMD}}
    return {"sm_90": nv, "sm_100": nv, "gfx942": amd, "gfx950": amd, "interpret": interpret}


# The interpreter runs programs one by one: few, wide tiles keep the tests fast.
# The decode entry has the GPU's structure (pair-order word tiles, left operand, prefetch; "x2" is the
# per-code fp16 decode for the tests' fp32 activations); tests/test_kernels_moe.py runs every variant.
_GU_INTERPRET = {"decode": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, PLANES=4, PREFETCH=True,
                                DECODE="x2", ONE_LOOP=True, num_warps=4, num_stages=1),
                 "prefill": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, PLANES=1, PREFETCH=False,
                                 DECODE="f16", num_warps=4, num_stages=1)}
_DOWN_INTERPRET = {form: {k: v for k, v in {**c, "BLOCK_N": 64, "BLOCK_K": 32}.items() if k != "ONE_LOOP"}
                   for form, c in _GU_INTERPRET.items()}
# Config per target and form, one table per kernel (sm_90: see scripts/gpu/bench_moe.py --sweep).
GATE_UP_CONFIGS: dict[str, dict[str, dict]] = _table(_GU_DECODE, _GU_PREFILL, _GU_INTERPRET)
DOWN_CONFIGS: dict[str, dict[str, dict]] = _table(_DOWN_DECODE, _DOWN_PREFILL, _DOWN_INTERPRET)
FORMS = ("decode", "prefill")
# constexprs; the rest: launch options. ONE_LOOP (gate/up only; off when absent): the gate and up
# rows of a PLANES 4 tile in one K loop sharing the activation tile (_fp4_gemm_pair).
_META = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PLANES", "PREFETCH", "DECODE")
_GU_META = ("ONE_LOOP",)


@triton.jit
def _tile_ids(max_tiles, n_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # pid -> (row tile, column tile). GROUP_M consecutive row tiles sweep the columns together, so
    # the x tiles of the group and the weight tiles of their experts are reused from L2.
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(n_cols, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(max_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_of(offsets_ptr, num_experts, pid_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # Row tile pid_m -> (expert, first sorted row, end of the expert's rows); expert == num_experts
    # when pid_m is past the last tile. Tile t belongs to the first expert whose cumulative tile
    # count exceeds t.
    e = tl.arange(0, BLOCK_E)
    valid = e < num_experts
    starts = tl.load(offsets_ptr + e, mask=valid, other=0)  # [BLOCK_E]
    ends = tl.load(offsets_ptr + e + 1, mask=valid, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)  # inclusive
    expert = tl.sum((valid & (tile_end <= pid_m)).to(tl.int32), 0)
    this = e == expert
    first_tile = tl.sum(tl.where(this, tile_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(this, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(this, ends, 0), 0)
    return expert, row_start, row_end


@triton.jit
def _mma(acc, a, b):
    # acc += a @ b in a's dtype. fp32 activations (the CPU interpreter, fp32 models) multiply
    # exactly, never in tf32.
    if a.dtype == tl.float32:
        return tl.dot(a, b.to(a.dtype), acc, input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def _load_a(row_ptrs, row_ok, k0, K, BLOCK_K: tl.constexpr, STEP: tl.constexpr):
    # Activation columns k0, k0 + STEP, ... (BLOCK_K of them) of the rows `row_ptrs` [BLOCK_M].
    kk = k0 + STEP * tl.arange(0, BLOCK_K)
    return tl.load(row_ptrs[:, None] + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def _load_w(w_ptr, n, n_ok, stride_wn, k0, K, BLOCK_K: tl.constexpr):
    # Plain weights: transposed tile [BLOCK_K, BLOCK_N] of output rows n at input columns k0...
    kk = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + n[None, :] * stride_wn + kk[:, None], mask=(kk < K)[:, None] & n_ok[None, :], other=0.0)


@triton.jit
def _tiled_chunks(s_ptr, n, g, ok, K):
    # The tiled layout (see _fp4_load_words) for rows n [BN] and scale groups g [G]: -> the chunk
    # index [BN, G, 1], the row in the chunk [BN, 1, 1], the group's half of the chunk's 64 columns
    # [1, G, 1], and the scales [BN, G, 1] (64 x 2 bytes per chunk).
    nn = n[:, None, None]
    g3 = g[None, :, None]
    chunk = (nn // 64) * (K // 64) + g3 // 2
    s = tl.load(s_ptr + chunk * 128 + (nn % 64) * 2 + g3 % 2, mask=ok, other=127)
    return chunk, nn % 64, g3 % 2, s


@triton.jit
def _fp4_load(w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, k0, K, BLOCK_K: tl.constexpr,
              TILED: tl.constexpr = False):
    # FP4 tile of output rows n [BLOCK_N] at input columns k0 .. k0 + BLOCK_K (k0 % 32 == 0):
    # bytes [BLOCK_N, G, 16] (BLOCK_K / 2 contiguous bytes of each row; G = BLOCK_K / 32 scale
    # groups) and their scale bytes [BLOCK_N, G, 1]. Groups past K load as code 0 (the value 0).
    # TILED: the chunked layout of _fp4_load_words.
    G: tl.constexpr = BLOCK_K // 32
    g = k0 // 32 + tl.arange(0, G)  # [G] scale group of each 16-byte run
    ok = n_ok[:, None, None] & (g < K // 32)[None, :, None]
    if TILED:
        chunk, row, half, s = _tiled_chunks(s_ptr, n, g, ok, K)
        b = tl.load(w_ptr + chunk * 2048 + row * 32 + 16 * half + tl.arange(0, 16)[None, None, :], mask=ok, other=0)
        return b, s
    n3 = n[:, None, None] * stride_wn
    b = tl.load(w_ptr + n3 + (16 * g)[None, :, None] + tl.arange(0, 16)[None, None, :], mask=ok, other=0)
    s = tl.load(s_ptr + n[:, None, None] * stride_sn + g[None, :, None], mask=ok, other=127)
    return b, s


@triton.jit
def _fp4_code(c, lo, hi, SHIFT: tl.constexpr, dt: tl.constexpr, DECODE: tl.constexpr):
    # The E2M1 code in bits SHIFT .. SHIFT + 3 of the int32 c, times 2^(s - 127), exactly, in dt;
    # lo / hi: the scale factors of _fp4_scales for the code's group.
    if DECODE == "bf16" and dt == tl.bfloat16:
        # Code -> bf16 bits (c & 7) << 6 | (c & 8) << 12: e2m1(c) * 2^-126 (code 1: the bf16
        # subnormal 2^-127), then two bf16 products by powers of two (packed two to an
        # instruction): 2^126, then the scale.
        x = c >> SHIFT
        v = (((x & 0x7) << 6) | ((x & 0x8) << 12)).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return v * lo * hi
    elif DECODE == "f32":
        # Code -> fp32 bits (c & 7) << 22 | (c & 8) << 28: e2m1(c) * 2^-126 (code 1: the subnormal
        # 2^-127); two products by powers of two (no flush to zero) give e2m1 * 2^(s - 127).
        if SHIFT <= 22:
            mag = (c << (22 - SHIFT)) & 0x01C00000
        else:
            mag = (c >> (SHIFT - 22)) & 0x01C00000
        sign = (c << (28 - SHIFT)) & -0x80000000
        return ((mag | sign).to(tl.float32, bitcast=True) * lo * hi).to(dt)
    else:
        # "f16" (and "bf16" for other activation dtypes): code -> fp16 bits (c & 7) << 9 |
        # (c & 8) << 12: e2m1(c) * 2^-14 (code 1: the fp16 subnormal 2^-15), widened to fp32,
        # then the two scale products.
        x = c >> SHIFT
        v = (((x & 0x7) << 9) | ((x & 0x8) << 12)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return (v * lo * hi).to(dt)


@triton.jit
def _fp4_scales(s, dt: tl.constexpr, DECODE: tl.constexpr):
    # UE8M0 bytes -> the (lo, hi) factors _fp4_code applies to a decoded code, each product exact.
    s = s.to(tl.int32)
    if DECODE == "bf16" and dt == tl.bfloat16:
        # 2^126 (bf16 bits 253 << 7), then 2^(s - 127) (s = 0: the subnormal 2^-127), in bf16.
        lo = tl.full(s.shape, 253 << 7, tl.int16).to(tl.bfloat16, bitcast=True)
        return lo, tl.where(s == 0, 0x40, s << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif DECODE == "f32":
        # 2^126, then 2^(s - 127) (s = 0: the subnormal 2^-127).
        return tl.full(s.shape, 2.0**126, tl.float32), tl.where(s == 0, 0x400000, s << 23).to(tl.float32,
                                                                                                bitcast=True)
    else:
        # 2^(min(s, 240) - 113) (fp32 exponent field min(s, 240) + 14) then 2^(max(s, 240) - 240);
        # s = 0 gives the fp32 subnormals e2m1 * 2^-127, as the twin does.
        return (((tl.minimum(s, 240) + 14) << 23).to(tl.float32, bitcast=True),
                ((tl.maximum(s, 240) - 113) << 23).to(tl.float32, bitcast=True))


@triton.jit
def _fp4_planes(b, s, dt: tl.constexpr, DECODE: tl.constexpr):
    # bytes [BN, G, 16] + scales [BN, G, 1] -> even / odd input columns [BN, G * 16] in dt, scaled.
    BN: tl.constexpr = b.shape[0]
    HALF: tl.constexpr = b.shape[1] * b.shape[2]
    b = b.to(tl.int32)
    lo, hi = _fp4_scales(s, dt, DECODE)
    w_even = tl.reshape(_fp4_code(b, lo, hi, 0, dt, DECODE), (BN, HALF))
    w_odd = tl.reshape(_fp4_code(b, lo, hi, 4, dt, DECODE), (BN, HALF))
    return w_even, w_odd


@triton.jit
def _fp4_mma(acc, a_rows, row_ok, k0, K, b, s, BLOCK_K: tl.constexpr, PLANES: tl.constexpr,
             DECODE: tl.constexpr):
    # acc [BM, BN] += a[:, k0:k0 + BLOCK_K] @ W[n, k0:k0 + BLOCK_K]^T for the FP4 tile (b, s).
    dt: tl.constexpr = a_rows.dtype.element_ty
    BN: tl.constexpr = b.shape[0]
    w_even, w_odd = _fp4_planes(b, s, dt, DECODE)  # [BN, BLOCK_K / 2] each
    if PLANES == 1:
        # Back to input order: [BN, BLOCK_K / 2, 2] -> [BN, BLOCK_K], one dot on contiguous columns.
        w = tl.reshape(tl.join(w_even, w_odd), (BN, BLOCK_K))
        return _mma(acc, _load_a(a_rows, row_ok, k0, K, BLOCK_K, 1), tl.trans(w))
    else:
        # The packed byte j holds input columns k0 + 2j (low nibble) and k0 + 2j + 1 (high):
        # the planes multiply the even and the odd activation columns.
        acc = _mma(acc, _load_a(a_rows, row_ok, k0, K, BLOCK_K // 2, 2), tl.trans(w_even))
        return _mma(acc, _load_a(a_rows + 1, row_ok, k0, K, BLOCK_K // 2, 2), tl.trans(w_odd))


@triton.jit
def _fp4_load_words(w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, k0, K, BLOCK_K: tl.constexpr,
                    TILED: tl.constexpr = False):
    # As _fp4_load, in 32-bit words (8 codes each, a quarter of the registers of bytes):
    # words [BLOCK_N, G, 4] of input columns k0 .. k0 + BLOCK_K and scales [BLOCK_N, G, 1].
    # TILED: the expert's matrix stored in 64-row x 64-column chunks (flashport/ops/moe.py, FP4_TILE =
    # 64, which the constants below assume: chunk (r, c) = rows 64r.., columns 64c.., 64 x 32
    # contiguous bytes = 512 words, its scales 64 x 2 contiguous bytes), so a 64-row K step is one
    # contiguous run instead of 64 runs of 32 bytes 2 KB apart.
    G: tl.constexpr = BLOCK_K // 32
    g = k0 // 32 + tl.arange(0, G)
    ok = n_ok[:, None, None] & (g < K // 32)[None, :, None]
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    if TILED:
        chunk, row, half, s = _tiled_chunks(s_ptr, n, g, ok, K)
        b = tl.load(w32 + chunk * 512 + row * 8 + 4 * half + tl.arange(0, 4)[None, None, :], mask=ok, other=0)
        return b, s
    n3 = n[:, None, None] * tl.multiple_of(stride_wn // 4, 4)  # K / 2 bytes a row, K % 32 == 0
    b = tl.load(w32 + n3 + (4 * g)[None, :, None] + tl.arange(0, 4)[None, None, :], mask=ok, other=0)
    s = tl.load(s_ptr + n[:, None, None] * stride_sn + g[None, :, None], mask=ok, other=127)
    return b, s


@triton.jit
def _fp4_words_mma(acc, a_rows, row_ok, k0, K, b, s, BLOCK_K: tl.constexpr, DECODE: tl.constexpr):
    # acc += a[:, k0:k0 + BLOCK_K] @ W^T for the word tile (b, s): nibble p of word j holds input
    # column k0 + 8j + p, so 8 planes of BLOCK_K / 8 columns each meet activation columns of stride 8.
    dt: tl.constexpr = a_rows.dtype.element_ty
    BN: tl.constexpr = b.shape[0]
    Q: tl.constexpr = b.shape[1] * b.shape[2]
    lo, hi = _fp4_scales(s, dt, DECODE)
    for p in tl.static_range(8):
        w = tl.reshape(_fp4_code(b, lo, hi, 4 * p, dt, DECODE), (BN, Q))
        acc = _mma(acc, _load_a(a_rows + p, row_ok, k0, K, Q, 8), tl.trans(w))
    return acc


@triton.jit
def _fp4_x2_bits(w, i: tl.constexpr):
    # int32 words w (nibble p: input column 8j + p) -> int32 words whose low / high halves are the
    # bf16 bits of codes i / i + 4: e2m1 * 2^-126 (the codes of magnitude <= 0.5 as subnormals),
    # magnitude (c & 7) << 6 and sign (c & 8) << 12, both halves at once: three integer ops for two
    # codes where _fp4_code takes six for one.
    if 4 * i <= 6:
        mag = (w << (6 - 4 * i)) & 0x01C001C0
    else:
        mag = (w >> (4 * i - 6)) & 0x01C001C0  # arithmetic shift: the mask drops the sign copies
    return mag | ((w << (12 - 4 * i)) & -0x7FFF8000)  # 0x80008000 as int32


@triton.jit
def _bf16_halves(v):
    # int32 [...] -> its (low, high) 16-bit halves as bf16.
    return v.to(tl.int16).to(tl.bfloat16, bitcast=True), (v >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _pair_order(x0, x1, x2, x3, x4, x5, x6, x7):
    # the eight code planes of a word tile [..., Q] -> [..., Q, 2, 2, 2] whose element (q, c, d, h)
    # is plane i + 4h, i = 2c + d: flattened, the word's codes in PAIR ORDER 0 4 1 5 2 6 3 7, so
    # codes i and i + 4 (the halves of one _fp4_x2_bits word) sit side by side (a join's new axis
    # is its last: the inner joins give the major axes).
    lo = tl.join(tl.join(x0, x2), tl.join(x1, x3))
    hi = tl.join(tl.join(x4, x6), tl.join(x5, x7))
    return tl.join(lo, hi)


@triton.jit
def _load_pair_cols_t(row_ptrs, row_ok, k0, K, BLOCK_K: tl.constexpr):
    # Activations of the rows `row_ptrs` [BM] at the input columns of a pair-order tile at k0,
    # transposed: [BLOCK_K, BM]. Loaded in input order (contiguous runs of each row, so few wide
    # loads: the tile is re-read from L2 by every column tile) and put in pair order in registers:
    # column 8j + i + 4h is (j, h, i) in input order, (j, i, h) in pair order.
    a = _load_a(row_ptrs, row_ok, k0, K, BLOCK_K, 1)  # [BM, BLOCK_K]
    BM: tl.constexpr = a.shape[0]
    a = tl.reshape(tl.permute(tl.reshape(a, (BM, BLOCK_K // 8, 2, 4)), (0, 1, 3, 2)), (BM, BLOCK_K))
    return tl.trans(a)


@triton.jit
def _fp4_words_unpack(b, s, dt: tl.constexpr, DECODE: tl.constexpr):
    # Word tile b int32 [BN, G, 4] + scales [BN, G, 1] -> W [BN, 32 G] in pair order (_pair_order), dt.
    # DECODE "x2" with bf16 activations: two codes per integer op (_fp4_x2_bits) and per packed
    # product; otherwise each of the eight codes of a word alone (_fp4_code).
    BN: tl.constexpr = b.shape[0]
    K: tl.constexpr = 8 * b.shape[1] * b.shape[2]
    if DECODE == "x2" and dt == tl.bfloat16:
        # The scale products after the join, on [BN, G, 4, 2, 2, 2]: the two halves of one word,
        # side by side there, make one packed bf16 product without re-pairing.
        x0, x4 = _bf16_halves(_fp4_x2_bits(b, 0))
        x1, x5 = _bf16_halves(_fp4_x2_bits(b, 1))
        x2, x6 = _bf16_halves(_fp4_x2_bits(b, 2))
        x3, x7 = _bf16_halves(_fp4_x2_bits(b, 3))
        lo, hi = _fp4_scales(s, dt, "bf16")  # [BN, G, 1]
        w = _pair_order(x0, x1, x2, x3, x4, x5, x6, x7)
        w = w * lo[:, :, :, None, None, None] * hi[:, :, :, None, None, None]
        return tl.reshape(w, (BN, K))
    D: tl.constexpr = "f16" if DECODE == "x2" else DECODE
    lo, hi = _fp4_scales(s, dt, D)
    x0 = _fp4_code(b, lo, hi, 0, dt, D)
    x1 = _fp4_code(b, lo, hi, 4, dt, D)
    x2 = _fp4_code(b, lo, hi, 8, dt, D)
    x3 = _fp4_code(b, lo, hi, 12, dt, D)
    x4 = _fp4_code(b, lo, hi, 16, dt, D)
    x5 = _fp4_code(b, lo, hi, 20, dt, D)
    x6 = _fp4_code(b, lo, hi, 24, dt, D)
    x7 = _fp4_code(b, lo, hi, 28, dt, D)
    return tl.reshape(_pair_order(x0, x1, x2, x3, x4, x5, x6, x7), (BN, K))


@triton.jit
def _fp4_dot_scaled(acc, a_rows, row_ok, w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, k0, K,
                    BLOCK_K: tl.constexpr):
    # Experimental (PLANES == 0; in no table, the sweep times it): Triton's own microscaled dot,
    # native FP4 MMA where the target has one, an upcast to bf16 elsewhere. bf16 activations only,
    # not in the interpreter, and not exact at extreme scales (Triton maps the scale byte 0 to 0,
    # and its bf16 products may flush subnormals).
    j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    b = tl.load(w_ptr + n[None, :] * stride_wn + j[:, None], mask=(j < K // 2)[:, None] & n_ok[None, :],
                other=0)  # [BLOCK_K / 2, BN]
    g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    s = tl.load(s_ptr + n[:, None] * stride_sn + g[None, :], mask=n_ok[:, None] & (g < K // 32)[None, :],
                other=127)  # [BN, BLOCK_K / 32]
    return tl.dot_scaled(_load_a(a_rows, row_ok, k0, K, BLOCK_K, 1), None, "bf16", b, s, "e2m1", acc)


@triton.jit
def _fp4_gemm(acc, a_rows, row_ok, w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, K,
              BLOCK_K: tl.constexpr, PLANES: tl.constexpr, PREFETCH: tl.constexpr, DECODE: tl.constexpr,
              TILED: tl.constexpr = False):
    # acc [BM, BN] += a[rows, :K] @ W[n, :K]^T over every K step (FP4 W, K % 32 == 0).
    # PLANES: 1 or 2 (byte tiles, see _fp4_mma), 8 (32-bit word tiles, see _fp4_words_mma), 0
    # (experimental: tl.dot_scaled, see _fp4_dot_scaled).
    if PLANES == 0:
        tl.static_assert(not TILED, "PLANES 0 (tl.dot_scaled) reads the row layout only")
        for k0 in range(0, K, BLOCK_K):
            acc = _fp4_dot_scaled(acc, a_rows, row_ok, w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, k0, K, BLOCK_K)
    elif PLANES == 4:
        # Word tiles in pair order times the activations' columns in the same order, the weights
        # as the LEFT operand: acc^T [BN, BM] = W [BN, BLOCK_K] @ a^T, so the matrix units' M side
        # is the BN weight rows (Hopper's wgmma needs M >= 64; BM is 16 at decode).
        # PREFETCH: the next K step's words, scales and activations are loaded before this step's
        # decode (a tile of bytes in flight while the program computes; without it every step
        # waits out the latency of its own loads).
        dt: tl.constexpr = a_rows.dtype.element_ty
        acc_t = tl.zeros((acc.shape[1], acc.shape[0]), dtype=tl.float32)
        if PREFETCH:
            b, s = _fp4_load_words(w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, 0, K, BLOCK_K, TILED)
            a_t = _load_pair_cols_t(a_rows, row_ok, 0, K, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            if PREFETCH:
                b_now, s_now, a_now = b, s, a_t
                b, s = _fp4_load_words(w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, k0 + BLOCK_K, K, BLOCK_K, TILED)
                a_t = _load_pair_cols_t(a_rows, row_ok, k0 + BLOCK_K, K, BLOCK_K)
            else:
                b_now, s_now = _fp4_load_words(w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, k0, K, BLOCK_K, TILED)
                a_now = _load_pair_cols_t(a_rows, row_ok, k0, K, BLOCK_K)
            w = _fp4_words_unpack(b_now, s_now, dt, DECODE)  # [BN, BLOCK_K]
            acc_t = _mma(acc_t, w, a_now)  # += W [BN, BLOCK_K] @ a^T [BLOCK_K, BM]
        acc += tl.trans(acc_t)
    elif PLANES == 8:
        if PREFETCH:
            b, s = _fp4_load_words(w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, 0, K, BLOCK_K, TILED)
            for k0 in range(0, K, BLOCK_K):
                b_next, s_next = _fp4_load_words(w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, k0 + BLOCK_K, K,
                                                 BLOCK_K, TILED)
                acc = _fp4_words_mma(acc, a_rows, row_ok, k0, K, b, s, BLOCK_K, DECODE)
                b, s = b_next, s_next
        else:
            for k0 in range(0, K, BLOCK_K):
                b, s = _fp4_load_words(w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, k0, K, BLOCK_K, TILED)
                acc = _fp4_words_mma(acc, a_rows, row_ok, k0, K, b, s, BLOCK_K, DECODE)
    elif PREFETCH:
        b, s = _fp4_load(w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, 0, K, BLOCK_K, TILED)
        for k0 in range(0, K, BLOCK_K):
            # Issue the next step's loads (all masked off past K) before this step's work.
            b_next, s_next = _fp4_load(w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, k0 + BLOCK_K, K, BLOCK_K, TILED)
            acc = _fp4_mma(acc, a_rows, row_ok, k0, K, b, s, BLOCK_K, PLANES, DECODE)
            b, s = b_next, s_next
    else:
        for k0 in range(0, K, BLOCK_K):
            b, s = _fp4_load(w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, k0, K, BLOCK_K, TILED)
            acc = _fp4_mma(acc, a_rows, row_ok, k0, K, b, s, BLOCK_K, PLANES, DECODE)
    return acc


@triton.jit
def _fp4_gemm_pair(acc_g, acc_u, a_rows, row_ok, w_ptr, s_ptr, n_g, n_u, n_ok, stride_wn, stride_sn, K,
                   BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, DECODE: tl.constexpr, TILED: tl.constexpr):
    # PLANES 4 (see _fp4_gemm) for the gate rows n_g and the up rows n_u in ONE K loop: each
    # activation tile is loaded once for both, and each K step has both weight tiles in flight.
    dt: tl.constexpr = a_rows.dtype.element_ty
    g_t = tl.zeros((acc_g.shape[1], acc_g.shape[0]), dtype=tl.float32)
    u_t = tl.zeros((acc_u.shape[1], acc_u.shape[0]), dtype=tl.float32)
    if PREFETCH:
        bg, sg = _fp4_load_words(w_ptr, s_ptr, n_g, n_ok, stride_wn, stride_sn, 0, K, BLOCK_K, TILED)
        bu, su = _fp4_load_words(w_ptr, s_ptr, n_u, n_ok, stride_wn, stride_sn, 0, K, BLOCK_K, TILED)
        a_t = _load_pair_cols_t(a_rows, row_ok, 0, K, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        if PREFETCH:
            bg_now, sg_now, bu_now, su_now, a_now = bg, sg, bu, su, a_t
            bg, sg = _fp4_load_words(w_ptr, s_ptr, n_g, n_ok, stride_wn, stride_sn, k0 + BLOCK_K, K, BLOCK_K, TILED)
            bu, su = _fp4_load_words(w_ptr, s_ptr, n_u, n_ok, stride_wn, stride_sn, k0 + BLOCK_K, K, BLOCK_K, TILED)
            a_t = _load_pair_cols_t(a_rows, row_ok, k0 + BLOCK_K, K, BLOCK_K)
        else:
            bg_now, sg_now = _fp4_load_words(w_ptr, s_ptr, n_g, n_ok, stride_wn, stride_sn, k0, K, BLOCK_K, TILED)
            bu_now, su_now = _fp4_load_words(w_ptr, s_ptr, n_u, n_ok, stride_wn, stride_sn, k0, K, BLOCK_K, TILED)
            a_now = _load_pair_cols_t(a_rows, row_ok, k0, K, BLOCK_K)
        g_t = _mma(g_t, _fp4_words_unpack(bg_now, sg_now, dt, DECODE), a_now)
        u_t = _mma(u_t, _fp4_words_unpack(bu_now, su_now, dt, DECODE), a_now)
    return acc_g + tl.trans(g_t), acc_u + tl.trans(u_t)


@triton.jit(do_not_specialize=["max_tiles"])
def _moe_gate_up_kernel(
    x_ptr,  # [N, H] activations
    order_ptr,  # [M] int64: pair (token * k + pick) at each sorted position
    offsets_ptr,  # [E + 1] int32: first sorted position of each expert
    w_ptr,  # FP4: uint8 [E, 2I, H/2]; plain: [E, 2I, H]
    s_ptr,  # FP4: uint8 [E, 2I, H/32]; plain: unused
    h_ptr,  # [M, I] out, sorted order, activation dtype
    num_experts, H, I, top_k, max_tiles, limit,
    stride_we, stride_wn, stride_se, stride_sn,
    W_FP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PLANES: tl.constexpr, PREFETCH: tl.constexpr, DECODE: tl.constexpr, BLOCK_E: tl.constexpr,
    ONE_LOOP: tl.constexpr, TILED: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 32 == 0)  # whole 1x32 scale groups per K step
    pid_m, pid_n = _tile_ids(max_tiles, I, BLOCK_N, GROUP_M)
    expert, row_start, row_end = _tile_of(offsets_ptr, num_experts, pid_m, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)  # [BLOCK_M] sorted positions
    row_ok = rows < row_end
    tokens = tl.load(order_ptr + rows, mask=row_ok, other=0) // top_k
    x_rows = x_ptr + tokens * H  # int64 offsets (order is int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns j: gate row j, up row I + j
    col_ok = cols < I
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    s_e = s_ptr + expert.to(tl.int64) * stride_se
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W_FP4 and ONE_LOOP and PLANES == 4:  # gate and up rows in one K loop (_fp4_gemm_pair)
        acc_g, acc_u = _fp4_gemm_pair(acc_g, acc_u, x_rows, row_ok, w_e, s_e, cols, cols + I, col_ok, stride_wn,
                                      stride_sn, H, BLOCK_K, PREFETCH, DECODE, TILED)
    elif W_FP4:
        acc_g = _fp4_gemm(acc_g, x_rows, row_ok, w_e, s_e, cols, col_ok, stride_wn, stride_sn, H, BLOCK_K,
                          PLANES, PREFETCH, DECODE, TILED)
        acc_u = _fp4_gemm(acc_u, x_rows, row_ok, w_e, s_e, cols + I, col_ok, stride_wn, stride_sn, H, BLOCK_K,
                          PLANES, PREFETCH, DECODE, TILED)
    else:
        for k0 in range(0, H, BLOCK_K):
            a = _load_a(x_rows, row_ok, k0, H, BLOCK_K, 1)
            acc_g = _mma(acc_g, a, _load_w(w_e, cols, col_ok, stride_wn, k0, H, BLOCK_K))
            acc_u = _mma(acc_u, a, _load_w(w_e, cols + I, col_ok, stride_wn, k0, H, BLOCK_K))
    # Clamped SwiGLU, rounded as transformers rounds: projections, silu, product.
    dt = h_ptr.dtype.element_ty
    g = tl.minimum(acc_g.to(dt).to(tl.float32), limit)
    u = acc_u.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    h = act * tl.minimum(tl.maximum(u, -limit), limit)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * I + cols[None, :]
    tl.store(h_ptrs, h.to(dt), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["max_tiles"])
def _moe_down_kernel(
    h_ptr,  # [M, I] sorted order
    order_ptr,  # [M] int64
    offsets_ptr,  # [E + 1] int32
    weights_ptr,  # [M] routing weight of each pair (pair order), activation dtype
    w_ptr,  # FP4: uint8 [E, H, I/2]; plain: [E, H, I]
    s_ptr,  # FP4: uint8 [E, H, I/32]; plain: unused
    out_ptr,  # [M, H] out, pair order: the weighted output of each (token, pick)
    num_experts, H, I, max_tiles,
    stride_we, stride_wn, stride_se, stride_sn,
    W_FP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PLANES: tl.constexpr, PREFETCH: tl.constexpr, DECODE: tl.constexpr, BLOCK_E: tl.constexpr,
    TILED: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 32 == 0)
    pid_m, pid_n = _tile_ids(max_tiles, H, BLOCK_N, GROUP_M)
    expert, row_start, row_end = _tile_of(offsets_ptr, num_experts, pid_m, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    pairs = tl.load(order_ptr + rows, mask=row_ok, other=0)  # [BLOCK_M] int64
    h_rows = h_ptr + rows.to(tl.int64) * I
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    s_e = s_ptr + expert.to(tl.int64) * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W_FP4:
        acc = _fp4_gemm(acc, h_rows, row_ok, w_e, s_e, cols, col_ok, stride_wn, stride_sn, I, BLOCK_K, PLANES,
                        PREFETCH, DECODE, TILED)
    else:
        for k0 in range(0, I, BLOCK_K):
            acc = _mma(acc, _load_a(h_rows, row_ok, k0, I, BLOCK_K, 1), _load_w(w_e, cols, col_ok, stride_wn, k0, I,
                                                                                 BLOCK_K))
    dt = out_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)  # [BLOCK_M]
    y = acc.to(dt).to(tl.float32) * weight[:, None]  # rounded projection x weight, rounded on store
    tl.store(out_ptr + pairs[:, None] * H + cols[None, :], y.to(dt), mask=row_ok[:, None] & col_ok[None, :])


def max_row_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    # sum_e ceil(c_e / B) <= M / B + (experts with rows), and at most min(E, M) experts have rows.
    return triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


def config(t: torch.Tensor, table: dict[str, dict[str, dict]], form: str) -> dict:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return table[target_of(t)][form]


def _check_weight(name: str, w: torch.Tensor, scale: torch.Tensor | None, E: int, rows: int, cols: int,
                  tiled: bool = False) -> bool:
    # -> whether the weight is FP4. Raises ValueError naming the tensor on any mismatch.
    if tiled and (rows % 64 or cols % 64):
        raise ValueError(f"{name}: the tiled FP4 layout needs rows and input columns in multiples of 64, "
                         f"got [{rows}, {cols}]")
    if scale is None:
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16) or tuple(w.shape) != (E, rows, cols):
            raise ValueError(f"{name}: plain expert weights must be float [{E}, {rows}, {cols}], "
                             f"got {w.dtype} {tuple(w.shape)}")
        if not w.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        return False
    if cols % FP4_GROUP:
        raise ValueError(f"{name}: FP4 input dim must be a multiple of {FP4_GROUP}, got {cols}")
    if w.dtype != torch.uint8 or tuple(w.shape) != (E, rows, cols // 2):
        raise ValueError(f"{name}: FP4 weights must be uint8 [{E}, {rows}, {cols // 2}], "
                         f"got {w.dtype} {tuple(w.shape)}")
    if scale.dtype != torch.uint8 or tuple(scale.shape) != (E, rows, cols // FP4_GROUP):
        raise ValueError(f"{name}_scale must be uint8 [{E}, {rows}, {cols // FP4_GROUP}], "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if not (w.is_contiguous() and scale.is_contiguous()):
        raise ValueError(f"{name} and {name}_scale must be contiguous")
    return True


def _check_route(order: torch.Tensor, offsets: torch.Tensor, M: int, E: int) -> None:
    if order.dtype != torch.int64 or order.shape != (M,) or not order.is_contiguous():
        raise ValueError(f"order must be contiguous int64 [{M}], got {order.dtype} {tuple(order.shape)}")
    if offsets.dtype != torch.int32 or offsets.shape != (E + 1,) or not offsets.is_contiguous():
        raise ValueError(f"offsets must be contiguous int32 [{E + 1}], got {offsets.dtype} {tuple(offsets.shape)}")


def _launch_options(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in _META and k not in _GU_META}


def moe_gate_up(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, top_k: int, w13: torch.Tensor,
                w13_scale: torch.Tensor | None, limit: float, form: str, cfg: dict | None = None,
                tiled: bool = False) -> torch.Tensor:
    """x [N, H], order [N*k] int64, offsets [E+1] int32 -> h [N*k, I] in sorted order (clamped SwiGLU applied).
    tiled: FP4 weights in the tiled layout (flashport.ops.moe.FP4_TILE)."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float [N, H], got {x.dtype} {tuple(x.shape)}")
    N, H = x.shape
    E, two_i = w13.shape[0], w13.shape[1]
    I = two_i // 2
    fp4 = _check_weight("w13", w13, w13_scale, E, 2 * I, H, tiled)
    M = N * top_k
    _check_route(order, offsets, M, E)
    cfg = cfg or config(x, GATE_UP_CONFIGS, form)
    h = torch.empty(M, I, dtype=x.dtype, device=x.device)
    tiles = max_row_tiles(M, E, cfg["BLOCK_M"])
    scale = w13_scale if fp4 else w13
    grid = (tiles * triton.cdiv(I, cfg["BLOCK_N"]),)
    _moe_gate_up_kernel[grid](
        x, order, offsets, w13, scale, h, E, H, I, top_k, tiles, float(limit),
        w13.stride(0), w13.stride(1), scale.stride(0), scale.stride(1),
        W_FP4=fp4, BLOCK_E=triton.next_power_of_2(E), ONE_LOOP=cfg.get("ONE_LOOP", False),
        TILED=tiled and fp4, **{k: cfg[k] for k in _META}, **_launch_options(cfg))
    return h


def moe_down(h: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, pair_weights: torch.Tensor,
             w2: torch.Tensor, w2_scale: torch.Tensor | None, form: str, cfg: dict | None = None,
             tiled: bool = False) -> torch.Tensor:
    """h [M, I] sorted, pair_weights [M] pair order -> weighted pair outputs [M, H] in pair order."""
    M, I = h.shape
    E, H = w2.shape[0], w2.shape[1]
    fp4 = _check_weight("w2", w2, w2_scale, E, H, I, tiled)
    _check_route(order, offsets, M, E)
    if pair_weights.shape != (M,) or pair_weights.dtype != h.dtype or not h.is_contiguous():
        raise ValueError(f"pair_weights must be {h.dtype} [{M}] and h contiguous, "
                         f"got {pair_weights.dtype} {tuple(pair_weights.shape)}")
    cfg = cfg or config(h, DOWN_CONFIGS, form)
    out = torch.empty(M, H, dtype=h.dtype, device=h.device)
    tiles = max_row_tiles(M, E, cfg["BLOCK_M"])
    scale = w2_scale if fp4 else w2
    grid = (tiles * triton.cdiv(H, cfg["BLOCK_N"]),)
    _moe_down_kernel[grid](
        h, order, offsets, pair_weights, w2, scale, out, E, H, I, tiles,
        w2.stride(0), w2.stride(1), scale.stride(0), scale.stride(1),
        W_FP4=fp4, BLOCK_E=triton.next_power_of_2(E), TILED=tiled and fp4, **{k: cfg[k] for k in _META},
        **_launch_options(cfg))
    return out


def _aot_specs() -> tuple[AotSpec, ...]:
    # V4-Flash: 256 experts, bf16 activations; FP4 weights (the checkpoint) and plain bf16 weights
    # (a dequantized load), both forms.
    specs = []
    common = {"num_experts": "i32", "H": "i32", "I": "i32"}
    strides = {"stride_we": "i32", "stride_wn": "i32", "stride_se": "i32", "stride_sn": "i32"}
    for fp4 in (True, False):
        w = "*u8" if fp4 else "*bf16"
        gate_up = {"x_ptr": "*bf16", "order_ptr": "*i64", "offsets_ptr": "*i32", "w_ptr": w, "s_ptr": w,
                   "h_ptr": "*bf16", **common, "top_k": "i32", "max_tiles": "i32", "limit": "fp32", **strides}
        down = {"h_ptr": "*bf16", "order_ptr": "*i64", "offsets_ptr": "*i32", "weights_ptr": "*bf16", "w_ptr": w,
                "s_ptr": w, "out_ptr": "*bf16", **common, "max_tiles": "i32", **strides}
        for name, fn, sig, table in (("moe_gate_up", _moe_gate_up_kernel, gate_up, GATE_UP_CONFIGS),
                                     ("moe_down", _moe_down_kernel, down, DOWN_CONFIGS)):
            for form in FORMS:
                # TILED: the engine's FP4 layout (flashport.ops.moe.FP4_TILE); plain weights are never tiled.
                def extra(t: str) -> dict:
                    one_loop = {"ONE_LOOP": table[t][form].get("ONE_LOOP", False)} if name == "moe_gate_up" else {}
                    return {**one_loop, "TILED": fp4}

                consts = {t: {"W_FP4": fp4, "BLOCK_E": 256, **{k: table[t][form][k] for k in _META}, **extra(t)}
                          for t in TARGETS}
                opts = {t: _launch_options(table[t][form]) for t in TARGETS}
                const_names = ("W_FP4", *_META, "BLOCK_E", *extra(next(iter(TARGETS))))
                sig_full = {**sig, **{k: "constexpr" for k in const_names}}
                specs.append(AotSpec(f"{name}[{form},{'fp4' if fp4 else 'bf16'}]", fn, sig_full, consts, opts,
                                     uses_dot=True))
    return tuple(specs)


AOT_SPECS: tuple[AotSpec, ...] = _aot_specs()
