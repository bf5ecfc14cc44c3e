"""Dense linears with FP8 block-scaled weights (spec §8.3), weight-only: y = x @ W^T.

W is FP8 E4M3 [G*N, K] (e4m3fn, or e4m3fnuz on gfx942) with raw UE8M0 block exponents S
[ceil(G*N/bo), ceil(K/bi)]: W[i, j] = e4m3(q[i, j]) * 2^(S[i // bo, j // bi] - 127), the block
(bo, bi) derived from the grid as `quant._expand_blocks` does (128 x 128 for every V4-Flash weight).
G > 1 is the grouped (block-diagonal) form: group g multiplies x[:, g] by rows g*N..(g+1)*N of W.

Three kernels, one launcher each:
- `fp8_matmul`: weight tiles are loaded as FP8, converted in registers to x's dtype (exact: every
  E4M3 value is a bf16 / fp16 value) and fed to tl.dot with fp32 accumulation; the tile's block
  scale 2^(s-127) (one per output column within a K tile, as BLOCK_K divides the scale block)
  multiplies the fp32 partial product, exactly. The twin rounds q * 2^(s-127) to x's dtype first,
  which is exact too unless that dtype's range is left (fp16 with extreme scales), so both sum
  the same products. "decode" form (small M): a config per M class (`DecodeClass`: BLOCK_M 16 up
  to M = 16, larger above), the grid split over N and, when N gives too few programs to fill the
  GPU, over K into an fp32 workspace summed by `split_sum`. "prefill" form: 128 x 128 tiles in
  grouped order.
- `fp8_dequant`: the whole weight to x's dtype in a scratch buffer (for the vendor-GEMM path).
- `split_sum`: sums the split-K partials and casts to the output dtype.

The split count depends on the weight's shape, the GPU and the M class only, so a row's result
does not depend on the batch it is in within one M class. The kernels take the weight as raw bytes
and bitcast them by a per-target format constexpr (e4m3fnuz on gfx942), so each AOT spec covers
all four targets; on the CPU e4m3fnuz is decoded arithmetically (the interpreter cannot load it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flashport.kernels.fp8 import e4m3_bits_to_f32
from flashport.kernels.spec import INTERPRET, TARGETS, AotSpec, target_of


@dataclass(frozen=True)
class Launch:
    constexprs: dict[str, int]  # block sizes
    options: dict[str, int]  # num_warps, num_stages; on AMD waves_per_eu, matrix_instr_nonkdim, kpack


@dataclass(frozen=True)
class DecodeClass:
    """The decode form's launch for M up to `max_m` (and above the previous class's max_m)."""
    max_m: int
    launch: Launch
    programs_per_sm: int = 4  # split K until the grid (without M tiles) has this many programs per SM
    split_min_k: int = 512  # ... but keep at least this much K per split
    fused_sum: bool = False  # split K: the last split of a tile sums the partials (no split_sum launch)


@dataclass(frozen=True)
class Fp8LinearConfig:
    decode: tuple[DecodeClass, ...]  # by ascending max_m; M above the last takes the prefill form
    prefill: Launch
    dequant: Launch
    split_sum: Launch
    dequant_above_m: int = 256  # the op dequantizes + vendor GEMM above this M (measured on the GPU)
    num_sms: int = 0  # 0: ask the device (the interpreter entry fixes it so tests exercise split-K)

    def __post_init__(self) -> None:
        if not self.decode or [c.max_m for c in self.decode] != sorted({c.max_m for c in self.decode}):
            raise ValueError(f"decode: classes must be non-empty with strictly ascending max_m, got "
                             f"{[c.max_m for c in self.decode]}")

    @property
    def decode_max_m(self) -> int:
        """M <= this takes the decode form."""
        return self.decode[-1].max_m

    def decode_class(self, m: int) -> DecodeClass:
        """The class of M (the last one for M above every class: a forced decode form)."""
        return next((c for c in self.decode if m <= c.max_m), self.decode[-1])


def _cls(max_m: int, bm: int, bn: int, bk: int, warps: int, stages: int, pps: int, min_k: int,
         f16: bool = False, **extra: int) -> DecodeClass:
    # f16: the F16_DOT constexpr (bf16 x: the dot in fp16, see the kernel)
    return DecodeClass(max_m, Launch(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, F16_DOT=f16),
                                     dict(num_warps=warps, num_stages=stages, **extra)), pps, min_k)


_MFMA = dict(matrix_instr_nonkdim=16, kpack=1)
_SPLIT_SUM = Launch(dict(BLOCK=1024), dict(num_warps=4, num_stages=1))
_DEQUANT = Launch(dict(BLOCK_N=32, BLOCK_K=128), dict(num_warps=4, num_stages=1))

# One table, keyed by target. sm_90: decode classes from `bench_fp8_linear.py --sweep` on the
# H200 (2026-11-29; over the 8 V4-Flash weights, the least total time of one call each): M <= 16
# 16x128x128 tiles, 8 warps, 4 stages, 1 program per SM before K splits; M <= 64 64x64x128, 4
# warps, 3 stages, 2 per SM. Above M = 64 dequant + cuBLAS beat both kernel forms at M = 256 on
# every weight (e.g. wq_b 58 us vs 86 / 108 us), hence dequant_above_m = 64. sm_100, gfx942,
# gfx950: not measured on those devices (sm_100 copies sm_90; AMD keeps 2 stages, the LDS budget
# of gfx942). The interpreter entry uses small tiles, two small decode classes and 4 "SMs" so CPU
# tests cross every path (tails, split-K, classes, both forms).
_SM90_DECODE = (
    _cls(16, 16, 128, 128, warps=8, stages=4, pps=1, min_k=256),
    _cls(64, 64, 64, 128, warps=4, stages=3, pps=2, min_k=256),
)
CONFIGS: dict[str, Fp8LinearConfig] = {
    "sm_90": Fp8LinearConfig(
        decode=_SM90_DECODE,
        prefill=Launch(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), dict(num_warps=8, num_stages=3)),
        dequant=_DEQUANT, split_sum=_SPLIT_SUM, dequant_above_m=64),
    "sm_100": Fp8LinearConfig(
        decode=_SM90_DECODE,
        prefill=Launch(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), dict(num_warps=8, num_stages=3)),
        dequant=_DEQUANT, split_sum=_SPLIT_SUM, dequant_above_m=64),
    **{t: Fp8LinearConfig(
        decode=(_cls(16, 16, 128, 128, warps=8, stages=2, pps=1, min_k=256, waves_per_eu=0, **_MFMA),
                _cls(64, 64, 64, 128, warps=4, stages=2, pps=2, min_k=256, waves_per_eu=0, **_MFMA)),
        prefill=Launch(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                       dict(num_warps=8, num_stages=2, waves_per_eu=2, **_MFMA)),
        dequant=_DEQUANT, split_sum=_SPLIT_SUM, dequant_above_m=64) for t in ("gfx942", "gfx950")},
    INTERPRET: Fp8LinearConfig(
        decode=(_cls(4, 16, 32, 64, warps=4, stages=1, pps=4, min_k=128),
                _cls(16, 16, 64, 64, warps=4, stages=1, pps=2, min_k=128)),
        prefill=Launch(dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=2), dict(num_warps=4, num_stages=1)),
        dequant=Launch(dict(BLOCK_N=32, BLOCK_K=64), dict(num_warps=4, num_stages=1)),
        split_sum=Launch(dict(BLOCK=256), dict(num_warps=4, num_stages=1)),
        dequant_above_m=48, num_sms=4),
}


# ---------------------------------------------------------------- device helpers
@triton.jit
def _pow2(s):
    # UE8M0 byte -> fp32 2^(s - 127), exactly, by building the fp32 bits (exp2 may be approximate).
    # s = 0 is 2^-127, an fp32 subnormal (mantissa bit 22).
    bits = s.to(tl.int32) << 23
    bits = tl.where(s == 0, 0x400000, bits)
    return bits.to(tl.float32, bitcast=True)


# Weight formats (W_FMT). The weight always arrives as raw bytes (*u8) and is bitcast here, so one
# kernel signature serves every target and the format is a per-target constexpr.
FMT_E4M3FN, FMT_E4M3FNUZ, FMT_E4M3FNUZ_SOFT = 0, 1, 2


@triton.jit
def _e4m3_to_f32(q, W_FMT: tl.constexpr):
    # q: uint8 E4M3 bytes -> fp32. FMT_E4M3FNUZ_SOFT decodes the bits arithmetically (exponent
    # bias 8): the interpreter has no float8_e4m3fnuz. Weights are finite, so NaN codes are not
    # special-cased there.
    if W_FMT == 0:  # FMT_E4M3FN (jit code reads only constexpr globals, hence the literals)
        v = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif W_FMT == 1:  # FMT_E4M3FNUZ
        v = q.to(tl.float8e4b8, bitcast=True).to(tl.float32)
    else:
        v = e4m3_bits_to_f32(q, 2)  # kernels/fp8.py format 2 = e4m3fnuz, decoded arithmetically
    return v


@triton.jit
def _e4m3_to_x(q, W_FMT: tl.constexpr, DTYPE: tl.constexpr):
    # uint8 E4M3 bytes -> DTYPE (bf16 / fp16 / fp32), exact. The hardware formats convert directly;
    # the software fnuz decode goes through fp32.
    if W_FMT == 0:
        v = q.to(tl.float8e4nv, bitcast=True).to(DTYPE)
    elif W_FMT == 1:
        v = q.to(tl.float8e4b8, bitcast=True).to(DTYPE)
    else:
        v = _e4m3_to_f32(q, W_FMT).to(DTYPE)
    return v


# ---------------------------------------------------------------- matmul
@triton.jit
def _fp8_matmul_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr, out_ptr, cnt_ptr,  # FUSED_SUM: y = fp32 split partials, out = result
    M, N, K,  # N, K: one group's out / in features
    stride_xm, stride_xg, stride_wn, stride_sn, stride_ym, stride_ysplit,
    block_rows, block_cols,  # the scale block (bo, bi); block_cols % BLOCK_K == 0
    k_per_split,  # a multiple of BLOCK_K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, W_FMT: tl.constexpr,  # EVEN_K: K % BLOCK_K == 0; W_FMT: FMT_*
    F16_DOT: tl.constexpr,  # bf16 x only: run the dot in fp16 (x rows scaled by a power of two)
    FUSED_SUM: tl.constexpr,  # split K: the last split to finish a tile sums the partials into out
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    # Tile order: bands of GROUP_M row tiles sweep all column tiles, so programs running together
    # share weight tiles (decode: all of M is one band) and x rows (prefill) in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * num_n)
    band_rows = tl.minimum(num_m - band * GROUP_M, GROUP_M)
    local = pid - band * GROUP_M * num_n
    pid_m = band * GROUP_M + local % band_rows
    pid_n = local // band_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    # Tails are clamped for the loads (they read valid memory, and the store drops them), so
    # only K needs a load mask.
    rows = g * N + tl.minimum(offs_n, N - 1)  # [BN] weight rows of this group
    x_ptrs = x_ptr + g * stride_xg + tl.minimum(offs_m, M - 1)[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + rows[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]: W^T tile
    s_ptrs = s_ptr + (rows // block_rows) * stride_sn  # [BN] this tile's scale rows

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    if F16_DOT:
        # E4M3 -> fp16 is one hardware convert per two values (-> bf16 takes three), the cost that
        # bounds this kernel. bf16 x goes to fp16 scaled per row by 2^-e, e from the row's max
        # |x| over this program's K range, so that every value keeps its 8 significant bits
        # (fp16 has 11) unless it is below 2^-29 of the row max; 2^e multiplies the result back.
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            a = tl.load(x_ptrs + k0, mask=((k0 + offs_k) < k_end)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
        ex = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2(amax)) for normals
        e = tl.minimum(tl.maximum(ex - 14, -126), 126)  # amax * 2^-e < 2^15
        row_mul = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e
        row_back = ((127 + e) << 23).to(tl.float32, bitcast=True)  # 2^e
    for k0 in range(k_start, k_end, BLOCK_K):
        scale = _pow2(tl.load(s_ptrs + k0 // block_cols))  # [BN]: one scale column per K tile
        DOT_T: tl.constexpr = tl.float16 if F16_DOT else x_ptr.dtype.element_ty
        if EVEN_K:  # every K tile is full (all V4-Flash weights): no masks
            a = tl.load(x_ptrs + k0)  # [BM, BK]
            w = _e4m3_to_x(tl.load(w_ptrs + k0), W_FMT, DOT_T)  # [BK, BN], exact
        else:
            k_ok = (k0 + offs_k) < k_end  # [BK]
            a = tl.load(x_ptrs + k0, mask=k_ok[None, :], other=0.0)
            # Masked-off weight lanes are undefined (maybe NaN codes): zero them after decoding.
            w = _e4m3_to_x(tl.load(w_ptrs + k0, mask=k_ok[:, None]), W_FMT, DOT_T)
            w = tl.where(k_ok[:, None], w, 0.0)
        if F16_DOT:
            a = (a.to(tl.float32) * row_mul[:, None]).to(tl.float16)
        if x_ptr.dtype.element_ty == tl.float32:
            part = tl.dot(a, w, input_precision="ieee")  # no TF32 for fp32 activations
        else:
            part = tl.dot(a, w)  # [BM, BN] fp32, exact products
        acc += part * scale[None, :]  # the block scale: an exact power of two
    if F16_DOT:
        acc = acc * row_back[:, None]

    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tile_off = offs_m[:, None] * stride_ym + (g * N + offs_n)[None, :]
    tl.store(y_ptr + split * stride_ysplit + tile_off, acc.to(y_ptr.dtype.element_ty), mask=ok)
    if FUSED_SUM:
        # Every split counts itself in on the tile's counter (after all its threads stored: the
        # barrier, then a release); the one that arrives last (acquire) adds the partials in split
        # order, as `split_sum` does, and puts the counter back to 0 for the next call.
        tl.debug_barrier()
        cnt = cnt_ptr + g * tl.num_programs(0) + pid
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(1) - 1:
            tot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sp in range(0, tl.num_programs(1)):
                tot += tl.load(y_ptr + sp * stride_ysplit + tile_off, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + tile_off, tot.to(out_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")


@triton.jit
def _split_sum_kernel(ws_ptr, y_ptr, numel, num_splits, BLOCK: tl.constexpr):
    # y[i] = sum_s ws[s, i] in fp32, cast to y's dtype. ws is [num_splits, numel] contiguous.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, num_splits):
        acc += tl.load(ws_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _fp8_dequant_kernel(
    w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on, block_rows, block_cols,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_FMT: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=ok)
    # Any block shape: the scale index is gathered per element (two small index vectors).
    s = tl.load(s_ptr + (offs_n // block_rows)[:, None] * stride_sn + (offs_k // block_cols)[None, :], mask=ok)
    w = _e4m3_to_f32(q, W_FMT) * _pow2(s)  # masked-off lanes are never stored
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launchers
_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_ACT = (torch.float32, torch.float16, torch.bfloat16)


def config_for(t: torch.Tensor) -> Fp8LinearConfig:
    return CONFIGS[target_of(t)]


def scale_block(weight: torch.Tensor, scale: torch.Tensor) -> tuple[int, int]:
    """(bo, bi) as `quant._expand_blocks` derives it: the weight dims over the grid, rounded up."""
    return -(-weight.shape[0] // scale.shape[0]), -(-weight.shape[1] // scale.shape[1])


def _check_weight(weight: torch.Tensor, scale: torch.Tensor) -> None:
    if weight.dtype not in _FP8 or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous 2-D float8 e4m3fn/e4m3fnuz tensor, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if scale.dtype != torch.uint8 or scale.dim() != 2 or not scale.is_contiguous():
        raise ValueError(f"scale must be a contiguous 2-D uint8 tensor (UE8M0 exponents), got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if 0 in scale.shape or 0 in weight.shape:
        raise ValueError(f"empty weight {tuple(weight.shape)} or scale grid {tuple(scale.shape)}")
    if scale.device != weight.device:
        raise ValueError(f"scale is on {scale.device}, weight on {weight.device}")


def _weight_args(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    # The weight's bytes and their format; the interpreter cannot load float8_e4m3fnuz, so on the
    # CPU those bytes are decoded in software.
    if weight.dtype == torch.float8_e4m3fn:
        return weight.view(torch.uint8), FMT_E4M3FN
    soft = weight.device.type == "cpu"
    return weight.view(torch.uint8), FMT_E4M3FNUZ_SOFT if soft else FMT_E4M3FNUZ


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class Plan:
    form: str  # "decode" or "prefill"
    splits: int  # K splits (decode form only; > 1 adds the split_sum launch unless fused_sum)
    k_per_split: int
    launch: Launch
    fused_sum: bool = False


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-tile arrival counters of the fused split-K sum: int32 zeros that every launch leaves at
    zero, shared by the launches of one device (which run in stream order)."""
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = c
    return c


