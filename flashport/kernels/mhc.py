"""mHC pre / post and the hc head as memory-bound kernels (spec §5.2, §5.9; twin: flashport/ops/mhc.py).

X is [N, hc=4, hidden] in the model dtype; K = hc * hidden (16384) is one token's flattened row.

pre (and the head) is two launches:
  1. `_mhc_mix_kernel`, grid (token blocks, SPLIT): per token block and K slice, the partial mixes
     X[:, slice] @ F[:, slice]^T [BLOCK_N, MP] and the partial sum of squares. The RMS scale factors
     out of the mixes (F . (x r) = r (F . x), spec §5.2), so one pass over X gives both. The K split
     keeps every SM busy at decode sizes (64 tokens); F (1.5 MB) stays in L2.
  2. `_mhc_pre_kernel`, grid (token blocks, hidden blocks): sums the partials, r = 1/sqrt(mean + eps),
     sigmoid / softmax / Sinkhorn on the 24 mixes (recomputed by each hidden block of a token:
     a few hundred flops), then u = sum_k pre_k X[k] from a second read of X.
  BLOCK_N, BLOCK_K and SPLIT are fixed per target, never per batch, so a token's result does not
  depend on the other tokens of the call (decode and prefill agree bit for bit).
post is one launch, `_mhc_post_kernel`, grid (token blocks, hidden blocks).

Mix precision. For bf16 X the dot runs on the matrix units without losing fp32 accuracy: x is
exact in bf16 and F = F1 + F2 + F3 splits exactly into three bf16 parts (8 + 8 + 8 significant
bits), so x . F = x . F1 + x . F2 + x . F3 with exact products and fp32 accumulation. fp16 / fp32 X
use one fp32 "ieee" dot. The interpreter's bf16 dot is wrong, so there (DOT_BF16=False) the same
split runs as fp32 dots of the same bf16-exact values.

Rounding follows the model (spec §5.11): mixes, Sinkhorn and the collapse in fp32, u rounded once;
post rounds post and comb to the model dtype, then post*y and C^T X are each rounded and their sum
rounded again, as torch's bf16 ops do; C^T X is a j-ordered chain of fused multiply-adds, which is
what torch's matmul computes on the CPU (MKL): post matches the CPU twin bit for bit in fp32 and
bf16. cuBLAS may order its 4-term sums differently: then fp32 differs in the last bit and bf16 by
at most one ulp, rarely. Divisions are IEEE (div_rn) as in torch; enable_fp_fusion=False keeps the
other products and sums separately rounded, as torch's separate kernels do. pre's mixes are a
different fp32 summation than torch's GEMM (last-bit differences in fp32; u in bf16 within one ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashport.kernels.rmsnorm import round_to
from flashport.kernels.spec import AotSpec, INTERPRET, TRITON_PTR, target_of

HC = 4  # streams; the kernels are written for 4 (V4-Flash hc_mult)

# mix: BLOCK_N tokens x BLOCK_K of the row per step, SPLIT K slices. F is re-read from L2 once per
# token block (1.5 MB / BLOCK_N tokens: 0.75x the X bytes at BLOCK_N = 64), the partials cost
# SPLIT * 24 * 4 B a token (3 KB next to its 32 KB of X, written and read once); SPLIT = 32 gives
# 32 programs at 64 tokens (decode). pre/post: BLOCK_T tokens x BLOCK_H of hidden per program.
MIX_CONFIGS: dict[str, dict[str, int | bool]] = {
    "sm_90": dict(BLOCK_N=64, BLOCK_K=128, SPLIT=32, num_warps=4, num_stages=3, enable_fp_fusion=False),
    "sm_100": dict(BLOCK_N=64, BLOCK_K=128, SPLIT=32, num_warps=4, num_stages=3, enable_fp_fusion=False),
    "gfx942": dict(BLOCK_N=64, BLOCK_K=64, SPLIT=32, num_warps=4, num_stages=2, enable_fp_fusion=False),
    "gfx950": dict(BLOCK_N=64, BLOCK_K=64, SPLIT=32, num_warps=4, num_stages=2, enable_fp_fusion=False),
    INTERPRET: dict(BLOCK_N=16, BLOCK_K=64, SPLIT=4, num_warps=1, num_stages=1, enable_fp_fusion=False),
}
ROW_CONFIGS: dict[str, dict[str, int | bool]] = {
    "sm_90": dict(BLOCK_T=4, BLOCK_H=512, num_warps=4, num_stages=1, enable_fp_fusion=False),
    "sm_100": dict(BLOCK_T=4, BLOCK_H=512, num_warps=4, num_stages=1, enable_fp_fusion=False),
    "gfx942": dict(BLOCK_T=4, BLOCK_H=512, num_warps=4, num_stages=1, enable_fp_fusion=False),
    "gfx950": dict(BLOCK_T=4, BLOCK_H=512, num_warps=4, num_stages=1, enable_fp_fusion=False),
    # the interpreter pays per program, not per element: many tokens a program
    INTERPRET: dict(BLOCK_T=16, BLOCK_H=256, num_warps=1, num_stages=1, enable_fp_fusion=False),
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _trunc_bf16(x):
    """fp32 -> its leading 8 significant bits (a bf16 value, as fp32); x - result is exact."""
    return ((x.to(tl.uint32, bitcast=True) >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _mhc_mix_kernel(x_ptr, f_ptr, part_ptr, sq_ptr, n_tok,
                    K: tl.constexpr, KC: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, F_SPLIT: tl.constexpr, DOT_BF16: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_mask = rows < n_tok
    m = tl.arange(0, MP)  # [MP]
    acc = tl.zeros([BLOCK_N, MP], dtype=tl.float32)
    sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_s * KC, (pid_s + 1) * KC, BLOCK_K):  # this program's K slice
        kk = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_mask = kk < K
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + kk[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BN, BK]
        xf = x.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
        f = tl.load(f_ptr + m[None, :] * K + kk[:, None], mask=(m < M)[None, :] & k_mask[:, None],
                    other=0.0)  # [BK, MP] = F^T slice, fp32
        if F_SPLIT:
            f1 = _trunc_bf16(f)
            rest = f - f1
            f2 = _trunc_bf16(rest)
            f3 = rest - f2  # <= 8 significant bits: exact in bf16
            if DOT_BF16:
                acc = tl.dot(x, f1.to(tl.bfloat16), acc)
                acc = tl.dot(x, f2.to(tl.bfloat16), acc)
                acc = tl.dot(x, f3.to(tl.bfloat16), acc)
            else:
                acc = tl.dot(xf, f1, acc, input_precision="ieee")
                acc = tl.dot(xf, f2, acc, input_precision="ieee")
                acc = tl.dot(xf, f3, acc, input_precision="ieee")
        else:
            acc = tl.dot(xf, f, acc, input_precision="ieee")
    part = part_ptr + (pid_s * n_tok + rows.to(tl.int64))[:, None] * MP + m[None, :]
    tl.store(part, acc, mask=row_mask[:, None] & (m < M)[None, :])  # pad columns are never read
    tl.store(sq_ptr + pid_s * n_tok + rows, sq, mask=row_mask)


@triton.jit
def _sigmoid(x):
    return tl.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + tl.exp(-x))


@triton.jit
def _mixes(part_ptr, toks, tok_mask, n_tok, COL0: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr,
           MP: tl.constexpr):
    """Mix columns COL0 .. COL0+W-1 of tokens `toks` [BT], the K-slice partials summed: [BT, W]."""
    s = tl.arange(0, SPLIT)[:, None, None]
    offs = (s * n_tok + toks[None, :, None]) * MP + COL0 + tl.arange(0, W)[None, None, :]  # [SPLIT, BT, W]
    return tl.sum(tl.load(part_ptr + offs, mask=tok_mask[None, :, None], other=0.0), axis=0)


@triton.jit
def _mhc_pre_kernel(x_ptr, part_ptr, sq_ptr, base_ptr, scale_ptr, u_ptr, post_ptr, comb_ptr,
                    n_tok, hc_eps, norm_eps, sinkhorn_iters,
                    HIDDEN: tl.constexpr, SPLIT: tl.constexpr, MP: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_H: tl.constexpr, HEAD: tl.constexpr):
    pid_t, pid_h = tl.program_id(0), tl.program_id(1)
    K: tl.constexpr = 4 * HIDDEN
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    tok_mask = toks < n_tok
    sq = tl.sum(tl.load(sq_ptr + tl.arange(0, SPLIT)[:, None] * n_tok + toks[None, :],
                        mask=tok_mask[None, :], other=0.0), axis=0)  # [BT]
    # the RMS scale of the flattened row; div_rn: Triton's "/" is the approximate fp32 division
    one = tl.full([BLOCK_T], 1.0, tl.float32)
    r = tl.div_rn(one, tl.sqrt_rn(tl.div_rn(sq, one * K) + norm_eps))[:, None]  # [BT, 1]
    i4 = tl.arange(0, 4)
    pre = _mixes(part_ptr, toks, tok_mask, n_tok, 0, 4, SPLIT, MP) * r  # [BT, 4]
    pre = _sigmoid(pre * tl.load(scale_ptr) + tl.load(base_ptr + i4)[None, :]) + hc_eps
    if not HEAD:
        if pid_h == 0:  # post and comb are per token: one hidden block stores them
            post = _mixes(part_ptr, toks, tok_mask, n_tok, 4, 4, SPLIT, MP) * r
            post = 2.0 * _sigmoid(post * tl.load(scale_ptr + 1) + tl.load(base_ptr + 4 + i4)[None, :])
            tl.store(post_ptr + toks[:, None] * 4 + i4[None, :], post, mask=tok_mask[:, None])
            ij = 4 * i4[:, None] + i4[None, :]  # [4, 4] row-major (i, j)
            c = tl.reshape(_mixes(part_ptr, toks, tok_mask, n_tok, 8, 16, SPLIT, MP), [BLOCK_T, 4, 4])
            c = c * r[:, :, None] * tl.load(scale_ptr + 2) + tl.load(base_ptr + 8 + ij)[None, :, :]
            e = tl.exp(c - tl.max(c, axis=2)[:, :, None])  # softmax over j
            c = tl.div_rn(e, tl.broadcast_to(tl.sum(e, axis=2)[:, :, None], [BLOCK_T, 4, 4])) + hc_eps
            c = tl.div_rn(c, tl.broadcast_to(tl.sum(c, axis=1)[:, None, :] + hc_eps, [BLOCK_T, 4, 4]))
            for _ in range(sinkhorn_iters - 1):  # alternate row (sum over j) and column normalisation
                c = tl.div_rn(c, tl.broadcast_to(tl.sum(c, axis=2)[:, :, None] + hc_eps, [BLOCK_T, 4, 4]))
                c = tl.div_rn(c, tl.broadcast_to(tl.sum(c, axis=1)[:, None, :] + hc_eps, [BLOCK_T, 4, 4]))
            tl.store(comb_ptr + toks[:, None, None] * 16 + ij[None, :, :], c, mask=tok_mask[:, None, None])
    # u = sum_k pre_k X[k], k in order, products and sums separately rounded (as torch's mul + sum)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    mask = tok_mask[:, None] & (h < HIDDEN)[None, :]  # [BT, BH]
    x_rows = x_ptr + toks.to(tl.int64)[:, None] * K + h[None, :]
    u = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(4):
        pre_k = tl.sum(tl.where(i4[None, :] == k, pre, 0.0), axis=1)  # [BT]
        u += pre_k[:, None] * tl.load(x_rows + k * HIDDEN, mask=mask, other=0.0).to(tl.float32)
    u_ty = u_ptr.dtype.element_ty
    tl.store(u_ptr + toks.to(tl.int64)[:, None] * HIDDEN + h[None, :], round_to(u, u_ty).to(u_ty), mask=mask)


@triton.jit
def _mhc_post_kernel(x_ptr, y_ptr, post_ptr, comb_ptr, out_ptr, n_tok,
                     HIDDEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, FMA64: tl.constexpr):
    pid_t, pid_h = tl.program_id(0), tl.program_id(1)
    ty = out_ptr.dtype.element_ty
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    tok_mask = toks < n_tok
    i4 = tl.arange(0, 4)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    mask = tok_mask[:, None] & (h < HIDDEN)[None, :]  # [BT, BH]
    p = round_to(tl.load(post_ptr + toks[:, None] * 4 + i4[None, :], mask=tok_mask[:, None], other=0.0),
                 ty)  # [BT, 4] post_k in the model dtype
    y = tl.load(y_ptr + toks.to(tl.int64)[:, None] * HIDDEN + h[None, :], mask=mask, other=0.0).to(tl.float32)
    x_rows = x_ptr + toks.to(tl.int64)[:, None] * (4 * HIDDEN) + h[None, :]  # [BT, BH] stream 0
    mix = tl.zeros([BLOCK_T, 4, BLOCK_H], dtype=tl.float32)  # [BT, k, BH] = sum_j comb[j, k] X[j]
    for j in tl.static_range(4):
        c_j = tl.load(comb_ptr + toks[:, None] * 16 + j * 4 + i4[None, :], mask=tok_mask[:, None], other=0.0)
        c_j = round_to(c_j, ty)[:, :, None]  # [BT, 4, 1] = comb[j, :]
        x_j = tl.load(x_rows + j * HIDDEN, mask=mask, other=0.0).to(tl.float32)[:, None, :]  # [BT, 1, BH]
        # a chain of fused multiply-adds in j order: what torch's matmul computes (MKL on the CPU)
        if FMA64:  # the interpreter's tl.fma rounds twice; fp64 holds the fp32 product exactly
            mix = (c_j.to(tl.float64) * x_j.to(tl.float64) + mix.to(tl.float64)).to(tl.float32)
        else:
            mix = tl.fma(c_j, x_j, mix)
    out = round_to(round_to(p[:, :, None] * y[:, None, :], ty) + round_to(mix, ty), ty)  # [BT, 4, BH]
    offs = toks.to(tl.int64)[:, None, None] * (4 * HIDDEN) + i4[None, :, None] * HIDDEN + h[None, None, :]
    tl.store(out_ptr + offs, out.to(ty), mask=mask[:, None, :])


def _check_x(x: torch.Tensor) -> None:
    if x.dtype not in DTYPES:
        raise ValueError(f"mhc: x must be bf16, fp16 or fp32, got {x.dtype}")
    if x.dim() != 3 or x.shape[1] != HC or not x.is_contiguous():
        raise ValueError(f"mhc: x must be contiguous [N, {HC}, hidden], got {tuple(x.shape)}")


def _check_fp32(t: torch.Tensor, name: str, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if t.dtype != torch.float32 or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"mhc: {name} must be contiguous fp32 {list(shape)}, got {t.dtype} {list(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"mhc: {name} is on {t.device}, x on {like.device}")


def _mix_constexprs(target: str, dtype: torch.dtype, K: int, M: int) -> dict[str, int | bool]:
    c = MIX_CONFIGS[target]
    block_k, split = int(c["BLOCK_K"]), int(c["SPLIT"])
    split_f = dtype == torch.bfloat16  # x exact in bf16: the 3-part bf16 split of F is exact
    return dict(K=K, KC=triton.cdiv(triton.cdiv(K, split), block_k) * block_k, M=M,
                MP=max(16, triton.next_power_of_2(M)), BLOCK_N=int(c["BLOCK_N"]), BLOCK_K=block_k,
                F_SPLIT=split_f, DOT_BF16=split_f and target != INTERPRET)


def _options(table: dict[str, dict[str, int | bool]], target: str) -> dict[str, int | bool]:
    return {k: v for k, v in table[target].items() if k in ("num_warps", "num_stages", "enable_fp_fusion")}


def _pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
         norm_eps: float, sinkhorn_iters: int, head: bool
         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    _check_x(x)
    N, _, H = x.shape
    M = HC if head else (2 + HC) * HC
    _check_fp32(fn, "fn", (M, HC * H), x)
    _check_fp32(base, "base", (M,), x)
    _check_fp32(scale, "scale", (1 if head else 3,), x)
    target = target_of(x)
    mc = _mix_constexprs(target, x.dtype, HC * H, M)
    split = int(MIX_CONFIGS[target]["SPLIT"])
    part = torch.empty(split, N, mc["MP"], dtype=torch.float32, device=x.device)  # [SPLIT, N, MP]
    sq = torch.empty(split, N, dtype=torch.float32, device=x.device)  # [SPLIT, N]
    u = torch.empty(N, H, dtype=x.dtype, device=x.device)
    post = None if head else torch.empty(N, HC, dtype=torch.float32, device=x.device)
    comb = None if head else torch.empty(N, HC, HC, dtype=torch.float32, device=x.device)
    if N == 0:
        return u, post, comb
    _mhc_mix_kernel[(triton.cdiv(N, mc["BLOCK_N"]), split)](
        x, fn, part, sq, N, **mc, **_options(MIX_CONFIGS, target))
    block_t, block_h = int(ROW_CONFIGS[target]["BLOCK_T"]), int(ROW_CONFIGS[target]["BLOCK_H"])
    _mhc_pre_kernel[(triton.cdiv(N, block_t), triton.cdiv(H, block_h))](
        x, part, sq, base, scale, u, part if head else post, part if head else comb,
        N, hc_eps, norm_eps, sinkhorn_iters, HIDDEN=H, SPLIT=split, MP=mc["MP"], BLOCK_T=block_t,
        BLOCK_H=block_h, HEAD=head, **_options(ROW_CONFIGS, target))
    return u, post, comb


def mhc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
            norm_eps: float, sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, 4, hidden]; fn [24, 4*hidden], base [24], scale [3] fp32
    -> u [N, hidden] x.dtype, post [N, 4] fp32, comb [N, 4, 4] fp32."""
    if sinkhorn_iters < 1:
        raise ValueError(f"mhc: sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
    u, post, comb = _pre(x, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters, head=False)
    assert post is not None and comb is not None
    return u, post, comb


def mhc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
             norm_eps: float) -> torch.Tensor:
    """x [N, 4, hidden]; fn [4, 4*hidden], base [4], scale [1] fp32 -> [N, hidden] x.dtype."""
    return _pre(x, fn, base, scale, hc_eps, norm_eps, 1, head=True)[0]


