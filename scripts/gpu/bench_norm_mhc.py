"""GPU benchmark of the RMSNorm and mHC kernels against their torch twins, in one run.

Cases (bf16, hidden 4096, hc 4):
  rmsnorm      weighted [8192, 4096] (attn / ffn norm of a prefill chunk)
  rmsnorm_q    unweighted per head [1024, 64, 512] (q_b_norm)
  mhc_pre      N = 64 and 8192 tokens: u, post, comb from X [N, 4, 4096]
  mhc_post     N = 64 and 8192: X' from X, y, post, comb
  mhc_head     N = 64 and 8192

Bytes are the floor: every input read once and every output written once (the mHC pre kernels read
X twice, once for the mixes and once for the collapse, so they cannot pass half of it). Fraction =
bytes / time / 4.2e12 B/s. Times are medians of `triton.testing.do_bench` (events around each
call, L2 flushed between calls) and of `do_bench_cudagraph` (launch overhead removed); inputs
rotate over copies totalling > 2x L2. Each case also checks the kernel against the twin.

Usage (repo root): python3 scripts/gpu/bench_norm_mhc.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.ops.mhc import mhc_head, mhc_post, mhc_pre  # noqa: E402
from flashport.ops.rmsnorm import rms_norm, rms_norm_unweighted  # noqa: E402

PEAK_BW = 4.2e12  # H200 HBM3e, B/s
L2_BYTES = 64 << 20  # above H100 / H200 (50 MB) L2
HC, HIDDEN, EPS, HC_EPS, ITERS = 4, 4096, 1e-6, 1e-6, 20
DT = torch.bfloat16


def _copies(bytes_per_call: int) -> int:
    return max(2, -(-2 * L2_BYTES // max(bytes_per_call, 1)))


def _rotating(make: Callable[[], tuple], n: int) -> Callable[[], tuple]:
    sets = [make() for _ in range(n)]
    state = {"i": 0}

    def next_args() -> tuple:
        state["i"] = (state["i"] + 1) % n
        return sets[state["i"]]

    return next_args


def _time(fn: Callable[[], object]) -> tuple[float, float]:
    """(median us with events, median us under a CUDA graph)."""
    fn()
    torch.cuda.synchronize()
    t_ev = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    try:
        t_graph = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:  # capture can fail on old stacks; the event time still stands
        print(f"  (cudagraph timing failed: {type(e).__name__}: {e})")
        t_graph = float("nan")
    return t_ev * 1e3, t_graph * 1e3


def _compare(got, ref) -> dict:
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    out = {}
    for i, (a, b) in enumerate(zip(got, ref)):
        d = (a.float() - b.float()).abs()
        out[f"out{i}"] = dict(dtype=str(a.dtype).removeprefix("torch."), max_abs=float(d.max()),
                              ref_max=float(b.float().abs().max()), mismatch=float((a != b).float().mean()))
    return out


def bench_case(name: str, make: Callable[[], tuple], kernel: Callable, twin: Callable, nbytes: int) -> list[dict]:
    args = _rotating(make, _copies(nbytes))
    first = args()
    check = _compare(kernel(*first), twin(*first))
    rows = []
    for impl, fn in (("triton", kernel), ("torch", twin)):
        t_ev, t_graph = _time(lambda fn=fn: fn(*args()))
        best = min(t_ev, t_graph) if t_graph == t_graph else t_ev
        rows.append(dict(case=name, impl=impl, us=t_ev, us_graph=t_graph, bytes=nbytes,
                         gbps=nbytes / best / 1e3, frac_peak=nbytes / (best * 1e-6) / PEAK_BW))
    rows[0]["check_vs_twin"] = check
    for r in rows:
        print(f"{r['case']:<16} {r['impl']:<6} {r['us']:9.1f} us  graph {r['us_graph']:9.1f} us  "
              f"{r['bytes'] / 1e6:9.2f} MB  {r['gbps']:7.0f} GB/s  {100 * r['frac_peak']:5.1f}% of 4.2 TB/s"
              " (faster of the two)")
    print(f"{'':<16} check vs torch: " + "; ".join(
        f"{k} {c['dtype']} max |diff| {c['max_abs']:.3g} (|ref| <= {c['ref_max']:.3g}), {c['mismatch']:.2g} differ"
        for k, c in check.items()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    rows: list[dict] = []

    N = 8192
    w = torch.randn(HIDDEN, device=dev, generator=g)
    rows += bench_case(
        "rmsnorm", lambda: (torch.randn(N, HIDDEN, device=dev, generator=g).to(DT),),
        lambda x: rms_norm(x, w, EPS, impl="triton"), lambda x: rms_norm(x, w, EPS, impl="torch"),
        2 * N * HIDDEN * 2 + HIDDEN * 4)
    Nq = 1024
    rows += bench_case(
        "rmsnorm_q", lambda: (torch.randn(Nq, 64, 512, device=dev, generator=g).to(DT),),
        lambda x: rms_norm_unweighted(x, EPS, impl="triton"), lambda x: rms_norm_unweighted(x, EPS, impl="torch"),
        2 * Nq * 64 * 512 * 2)

    K = HC * HIDDEN
    fn = torch.randn(24, K, device=dev, generator=g) * (2 / K ** 0.5)
    base = torch.randn(24, device=dev, generator=g) * 0.5
    scale = torch.rand(3, device=dev, generator=g) + 0.5
    fn_h, base_h, scale_h = fn[:4].contiguous(), base[:4].contiguous(), scale[:1].contiguous()
    for N in (64, 8192):
        make_x = lambda N=N: (torch.randn(N, HC, HIDDEN, device=dev, generator=g).to(DT),)  # noqa: E731
        x_bytes = N * K * 2
        rows += bench_case(
            f"mhc_pre N={N}", make_x,
            lambda x: mhc_pre(x, fn, base, scale, HC_EPS, EPS, ITERS, impl="triton"),
            lambda x: mhc_pre(x, fn, base, scale, HC_EPS, EPS, ITERS, impl="torch"),
            x_bytes + N * HIDDEN * 2 + N * 20 * 4 + fn.numel() * 4)

        def make_post(N=N):
            post = 2 * torch.rand(N, HC, device=dev, generator=g)
            comb = torch.rand(N, HC, HC, device=dev, generator=g)
            return (make_x(N)[0], torch.randn(N, HIDDEN, device=dev, generator=g).to(DT), post,
                    comb / comb.sum(-2, keepdim=True))

        rows += bench_case(
            f"mhc_post N={N}", make_post,
            lambda x, y, p, c: mhc_post(x, y, p, c, impl="triton"),
            lambda x, y, p, c: mhc_post(x, y, p, c, impl="torch"),
            2 * x_bytes + N * HIDDEN * 2 + N * 20 * 4)
        rows += bench_case(
            f"mhc_head N={N}", make_x,
            lambda x: mhc_head(x, fn_h, base_h, scale_h, HC_EPS, EPS, impl="triton"),
            lambda x: mhc_head(x, fn_h, base_h, scale_h, HC_EPS, EPS, impl="torch"),
            x_bytes + N * HIDDEN * 2 + fn_h.numel() * 4)
        torch.cuda.empty_cache()

    out = args.out / "bench_norm_mhc.json"
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                   triton=triton.__version__, peak_bw=PEAK_BW, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
