"""FP8 block-scaled linear kernels vs their torch twins (CPU: the Triton interpreter), and the
ahead-of-time compile of every AOT_SPECS entry for the four targets (in a subprocess, started
first so it overlaps the interpreter tests)."""

from __future__ import annotations


import pytest
import torch

from flashport.kernels import fp8_linear as k
from flashport.model.quant import dequant_fp8_blocks, fp8_fn_to_fnuz, quant_fp8_blocks
from flashport.ops.fp8_linear import fp8_linear, fp8_linear_ref, grouped_linear, grouped_linear_ref

CFG = k.CONFIGS["interpret"]  # decode for M <= 16, kernel up to M = 48, dequant + matmul above


def _weight(g: torch.Generator, n: int, kdim: int, block: tuple[int, int] = (128, 128),
            exps: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # Random weights quantized as the checkpoint is; `exps` overrides the block exponents (2^e
    # per block, cycled) to reach the ends of the range while keeping the same FP8 codes.
    q, s = quant_fp8_blocks(torch.randn(n, kdim, generator=g), block)
    if exps is not None:
        pick = torch.randint(len(exps), s.shape, generator=g)
        s = (torch.tensor(exps)[pick] + 127).to(torch.uint8)
    return q, s


def _check(y: torch.Tensor, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, rel: float) -> None:
    # Error bounded elementwise by rel * (|x| @ |W|^T): the fp32 accumulation-order bound, which
    # stays meaningful when output columns differ by 2^30 (extreme block scales).
    ref = fp8_linear_ref(x, q, s)
    assert y.dtype == x.dtype and y.shape == ref.shape
    bound = x.abs().float() @ dequant_fp8_blocks(q, s, torch.float32).abs().T
    err = (y.float() - ref.float()).abs()
    assert torch.all(err <= rel * bound + 1e-30), float((err / (bound + 1e-30)).max())


TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 5, 37])
@pytest.mark.parametrize("n,kdim", [(256, 256), (160, 384)])  # N=160: 2 scale rows, derived block 80
def test_fp8_linear_matches_twin(M, n, kdim, dtype):
    g = torch.Generator().manual_seed(1000 * M + n + kdim)
    q, s = _weight(g, n, kdim)
    x = torch.randn(M, kdim, generator=g).to(dtype)
    _check(fp8_linear(x, q, s, impl="triton"), x, q, s, TOL[dtype])


@pytest.mark.parametrize("form", ["decode", "prefill"])
def test_extreme_block_scales(form):
    g = torch.Generator().manual_seed(7)
    q, s = _weight(g, 192, 256, exps=(-20, 10, -3, 0))
    x = torch.randn(19, 256, generator=g)
    _check(k.fp8_matmul(x[:, None], q, s, form)[:, 0], x, q, s, 1e-5)


def test_dequant_exact_full_exponent_range_and_fnuz():
    g = torch.Generator().manual_seed(8)
    q, s = _weight(g, 160, 200, exps=(-127, 1, -67, 127))  # raw bytes 0, 128, 60, 254
    ref = dequant_fp8_blocks(q, s, torch.float32)
    assert torch.equal(k.fp8_dequant(q, s, torch.float32), ref)
    assert torch.equal(k.fp8_dequant(q, s, torch.float16), dequant_fp8_blocks(q, s, torch.float16))
    qz, sz = fp8_fn_to_fnuz(*_weight(g, 160, 200))  # e4m3fnuz bytes decoded in-kernel
    assert torch.equal(k.fp8_dequant(qz, sz, torch.float32), dequant_fp8_blocks(qz, sz, torch.float32))


@pytest.mark.parametrize("form", ["decode", "prefill"])
def test_e4m3fnuz_weights(form):
    g = torch.Generator().manual_seed(9)
    q, s = fp8_fn_to_fnuz(*_weight(g, 160, 256))
    x = torch.randn(5, 256, generator=g)
    _check(k.fp8_matmul(x[:, None], q, s, form)[:, 0], x, q, s, 1e-5)


def test_k_tail_and_unsupported_block_falls_back():
    # K=190 with 64-wide column blocks: 3 blocks of 64 (the last one partial), a masked K tail.
    g = torch.Generator().manual_seed(10)
    q, s = _weight(g, 96, 190, block=(128, 64))
    x = torch.randn(3, 190, generator=g)
    assert k.supports(q, s, "decode") and not k.supports(q, s, "prefill")  # BLOCK_K 64 / 128
    _check(k.fp8_matmul(x[:, None], q, s, "decode")[:, 0], x, q, s, 1e-5)
    with pytest.raises(ValueError, match="BLOCK_K"):
        k.fp8_matmul(x[:, None], q, s, "prefill")
    x = torch.randn(30, 190, generator=g)  # the prefill form cannot take it: the op dequantizes
    _check(fp8_linear(x, q, s, impl="triton"), x, q, s, 1e-5)


def test_dequant_matmul_path_with_scratch():
    g = torch.Generator().manual_seed(11)
    q, s = _weight(g, 160, 256)
    x = torch.randn(2, 30, 256, generator=g)  # M = 60 > dequant_above_m
    scratch = torch.empty(160 * 256 + 7)
    _check(fp8_linear(x, q, s, impl="triton", scratch=scratch), x, q, s, 1e-5)


