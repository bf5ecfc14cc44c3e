"""Attention's q and kv rows after their projections: norm + RoPE (spec §5.3), and the kv row's
store into the window ring. Torch twins are the model's own functions (flashport/model/layers.py);
the kernel is flashport/kernels/qkv_rope.py."""

from __future__ import annotations

import torch

from flashport.ops import use_triton

from flashport.model.layers import apply_rope, rms_unweighted


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """layers.RMSNorm.forward as a function: fp32 weight, multiply in fp32, cast once."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf).to(x.dtype)


def q_norm_rope_ref(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    return apply_rope(rms_unweighted(q, eps), cos, sin)


def kv_norm_rope_ref(kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
    return apply_rope(rms_norm(kv, norm_weight, eps).unsqueeze(1), cos, sin).squeeze(1)



def q_norm_rope(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """q [N, H, D] (wq_b output) -> unweighted per-head RMSNorm, then RoPE at cos/sin [N, rope/2]."""
    if not use_triton(q, impl):
        return q_norm_rope_ref(q, cos, sin, eps)
    from flashport.kernels.qkv_rope import norm_rope

    return norm_rope(q, None, cos, sin, eps)


def kv_norm_rope_store(kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                       window_pool: torch.Tensor, rows: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """kv [N, D] (wkv output) -> weighted RMSNorm + RoPE [N, D]; also window_pool[rows[n]] = out[n]
    (window_pool [R, D], rows [N] int64; a row < 0 is not stored, e.g. a padding token)."""
    if not use_triton(kv, impl):
        out = kv_norm_rope_ref(kv, norm_weight, eps, cos, sin)
        keep = rows >= 0  # boolean indexing syncs on a GPU: fine for the reference path
        window_pool.index_copy_(0, rows[keep], out[keep])
        return out
    from flashport.kernels.qkv_rope import norm_rope

    if kv.dim() != 2:
        raise ValueError(f"kv_norm_rope_store: kv must be [N, D], got {list(kv.shape)}")
    return norm_rope(kv.unsqueeze(1), norm_weight, cos, sin, eps, window_pool, rows).squeeze(1)
