"""Benchmark of the FP8 block-scaled linear (issue "Kernels II" item 2) on V4-Flash shapes.

For each weight (wq_a, wq_b, wkv, wo_b, shared w1, grouped wo_a) at M = 64 and M = 8192, timed in
one run (medians; inputs rotated over copies that together exceed 2x L2):
  kernel      the Triton weight-only kernel (decode form at M <= 64, prefill form above)
  dequant+mm  Triton dequantize into a scratch buffer + the vendor GEMM (the op's large-M path)
  op          what `flashport.ops.fp8_linear` picks by its config threshold
  bf16 mm     the vendor GEMM on an already dequantized weight (the dequant path's ceiling)
  twin        the torch reference (dequant_fp8_blocks + F.linear / bmm)
  scaled_mm   torch._scaled_mm FP8 x FP8 (per-tensor scales; and DeepSeek blockwise when the
              build accepts it): the vendor's FP8 GEMM, for reference at M = 8192
Each is timed eagerly (do_bench, launch overhead included) and as a CUDA graph (do_bench_cudagraph:
what a graph-replayed decode step pays). Floors: bytes (FP8 weight + scales + activations in and
out) / 4.2e12 B/s at M = 64; FLOPs / 740e12 (bf16 MMA, what weight-only dequant feeds) and
/ 1300e12 (FP8 MMA) at M = 8192. --sweep also times the decode kernel at several split-K targets.

Usage (repo root): python3 scripts/gpu/bench_fp8_linear.py --out DIR [--sweep]
Writes DIR/bench_fp8_linear.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.kernels import fp8_linear as k  # noqa: E402
from flashport.kernels.spec import target_of  # noqa: E402
from flashport.model.quant import fp8_fn_to_fnuz, quant_fp8_blocks  # noqa: E402
from flashport.ops.fp8_linear import fp8_linear, fp8_linear_ref, grouped_linear, grouped_linear_ref  # noqa: E402
from flashport.platform import detect_platform  # noqa: E402

HBM_BPS, BF16_FLOPS, FP8_FLOPS = 4.2e12, 740e12, 1300e12
# name, out features per group, in features, groups
SHAPES = [("wq_a", 1024, 4096, 1), ("wq_b", 32768, 1024, 1), ("wkv", 512, 4096, 1),
          ("wo_b", 4096, 8192, 1), ("shared_w1", 2048, 4096, 1), ("wo_a (grouped)", 1024, 4096, 8)]
MS = (64, 8192)


class Rotation:
    """Several copies of one problem, each call using the next, so the set exceeds L2."""

    def __init__(self, make: Callable[[int], dict], set_bytes: int, l2_bytes: int, cap: int = 64) -> None:
        n = max(1, min(cap, -(-2 * l2_bytes // max(set_bytes, 1))))
        self.sets = [make(i) for i in range(n)]
        self.i = 0

    def next(self) -> dict:
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s


def _time(fn: Callable[[], object]) -> dict:
    out = {}
    for mode, bench in (("eager_us", lambda: do_bench(fn, warmup=25, rep=100, return_mode="median")),
                        ("graph_us", lambda: do_bench_cudagraph(fn, rep=100, return_mode="median"))):
        try:
            out[mode] = round(bench() * 1e3, 2)
        except Exception as e:  # noqa: BLE001 - record and go on: one failing path must not end the run
            out[mode] = None
            out[f"{mode}_error"] = f"{type(e).__name__}: {e}"[:300]
            torch.cuda.synchronize()
    return out


def _scaled_mm_fns(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, fp8: torch.dtype) -> dict[str, Callable]:
    # FP8 activations (values irrelevant for timing); W [N, K] row-major is the column-major [K, N].
    xq = x.to(fp8)
    one = torch.ones((), device=x.device)
    fns = {"scaled_mm (tensorwise)": lambda: torch._scaled_mm(xq, w.t(), one, one, out_dtype=torch.bfloat16)}
    M, K = x.shape
    # DeepSeek recipe: activations 1x128 (scale [M, K/128]), weights 128x128 (scale [K/128, N/128]:
    # the checkpoint grid transposed). Which memory layout of the scales a build accepts varies:
    # take the first candidate that runs.
    sb_rm = torch.ldexp(torch.ones_like(s, dtype=torch.float32), s.int() - 127)  # [N/128, K/128]
    sa_cands = (torch.ones(K // 128, M, device=x.device).t(), torch.ones(M, K // 128, device=x.device))
    sb_cands = (sb_rm.t(), sb_rm.t().contiguous())
    for sa in sa_cands:
        for sb in sb_cands:
            try:
                torch._scaled_mm(xq, w.t(), sa, sb, out_dtype=torch.bfloat16)
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - not this layout (or no blockwise support in this build)
                continue
            fns["scaled_mm (blockwise 1x128/128x128)"] = (
                lambda sa=sa, sb=sb: torch._scaled_mm(xq, w.t(), sa, sb, out_dtype=torch.bfloat16))
            return fns
    return fns


def bench_shape(name: str, n: int, kdim: int, groups: int, M: int, fp8: torch.dtype, l2: int) -> list[dict]:
    dev = torch.device("cuda")
    rows = n * groups
    w_bytes = rows * kdim + (-(-rows // 128)) * (-(-kdim // 128))
    act_bytes = 2 * M * groups * kdim + 2 * M * rows  # bf16 x in, y out

    def make(i: int) -> dict:
        g = torch.Generator(device=dev).manual_seed(i)
        q, s = quant_fp8_blocks(torch.randn(rows, kdim, device=dev, generator=g) * 0.02)
        if fp8 == torch.float8_e4m3fnuz:
            q, s = fp8_fn_to_fnuz(q, s)
        x = torch.randn(M, groups, kdim, device=dev, generator=g, dtype=torch.bfloat16)
        return dict(q=q, s=s, x=x, x2=x.view(M, groups * kdim) if groups == 1 else None)

    rot = Rotation(make, w_bytes + act_bytes, l2)
    scratch = torch.empty(rows * kdim, dtype=torch.bfloat16, device=dev)
    dense = k.fp8_dequant(rot.sets[0]["q"], rot.sets[0]["s"], torch.bfloat16)  # for the bf16-mm ceiling only

    def dequant_mm():
        p = rot.next()
        w = k.fp8_dequant(p["q"], p["s"], torch.bfloat16, out=scratch.view(rows, kdim))
        if groups == 1:
            return F.linear(p["x2"], w)
        return torch.bmm(p["x"].transpose(0, 1), w.view(groups, n, kdim).transpose(1, 2))

    def bf16_mm():
        p = rot.next()
        if groups == 1:
            return F.linear(p["x2"], dense)
        return torch.bmm(p["x"].transpose(0, 1), dense.view(groups, n, kdim).transpose(1, 2))

    def op():
        p = rot.next()
        if groups == 1:
            return fp8_linear(p["x2"], p["q"], p["s"], scratch=scratch)
        return grouped_linear(p["x"], p["q"], p["s"], scratch=scratch)

    def twin():
        p = rot.next()
        return fp8_linear_ref(p["x2"], p["q"], p["s"]) if groups == 1 else grouped_linear_ref(p["x"], p["q"], p["s"])

    fns: dict[str, Callable] = {"kernel": lambda: (lambda p: k.fp8_matmul(p["x"], p["q"], p["s"]))(rot.next()),
                                "dequant+mm": dequant_mm, "op": op, "bf16 mm": bf16_mm, "twin": twin}
    if groups == 1 and M >= 1024 and hasattr(torch, "_scaled_mm"):
        p0 = rot.sets[0]
        fns.update(_scaled_mm_fns(p0["x2"], p0["q"], p0["s"], fp8))

    # Correctness on set 0 (the kernel vs the twin, bf16 output)
    p0 = rot.sets[0]
    ref = (fp8_linear_ref(p0["x2"], p0["q"], p0["s"]).view(M, groups, n) if groups == 1
           else grouped_linear_ref(p0["x"], p0["q"], p0["s"]))
    got = k.fp8_matmul(p0["x"], p0["q"], p0["s"])
    rel_err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
    del ref, got
    plan = k.plan(p0["x"], p0["q"])
    flops = 2 * M * rows * kdim
    results = []
    for impl, fn in fns.items():
        t = _time(fn)
        best = min((v for key, v in t.items() if key.endswith("_us") and v), default=None)
        row = dict(shape=name, M=M, N=rows, K=kdim, groups=groups, impl=impl, **t,
                   bytes=w_bytes + act_bytes, flops=flops, copies=len(rot.sets))
        if best:
            row["hbm_frac"] = round((w_bytes + act_bytes) / (best * 1e-6) / HBM_BPS, 3)
            row["bf16_frac"] = round(flops / (best * 1e-6) / BF16_FLOPS, 3)
            row["fp8_frac"] = round(flops / (best * 1e-6) / FP8_FLOPS, 3)
        if impl == "kernel":
            row.update(form=plan.form, splits=plan.splits, max_rel_err_vs_twin=rel_err)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def sweep(fp8: torch.dtype, l2: int) -> list[dict]:
    # The decode kernel at M = 1 and 64 for several split-K targets (config programs_per_sm).
    target = target_of(torch.empty(0, device="cuda"))
    base = k.CONFIGS[target]
    dev = torch.device("cuda")
    rows = []
    for name, n, kdim, groups in SHAPES:
        for M in (1, 64):
            def make(i: int, n=n, kdim=kdim, groups=groups, M=M) -> dict:
                q, s = quant_fp8_blocks(torch.randn(n * groups, kdim, device=dev) * 0.02)
                if fp8 == torch.float8_e4m3fnuz:
                    q, s = fp8_fn_to_fnuz(q, s)
                return dict(q=q, s=s, x=torch.randn(M, groups, kdim, device=dev, dtype=torch.bfloat16))

            nbytes = n * groups * kdim + 2 * M * groups * kdim + 2 * M * n * groups
            rot = Rotation(make, nbytes, l2)
            for pps in (1, 2, 4, 8, 16):
                k.CONFIGS[target] = dataclasses.replace(base, programs_per_sm=pps)  # read by k.plan per call
                try:
                    splits = k.plan(rot.sets[0]["x"], rot.sets[0]["q"], "decode").splits
                    t = _time(lambda: (lambda p: k.fp8_matmul(p["x"], p["q"], p["s"], "decode"))(rot.next()))  # noqa: B023
                finally:
                    k.CONFIGS[target] = base
                row = dict(programs_per_sm=pps, shape=name, M=M, splits=splits, **t)
                if t.get("graph_us"):
                    row["hbm_frac_graph"] = round(nbytes / (t["graph_us"] * 1e-6) / HBM_BPS, 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del rot
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", action="store_true", help="also sweep the decode split-K target")
    args = ap.parse_args()
    plat = detect_platform("cuda")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 0) or 64 << 20
    res: dict = dict(device=plat.device_name, arch=plat.arch, fp8=plat.fp8_flavour, torch=torch.__version__,
                     triton=triton.__version__, l2_bytes=l2, sms=props.multi_processor_count,
                     target=target_of(torch.empty(0, device="cuda")), rows=[], errors=[])
    for M in MS:
        for name, n, kdim, groups in SHAPES:
            try:
                res["rows"] += bench_shape(name, n, kdim, groups, M, plat.fp8_dtype, l2)
            except Exception:  # noqa: BLE001
                res["errors"].append(dict(shape=name, M=M, error=traceback.format_exc()[-2000:]))
                print(res["errors"][-1]["error"], flush=True)
            torch.cuda.empty_cache()
    if args.sweep:
        res["sweep"] = sweep(plat.fp8_dtype, l2)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "bench_fp8_linear.json").write_text(json.dumps(res, indent=1))

    print(f"\n{res['device']} ({res['target']}, {res['fp8']}), torch {res['torch']}, triton {res['triton']}")
    print(f"{'shape':16} {'M':>5} {'impl':36} {'eager us':>9} {'graph us':>9} {'HBM frac':>8} {'bf16 frac':>9} "
          f"{'fp8 frac':>8}  note")
    for r in res["rows"]:
        note = f"{r['form']} splits={r['splits']} err={r['max_rel_err_vs_twin']:.1e}" if r["impl"] == "kernel" else ""
        if r.get("graph_us_error") or r.get("eager_us_error"):
            note += " " + (r.get("eager_us_error") or r.get("graph_us_error"))[:60]
        print(f"{r['shape']:16} {r['M']:5} {r['impl']:36} {r['eager_us'] or '-':>9} {r['graph_us'] or '-':>9} "
              f"{r.get('hbm_frac', '-'):>8} {r.get('bf16_frac', '-'):>9} {r.get('fp8_frac', '-'):>8}  {note}")
    for e in res["errors"]:
        print("ERROR", e["shape"], e["M"], e["error"].strip().splitlines()[-1])


if __name__ == "__main__":
    main()
