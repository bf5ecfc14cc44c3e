"""The routed-expert MoE op (spec §5.8, §5.11): weight * expert(x) summed over a token's k picks.

`fused_moe` dispatches to the fused Triton kernels (`flashport.kernels.moe`: device routing, no
host sync, no per-expert loop) on CUDA/ROCm tensors and to the torch twin on the CPU. The twin is
MoE._routed's reference: pairs sorted by expert, one dense matmul per expert that has rows.

Numerics (transformers' grouped_mm path, both implementations): per pair, gate/up projections
rounded to the activation dtype, silu(min(g, limit)) rounded, times clamp(u, +-limit) rounded, down
projection rounded, times the routing weight rounded; the k picks summed in fp32, then rounded.
"""

from __future__ import annotations

import torch

from flashport.ops import use_triton
import torch.nn.functional as F

from flashport.model.quant import dequant_fp4

# The kernels' FP4 layout ("tiled"): each expert's [R, K] matrix (bytes [R, K/2], scales [R, K/32])
# stored as 64-row x 64-column chunks in (row chunk, column chunk) order, each chunk its 64 rows'
# 32 bytes back to back (and its scales as 64 x 2 bytes): a 64-row K step of a kernel is one
# contiguous 2 KB run instead of 64 runs of 32 bytes 2 KB apart (measured: the decode kernels
# were bound by L1 wavefronts of those scattered loads; docs/perf/speed-notes.md). Same shapes
# and dtypes as the row layout; only the byte order differs.
FP4_TILE = 64


def fp4_tileable(w: torch.Tensor) -> bool:
    """Whether a stacked FP4 matrix [E, R, K/2] has whole 64 x 64 chunks."""
    return w.dim() == 3 and w.shape[1] % FP4_TILE == 0 and (2 * w.shape[2]) % FP4_TILE == 0


def _chunked(x: torch.Tensor, per_row: int) -> torch.Tensor:
    """[R, C] row layout -> [R/64, C/per_row, 64, per_row] view (per_row: the chunk's bytes per row)."""
    R, C = x.shape
    return x.view(R // FP4_TILE, FP4_TILE, C // per_row, per_row).permute(0, 2, 1, 3)


def tile_fp4_(w: torch.Tensor, scale: torch.Tensor) -> None:
    """Row layout -> tiled layout, in place, one expert at a time (one expert's copy of scratch)."""
    if not fp4_tileable(w):
        raise ValueError(f"FP4 weights {tuple(w.shape)}: the tiled layout needs rows and input columns "
                         f"in multiples of {FP4_TILE}")
    for e in range(w.shape[0]):
        for x, per_row in ((w[e], FP4_TILE // 2), (scale[e], FP4_TILE // 32)):
            x.view(-1).copy_(_chunked(x, per_row).contiguous().view(-1))


def untile_fp4(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's tiled bytes [R, K/2] and scales [R, K/32] -> new tensors in the row layout."""
    out = []
    for x, per_row in ((w, FP4_TILE // 2), (scale, FP4_TILE // 32)):
        R, C = x.shape
        out.append(x.reshape(R // FP4_TILE, C // per_row, FP4_TILE, per_row).permute(0, 2, 1, 3).reshape(R, C))
    return out[0], out[1]



def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def expert_dense(w: torch.Tensor, scale: torch.Tensor | None, expert: int, dtype: torch.dtype,
                 tiled: bool = False) -> torch.Tensor:
    """[out, in] weight of one expert in `dtype`: FP4 (uint8 + uint8 scales, row or tiled layout)
    or plain (scale None)."""
    if scale is None:
        return w[expert].to(dtype)
    if tiled:
        return dequant_fp4(*untile_fp4(w[expert], scale[expert]), dtype)
    return dequant_fp4(w[expert], scale[expert], dtype)


def fused_moe_torch(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13: torch.Tensor,
                    w13_scale: torch.Tensor | None, w2: torch.Tensor, w2_scale: torch.Tensor | None,
                    limit: float, tiled: bool = False) -> torch.Tensor:
    # The slow twin: reads the per-expert counts back to the host (one sync) and loops over experts.
    N, k = experts.shape
    flat = experts.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    xs = x[order // k]  # [N*k, H] rows of the sorted pairs
    out = torch.empty(N * k, w2.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sl = slice(start, start + n)
        gate, up = F.linear(xs[sl], expert_dense(w13, w13_scale, e, x.dtype, tiled)).chunk(2, dim=-1)
        out[sl] = F.linear(clamped_swiglu(gate, up, limit), expert_dense(w2, w2_scale, e, x.dtype, tiled))
        start += n
    out = out * weights.flatten()[order].unsqueeze(-1)
    pair_out = torch.empty_like(out)
    pair_out[order] = out
    return pair_out.view(N, k, -1).float().sum(dim=1).to(x.dtype)


def fused_moe(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13: torch.Tensor,
              w13_scale: torch.Tensor | None, w2: torch.Tensor, w2_scale: torch.Tensor | None,
              limit: float, impl: str = "auto", tiled: bool = False) -> torch.Tensor:
    """x [N, H], weights [N, k] (x's dtype), experts [N, k] int ids in [0, E) -> [N, H].

    w13 [E, 2I, H/2] uint8 FP4 + w13_scale [E, 2I, H/32] uint8, or plain [E, 2I, H] with scale
    None (gate rows then up rows); w2 [E, H, I/2] + [E, H, I/32], or plain [E, H, I]. tiled: the
    FP4 weights are in the kernels' tiled layout (FP4_TILE)."""
    if not use_triton(x, impl):
        return fused_moe_torch(x, weights, experts, w13, w13_scale, w2, w2_scale, limit, tiled)
    from flashport.kernels.moe import fused_moe_triton  # Triton only where kernels run

    return fused_moe_triton(x, weights, experts, w13, w13_scale, w2, w2_scale, limit, tiled=tiled)
