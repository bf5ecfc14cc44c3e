"""Linears with FP8 block-scaled weights: y = x @ W^T (spec §8.3), plain and grouped.

Torch twins: `fp8_linear_ref` is `layers.Linear.forward` (dequantize to x's dtype, F.linear);
`grouped_linear_ref` is the attention's grouped output projection (wo_a: bmm over the
block-diagonal groups). The Triton path: for M <= `dequant_above_m` (per-target config) the
weight-only kernel reads FP8 directly; above it the weight is dequantized once into a scratch
buffer and the vendor GEMM runs (prefill is compute-bound, where cuBLAS / hipBLASLt win).
"""

from __future__ import annotations

import torch

from flashport.ops import use_triton
import torch.nn.functional as F

from flashport.model.quant import dequant_fp8_blocks



def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequant(weight [N, K], scale)^T -> [..., N] in x.dtype (as layers.Linear)."""
    return F.linear(x, dequant_fp8_blocks(weight, scale, x.dtype))


def grouped_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, G, Kg], weight [G*No, Kg] (group g = rows g*No..) -> [M, G, No] (as attention's wo_a)."""
    M, G, Kg = x.shape
    w = dequant_fp8_blocks(weight, scale, x.dtype).view(G, -1, Kg)  # [G, No, Kg]
    return torch.bmm(x.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)  # [M, G, No]



def _dense(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, scratch: torch.Tensor | None
           ) -> torch.Tensor:
    from flashport.kernels import fp8_linear as k

    if scratch is not None:  # a flat buffer of at least N*K elements of dtype, reused across layers
        if scratch.dtype != dtype or not scratch.is_contiguous() or scratch.numel() < weight.numel():
            raise ValueError(f"scratch must be a contiguous {dtype} buffer of >= {weight.numel()} elements, got "
                             f"{scratch.dtype} {tuple(scratch.shape)}")
        scratch = scratch.view(-1)[: weight.numel()].view(weight.shape)
    return k.fp8_dequant(weight, scale, dtype, out=scratch)


def _kernel_path(x3: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> bool:
    from flashport.kernels import fp8_linear as k

    cfg = k.config_for(x3)
    M = x3.shape[0]
    if M > cfg.dequant_above_m:
        return False
    return k.supports(weight, scale, "decode" if M <= cfg.decode_max_m else "prefill", M)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, impl: str = "auto",
               scratch: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (fp32/fp16/bf16) @ W^T, W = FP8 weight [N, K] + uint8 block scales -> [..., N] in x.dtype."""
    if not use_triton(x, impl):
        return fp8_linear_ref(x, weight, scale)
    from flashport.kernels import fp8_linear as k

    N, K = weight.shape
    x3 = x.reshape(-1, 1, K)  # [M, 1, K]
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    if _kernel_path(x3, weight, scale):
        y = k.fp8_matmul(x3, weight, scale)  # [M, 1, N]
    else:
        y = F.linear(x3[:, 0], _dense(weight, scale, x.dtype, scratch))
    return y.reshape(*x.shape[:-1], N)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, impl: str = "auto",
                   scratch: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, G, Kg] @ per-group W_g^T, W = FP8 [G*No, Kg] + block scales -> [M, G, No] in x.dtype.

    The Triton path is one launch for all groups (a grid axis over G).
    """
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] % x.shape[1] or weight.shape[1] != x.shape[2]:
        raise ValueError(f"grouped_linear needs x [M, G, Kg] and weight [G*No, Kg], got x {tuple(x.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if not use_triton(x, impl):
        return grouped_linear_ref(x, weight, scale)
    from flashport.kernels import fp8_linear as k

    M, G, Kg = x.shape
    x3 = x if x.stride(-1) == 1 else x.contiguous()
    if _kernel_path(x3, weight, scale):
        return k.fp8_matmul(x3, weight, scale)
    w = _dense(weight, scale, x.dtype, scratch).view(G, -1, Kg)  # [G, No, Kg]
    return torch.bmm(x3.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)  # [M, G, No]
