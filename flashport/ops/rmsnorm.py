"""RMSNorm, weighted and unweighted (spec §5.11): the torch twins and the dispatching ops.

The twins are the model's own math (flashport/model/layers.py: RMSNorm.forward, rms_unweighted),
op for op, so the two paths round at the same places.
"""

from __future__ import annotations

import torch

from flashport.ops import use_triton



def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(w * (x_fp32 * rsqrt(mean(x_fp32^2) + eps))).to(x.dtype); weight [D] fp32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf).to(x.dtype)


def rms_norm_unweighted_ref(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x_fp32^2) + eps).to(x.dtype): the scale is rounded before the multiply."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)



def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """x [..., D] (contiguous), weight [D] fp32 -> [..., D] in x.dtype."""
    if use_triton(x, impl):
        from flashport.kernels.rmsnorm import rmsnorm  # triton is optional on CPU installs

        return rmsnorm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def rms_norm_unweighted(x: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """x [..., D] (contiguous; per head: [N, H, D]) -> [..., D] in x.dtype."""
    if use_triton(x, impl):
        from flashport.kernels.rmsnorm import rmsnorm

        return rmsnorm(x, None, eps)
    return rms_norm_unweighted_ref(x, eps)
