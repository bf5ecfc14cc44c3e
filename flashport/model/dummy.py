"""Random weights with the real shapes and dtypes, generated on the model's device (`--load-format dummy`).

Used to benchmark or smoke-test a model without downloading it. Values are chosen so a forward
pass stays finite and O(1): linears have an effective std of 1/sqrt(fan_in) (FP8: N(0, 1) values
with a power-of-two block scale near that; FP4: random codes with a matching 1x32 scale), norms
are ~1, hc mixes are small, and the hash router gets k distinct random experts per token id.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

from flashport.model.quant import E8M0_BIAS

_HC_RE = re.compile(r"(^|\.)hc_(attn|ffn|head)\.(fn|base|scale)$")
_FP4_STD = math.sqrt(sum(v * v for v in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)) / 8)  # random codes: ~2.93
_CHUNK = 1 << 24  # elements generated at once (bounds the fp32 temporaries)


def _fill(p: torch.Tensor, make: Callable[[tuple[int, ...]], torch.Tensor]) -> None:
    """p.copy_(make(shape)) in slices of dim 0, so huge tensors need no full-size temporary."""
    if p.dim() == 0 or p.numel() <= _CHUNK:
        p.copy_(make(tuple(p.shape)))
        return
    rows = max(1, _CHUNK // (p.numel() // p.shape[0]))
    for i in range(0, p.shape[0], rows):
        part = p[i:i + rows]
        part.copy_(make(tuple(part.shape)))


def _scale_byte(std: float) -> int:
    return int(round(math.log2(std))) + E8M0_BIAS


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter of a `DeepseekV4` in place (deterministic for a seed and device)."""
    cfg = model.cfg  # type: ignore[attr-defined]
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(shape: tuple[int, ...], std: float = 1.0, mean: float = 0.0, dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
        x = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        return (x * std + mean).to(dtype)

    def uniform_int(lo: int, hi: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=g, device=device, dtype=dtype)

    for name, p in params.items():
        data = p.data
        if data.dtype == torch.int64:  # tid2eid [vocab, k]: k distinct experts per token id
            scores = torch.rand(data.shape[0], cfg.n_routed_experts, generator=g, device=device)
            data.copy_(scores.topk(data.shape[1], dim=-1).indices)
        elif data.dtype == torch.uint8 and name.endswith(".scale"):
            weight = params[name.removesuffix("scale") + "weight"]
            if weight.dtype == torch.uint8:  # FP4 codes: fan_in = 2 x packed width
                byte = _scale_byte(1.0 / math.sqrt(2 * weight.shape[-1]) / _FP4_STD)
            else:  # FP8 values ~N(0, 1)
                byte = _scale_byte(1.0 / math.sqrt(weight.shape[-1]))
            _fill(data, lambda s, b=byte: uniform_int(b - 1, b + 2, s, torch.uint8))  # +-1 jitter per block
        elif data.dtype == torch.uint8:  # packed FP4: every byte is two valid E2M1 codes
            _fill(data, lambda s: uniform_int(0, 256, s, torch.uint8))
        elif data.dtype.itemsize == 1:  # FP8 (e4m3fn or e4m3fnuz): N(0, 1) values, well inside range
            _fill(data, lambda s, dt=data.dtype: randn(s).clamp(-8, 8).to(dt))
        elif (m := _HC_RE.search(name)) is not None:
            kind = m.group(3)
            if kind == "fn":  # mixes of the rms-normalised [hc * hidden] residual: O(0.5)
                data.copy_(randn(tuple(data.shape), 0.5 / math.sqrt(data.shape[-1])))
            elif kind == "base":
                data.copy_(randn(tuple(data.shape), 0.5))
            else:
                data.copy_(torch.rand(data.shape, generator=g, device=device) + 0.5)
        elif name.endswith("attn_sink"):
            data.copy_(randn(tuple(data.shape)))
        elif name.endswith(".ape"):
            data.copy_(randn(tuple(data.shape), 0.5))
        elif name.endswith("gate.bias"):
            data.copy_(randn(tuple(data.shape), 0.3))
        elif data.dim() == 1:  # RMSNorm weights
            data.copy_(randn(tuple(data.shape), 0.05, mean=1.0))
        elif name == "embed.weight":
            _fill(data, lambda s, dt=data.dtype: randn(s, dtype=dt))
        else:  # plain linears [out, in] or stacked experts [E, out, in]
            std = 1.0 / math.sqrt(data.shape[-1])
            _fill(data, lambda s, dt=data.dtype, sd=std: randn(s, sd, dtype=dt))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
