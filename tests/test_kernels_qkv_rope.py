"""q / kv norm + RoPE (flashport/ops/qkv_rope.py): the Triton kernel (interpreter on the CPU)
against the torch twins, which are the model's own functions; ahead-of-time compile for all targets."""

import sys

import pytest
import torch

from flashport.model.layers import RMSNorm
from flashport.ops.qkv_rope import kv_norm_rope_ref, kv_norm_rope_store, q_norm_rope, q_norm_rope_ref, rms_norm

EPS = 1e-6


def _cos_sin(n: int, half: int, dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ang = torch.rand(n, half, generator=g) * 100.0
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    else:  # last-bit differences only (fp32 summation order of the mean square)
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=2 * ulp)
        assert (got != want).float().mean() < 0.01


def test_rms_norm_is_the_model_norm():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, EPS)
    norm.weight.copy_(torch.randn(64, generator=g))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 64, generator=g).to(dtype)
        assert torch.equal(rms_norm(x, norm.weight, EPS), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,H,D,rope", [(7, 3, 64, 16), (3, 5, 128, 64)])
def test_q_norm_rope(dtype, N, H, D, rope):
    g = torch.Generator().manual_seed(N * 100 + H)
    q = (torch.randn(N, H, D, generator=g) * 3).to(dtype)
    cos, sin = _cos_sin(N, rope // 2, dtype, g)
    got = q_norm_rope(q, cos, sin, EPS, impl="triton")
    want = q_norm_rope_ref(q, cos, sin, EPS)
    assert q_norm_rope(q, cos, sin, EPS) is not None  # "auto" on the CPU is the twin
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_norm_rope_store(dtype):
    g = torch.Generator().manual_seed(3)
    N, D, rope, R = 9, 64, 16, 23
    kv = (torch.randn(N, D, generator=g) * 2).to(dtype)
    w = torch.randn(D, generator=g)
    cos, sin = _cos_sin(N, rope // 2, dtype, g)
    rows = torch.randperm(R, generator=g)[:N]
    rows[4] = -1  # not stored (a padding token)
    pool = torch.randn(R, D, generator=g).to(dtype)
    want_pool = pool.clone()
    want = kv_norm_rope_store(kv, w, EPS, cos, sin, want_pool, rows, impl="torch")
    assert torch.equal(want, kv_norm_rope_ref(kv, w, EPS, cos, sin))
    got = kv_norm_rope_store(kv, w, EPS, cos, sin, pool, rows, impl="triton")
    _close(got, want, dtype)
    _close(pool, want_pool, dtype)
    untouched = torch.ones(R, dtype=torch.bool)
    untouched[rows[rows >= 0]] = False
    assert torch.equal(pool[untouched], want_pool[untouched])


def test_checks_name_the_tensor():
    q = torch.randn(3, 2, 64)
    cos = torch.randn(3, 8)
    with pytest.raises(ValueError, match="sin"):
        q_norm_rope(q, cos, torch.randn(3, 8, dtype=torch.float16), EPS, impl="triton")
    with pytest.raises(ValueError, match="rows"):
        kv_norm_rope_store(torch.randn(3, 64), torch.ones(64), EPS, cos, cos, torch.zeros(8, 64),
                           torch.zeros(3, dtype=torch.int32), impl="triton")
    with pytest.raises(ValueError, match="impl"):
        q_norm_rope(q, cos, cos, EPS, impl="cuda")


AOT_CHECK = r"""
import sys, triton
from concurrent.futures import ThreadPoolExecutor
from triton.backends.compiler import GPUTarget
from flashport.kernels.spec import TARGETS
import importlib
mod = importlib.import_module(sys.argv[1])
dtype = sys.argv[2]
jobs = [(s, t) for s in mod.AOT_SPECS if dtype in s.name for t in TARGETS]
def build(job):
    spec, t = job
    backend, arch, warp = TARGETS[t]
    k = triton.compile(triton.compiler.ASTSource(spec.fn, spec.signature, constexprs=spec.constexprs[t]),
                       target=GPUTarget(backend, arch, warp), options=spec.options[t])
    asm = k.asm["amdgcn"] if backend == "hip" else k.asm["ptx"]
    assert asm, (spec.name, t)
    return spec.name, t
with ThreadPoolExecutor(2) as ex:
    done = list(ex.map(build, jobs))
assert len(done) >= 4, done
print(len(done), "compiled")
"""