def plan(x: torch.Tensor, weight: torch.Tensor, form: str | None = None,
         config: Fp8LinearConfig | None = None) -> Plan:
    """How `fp8_matmul` runs x [M, G, K] against weight [G*N, K]: the form, launch and split over K."""
    M, G, K = x.shape
    cfg = config if config is not None else config_for(x)
    form = form or ("decode" if M <= cfg.decode_max_m else "prefill")
    if form not in ("decode", "prefill"):
        raise ValueError(f"form must be 'decode' or 'prefill', got {form!r}")
    splits = 1
    fused = False
    if form == "decode":
        cls = cfg.decode_class(M)
        fused = cls.fused_sum
        launch = cls.launch
        c = launch.constexprs
        # When the N tiles (x groups) alone give too few programs to fill the GPU, split K. Counted
        # without the M tiles so the split, hence each row's summation order, does not depend on M
        # within the class.
        n_tiles = triton.cdiv(weight.shape[0] // G, c["BLOCK_N"]) * G
        sms = cfg.num_sms or _device_sms(x.device.index or 0)
        want = cls.programs_per_sm * sms // n_tiles
        splits = max(1, min(want, K // max(cls.split_min_k, c["BLOCK_K"])))
    else:
        launch = cfg.prefill
        c = launch.constexprs
    k_per_split = triton.cdiv(triton.cdiv(K, c["BLOCK_K"]), splits) * c["BLOCK_K"]
    splits = triton.cdiv(K, k_per_split)  # no empty splits
    return Plan(form, splits, k_per_split, launch, fused and splits > 1)


def supports(weight: torch.Tensor, scale: torch.Tensor, form: str, m: int = 1) -> bool:
    """Whether `fp8_matmul` can run this weight at M = m: the column scale block must be a multiple
    of BLOCK_K."""
    cfg = config_for(weight)
    launch = cfg.decode_class(m).launch if form == "decode" else cfg.prefill
    return scale_block(weight, scale)[1] % launch.constexprs["BLOCK_K"] == 0


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, form: str | None = None,
               config: Fp8LinearConfig | None = None) -> torch.Tensor:
    """x [M, G, K] (last dim contiguous) @ blockdiag(W)^T -> y [M, G, N] in x.dtype, W = weight [G*N, K].

    form: "decode" or "prefill"; None picks by M (config `decode_max_m`). config overrides the
    table (benchmark sweeps).
    """
    _check_weight(weight, scale)
    if x.dim() != 3 or x.dtype not in _ACT or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, G, K] fp32/fp16/bf16 with a contiguous last dim, got "
                         f"{x.dtype} {tuple(x.shape)} strides {x.stride()}")
    M, G, K = x.shape
    if weight.shape[1] != K or weight.shape[0] % G:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}: need [G*N, {K}]")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight on {weight.device}")
    N = weight.shape[0] // G
    cfg = config if config is not None else config_for(x)
    p = plan(x, weight, form, cfg)
    c = dict(p.launch.constexprs)
    f16_dot = bool(c.pop("F16_DOT", False)) and x.dtype == torch.bfloat16
    bo, bi = scale_block(weight, scale)
    if bi % c["BLOCK_K"]:
        raise ValueError(f"scale column block {bi} is not a multiple of BLOCK_K={c['BLOCK_K']}; use fp8_dequant")
    y = torch.empty(M, G, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    tiles = triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])
    splits = p.splits
    out = y if splits == 1 else torch.empty(splits, M, G * N, dtype=torch.float32, device=x.device)
    cnt = _counters(x.device, tiles * G if p.fused_sum else 1)
    w, w_fmt = _weight_args(weight)
    _fp8_matmul_kernel[(tiles, splits, G)](
        x, w, scale, out, y, cnt, M, N, K,
        x.stride(0), x.stride(1), K, scale.stride(0), G * N, M * G * N,
        bo, bi, p.k_per_split, EVEN_K=K % c["BLOCK_K"] == 0, W_FMT=w_fmt, F16_DOT=f16_dot,
        FUSED_SUM=p.fused_sum, **c, **p.launch.options)
    if splits > 1 and not p.fused_sum:
        s = cfg.split_sum
        numel = M * G * N
        _split_sum_kernel[(triton.cdiv(numel, s.constexprs["BLOCK"]),)](
            out, y, numel, splits, **s.constexprs, **s.options)
    return y


