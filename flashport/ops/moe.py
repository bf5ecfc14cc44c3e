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



def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def expert_dense(w: torch.Tensor, scale: torch.Tensor | None, expert: int, dtype: torch.dtype) -> torch.Tensor:
    """[out, in] weight of one expert in `dtype`: FP4 (uint8 + uint8 scales) or plain (scale None)."""
    if scale is None:
        return w[expert].to(dtype)
    return dequant_fp4(w[expert], scale[expert], dtype)


def fused_moe_torch(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13: torch.Tensor,
                    w13_scale: torch.Tensor | None, w2: torch.Tensor, w2_scale: torch.Tensor | None,
                    limit: float) -> torch.Tensor:
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
        gate, up = F.linear(xs[sl], expert_dense(w13, w13_scale, e, x.dtype)).chunk(2, dim=-1)
        out[sl] = F.linear(clamped_swiglu(gate, up, limit), expert_dense(w2, w2_scale, e, x.dtype))
        start += n
    out = out * weights.flatten()[order].unsqueeze(-1)
    pair_out = torch.empty_like(out)
    pair_out[order] = out
    return pair_out.view(N, k, -1).float().sum(dim=1).to(x.dtype)


def fused_moe(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13: torch.Tensor,
              w13_scale: torch.Tensor | None, w2: torch.Tensor, w2_scale: torch.Tensor | None,
              limit: float, impl: str = "auto") -> torch.Tensor:
    """x [N, H], weights [N, k] (x's dtype), experts [N, k] int ids in [0, E) -> [N, H].

    w13 [E, 2I, H/2] uint8 FP4 + w13_scale [E, 2I, H/32] uint8, or plain [E, 2I, H] with scale
    None (gate rows then up rows); w2 [E, H, I/2] + [E, H, I/32], or plain [E, H, I]."""
    if not use_triton(x, impl):
        return fused_moe_torch(x, weights, experts, w13, w13_scale, w2, w2_scale, limit)
    from flashport.kernels.moe import fused_moe_triton  # Triton only where kernels run

    return fused_moe_triton(x, weights, experts, w13, w13_scale, w2, w2_scale, limit)
