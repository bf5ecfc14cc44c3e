"""The RMSNorm kernel (interpreter on the CPU) against its torch twin, and the twin against the model."""

from __future__ import annotations

import zlib

import pytest
import torch

from flashport.model.layers import RMSNorm, rms_unweighted
from flashport.ops.rmsnorm import rms_norm, rms_norm_ref, rms_norm_unweighted, rms_norm_unweighted_ref

EPS = 1e-6
# rows [N, D] at the model's D values (odd N; D=128 packs many rows per program, D=100 is padded),
# and per head [N, H, D]
SHAPES = [(3, 4096), (7, 1024), (5, 512), (37, 128), (9, 100), (3, 64, 512)]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed} {shape} {dtype}".encode()))
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    w = torch.randn(shape[-1], generator=g)
    return x, w


def _assert_within_one_ulp(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Low-precision outputs: equal but for rare one-ulp flips (the fp32 sum of squares is reduced
    in a different order than torch's, so the fp32 scale can differ in its last bit)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    ulp = torch.finfo(ref.dtype).eps * ref.float().abs().clamp_min(torch.finfo(ref.dtype).tiny)
    assert ((got.float() - ref.float()).abs() <= ulp).all()
    assert (got != ref).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_weighted_matches_twin(shape, dtype):
    x, w = _inputs(shape, dtype, seed=0)
    got, ref = rms_norm(x, w, EPS, impl="triton"), rms_norm_ref(x, w, EPS)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    else:
        _assert_within_one_ulp(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_unweighted_matches_twin(shape, dtype):
    x, _ = _inputs(shape, dtype, seed=1)
    got, ref = rms_norm_unweighted(x, EPS, impl="triton"), rms_norm_unweighted_ref(x, EPS)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    else:
        _assert_within_one_ulp(got, ref)


def test_unweighted_rounds_the_scale_first():
    # bf16: the scale rounded to bf16 before the multiply is not the fp32-scale product
    x, _ = _inputs((64, 512), torch.bfloat16, seed=3)
    got = rms_norm_unweighted(x, EPS, impl="triton")
    fp32_scale = (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + EPS)).bfloat16()
    assert (got != fp32_scale).any()
    _assert_within_one_ulp(got, rms_norm_unweighted_ref(x, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twins_are_the_model_math(dtype):
    x, w = _inputs((5, 3, 64), dtype, seed=4)
    norm = RMSNorm(64, EPS)
    norm.weight.copy_(w)
    assert torch.equal(rms_norm_ref(x, w, EPS), norm(x))
    assert torch.equal(rms_norm_unweighted_ref(x, EPS), rms_unweighted(x, EPS))
    assert torch.equal(rms_norm(x, w, EPS), norm(x))  # "auto" on the CPU is the twin


def test_empty_and_bad_inputs():
    w = torch.ones(128)
    assert rms_norm(torch.empty(0, 128), w, EPS, impl="triton").shape == (0, 128)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(4, 128), torch.ones(128, dtype=torch.bfloat16), EPS, impl="triton")
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(4, 128), torch.ones(64), EPS, impl="triton")
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(torch.randn(128, 4).t(), w, EPS, impl="triton")
    with pytest.raises(ValueError, match="x must be"):
        rms_norm_unweighted(torch.randn(4, 128).double(), EPS, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        rms_norm(torch.randn(4, 128), w, EPS, impl="cuda")