def fp8_dequant(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 weight [N, K] + uint8 block scales -> [N, K] in dtype (into `out` when given: a scratch buffer)."""
    _check_weight(weight, scale)
    N, K = weight.shape
    if dtype not in _ACT:
        raise ValueError(f"dtype must be fp32/fp16/bf16, got {dtype}")
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=weight.device)
    elif out.shape != (N, K) or out.dtype != dtype or out.stride(-1) != 1 or out.device != weight.device:
        raise ValueError(f"out must be [{N}, {K}] {dtype} on {weight.device} with a contiguous last dim, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()} on {out.device}")
    launch = config_for(weight).dequant
    c = launch.constexprs
    bo, bi = scale_block(weight, scale)
    w, w_fmt = _weight_args(weight)
    grid = (triton.cdiv(N, c["BLOCK_N"]), triton.cdiv(K, c["BLOCK_K"]))
    _fp8_dequant_kernel[grid](w, scale, out, N, K, K, scale.stride(0), out.stride(0), bo, bi,
                              W_FMT=w_fmt, **c, **launch.options)
    return out


# ---------------------------------------------------------------- ahead-of-time specs
def _specs() -> tuple[AotSpec, ...]:
    # The FP8 flavour the loader gives each target: e4m3fnuz on gfx942 (MI300X), e4m3fn elsewhere.
    fmt = {t: FMT_E4M3FNUZ if t == "gfx942" else FMT_E4M3FN for t in TARGETS}
    ints = ("M", "N", "K", "stride_xm", "stride_xg", "stride_wn", "stride_sn", "stride_ym", "stride_ysplit",
            "block_rows", "block_cols", "k_per_split")
    mm_sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8", "y_ptr": "*bf16", "out_ptr": "*bf16", "cnt_ptr": "*i32",
              **{a: "i32" for a in ints},
              **{a: "constexpr" for a in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EVEN_K", "W_FMT", "F16_DOT",
                                          "FUSED_SUM")}}
    dq_sig = {"w_ptr": "*u8", "s_ptr": "*u8", "out_ptr": "*bf16",
              **{a: "i32" for a in ("N", "K", "stride_wn", "stride_sn", "stride_on", "block_rows", "block_cols")},
              **{a: "constexpr" for a in ("BLOCK_N", "BLOCK_K", "W_FMT")}}

    def spec(name: str, fn: object, sig: dict[str, str], launch: Callable[[Fp8LinearConfig], Launch] | str,
             extra: Callable[[str], dict], uses_dot: bool = False) -> AotSpec:
        get = (lambda cfg: getattr(cfg, launch)) if isinstance(launch, str) else launch
        return AotSpec(name=name, fn=fn, signature=sig,
                       constexprs={t: {**({"F16_DOT": False, "FUSED_SUM": False} if fn is _fp8_matmul_kernel else {}),
                                       **get(CONFIGS[t]).constexprs, **extra(t)} for t in TARGETS},
                       options={t: dict(get(CONFIGS[t]).options) for t in TARGETS}, uses_dot=uses_dot)

    # One decode spec per M class (every target's table has the same number of classes).
    n_classes = len(CONFIGS["sm_90"].decode)
    if any(len(CONFIGS[t].decode) != n_classes for t in TARGETS):
        raise ValueError("fp8_linear CONFIGS: every target needs the same number of decode classes")
    decode = tuple(
        spec(f"fp8_matmul[decode class {i}]", _fp8_matmul_kernel, mm_sig, lambda cfg, i=i: cfg.decode[i].launch,
             lambda t: dict(EVEN_K=True, W_FMT=fmt[t]), uses_dot=True)
        for i in range(n_classes))
    return decode + (
        spec("fp8_matmul[prefill]", _fp8_matmul_kernel, mm_sig, "prefill", lambda t: dict(EVEN_K=True, W_FMT=fmt[t]),
             uses_dot=True),
        spec("fp8_dequant", _fp8_dequant_kernel, dq_sig, "dequant", lambda t: dict(W_FMT=fmt[t])),
        spec("split_sum", _split_sum_kernel,
             {"ws_ptr": "*fp32", "y_ptr": "*bf16", "numel": "i32", "num_splits": "i32", "BLOCK": "constexpr"},
             "split_sum", lambda t: {}),
    )


AOT_SPECS: tuple[AotSpec, ...] = _specs()
