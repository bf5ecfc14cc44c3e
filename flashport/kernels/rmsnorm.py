"""RMSNorm over the last dim, fused with the casts of spec §5.11 (torch twin: flashport/ops/rmsnorm.py).

Two forms, one kernel:
  weighted (fp32 weight):  out = (w * (x_fp32 * r)).to(x.dtype)            r = rsqrt(mean(x_fp32^2) + eps)
  unweighted (q_b_norm):   out = x * r.to(x.dtype)   (the scale rounded to x.dtype, the product in x.dtype)
The unweighted product of two x.dtype values is exact in fp32, so "multiply in fp32, round once" is
the x.dtype multiply. Rows are [R, D] with D a model constant (4096, 1024, 512, 128); per-head
inputs [N, H, D] are rows [N*H, D].

Rounding to bf16 goes through `round_to` (round-to-nearest-even on the bits) rather than a cast,
because the interpreter's fp32->bf16 cast truncates; on the GPU both give the same value. The
reciprocal square root is `1 / sqrt` correctly rounded (sqrt_rn, div_rn), as torch computes it on
the CPU; torch on CUDA uses the 2-ulp `rsqrtf`, so GPU results may differ from torch in the last
fp32 bit (and then rarely by one bf16 ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashport.kernels.spec import AotSpec, INTERPRET, TRITON_PTR, target_of

# target -> elements per program (rows x padded D), num_warps, num_stages. A program holds whole
# rows, so D = 4096 is one row per program and D = 128 is 32 rows. enable_fp_fusion=False keeps
# x*x + acc unfused, as torch computes it.
CONFIGS: dict[str, dict[str, int | bool]] = {
    "sm_90": dict(elems=4096, num_warps=8, num_stages=1, enable_fp_fusion=False),
    "sm_100": dict(elems=4096, num_warps=8, num_stages=1, enable_fp_fusion=False),
    "gfx942": dict(elems=4096, num_warps=8, num_stages=1, enable_fp_fusion=False),
    "gfx950": dict(elems=4096, num_warps=8, num_stages=1, enable_fp_fusion=False),
    INTERPRET: dict(elems=8192, num_warps=1, num_stages=1, enable_fp_fusion=False),
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 x -> the nearest DTYPE value (ties to even), still as fp32. NaN payloads not preserved."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, n_rows, eps,
                    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    cols = tl.arange(0, BLOCK_D)  # [BD]
    col_mask = cols < D
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]  # [R, BD]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [R, BD]
    # div_rn / sqrt_rn: correctly rounded, where Triton's "/" is the approximate fp32 division
    mean_sq = tl.div_rn(tl.sum(x * x, axis=1), tl.full([BLOCK_R], D, tl.float32))  # [R]
    r = tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.sqrt_rn(mean_sq + eps))  # [R]
    out_ty = out_ptr.dtype.element_ty
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)  # [BD] fp32
        y = w[None, :] * (x * r[:, None])
    else:
        y = x * round_to(r, out_ty)[:, None]
    tl.store(out_ptr + offs, round_to(y, out_ty).to(out_ty), mask=mask)


def _blocks(D: int, target: str) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, int(CONFIGS[target]["elems"]) // block_d), block_d


def _options(target: str) -> dict[str, int | bool]:
    return {k: v for k, v in CONFIGS[target].items() if k != "elems"}


def rmsnorm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., D] -> [..., D] in x.dtype; weight [D] fp32 (weighted form) or None (unweighted form)."""
    if x.dtype not in DTYPES:
        raise ValueError(f"rmsnorm: x must be bf16, fp16 or fp32, got {x.dtype}")
    if x.dim() < 2 or not x.is_contiguous():
        raise ValueError(f"rmsnorm: x must be contiguous with at least 2 dims, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if weight is not None:
        if weight.dtype != torch.float32 or weight.shape != (D,) or not weight.is_contiguous():
            raise ValueError(f"rmsnorm: weight must be contiguous fp32 [{D}], got {weight.dtype} {tuple(weight.shape)}")
        if weight.device != x.device:
            raise ValueError(f"rmsnorm: weight is on {weight.device}, x on {x.device}")
    target = target_of(x)
    block_r, block_d = _blocks(D, target)
    out = torch.empty_like(x)
    n_rows = x.numel() // D
    if n_rows == 0:
        return out
    grid = (triton.cdiv(n_rows, block_r),)
    _rmsnorm_kernel[grid](x, weight if weight is not None else x, out, n_rows, eps,
                          D=D, BLOCK_R=block_r, BLOCK_D=block_d, HAS_WEIGHT=weight is not None,
                          **_options(target))
    return out


def _spec(name: str, dtype: torch.dtype, D: int, has_weight: bool) -> AotSpec:
    p = TRITON_PTR[dtype]
    constexprs = {}
    for target in CONFIGS:
        if target == INTERPRET:
            continue
        block_r, block_d = _blocks(D, target)
        constexprs[target] = dict(D=D, BLOCK_R=block_r, BLOCK_D=block_d, HAS_WEIGHT=has_weight)
    return AotSpec(
        name=name, fn=_rmsnorm_kernel,
        signature=dict(x_ptr=p, w_ptr="*fp32" if has_weight else p, out_ptr=p, n_rows="i32", eps="fp32",
                       D="constexpr", BLOCK_R="constexpr", BLOCK_D="constexpr", HAS_WEIGHT="constexpr"),
        constexprs=constexprs,
        options={t: _options(t) for t in constexprs},
    )


# What the model launches: weighted norms over hidden (4096: attn/ffn/final norm), q_lora (1024),
# head dim (512: kv_norm, compressor) and indexer head dim (128); the unweighted per-head q norm
# (D = 512). bf16 is the serving dtype; fp32 for an fp32 model on the GPU.
AOT_SPECS: tuple[AotSpec, ...] = tuple(
    _spec(f"rmsnorm[{'w' if hw else 'unweighted'},D={D},{str(dt).removeprefix('torch.')}]", dt, D, hw)
    for dt in (torch.bfloat16, torch.float32)
    for D, hw in ((4096, True), (1024, True), (512, True), (128, True), (512, False))
)
