"""Dense linears with FP8 block-scaled weights (spec §8.3), weight-only: y = x @ W^T.

W is FP8 E4M3 [G*N, K] (e4m3fn, or e4m3fnuz on gfx942) with raw UE8M0 block exponents S
[ceil(G*N/bo), ceil(K/bi)]: W[i, j] = e4m3(q[i, j]) * 2^(S[i // bo, j // bi] - 127), the block
(bo, bi) derived from the grid as `quant._expand_blocks` does (128 x 128 for every V4-Flash weight).
G > 1 is the grouped (block-diagonal) form: group g multiplies x[:, g] by rows g*N..(g+1)*N of W.

Three kernels, one launcher each:
- `fp8_matmul`: weight tiles are loaded as FP8, dequantized in registers to x's dtype (exactly
  as the torch twin does: fp32 value * 2^(s-127), rounded once) and fed to tl.dot with fp32
  accumulation. "decode" form (small M): BLOCK_M 16, the grid split over N and, when N gives too
  few programs to fill the GPU, over K into an fp32 workspace summed by `split_sum`. "prefill"
  form: 128 x 128 tiles in grouped order.
- `fp8_dequant`: the whole weight to x's dtype in a scratch buffer (for the vendor-GEMM path).
- `split_sum`: sums the split-K partials and casts to the output dtype.

The split count depends on the weight's shape and the GPU only, never on M, so a row's result
does not depend on the batch it is in (within one form). The kernels take the weight as raw bytes
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

from flashport.kernels.spec import INTERPRET, TARGETS, AotSpec, target_of


@dataclass(frozen=True)
class Launch:
    constexprs: dict[str, int]  # block sizes
    options: dict[str, int]  # num_warps, num_stages; on AMD waves_per_eu, matrix_instr_nonkdim, kpack


@dataclass(frozen=True)
class Fp8LinearConfig:
    decode: Launch
    prefill: Launch
    dequant: Launch
    split_sum: Launch
    decode_max_m: int = 64  # M <= this takes the decode form
    dequant_above_m: int = 256  # the op dequantizes + vendor GEMM above this M (measured on the GPU)
    programs_per_sm: int = 4  # decode form: split K until the grid has this many programs per SM
    split_min_k: int = 512  # ... but keep at least this much K per split
    num_sms: int = 0  # 0: ask the device (the interpreter entry fixes it so tests exercise split-K)


def _nv(decode_warps: int, decode_stages: int, prefill_stages: int) -> Fp8LinearConfig:
    return Fp8LinearConfig(
        decode=Launch(dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
                      dict(num_warps=decode_warps, num_stages=decode_stages)),
        prefill=Launch(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), dict(num_warps=8, num_stages=prefill_stages)),
        dequant=Launch(dict(BLOCK_N=32, BLOCK_K=128), dict(num_warps=4, num_stages=1)),
        split_sum=Launch(dict(BLOCK=1024), dict(num_warps=4, num_stages=1)),
    )


def _amd() -> Fp8LinearConfig:
    mfma = dict(matrix_instr_nonkdim=16, kpack=1)
    return Fp8LinearConfig(
        decode=Launch(dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=8),
                      dict(num_warps=4, num_stages=2, waves_per_eu=0, **mfma)),
        prefill=Launch(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                       dict(num_warps=8, num_stages=2, waves_per_eu=2, **mfma)),
        dequant=Launch(dict(BLOCK_N=32, BLOCK_K=128), dict(num_warps=4, num_stages=1)),
        split_sum=Launch(dict(BLOCK=1024), dict(num_warps=4, num_stages=1)),
    )


# One table, keyed by target. The interpreter entry uses small tiles and a low decode/dequant
# threshold and 4 "SMs" so CPU tests cross every path (tails, split-K, both forms) on small shapes.
CONFIGS: dict[str, Fp8LinearConfig] = {
    "sm_90": _nv(decode_warps=4, decode_stages=4, prefill_stages=3),
    "sm_100": _nv(decode_warps=4, decode_stages=4, prefill_stages=3),
    "gfx942": _amd(),
    "gfx950": _amd(),
    INTERPRET: Fp8LinearConfig(
        decode=Launch(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2), dict(num_warps=4, num_stages=1)),
        prefill=Launch(dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=2), dict(num_warps=4, num_stages=1)),
        dequant=Launch(dict(BLOCK_N=32, BLOCK_K=64), dict(num_warps=4, num_stages=1)),
        split_sum=Launch(dict(BLOCK=256), dict(num_warps=4, num_stages=1)),
        decode_max_m=16, dequant_above_m=48, programs_per_sm=4, split_min_k=128, num_sms=4),
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
        b = q.to(tl.int32)
        e = (b >> 3) & 15
        m = (b & 7).to(tl.float32)
        m = tl.where(e == 0, m, m + 8.0)  # subnormals have no implicit leading one
        # value = m * 2^(max(e, 1) - 8 - 3): a normal fp32 power of two for every code.
        p = ((tl.maximum(e, 1) - 11 + 127) << 23).to(tl.float32, bitcast=True)
        v = tl.where(b >= 128, -(m * p), m * p)
    return v


# ---------------------------------------------------------------- matmul
@triton.jit
def _fp8_matmul_kernel(
    x_ptr, w_ptr, s_ptr, y_ptr,
    M, N, K,  # N, K: one group's out / in features
    stride_xm, stride_xg, stride_wn, stride_sn, stride_ym, stride_ysplit,
    block_rows, block_cols,  # the scale block (bo, bi); block_cols % BLOCK_K == 0
    k_per_split,  # a multiple of BLOCK_K
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, W_FMT: tl.constexpr,  # EVEN_K: K % BLOCK_K == 0; W_FMT: FMT_*
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
    for k0 in range(k_start, k_end, BLOCK_K):
        scale = _pow2(tl.load(s_ptrs + k0 // block_cols))  # [BN]: one scale column per K tile
        if EVEN_K:  # every K tile is full (all V4-Flash weights): no masks
            a = tl.load(x_ptrs + k0)  # [BM, BK]
            # Dequantize as the twin does: fp32 value times an exact power of two, rounded once.
            w = _e4m3_to_f32(tl.load(w_ptrs + k0), W_FMT) * scale[None, :]  # [BK, BN]
        else:
            k_ok = (k0 + offs_k) < k_end  # [BK]
            a = tl.load(x_ptrs + k0, mask=k_ok[None, :], other=0.0)
            # Masked-off weight lanes are undefined (maybe NaN codes): zero them after decoding.
            w = _e4m3_to_f32(tl.load(w_ptrs + k0, mask=k_ok[:, None]), W_FMT) * scale[None, :]
            w = tl.where(k_ok[:, None], w, 0.0)
        w = w.to(x_ptr.dtype.element_ty)
        if x_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(a, w, acc, input_precision="ieee")  # no TF32 for fp32 activations
        else:
            acc = tl.dot(a, w, acc)

    y_ptrs = y_ptr + split * stride_ysplit + offs_m[:, None] * stride_ym + (g * N + offs_n)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


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
    splits: int  # K splits (decode form only; > 1 adds the split_sum launch)
    k_per_split: int


def plan(x: torch.Tensor, weight: torch.Tensor, form: str | None = None) -> Plan:
    """How `fp8_matmul` runs x [M, G, K] against weight [G*N, K]: the form and the split over K."""
    M, G, K = x.shape
    cfg = config_for(x)
    form = form or ("decode" if M <= cfg.decode_max_m else "prefill")
    if form not in ("decode", "prefill"):
        raise ValueError(f"form must be 'decode' or 'prefill', got {form!r}")
    c = getattr(cfg, form).constexprs
    splits = 1
    if form == "decode":
        # When the N tiles (x groups) alone give too few programs to fill the GPU, split K. Counted
        # without the M tiles so the split, hence each row's summation order, does not depend on M.
        n_tiles = triton.cdiv(weight.shape[0] // G, c["BLOCK_N"]) * G
        sms = cfg.num_sms or _device_sms(x.device.index or 0)
        want = cfg.programs_per_sm * sms // n_tiles
        splits = max(1, min(want, K // max(cfg.split_min_k, c["BLOCK_K"])))
    k_per_split = triton.cdiv(triton.cdiv(K, c["BLOCK_K"]), splits) * c["BLOCK_K"]
    return Plan(form, triton.cdiv(K, k_per_split), k_per_split)  # no empty splits


def supports(weight: torch.Tensor, scale: torch.Tensor, form: str) -> bool:
    """Whether `fp8_matmul` can run this weight: the column scale block must be a multiple of BLOCK_K."""
    return scale_block(weight, scale)[1] % getattr(config_for(weight), form).constexprs["BLOCK_K"] == 0


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, form: str | None = None) -> torch.Tensor:
    """x [M, G, K] (last dim contiguous) @ blockdiag(W)^T -> y [M, G, N] in x.dtype, W = weight [G*N, K].

    form: "decode" or "prefill"; None picks by M (config `decode_max_m`).
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
    cfg = config_for(x)
    p = plan(x, weight, form)
    launch: Launch = getattr(cfg, p.form)
    c = launch.constexprs
    bo, bi = scale_block(weight, scale)
    if bi % c["BLOCK_K"]:
        raise ValueError(f"scale column block {bi} is not a multiple of BLOCK_K={c['BLOCK_K']}; use fp8_dequant")
    y = torch.empty(M, G, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    tiles = triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"])
    splits = p.splits
    out = y if splits == 1 else torch.empty(splits, M, G * N, dtype=torch.float32, device=x.device)
    w, w_fmt = _weight_args(weight)
    _fp8_matmul_kernel[(tiles, splits, G)](
        x, w, scale, out, M, N, K,
        x.stride(0), x.stride(1), K, scale.stride(0), G * N, M * G * N,
        bo, bi, p.k_per_split, EVEN_K=K % c["BLOCK_K"] == 0, W_FMT=w_fmt, **c, **launch.options)
    if splits > 1:
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
    mm_sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*u8", "y_ptr": "*bf16", **{a: "i32" for a in ints},
              **{a: "constexpr" for a in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EVEN_K", "W_FMT")}}
    dq_sig = {"w_ptr": "*u8", "s_ptr": "*u8", "out_ptr": "*bf16",
              **{a: "i32" for a in ("N", "K", "stride_wn", "stride_sn", "stride_on", "block_rows", "block_cols")},
              **{a: "constexpr" for a in ("BLOCK_N", "BLOCK_K", "W_FMT")}}

    def spec(name: str, fn: object, sig: dict[str, str], launch: str, extra: Callable[[str], dict],
             uses_dot: bool = False) -> AotSpec:
        return AotSpec(name=name, fn=fn, signature=sig,
                       constexprs={t: {**getattr(CONFIGS[t], launch).constexprs, **extra(t)} for t in TARGETS},
                       options={t: dict(getattr(CONFIGS[t], launch).options) for t in TARGETS}, uses_dot=uses_dot)

    return (
        spec("fp8_matmul[decode]", _fp8_matmul_kernel, mm_sig, "decode", lambda t: dict(EVEN_K=True, W_FMT=fmt[t]),
             uses_dot=True),
        spec("fp8_matmul[prefill]", _fp8_matmul_kernel, mm_sig, "prefill", lambda t: dict(EVEN_K=True, W_FMT=fmt[t]),
             uses_dot=True),
        spec("fp8_dequant", _fp8_dequant_kernel, dq_sig, "dequant", lambda t: dict(W_FMT=fmt[t])),
        spec("split_sum", _split_sum_kernel,
             {"ws_ptr": "*fp32", "y_ptr": "*bf16", "numel": "i32", "num_splits": "i32", "BLOCK": "constexpr"},
             "split_sum", lambda t: {}),
    )


AOT_SPECS: tuple[AotSpec, ...] = _specs()
