"""Fused MoE kernels (flashport/kernels/moe*.py) against the torch twin (flashport/ops/moe.py), the
twin against MoE._routed, and an ahead-of-time compile for the four GPU targets.

Kernels run in the Triton interpreter on the CPU (conftest sets TRITON_INTERPRET=1) in fp32.
Shapes are small (the interpreter runs programs one by one) but cross the tile sizes of the
"interpret" configs: 16-row (decode) and 32-row (prefill) row tiles; gate/up K steps of 64 over
H = 96 (the last step has a masked scale group); down column tiles of 64 over H = 96 (one partial).
Partial gate/up column tiles and K steps of any length: the plain-weight test (H 80, I 40).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flashport.model.quant import dequant_fp4
from flashport.ops.moe import clamped_swiglu, fused_moe, fused_moe_torch

LIMIT = 10.0
H, I, E = 96, 32, 6

# One spec per target covers both kernels and both forms; the project-wide AOT test compiles all.
_AOT_PICKS = {"sm_90": "moe_gate_up[decode,fp4]", "gfx942": "moe_down[decode,fp4]",
              "gfx950": "moe_gate_up[prefill,fp4]", "sm_100": "moe_down[prefill,fp4]"}


def _fp4(g: torch.Generator, rows: int, cols: int, exps: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    # Random codes (every nibble value, signs, zeros) and UE8M0 scales drawn from `exps`.
    packed = torch.randint(0, 256, (E, rows, cols // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    pick = torch.randint(0, len(exps), (E, rows, cols // 32), generator=g)
    return packed, torch.tensor(exps, dtype=torch.uint8)[pick]


def _experts(g: torch.Generator, low: int = 124, high: int = 126):
    w13, s13 = _fp4(g, 2 * I, H, tuple(range(low, high + 1)))
    w2, s2 = _fp4(g, H, I, tuple(range(low, high + 1)))
    return w13, s13, w2, s2


def _hash_routing(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    # Experts 0-3 get many pairs (several 16-row tiles), expert 4 exactly one, expert 5 none;
    # picks repeat within a token as tid2eid rows can.
    experts = torch.randint(0, 4, (n, k), generator=g)
    experts[0] = 2
    experts[n // 2, k - 1] = 4
    return experts


def _dense(x, weights, experts, w13, s13, w2, s2) -> tuple[torch.Tensor, float]:
    # Fully dequantized, per pair, fp32, no intermediate rounding -> (output, max |gate/up|).
    W13, W2 = dequant_fp4(w13, s13, torch.float32), dequant_fp4(w2, s2, torch.float32)
    gu = torch.einsum("nh,nkoh->nko", x.float(), W13[experts])
    h = clamped_swiglu(gu[..., :I], gu[..., I:], LIMIT)
    y = torch.einsum("nki,nkoi->nko", h, W2[experts])
    return (y * weights.float().unsqueeze(-1)).sum(dim=1), float(gu.abs().max())


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 2e-5) -> None:
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * float(ref.abs().max()))


@pytest.mark.parametrize("n", [1, 3, 37])
def test_fp4_hash_routing_decode(n: int) -> None:
    g = torch.Generator().manual_seed(100 + n)
    w13, s13, w2, s2 = _experts(g)
    x = torch.randn(n, H, generator=g)
    experts = _hash_routing(g, n, 3)
    weights = torch.rand(n, 3, generator=g)
    got = fused_moe(x, weights, experts, w13, s13, w2, s2, LIMIT, impl="triton")
    ref = fused_moe(x, weights, experts, w13, s13, w2, s2, LIMIT, impl="torch")
    _close(got, ref)
    dense, gate_up_max = _dense(x, weights, experts, w13, s13, w2, s2)
    _close(got, dense)
    assert gate_up_max > LIMIT  # the clamps are exercised


def test_fp4_topk_routing_prefill_form() -> None:
    from flashport.kernels.moe import fused_moe_triton

    g = torch.Generator().manual_seed(7)
    n, k = 37, 3
    w13, s13, w2, s2 = _experts(g)
    x = torch.randn(n, H, generator=g)
    # Biased scores: experts 0 and 1 get (nearly) every token (two 32-row tiles each), 2-4 share
    # the third pick, 5 gets none. Distinct picks per token, int32 ids.
    scores = torch.randn(n, E, generator=g) + torch.tensor([3.0, 3.0, 0.0, 0.0, 0.0, -9.0])
    experts = torch.topk(scores, k, dim=-1, sorted=False).indices.to(torch.int32)
    weights = torch.rand(n, k, generator=g)
    got = fused_moe_triton(x, weights, experts, w13, s13, w2, s2, LIMIT, form="prefill")
    _close(got, fused_moe_torch(x, weights, experts.long(), w13, s13, w2, s2, LIMIT))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # silu(-big) = -0, as in torch
@pytest.mark.parametrize("form,low", [("decode", 0), ("prefill", 16)])
def test_fp4_extreme_scale_exponents(form: str, low: int) -> None:
    # Per 32-column group of H: group 0 has scales 2^(low-127) .. 2^(low-124) against x scaled up
    # to match, group 1 scales up to 2^125 (s = 252; 6 * 2^126 would overflow fp32) against x near
    # 2^-100, group 2 ordinary, so every product is finite and normal in fp32. The decode form
    # scales after the dot and is exact down to s = 0 (the subnormal 2^-127) while x * e2m1 * 2^-14
    # stays normal; the prefill form scales the decoded weights, exact while they are normal (s >= 16).
    from flashport.kernels.moe import fused_moe_triton

    g = torch.Generator().manual_seed(11 + low)
    n = 5
    w13, s13, w2, s2 = _experts(g)
    pick = torch.randint(0, 4, (E, 2 * I), generator=g).to(torch.uint8)
    s13[:, :, 0] = low + pick
    s13[:, :, 1] = 249 + pick
    x = torch.randn(n, H, generator=g)
    sign = torch.where(x < 0, -1.0, 1.0)
    x[:, :32] *= 2.0 ** (124 - low)
    x[:, 32:64] = sign[:, 32:64] * (1 + x[:, 32:64].abs()) * 2.0**-100
    experts = _hash_routing(g, n, 3)
    weights = torch.rand(n, 3, generator=g)
    got = fused_moe_triton(x, weights, experts, w13, s13, w2, s2, LIMIT, form=form)
    _close(got, fused_moe_torch(x, weights, experts, w13, s13, w2, s2, LIMIT))


def test_fp4_fp16_rounding_flow() -> None:
    # Half precision (bf16 dots are wrong in the interpreter; fp16 ones are not): the kernel rounds
    # where the twin rounds (projections, silu, product, weighted pair), so nearly all outputs
    # agree bit for bit; the rest differ only by accumulation order.
    g = torch.Generator().manual_seed(13)
    n = 6
    w13, s13, w2, s2 = _experts(g, 123, 124)
    x = torch.randn(n, H, generator=g).half()
    experts = _hash_routing(g, n, 3)
    weights = torch.rand(n, 3, generator=g).half()
    got = fused_moe(x, weights, experts, w13, s13, w2, s2, LIMIT, impl="triton")
    ref = fused_moe_torch(x, weights, experts, w13, s13, w2, s2, LIMIT)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-3, atol=2e-3 * float(ref.abs().max()))
    assert (got == ref).float().mean() > 0.95


def test_plain_weights() -> None:
    g = torch.Generator().manual_seed(5)
    n, k, h, i = 9, 3, 80, 40
    w13 = torch.randn(E, 2 * i, h, generator=g) * 0.3
    w2 = torch.randn(E, h, i, generator=g) * 0.1
    x = torch.randn(n, h, generator=g)
    experts = torch.randint(0, E - 1, (n, k), generator=g)  # last expert unused
    weights = torch.rand(n, k, generator=g)
    got = fused_moe(x, weights, experts, w13, None, w2, None, LIMIT, impl="triton")
    _close(got, fused_moe(x, weights, experts, w13, None, w2, None, LIMIT, impl="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_equals_model_routed(dtype: torch.dtype) -> None:
    # The twin is MoE._routed's reference, bit for bit (FP4 experts of the tiny config).
    from flashport.model.moe import MoE
    from flashport.model.tiny import tiny_config

    cfg = dataclasses.replace(tiny_config(), num_experts_per_tok=3)
    moe = MoE(cfg, layer=2, dtype=dtype, fp8_dtype=torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(3)
    for w in (moe.experts.w13, moe.experts.w2):
        w.weight.copy_(torch.randint(0, 256, w.weight.shape, generator=g, dtype=torch.int32).to(torch.uint8))
        w.scale.copy_(torch.randint(122, 126, w.scale.shape, generator=g, dtype=torch.int32).to(torch.uint8))
    n = 9
    x = torch.randn(n, cfg.hidden_size, generator=g).to(dtype)
    experts = torch.randint(0, cfg.n_routed_experts, (n, 3), generator=g)
    weights = torch.rand(n, 3, generator=g).to(dtype)
    ref = moe._routed(x, weights, experts)
    e = moe.experts
    got = fused_moe(x, weights, experts, e.w13.weight, e.w13.scale, e.w2.weight, e.w2.scale, moe.limit)
    assert torch.equal(got, ref)


def test_input_checks() -> None:
    from flashport.kernels.moe import fused_moe_triton

    g = torch.Generator().manual_seed(1)
    w13, s13, w2, s2 = _experts(g)
    x = torch.randn(4, H, generator=g)
    experts = torch.zeros(4, 2, dtype=torch.int64)
    weights = torch.rand(4, 2, generator=g)
    with pytest.raises(ValueError, match="weights"):
        fused_moe_triton(x, weights.half(), experts, w13, s13, w2, s2, LIMIT)
    with pytest.raises(ValueError, match="w13_scale"):
        fused_moe_triton(x, weights, experts, w13, s13[:, :, :1], w2, s2, LIMIT)
    with pytest.raises(ValueError, match="x must"):  # not contiguous
        fused_moe_triton(torch.randn(H, 4, generator=g).t(), weights, experts, w13, s13, w2, s2, LIMIT)
    with pytest.raises(ValueError, match="experts"):
        fused_moe_triton(x, weights, experts[:3], w13, s13, w2, s2, LIMIT)
    with pytest.raises(ValueError, match="impl"):
        fused_moe(x, weights, experts, w13, s13, w2, s2, LIMIT, impl="cuda")


