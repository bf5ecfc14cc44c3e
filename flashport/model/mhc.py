"""Manifold-constrained hyper-connections (mHC, spec §5.2) and the final stream collapse (§5.9).

The residual is X [N, hc, hidden] (hc = 4 streams). Before a sub-layer, `HyperConnection.pre`
mixes the streams into one input u and returns the `post` and `comb` weights that `post_update`
uses to write the sub-layer's output y back: X'[k] = post_k * y + sum_j comb[j, k] * X[j].
All mixing weights are computed in fp32; u is rounded to the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashport.model.layers import REFERENCE, rms_unweighted


class HyperConnection(nn.Module):
    def __init__(self, hc: int, hidden: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.hc, self.sinkhorn_iters, self.hc_eps, self.norm_eps = hc, sinkhorn_iters, hc_eps, norm_eps
        mixes = (2 + hc) * hc  # pre (hc) + post (hc) + comb (hc x hc)
        kw = dict(dtype=torch.float32, device=device)
        self.fn = nn.Parameter(torch.empty(mixes, hc * hidden, **kw), requires_grad=False)
        self.base = nn.Parameter(torch.empty(mixes, **kw), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(3, **kw), requires_grad=False)

    def pre(self, x: torch.Tensor, impl: str = REFERENCE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hc, hidden] -> (u [N, hidden] in x.dtype, post [N, hc] fp32, comb [N, hc, hc] fp32)."""
        if impl != REFERENCE:
            from flashport.ops.mhc import mhc_pre

            return mhc_pre(x.contiguous(), self.fn, self.base, self.scale, self.hc_eps, self.norm_eps,
                           self.sinkhorn_iters, impl=impl)
        hc = self.hc
        flat = rms_unweighted(x.flatten(1).float(), self.norm_eps)  # [N, hc*hidden]
        mix = F.linear(flat, self.fn)  # [N, (2+hc)*hc]
        pre_w, post_w, comb_w = mix.split([hc, hc, hc * hc], dim=-1)
        pre_b, post_b, comb_b = self.base.split([hc, hc, hc * hc])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (hc, hc)) * comb_s + comb_b.view(hc, hc), dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.sinkhorn_iters - 1):  # Sinkhorn: alternate row and column normalisation
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        u = (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)
        return u, post, comb


def post_update(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                impl: str = REFERENCE) -> torch.Tensor:
    """X'[k] = post_k * y + sum_j comb[j, k] X[j]; x [N, hc, hidden], y [N, hidden] -> [N, hc, hidden].

    post and comb are rounded to the model dtype first and comb is applied transposed, as in
    transformers.
    """
    if impl != REFERENCE:
        from flashport.ops.mhc import mhc_post

        return mhc_post(x.contiguous(), y.contiguous(), post, comb, impl=impl)
    dtype = x.dtype
    return post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), x)


class HyperHead(nn.Module):
    """Collapses the streams once before the final norm: h = sum_k sigmoid(...)_k X[k]."""

    def __init__(self, hc: int, hidden: int, hc_eps: float, norm_eps: float,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        kw = dict(dtype=torch.float32, device=device)
        self.fn = nn.Parameter(torch.empty(hc, hc * hidden, **kw), requires_grad=False)
        self.base = nn.Parameter(torch.empty(hc, **kw), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(1, **kw), requires_grad=False)

    def forward(self, x: torch.Tensor, impl: str = REFERENCE) -> torch.Tensor:
        if impl != REFERENCE:
            from flashport.ops.mhc import mhc_head

            return mhc_head(x.contiguous(), self.fn, self.base, self.scale, self.hc_eps, self.norm_eps, impl=impl)
        flat = rms_unweighted(x.flatten(1).float(), self.norm_eps)
        pre = torch.sigmoid(F.linear(flat, self.fn) * self.scale + self.base) + self.hc_eps  # [N, hc]
        return (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)
