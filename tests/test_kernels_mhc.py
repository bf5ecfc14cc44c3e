"""mHC pre / post / head kernels (interpreter on the CPU) against their torch twins, and the twins
against the model's HyperConnection / post_update / HyperHead."""

from __future__ import annotations

import zlib

import pytest
import torch

from flashport.model.mhc import HyperConnection, HyperHead, post_update
from flashport.ops.mhc import mhc_head, mhc_head_ref, mhc_post, mhc_post_ref, mhc_pre, mhc_pre_ref

HC_EPS, NORM_EPS, ITERS = 1e-6, 1e-6, 20


def _gen(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _x(N: int, H: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(N, 4, H, generator=g) * 2 + 0.3).to(dtype)  # [N, 4, H]


def _params(M: int, H: int, n_scale: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # logits of order one: fn rows of norm ~2 against the unit-RMS flattened row
    fn = torch.randn(M, 4 * H, generator=g) * (2.0 / (4 * H) ** 0.5)
    return fn, torch.randn(M, generator=g) * 0.5, torch.rand(n_scale, generator=g) + 0.5


def _assert_within_one_ulp(got: torch.Tensor, ref: torch.Tensor, max_fraction: float = 0.01) -> None:
    """Low-precision outputs computed from fp32 values that differ from torch's in the last bit
    (a different summation order of the 16384-long mix dot products): equal but for rare one-ulp flips."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    ulp = torch.finfo(ref.dtype).eps * ref.float().abs().clamp_min(torch.finfo(ref.dtype).tiny)
    assert ((got.float() - ref.float()).abs() <= ulp).all()
    assert (got != ref).float().mean() <= max_fraction


# (N, hidden): odd N across token blocks (16 in the interpreter config); hidden 320 crosses the
# 256-wide hidden block and leaves the last K slice of the mix kernel empty
CASES = [(torch.float32, 37, 96), (torch.bfloat16, 37, 96), (torch.float16, 19, 96), (torch.bfloat16, 3, 320)]


@pytest.mark.parametrize("dtype,N,H", CASES)
def test_pre_matches_twin(dtype, N, H):
    g = _gen("pre", dtype, N, H)
    x = _x(N, H, dtype, g)
    fn, base, scale = _params(24, H, 3, g)
    u, post, comb = mhc_pre(x, fn, base, scale, HC_EPS, NORM_EPS, ITERS, impl="triton")
    u_ref, post_ref, comb_ref = mhc_pre_ref(x, fn, base, scale, HC_EPS, NORM_EPS, ITERS)
    assert post.dtype == comb.dtype == torch.float32 and u.dtype == dtype
    # mixes are fp32-accurate for every dtype (bf16: the exact 3-part split of F)
    torch.testing.assert_close(post, post_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(comb, comb_ref, rtol=2e-6, atol=2e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(u, u_ref, rtol=2e-6, atol=2e-6)
    else:
        _assert_within_one_ulp(u, u_ref)


@pytest.mark.parametrize("dtype,N,H", CASES[:3])
def test_head_matches_twin(dtype, N, H):
    g = _gen("head", dtype, N, H)
    x = _x(N, H, dtype, g)
    fn, base, scale = _params(4, H, 1, g)
    got = mhc_head(x, fn, base, scale, HC_EPS, NORM_EPS, impl="triton")
    ref = mhc_head_ref(x, fn, base, scale, HC_EPS, NORM_EPS)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)
    else:
        _assert_within_one_ulp(got, ref)


@pytest.mark.parametrize("dtype,N,H", CASES)
def test_post_matches_twin_exactly(dtype, N, H):
    # the kernel rounds where torch rounds and sums C^T X in torch's (MKL's) order: bit-identical
    g = _gen("post", dtype, N, H)
    x = _x(N, H, dtype, g)
    y = torch.randn(N, H, generator=g).to(dtype)
    post = 2 * torch.rand(N, 4, generator=g)
    comb = torch.rand(N, 4, 4, generator=g)
    comb = comb / comb.sum(-2, keepdim=True)
    ref = mhc_post_ref(x, y, post, comb)
    assert torch.equal(mhc_post(x, y, post, comb, impl="triton"), ref)
    from flashport.kernels import mhc as kernels

    assert torch.equal(kernels.mhc_post(x, y, post, comb, out=x), ref)  # in place
    assert torch.equal(x, ref)


def test_a_token_does_not_depend_on_the_batch():
    # fixed blocks and K split per target: the first tokens of a batch equal the same tokens alone
    g = _gen("batch")
    x = _x(21, 64, torch.bfloat16, g)
    fn, base, scale = _params(24, 64, 3, g)
    full = mhc_pre(x, fn, base, scale, HC_EPS, NORM_EPS, ITERS, impl="triton")
    part = mhc_pre(x[:3].contiguous(), fn, base, scale, HC_EPS, NORM_EPS, ITERS, impl="triton")
    for a, b in zip(full, part):
        assert torch.equal(a[:3], b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twins_are_the_model_math(dtype):
    g = _gen("model", dtype)
    N, H = 5, 32
    x = _x(N, H, dtype, g)
    hc = HyperConnection(4, H, ITERS, HC_EPS, NORM_EPS)
    for p, v in zip((hc.fn, hc.base, hc.scale), _params(24, H, 3, g)):
        p.copy_(v)
    want = hc.pre(x)
    got = mhc_pre_ref(x, hc.fn, hc.base, hc.scale, HC_EPS, NORM_EPS, ITERS)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(mhc_pre(x, hc.fn, hc.base, hc.scale, HC_EPS, NORM_EPS, ITERS), want))
    y = torch.randn(N, H, generator=g).to(dtype)
    assert torch.equal(mhc_post_ref(x, y, want[1], want[2]), post_update(x, y, want[1], want[2]))
    head = HyperHead(4, H, HC_EPS, NORM_EPS)
    for p, v in zip((head.fn, head.base, head.scale), _params(4, H, 1, g)):
        p.copy_(v)
    assert torch.equal(mhc_head_ref(x, head.fn, head.base, head.scale, HC_EPS, NORM_EPS), head(x))


def test_bad_inputs():
    g = _gen("bad")
    x = _x(3, 32, torch.float32, g)
    fn, base, scale = _params(24, 32, 3, g)
    with pytest.raises(ValueError, match="x must be"):
        mhc_pre(x[:, :3].contiguous(), fn, base, scale, HC_EPS, NORM_EPS, ITERS, impl="triton")
    with pytest.raises(ValueError, match="fn"):
        mhc_pre(x, fn[:, :64].contiguous(), base, scale, HC_EPS, NORM_EPS, ITERS, impl="triton")
    with pytest.raises(ValueError, match="scale"):
        mhc_head(x, fn[:4].contiguous(), base[:4], scale, HC_EPS, NORM_EPS, impl="triton")
    with pytest.raises(ValueError, match="y must be"):
        mhc_post(x, torch.randn(3, 32).bfloat16(), torch.rand(3, 4), torch.rand(3, 4, 4), impl="triton")
    with pytest.raises(ValueError, match="comb"):
        mhc_post(x, torch.randn(3, 32), torch.rand(3, 4), torch.rand(3, 4, 4).double(), impl="triton")
    u, post, comb = mhc_pre(x[:0], fn, base, scale, HC_EPS, NORM_EPS, ITERS, impl="triton")
    assert u.shape == (0, 32) and post.shape == (0, 4) and comb.shape == (0, 4, 4)
