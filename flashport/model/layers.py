"""Building blocks: RMSNorm, the (optionally FP8 block-quantized) linear, interleaved RoPE.

Dtype rules follow transformers 5.24 (spec §5.11): norm weights are fp32, a weighted RMSNorm
multiplies in fp32 and casts once; the unweighted per-head norm rounds its scale to the input
dtype first; RoPE rotates in fp32 with cos/sin rounded to the model dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flashport.config import ModelConfig, YarnScaling
from flashport.model.quant import dequant_fp8_blocks

# How the model computes: REFERENCE is the plain torch code in this package (the slow twin);
# "auto", "torch" and "triton" go through flashport.ops (Triton kernels on a GPU with "auto",
# their torch twins on the CPU; "triton" forces kernels, the interpreter on a CPU).
REFERENCE = "reference"
OPS_IMPLS = (REFERENCE, "auto", "torch", "triton")  # REFERENCE + flashport.ops.IMPLS


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, impl: str = REFERENCE) -> torch.Tensor:
        if impl != REFERENCE:
            from flashport.ops.rmsnorm import rms_norm

            return rms_norm(x.contiguous(), self.weight, self.eps, impl=impl)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    # The scale is rounded to x's dtype before the multiply, as transformers does.
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Linear(nn.Module):
    """y = x @ W^T. W is stored in the model dtype, or as FP8 E4M3 + UE8M0 block scales.

    Quantized weights are dequantized to the activation dtype on use (the torch reference path;
    the kernel path reads FP8 directly).
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype,
                 fp8_block: tuple[int, int] | None = None, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if fp8_block is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                       requires_grad=False)
            self.scale = None
        else:
            bo, bi = fp8_block
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=fp8_dtype, device=device),
                                       requires_grad=False)
            self.scale = nn.Parameter(
                torch.empty(-(-out_features // bo), -(-in_features // bi), dtype=torch.uint8, device=device),
                requires_grad=False)

    @property
    def is_quantized(self) -> bool:
        return self.scale is not None

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.scale is None:
            return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)
        return dequant_fp8_blocks(self.weight, self.scale, dtype)

    def forward(self, x: torch.Tensor, impl: str = REFERENCE) -> torch.Tensor:
        if impl != REFERENCE and self.scale is not None:
            from flashport.ops.fp8_linear import fp8_linear

            return fp8_linear(x, self.weight, self.scale, impl=impl)
        return F.linear(x, self.dense_weight(x.dtype))


# ---------------------------------------------------------------- RoPE
def rope_inv_freq(rope_dim: int, theta: float, yarn: YarnScaling | None) -> torch.Tensor:
    """[rope_dim/2] fp32 angular frequencies; YaRN blends interpolated and extrapolated bands."""
    pos_freqs = theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    extrapolated = 1.0 / pos_freqs
    if yarn is None:
        return extrapolated
    interpolated = 1.0 / (yarn.factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        return (rope_dim * math.log(yarn.original_max_position_embeddings / (num_rotations * 2 * math.pi))
                ) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    return interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight


class RotaryTables(nn.Module):
    """Two frequency tables: "main" (SWA layers) and "compress" (CSA/HCA layers, YaRN)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        r = cfg.qk_rope_head_dim
        self.register_buffer("main_inv_freq", rope_inv_freq(r, cfg.rope_theta, None).to(device), persistent=False)
        self.register_buffer("compress_inv_freq",
                             rope_inv_freq(r, cfg.compress_rope_theta, cfg.rope_scaling).to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor, compress: bool, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> cos, sin [..., rope_dim/2] in `dtype` (rounded like transformers)."""
        inv_freq = self.compress_inv_freq if compress else self.main_inv_freq
        freqs = positions[..., None].float() * inv_freq
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the trailing 2*len(cos) dims of x, pairs (2i, 2i+1) interleaved, in fp32.

    x [..., H, D] with cos/sin [..., rope/2] broadcast over H (pass sin negated for the inverse).
    """
    half = cos.shape[-1]
    cos = cos.unsqueeze(-2).float()
    sin = sin.unsqueeze(-2).float()
    nope, rope = x[..., : -2 * half], x[..., -2 * half:]
    pairs = rope.float().unflatten(-1, (half, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    y0 = x0 * cos - x1 * sin
    y1 = x1 * cos + x0 * sin
    rotated = torch.stack((y0, y1), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([nope, rotated], dim=-1)
