"""mHC pre / post and the hc head (spec §5.2, §5.9): the torch twins and the dispatching ops.

The twins are the model's own math (flashport/model/mhc.py: HyperConnection.pre, post_update,
HyperHead.forward), op for op; tests check they agree bit for bit.
"""

from __future__ import annotations

import torch

from flashport.ops import use_triton
import torch.nn.functional as F

from flashport.ops.rmsnorm import rms_norm_unweighted_ref



def mhc_pre_ref(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
                norm_eps: float, sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, hc, hidden] -> (u [N, hidden] in x.dtype, post [N, hc] fp32, comb [N, hc, hc] fp32)."""
    hc = x.shape[1]
    flat = rms_norm_unweighted_ref(x.flatten(1).float(), norm_eps)  # [N, hc*hidden]
    mix = F.linear(flat, fn)  # [N, (2+hc)*hc]
    pre_w, post_w, comb_w = mix.split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.split([hc, hc, hc * hc])
    pre_s, post_s, comb_s = scale.unbind(0)
    pre = torch.sigmoid(pre_w * pre_s + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * post_s + post_b)
    comb = torch.softmax(comb_w.unflatten(-1, (hc, hc)) * comb_s + comb_b.view(hc, hc), dim=-1) + hc_eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(sinkhorn_iters - 1):  # Sinkhorn: alternate row and column normalisation
        comb = comb / (comb.sum(dim=-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + hc_eps)
    u = (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)
    return u, post, comb


def mhc_post_ref(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'[k] = post_k * y + sum_j comb[j, k] X[j] with post and comb rounded to x.dtype first."""
    dtype = x.dtype
    return post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), x)


def mhc_head_ref(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
                 norm_eps: float) -> torch.Tensor:
    """h = sum_k (sigmoid(scale * (fn . RMS(flat X)) + base)_k + hc_eps) X[k]: [N, hc, hidden] -> [N, hidden]."""
    flat = rms_norm_unweighted_ref(x.flatten(1).float(), norm_eps)
    pre = torch.sigmoid(F.linear(flat, fn) * scale + base) + hc_eps  # [N, hc]
    return (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)



def mhc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
            norm_eps: float, sinkhorn_iters: int, impl: str = "auto"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, 4, hidden] contiguous -> (u [N, hidden] x.dtype, post [N, 4] fp32, comb [N, 4, 4] fp32)."""
    if use_triton(x, impl):
        from flashport.kernels import mhc  # triton is optional on CPU installs

        return mhc.mhc_pre(x, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters)
    return mhc_pre_ref(x, fn, base, scale, hc_eps, norm_eps, sinkhorn_iters)


def mhc_post(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
             impl: str = "auto") -> torch.Tensor:
    """x [N, 4, hidden], y [N, hidden], post [N, 4] fp32, comb [N, 4, 4] fp32 -> [N, 4, hidden]."""
    if use_triton(x, impl):
        from flashport.kernels import mhc

        return mhc.mhc_post(x, y, post, comb)
    return mhc_post_ref(x, y, post, comb)


def mhc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
             norm_eps: float, impl: str = "auto") -> torch.Tensor:
    """x [N, 4, hidden] contiguous -> [N, hidden] x.dtype."""
    if use_triton(x, impl):
        from flashport.kernels import mhc

        return mhc.mhc_head(x, fn, base, scale, hc_eps, norm_eps)
    return mhc_head_ref(x, fn, base, scale, hc_eps, norm_eps)
