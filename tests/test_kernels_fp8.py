"""FP8 E4M3 storage codes in Triton (flashport/kernels/fp8.py) against torch's casts: every code's
value, every midpoint between neighbours (ties to even), subnormals, -0, saturation."""

import pytest
import torch
import triton
import triton.language as tl

from flashport.kernels.fp8 import e4m3_bits_to_f32, f32_to_e4m3_bits, fp8_format
from flashport.model.quant import fp8_max, to_fp8_storage


@triton.jit
def _roundtrip(x_ptr, code_ptr, val_ptr, FMT: tl.constexpr, N: tl.constexpr):
    o = tl.arange(0, N)
    c = f32_to_e4m3_bits(tl.load(x_ptr + o), FMT)
    tl.store(code_ptr + o, c)
    tl.store(val_ptr + o, e4m3_bits_to_f32(c, FMT))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz], ids=["e4m3fn", "e4m3fnuz"])
def test_codes_equal_torch(dtype):
    g = torch.Generator().manual_seed(3)
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    grid = grid[torch.isfinite(grid)].unique()  # sorted
    mids = (grid[1:] + grid[:-1]) / 2
    big = fp8_max(dtype)
    x = torch.cat([grid, mids, torch.randn(1000, generator=g) * 4, torch.randn(500, generator=g) * 1e-3,
                   torch.tensor([-0.0, 0.0, big * 1.01, -big * 3, 1e30, -1e30])])
    n = triton.next_power_of_2(x.numel())
    x = torch.nn.functional.pad(x, (0, n - x.numel()))
    code, val = torch.empty(n, dtype=torch.uint8), torch.empty(n)
    _roundtrip[(1,)](x, code, val, FMT=fp8_format(dtype), N=n)
    want = to_fp8_storage(x, dtype)
    assert torch.equal(code, want.view(torch.uint8))
    assert torch.equal(val, want.float())
    assert want.float().abs().max() == big  # saturated, never NaN