def mhc_post(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """X'[k] = post_k * y + sum_j comb[j, k] X[j]: x [N, 4, hidden], y [N, hidden] (x.dtype),
    post [N, 4] and comb [N, 4, 4] fp32 -> [N, 4, hidden]. `out` may be x itself (each program
    reads its X block before writing it)."""
    _check_x(x)
    N, _, H = x.shape
    if y.dtype != x.dtype or tuple(y.shape) != (N, H) or not y.is_contiguous() or y.device != x.device:
        raise ValueError(f"mhc: y must be contiguous {x.dtype} [{N}, {H}] on {x.device}, "
                         f"got {y.dtype} {list(y.shape)} on {y.device}")
    _check_fp32(post, "post", (N, HC), x)
    _check_fp32(comb, "comb", (N, HC, HC), x)
    if out is None:
        out = torch.empty_like(x)
    elif out.dtype != x.dtype or out.shape != x.shape or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"mhc: out must be contiguous {x.dtype} {list(x.shape)}, got {out.dtype} {list(out.shape)}")
    if N == 0:
        return out
    target = target_of(x)
    block_t, block_h = int(ROW_CONFIGS[target]["BLOCK_T"]), int(ROW_CONFIGS[target]["BLOCK_H"])
    _mhc_post_kernel[(triton.cdiv(N, block_t), triton.cdiv(H, block_h))](
        x, y, post, comb, out, N, HIDDEN=H, BLOCK_T=block_t, BLOCK_H=block_h, FMA64=target == INTERPRET,
        **_options(ROW_CONFIGS, target))
    return out


