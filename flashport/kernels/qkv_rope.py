"""RMSNorm + interleaved RoPE on the trailing dims, fused: the q and kv rows of attention (spec §4,
§5.3, §5.11; torch twins: flashport/ops/qkv_rope.py).

One kernel, two forms:
  q  (unweighted, per head):  y = x * r.to(dt)                 r = 1 / sqrt(mean(x_fp32^2) + eps)
  kv (fp32 weight, one head):  y = (w * (x_fp32 * r)).to(dt),  also stored into the window pool rows
then RoPE rotates pairs (2i, 2i+1) of the trailing ROPE dims in fp32 with cos/sin of the row's
token and rounds to dt. A program holds whole rows [BLOCK_R, D] (D = 512 for V4-Flash): it loads a
row once for the sum of squares and the nope dims, and reads the ROPE/2 even and odd elements of
the rope tail again as pairs (a strided re-read of 128 B per row that the L1/L2 serves), so no
register shuffle is needed to pair neighbours.

Rounding to bf16 goes through `round_to` (round-to-nearest-even on the bits), because the
interpreter's fp32->bf16 cast truncates; on the GPU both give the same value. 1/sqrt is correctly
rounded (sqrt_rn, div_rn) as torch computes it on the CPU; torch on CUDA uses the 2-ulp rsqrtf, so
GPU results may differ from torch in the last fp32 bit and then rarely by one bf16 ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashport.kernels.spec import AotSpec, INTERPRET, TRITON_PTR, target_of
from flashport.kernels.rmsnorm import round_to

# target -> elements per program (BLOCK_R rows x D), num_warps, num_stages. enable_fp_fusion=False
# keeps x0*c - x1*s as two rounded products and a difference, as torch computes it.
CONFIGS: dict[str, dict[str, int | bool]] = {
    "sm_90": dict(elems=4096, num_warps=8, num_stages=1, enable_fp_fusion=False),
    "sm_100": dict(elems=4096, num_warps=8, num_stages=1, enable_fp_fusion=False),
    "gfx942": dict(elems=4096, num_warps=8, num_stages=1, enable_fp_fusion=False),
    "gfx950": dict(elems=4096, num_warps=8, num_stages=1, enable_fp_fusion=False),
    INTERPRET: dict(elems=256, num_warps=1, num_stages=1, enable_fp_fusion=False),
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, pool_ptr, rows_ptr, n_rows, eps,
                      HEADS: tl.constexpr, D: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                      HAS_WEIGHT: tl.constexpr, STORE: tl.constexpr):
    # x, out [n_rows, D] with row = token * HEADS + head; cos, sin [tokens, ROPE/2];
    # STORE: pool [R, D] gets row r at rows[r] (>= 0; HEADS == 1).
    dt = out_ptr.dtype.element_ty
    NOPE: tl.constexpr = D - ROPE
    HALF: tl.constexpr = ROPE // 2
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    r_ok = r < n_rows
    tok = (r // HEADS).to(tl.int64)
    base = r.to(tl.int64) * D  # [R]
    f = tl.arange(0, D)  # [D]
    x = tl.load(x_ptr + base[:, None] + f[None, :], mask=r_ok[:, None], other=0.0).to(tl.float32)  # [R, D]
    rstd = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.sqrt_rn(tl.sum(x * x, axis=1) / D + eps))  # [R]
    if HAS_WEIGHT:
        y = round_to(tl.load(w_ptr + f)[None, :] * (x * rstd[:, None]), dt)
    else:
        scale = round_to(rstd, dt)  # rounded before the multiply, as transformers does
        y = round_to(x * scale[:, None], dt)
    nope = r_ok[:, None] & (f < NOPE)[None, :]  # [R, D]
    tl.store(out_ptr + base[:, None] + f[None, :], y.to(dt), mask=nope)
    if STORE:
        prow = tl.load(rows_ptr + r, mask=r_ok, other=-1)  # [R] int64
        p_ok = r_ok & (prow >= 0)
        pbase = prow * D
        tl.store(pool_ptr + pbase[:, None] + f[None, :], y.to(dt), mask=p_ok[:, None] & (f < NOPE)[None, :])

    # The rope tail as pairs: the same rows' elements NOPE + 2k and NOPE + 2k + 1.
    k = tl.arange(0, HALF)  # [H2]
    e = NOPE + 2 * k
    ev = base[:, None] + e[None, :]  # [R, H2]
    x0 = tl.load(x_ptr + ev, mask=r_ok[:, None], other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + ev + 1, mask=r_ok[:, None], other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        y0 = round_to(tl.load(w_ptr + e)[None, :] * (x0 * rstd[:, None]), dt)
        y1 = round_to(tl.load(w_ptr + e + 1)[None, :] * (x1 * rstd[:, None]), dt)
    else:
        y0 = round_to(x0 * scale[:, None], dt)
        y1 = round_to(x1 * scale[:, None], dt)
    cs = tok[:, None] * HALF + k[None, :]
    c = tl.load(cos_ptr + cs, mask=r_ok[:, None], other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + cs, mask=r_ok[:, None], other=0.0).to(tl.float32)
    z0 = round_to(y0 * c - y1 * s, dt).to(dt)
    z1 = round_to(y1 * c + y0 * s, dt).to(dt)
    tl.store(out_ptr + ev, z0, mask=r_ok[:, None])
    tl.store(out_ptr + ev + 1, z1, mask=r_ok[:, None])
    if STORE:
        pv = pbase[:, None] + e[None, :]
        tl.store(pool_ptr + pv, z0, mask=p_ok[:, None])
        tl.store(pool_ptr + pv + 1, z1, mask=p_ok[:, None])


def _block_r(D: int, target: str) -> int:
    return max(1, int(CONFIGS[target]["elems"]) // D)


def _options(target: str) -> dict[str, int | bool]:
    return {k: v for k, v in CONFIGS[target].items() if k != "elems"}


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous() or t.device != device:
        raise ValueError(f"norm_rope: {name} must be contiguous {dtype} {list(shape)} on {device}, "
                         f"got {t.dtype} {list(t.shape)} on {t.device} (contiguous={t.is_contiguous()})")


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float,
              pool: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, H, D] -> [N, H, D]: RMSNorm (weighted with weight [D] fp32, else unweighted) then RoPE
    with cos/sin [N, rope/2]. With pool [R, D] and rows [N] int64 (H == 1): also pool[rows[n]] = out[n]
    for rows[n] >= 0."""
    if x.dim() != 3 or x.dtype not in DTYPES or not x.is_contiguous():
        raise ValueError(f"norm_rope: x must be contiguous bf16/fp16/fp32 [N, H, D], got {x.dtype} "
                         f"{list(x.shape)} (contiguous={x.is_contiguous()})")
    N, H, D = x.shape
    if cos.dim() != 2 or cos.shape[0] != N:
        raise ValueError(f"norm_rope: cos must be [{N}, rope/2], got {list(cos.shape)}")
    rope = 2 * cos.shape[1]
    if D & (D - 1) or rope & (rope - 1) or not 2 <= rope <= D:
        raise ValueError(f"norm_rope: D {D} and rope dims {rope} must be powers of two with rope <= D")
    _check("cos", cos, (N, rope // 2), x.dtype, x.device)
    _check("sin", sin, (N, rope // 2), x.dtype, x.device)
    if weight is not None:
        _check("weight", weight, (D,), torch.float32, x.device)
    if (pool is None) != (rows is None):
        raise ValueError("norm_rope: pass both pool and rows, or neither")
    if pool is not None:
        if H != 1:
            raise ValueError(f"norm_rope: storing into a pool needs one head per token, got H={H}")
        if pool.dim() != 2:
            raise ValueError(f"norm_rope: pool must be [R, {D}], got {list(pool.shape)}")
        _check("pool", pool, (pool.shape[0], D), x.dtype, x.device)
        _check("rows", rows, (N,), torch.int64, x.device)
    out = torch.empty_like(x)
    if N * H == 0:
        return out
    target = target_of(x)
    block_r = _block_r(D, target)
    grid = (triton.cdiv(N * H, block_r),)
    _norm_rope_kernel[grid](x, weight if weight is not None else cos, cos, sin, out,
                            pool if pool is not None else out, rows if rows is not None else cos,
                            N * H, eps, HEADS=H, D=D, ROPE=rope, BLOCK_R=block_r,
                            HAS_WEIGHT=weight is not None, STORE=pool is not None, **_options(target))
    return out


def _spec(name: str, dtype: torch.dtype, heads: int, D: int, rope: int, weighted: bool, store: bool) -> AotSpec:
    p = TRITON_PTR[dtype]
    targets = [t for t in CONFIGS if t != INTERPRET]
    return AotSpec(
        name=name, fn=_norm_rope_kernel,
        signature=dict(x_ptr=p, w_ptr="*fp32" if weighted else p, cos_ptr=p, sin_ptr=p, out_ptr=p,
                       pool_ptr=p, rows_ptr="*i64" if store else p, n_rows="i32", eps="fp32",
                       HEADS="constexpr", D="constexpr", ROPE="constexpr", BLOCK_R="constexpr",
                       HAS_WEIGHT="constexpr", STORE="constexpr"),
        constexprs={t: dict(HEADS=heads, D=D, ROPE=rope, BLOCK_R=_block_r(D, t), HAS_WEIGHT=weighted, STORE=store)
                    for t in targets},
        options={t: _options(t) for t in targets},
    )


# What the model launches (V4-Flash: 64 heads x 512, rope 64): the per-head q norm and the kv
# norm that also writes the window ring; bf16 serving, fp32 for an fp32 model on the GPU.
AOT_SPECS: tuple[AotSpec, ...] = tuple(
    spec
    for dt in (torch.bfloat16, torch.float32)
    for spec in (
        _spec(f"norm_rope[q,H=64,D=512,{str(dt).removeprefix('torch.')}]", dt, 64, 512, 64, False, False),
        _spec(f"norm_rope[kv,D=512,{str(dt).removeprefix('torch.')}]", dt, 1, 512, 64, True, True),
    )
)