def test_rows_do_not_depend_on_batch():
    # The split over K is chosen from the weight shape and the M class alone, so a row's sums run
    # in the same order at any M within one decode class (interpreter classes: M <= 4, M <= 16).
    g = torch.Generator().manual_seed(12)
    q, s = _weight(g, 160, 512)  # 3 N tiles of 64 on 4 "SMs": 2 uneven K splits
    x = torch.randn(9, 512, generator=g)
    assert k.plan(x[:, None], q, "decode").splits > 1
    full = k.fp8_matmul(x[:, None], q, s, "decode")
    # rows at the same place in their M tile (the interpreter's numpy matmul rounds by position)
    assert torch.equal(k.fp8_matmul(x[:5, None], q, s, "decode"), full[:5])


def test_decode_classes_pick_by_m():
    g = torch.Generator().manual_seed(15)
    q, s = _weight(g, 160, 512)
    small, large = CFG.decode
    for m, cls in ((1, small), (small.max_m, small), (small.max_m + 1, large), (CFG.decode_max_m, large)):
        x = torch.randn(m, 1, 512, generator=g)
        p = k.plan(x, q)
        assert p.form == "decode" and p.launch == cls.launch
        _check(k.fp8_matmul(x, q, s)[:, 0], x[:, 0], q, s, 1e-5)
    assert k.plan(torch.randn(CFG.decode_max_m + 1, 1, 512), q).form == "prefill"
    with pytest.raises(ValueError, match="ascending"):
        k.Fp8LinearConfig(decode=(large, small), prefill=CFG.prefill, dequant=CFG.dequant, split_sum=CFG.split_sum)


def test_f16_dot_for_bf16_activations():
    """F16_DOT: bf16 x rows scaled into fp16 by a power of two, the dot in fp16. Rows from 1e-20 to
    3e4 (beyond fp16's range unscaled) stay within bf16 output rounding of the fp32 reference.
    (The interpreter's bf16 dot is wrong, so only this form runs bf16 x here.)"""
    import dataclasses

    g = torch.Generator().manual_seed(16)
    q, s = _weight(g, 160, 512, exps=(-9, -3, 2))
    x = (torch.randn(6, 512, generator=g) * torch.tensor([1, 1e-3, 1e3, 1e-20, 3e4, 0])[:, None]).bfloat16()
    x[0, :7] = 0
    cfg = dataclasses.replace(CFG, decode=tuple(
        dataclasses.replace(c, launch=k.Launch({**c.launch.constexprs, "F16_DOT": True}, c.launch.options))
        for c in CFG.decode))
    w = dequant_fp8_blocks(q, s, torch.float32)
    ref, bound = x.float() @ w.T, x.float().abs() @ w.abs().T
    for m in (1, 6):  # both interpreter classes; split-K on
        y = k.fp8_matmul(x[:m, None], q, s, "decode", cfg)[:, 0]
        assert y.dtype == torch.bfloat16
        assert torch.all((y.float() - ref[:m]).abs() <= 2 ** -8 * bound[:m] + 1e-30)
    assert torch.all(k.fp8_matmul(x[5:, None], q, s, "decode", cfg) == 0)


@pytest.mark.parametrize("groups", [1, 2])
def test_fused_split_sum_equals_split_sum_launch(groups):
    """fused_sum: the last split of each tile adds the partials (in split order, as split_sum does):
    bit-identical results, and the arrival counters are back at zero after every launch."""
    import dataclasses

    g = torch.Generator().manual_seed(17)
    q, s = _weight(g, 96 if groups == 1 else 32 * groups, 512)  # 2 N tiles on 4 "SMs": K splits
    x = torch.randn(7, groups, 512, generator=g)
    fused = dataclasses.replace(CFG, decode=tuple(dataclasses.replace(c, fused_sum=True) for c in CFG.decode))
    p = k.plan(x, q, "decode", fused)
    assert p.splits > 1 and p.fused_sum
    for _ in range(2):  # the counters are reused by the next launch
        y = k.fp8_matmul(x, q, s, "decode", fused)
        assert torch.equal(y, k.fp8_matmul(x, q, s, "decode"))
        assert int(k._counters(x.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("M", [1, 37, 50])
def test_grouped_linear(M):
    # 4 groups of 96 rows over 128-row scale blocks: groups straddle scale blocks.
    g = torch.Generator().manual_seed(13 + M)
    G, No, Kg = 4, 96, 256
    q, s = _weight(g, G * No, Kg)
    x = torch.randn(M, G, Kg, generator=g)
    y = grouped_linear(x, q, s, impl="triton")
    ref = grouped_linear_ref(x, q, s)
    assert y.shape == (M, G, No)
    w = dequant_fp8_blocks(q, s, torch.float32).view(G, No, Kg).abs()
    bound = torch.einsum("mgk,gnk->mgn", x.abs(), w)
    assert torch.all((y - ref).abs() <= 1e-5 * bound)


def test_auto_on_cpu_is_the_twin_and_inputs_are_checked():
    g = torch.Generator().manual_seed(14)
    q, s = _weight(g, 128, 128)
    x = torch.randn(3, 128, generator=g)
    assert torch.equal(fp8_linear(x, q, s), fp8_linear_ref(x, q, s))
    with pytest.raises(ValueError, match="weight"):
        k.fp8_matmul(x[:, None], q.float(), s)
    with pytest.raises(ValueError, match="scale"):
        k.fp8_matmul(x[:, None], q, s.to(torch.int32))
    with pytest.raises(ValueError, match="x must"):
        k.fp8_matmul(x, q, s)
    with pytest.raises(ValueError, match="does not match"):
        k.fp8_matmul(x[:, None, :64], q, s)
    with pytest.raises(ValueError, match="impl"):
        fp8_linear(x, q, s, impl="cuda")