# ---------------------------------------------------------------- ahead-of-time specs (hidden 4096)
_HIDDEN = 4096
_GPU_TARGETS = tuple(t for t in MIX_CONFIGS if t != INTERPRET)


def _specs(dtype: torch.dtype) -> tuple[AotSpec, ...]:
    p, dt = TRITON_PTR[dtype], str(dtype).removeprefix("torch.")
    specs = []
    for head in (False, True):
        form = "head" if head else "pre"
        M = HC if head else (2 + HC) * HC
        mix = {t: _mix_constexprs(t, dtype, HC * _HIDDEN, M) for t in _GPU_TARGETS}
        specs.append(AotSpec(
            name=f"mhc_mix[{form},{dt}]", fn=_mhc_mix_kernel,
            signature=dict(x_ptr=p, f_ptr="*fp32", part_ptr="*fp32", sq_ptr="*fp32", n_tok="i32",
                           **{k: "constexpr" for k in mix["sm_90"]}),
            constexprs=mix, options={t: _options(MIX_CONFIGS, t) for t in _GPU_TARGETS},
            uses_dot=dtype == torch.bfloat16))  # fp32 "ieee" dots are FMA on NVIDIA
        specs.append(AotSpec(
            name=f"mhc_{form}[{dt}]", fn=_mhc_pre_kernel,
            signature=dict(x_ptr=p, part_ptr="*fp32", sq_ptr="*fp32", base_ptr="*fp32", scale_ptr="*fp32",
                           u_ptr=p, post_ptr="*fp32", comb_ptr="*fp32", n_tok="i32", hc_eps="fp32",
                           norm_eps="fp32", sinkhorn_iters="i32", HIDDEN="constexpr", SPLIT="constexpr",
                           MP="constexpr", BLOCK_T="constexpr", BLOCK_H="constexpr", HEAD="constexpr"),
            constexprs={t: dict(HIDDEN=_HIDDEN, SPLIT=int(MIX_CONFIGS[t]["SPLIT"]), MP=mix[t]["MP"],
                                BLOCK_T=int(ROW_CONFIGS[t]["BLOCK_T"]), BLOCK_H=int(ROW_CONFIGS[t]["BLOCK_H"]),
                                HEAD=head) for t in _GPU_TARGETS},
            options={t: _options(ROW_CONFIGS, t) for t in _GPU_TARGETS}))
    specs.append(AotSpec(
        name=f"mhc_post[{dt}]", fn=_mhc_post_kernel,
        signature=dict(x_ptr=p, y_ptr=p, post_ptr="*fp32", comb_ptr="*fp32", out_ptr=p, n_tok="i32",
                       HIDDEN="constexpr", BLOCK_T="constexpr", BLOCK_H="constexpr", FMA64="constexpr"),
        constexprs={t: dict(HIDDEN=_HIDDEN, BLOCK_T=int(ROW_CONFIGS[t]["BLOCK_T"]),
                            BLOCK_H=int(ROW_CONFIGS[t]["BLOCK_H"]), FMA64=False) for t in _GPU_TARGETS},
        options={t: _options(ROW_CONFIGS, t) for t in _GPU_TARGETS}))
    return tuple(specs)


# bf16 is the serving dtype; fp32 for an fp32 model on the GPU.
AOT_SPECS: tuple[AotSpec, ...] = _specs(torch.bfloat16) + _specs(torch.float32)
