"""Fused routed-expert MoE (spec §5.8, §5.11): device routing, two grouped GEMMs, the k-sum.

    order, offsets = moe_route(experts)          sort the (token, pick) pairs by expert, on the device
    h     = moe_gate_up(x, ...)                  [N*k, I] sorted: clamped SwiGLU of each pair
    pairs = moe_down(h, ...)                     [N*k, H] pair order: rounded down-projection x weight
    y     = moe_sum(pairs)                       [N, H]: fp32 sum of a token's k picks, rounded

Nothing is read back to the host, so one call is one fixed sequence of launches whose grids depend
on N only (CUDA-graph capturable). The decode form (memory-bound: BLOCK_M 16, narrow column tiles)
or the prefill form (compute-bound tiles) is chosen from N by a fixed per-target threshold.

Expert ids must lie in [0, E): a pair outside that range is not computed and its row of `pairs`
is left unwritten (checking would need a host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashport.kernels import moe_gemm
from flashport.kernels.moe_gemm import moe_down, moe_gate_up
from flashport.kernels.spec import TARGETS, AotSpec, target_of

# N (tokens in the call) from which the prefill form runs. The prefill form's 128-row tiles pay one
# dequantization of an expert's weights per 128 rows, the decode form's 16-row tiles one per 16 rows.
# H200, 2026-11-29 (fused op, pair-order decode tiles of scripts/gpu/rounds/s3d.tsv): decode form
# 3.40 / 3.72 / 6.70 ms at N = 256 / 512 / 1024, prefill form 6.06 / 6.13 / 6.23 ms (flat: below ~1K
# tokens every expert has one row tile); 928: the crossover interpolated between 512 and 1024 (937).
# Other targets: the sm_90 value (not measured there).
PREFILL_MIN_TOKENS: dict[str, int] = {"sm_90": 928, "sm_100": 928, "gfx942": 928, "gfx950": 928,
                                      "interpret": 64}
SUM_CONFIGS: dict[str, dict] = {
    **{t: dict(BLOCK_H=1024, num_warps=4) for t in TARGETS},
    "interpret": dict(BLOCK_H=128, num_warps=4),
}


def moe_route(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """experts [N, k] -> (order [N*k] int64: pair at each sorted position, offsets [E+1] int32)."""
    sorted_ids, order = torch.sort(experts.reshape(-1), stable=True)
    bounds = torch.arange(num_experts + 1, device=experts.device, dtype=sorted_ids.dtype)
    # offsets[e] = first sorted position with id >= e; searchsorted, unlike bincount, never syncs.
    return order, torch.searchsorted(sorted_ids, bounds, out_int32=True)


@triton.jit
def _moe_sum_kernel(
    pair_ptr,  # [N * k, H] weighted pair outputs, pair order
    out_ptr,  # [N, H]
    H, top_k,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = c < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in range(top_k):  # pick order, in fp32 as transformers' grouped_mm path
        acc += tl.load(pair_ptr + (t * top_k + j) * H + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + c, acc.to(out_ptr.dtype.element_ty), mask=ok)


def moe_sum(pairs: torch.Tensor, top_k: int) -> torch.Tensor:
    """pairs [N*k, H] -> [N, H]: the k picks of each token summed in fp32, rounded to the dtype."""
    M, H = pairs.shape
    if M % top_k or not pairs.is_contiguous():
        raise ValueError(f"pairs must be contiguous [N * {top_k}, H], got {tuple(pairs.shape)}")
    cfg = SUM_CONFIGS[target_of(pairs)]
    out = torch.empty(M // top_k, H, dtype=pairs.dtype, device=pairs.device)
    grid = (M // top_k, triton.cdiv(H, cfg["BLOCK_H"]))
    _moe_sum_kernel[grid](pairs, out, H, top_k, BLOCK_H=cfg["BLOCK_H"], num_warps=cfg["num_warps"])
    return out


def moe_form(x: torch.Tensor) -> str:
    return "prefill" if x.shape[0] >= PREFILL_MIN_TOKENS[target_of(x)] else "decode"


def fused_moe_triton(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13: torch.Tensor,
                     w13_scale: torch.Tensor | None, w2: torch.Tensor, w2_scale: torch.Tensor | None,
                     limit: float, form: str | None = None, tiled: bool = False) -> torch.Tensor:
    """x [N, H], routing weights / expert ids [N, k] -> sum over picks of weight * expert(x), [N, H].

    w13: FP4 uint8 [E, 2I, H/2] + uint8 scales [E, 2I, H/32], or plain [E, 2I, H] with scale None
    (gate rows then up rows); w2 likewise [E, H, I/2] + [E, H, I/32], or [E, H, I]. tiled: FP4 in
    the tiled layout (flashport.ops.moe.FP4_TILE; the layout the engine's kernels read)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [N, H], got {tuple(x.shape)}")
    if experts.dim() != 2 or experts.shape[0] != x.shape[0] or experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"experts must be int32/int64 [{x.shape[0]}, k], got {experts.dtype} {tuple(experts.shape)}")
    if weights.shape != experts.shape or weights.dtype != x.dtype:
        raise ValueError(f"weights must be {x.dtype} {tuple(experts.shape)}, "
                         f"got {weights.dtype} {tuple(weights.shape)}")
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0]:
        raise ValueError(f"w13 and w2 must be stacked [E, out, in] with the same E, "
                         f"got {tuple(w13.shape)} and {tuple(w2.shape)}")
    top_k = experts.shape[1]
    if x.shape[0] == 0:  # an empty grid is not launchable
        return x.new_empty((0, w2.shape[1]))
    form = form or moe_form(x)
    order, offsets = moe_route(experts, w13.shape[0])
    h = moe_gate_up(x, order, offsets, top_k, w13, w13_scale, limit, form, tiled=tiled)
    pairs = moe_down(h, order, offsets, weights.reshape(-1), w2, w2_scale, form, tiled=tiled)
    return moe_sum(pairs, top_k)


AOT_SPECS: tuple[AotSpec, ...] = moe_gemm.AOT_SPECS + (
    AotSpec("moe_sum", _moe_sum_kernel,
            {"pair_ptr": "*bf16", "out_ptr": "*bf16", "H": "i32", "top_k": "i32", "BLOCK_H": "constexpr"},
            {t: {"BLOCK_H": SUM_CONFIGS[t]["BLOCK_H"]} for t in TARGETS},
            {t: {"num_warps": SUM_CONFIGS[t]["num_warps"]} for t in TARGETS}),
)
