"""Benchmark of the FP8 block-scaled linear on V4-Flash shapes (issue "Kernels II" item 2).

Default run: for each weight (wq_a, wq_b, wkv, wo_a grouped, wo_b, shared w1 / w3, shared w2,
indexer wq_b) at each M of --ms (default 1, 64, 8192), timed in one run (medians; inputs rotated
over copies that together exceed 2x L2):
  kernel      the Triton weight-only kernel (decode form at M <= decode_max_m, prefill form above)
  dequant+mm  Triton dequantize into a scratch buffer + the vendor GEMM (the op's large-M path)
  op          what `flashport.ops.fp8_linear` picks by its config thresholds
  bf16 mm     the vendor GEMM on an already dequantized weight (the dequant path's ceiling)
  twin        the torch reference (dequant_fp8_blocks + F.linear / bmm)
  scaled_mm   torch._scaled_mm FP8 x FP8 (per-tensor scales; and DeepSeek blockwise when the
              build accepts it): the vendor's FP8 GEMM, for reference at M >= 1024
Each is timed eagerly (do_bench, launch overhead included) and as a CUDA graph (what a
graph-replayed decode step pays). Floors: bytes (FP8 weight + scales + activations in and out) /
4.2e12 B/s; FLOPs / 740e12 (bf16 MMA, what weight-only dequant feeds).

--sweep: instead, the decode kernel's candidate launch configs (all compile for sm_90; each with the
bf16 dot and the fp16 dot "f16") x split-K targets (programs per SM 1, 2, 4; with and without the
fused split sum "+fused") at M = 64, 1, 8, 256 (--ms) on every shape (CUDA-graph time of 40 calls),
every candidate checked against the twin (rel_err), with the table config,
the prefill form (M = 256), dequant+mm (M = 256) and the twin as references; prints the best per
(shape, M) and the best config per M class over all shapes (geometric mean of the fraction of the
byte floor), to fill the `CONFIGS` decode classes.

Usage (repo root): python3 scripts/gpu/bench_fp8_linear.py --out DIR [--sweep] [--ms 1 64 8192] [--tiny]
Writes DIR/bench_fp8_linear.json (or bench_fp8_linear_sweep.json) and prints a table.
--tiny: a CPU smoke test of the script (TRITON_INTERPRET=1, small shapes, no timing worth reading).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.kernels import fp8_linear as k  # noqa: E402
from flashport.kernels.spec import target_of  # noqa: E402
from flashport.model.quant import fp8_fn_to_fnuz, quant_fp8_blocks  # noqa: E402
from flashport.ops.fp8_linear import fp8_linear, fp8_linear_ref, grouped_linear, grouped_linear_ref  # noqa: E402
from flashport.platform import detect_platform  # noqa: E402

HBM_BPS, BF16_FLOPS, FP8_FLOPS = 4.2e12, 740e12, 1300e12
# name, out features per group, in features, groups
SHAPES = [("wq_a", 1024, 4096, 1), ("wq_b", 32768, 1024, 1), ("wkv", 512, 4096, 1),
          ("wo_a (grouped)", 1024, 4096, 8), ("wo_b", 4096, 8192, 1), ("shared_w1/w3", 2048, 4096, 1),
          ("shared_w2", 4096, 2048, 1), ("indexer wq_b", 8192, 1024, 1)]
TINY_SHAPES = [("tiny", 160, 256, 1), ("tiny grouped", 96, 256, 4)]
MS = (1, 64, 8192)
SWEEP_MS = (64, 1, 8, 256)  # the goal's M first


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


def graph_us(fn: Callable[[], object], calls: int = 40, replays: int = 5) -> float:
    """Median per-call time of `calls` calls captured in one CUDA graph (what a replayed decode step
    pays: no launch overhead). Cheaper than do_bench_cudagraph, whose capture length comes from an
    eager estimate that launch overhead inflates."""
    if not torch.cuda.is_available():  # --tiny: one call, wall clock
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: compiles, allocator
            fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(calls):
                fn()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / calls)
    del g
    return sorted(times)[len(times) // 2]


def _time(fn: Callable[[], object]) -> dict:
    out = {}
    for mode, bench in (("eager_us", lambda: _eager_us(fn)), ("graph_us", lambda: graph_us(fn))):
        try:
            out[mode] = round(bench(), 2)
        except Exception as e:  # noqa: BLE001 - record and go on: one failing path must not end the run
            out[mode] = None
            out[f"{mode}_error"] = f"{type(e).__name__}: {e}"[:300]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    return out


def _eager_us(fn: Callable[[], object]) -> float:
    if not torch.cuda.is_available():
        return graph_us(fn)
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3


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


def _bytes(n: int, kdim: int, groups: int, M: int) -> tuple[int, int]:
    rows = n * groups
    w_bytes = rows * kdim + (-(-rows // 128)) * (-(-kdim // 128))
    return w_bytes, 2 * M * groups * kdim + 2 * M * rows  # FP8 weight + scales; bf16 x in, y out


def _rotation(n: int, kdim: int, groups: int, M: int, fp8: torch.dtype, l2: int, dev: torch.device,
              dtype: torch.dtype) -> Rotation:
    rows = n * groups

    def make(i: int) -> dict:
        g = torch.Generator(device=dev).manual_seed(i)
        q, s = quant_fp8_blocks(torch.randn(rows, kdim, device=dev, generator=g) * 0.02)
        if fp8 == torch.float8_e4m3fnuz:
            q, s = fp8_fn_to_fnuz(q, s)
        x = torch.randn(M, groups, kdim, device=dev, generator=g).to(dtype)
        return dict(q=q, s=s, x=x, x2=x.view(M, groups * kdim) if groups == 1 else None)

    return Rotation(make, sum(_bytes(n, kdim, groups, M)), l2)


def _twin_fn(rot: Rotation, groups: int) -> Callable[[], object]:
    def twin():
        p = rot.next()
        return fp8_linear_ref(p["x2"], p["q"], p["s"]) if groups == 1 else grouped_linear_ref(p["x"], p["q"], p["s"])
    return twin


def _dequant_mm_fn(rot: Rotation, n: int, kdim: int, groups: int, scratch: torch.Tensor) -> Callable[[], object]:
    rows = n * groups

    def dequant_mm():
        p = rot.next()
        w = k.fp8_dequant(p["q"], p["s"], p["x"].dtype, out=scratch.view(rows, kdim))
        if groups == 1:
            return F.linear(p["x2"], w)
        return torch.bmm(p["x"].transpose(0, 1), w.view(groups, n, kdim).transpose(1, 2))
    return dequant_mm


def bench_shape(name: str, n: int, kdim: int, groups: int, M: int, fp8: torch.dtype, l2: int,
                dev: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = n * groups
    w_bytes, act_bytes = _bytes(n, kdim, groups, M)
    rot = _rotation(n, kdim, groups, M, fp8, l2, dev, dtype)
    scratch = torch.empty(rows * kdim, dtype=dtype, device=dev)
    dense = k.fp8_dequant(rot.sets[0]["q"], rot.sets[0]["s"], dtype)  # for the bf16-mm ceiling only

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

    fns: dict[str, Callable] = {"kernel": lambda: (lambda p: k.fp8_matmul(p["x"], p["q"], p["s"]))(rot.next()),
                                "dequant+mm": _dequant_mm_fn(rot, n, kdim, groups, scratch), "op": op,
                                "bf16 mm": bf16_mm, "twin": _twin_fn(rot, groups)}
    if groups == 1 and M >= 1024 and hasattr(torch, "_scaled_mm") and dev.type == "cuda":
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
                   bytes=w_bytes + act_bytes, flops=flops, copies=len(rot.sets),
                   floor_us=round(max((w_bytes + act_bytes) / HBM_BPS, flops / BF16_FLOPS) * 1e6, 2))
        if best:
            row["hbm_frac"] = round((w_bytes + act_bytes) / (best * 1e-6) / HBM_BPS, 3)
            row["bf16_frac"] = round(flops / (best * 1e-6) / BF16_FLOPS, 3)
            row["fp8_frac"] = round(flops / (best * 1e-6) / FP8_FLOPS, 3)
            row["floor_frac"] = round(row["floor_us"] / best, 3)
        if impl == "kernel":
            row.update(form=plan.form, splits=plan.splits, launch=dataclasses.asdict(plan.launch),
                       max_rel_err_vs_twin=rel_err)
        results.append(row)
        print(f"  {name:16} M={M:<5} {impl:36} eager {t.get('eager_us') or '-':>8} graph {t.get('graph_us') or '-':>8} "
              f"floor {row['floor_us']:>8} ({row.get('floor_frac', '-')})", flush=True)
    return results


# ---------------------------------------------------------------- sweep
def _cands(M: int, tiny: bool) -> list[k.Launch]:
    """Candidate decode launches (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for this M."""
    if tiny:
        return [k.Launch(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, F16_DOT=f16), dict(num_warps=4, num_stages=1))
                for f16 in (False, True)]
    if M <= 16:
        c = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 128, 8, 4)]
    elif M <= 64:
        c = [(64, 32, 128, 4, 4), (64, 64, 128, 4, 3), (64, 128, 128, 4, 3)]
    else:
        c = [(64, 128, 128, 8, 3), (128, 64, 128, 8, 3), (128, 128, 128, 8, 3)]
    return [k.Launch(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, F16_DOT=f16), dict(num_warps=w, num_stages=st))
            for bm, bn, bk, w, st in c for f16 in (False, True)]


def _lname(launch: k.Launch) -> str:
    c, o = launch.constexprs, launch.options
    return (f"m{c['BLOCK_M']}n{c['BLOCK_N']}k{c['BLOCK_K']}w{o['num_warps']}s{o['num_stages']}"
            + ("f16" if c.get("F16_DOT") else ""))


def sweep(fp8: torch.dtype, l2: int, dev: torch.device, dtype: torch.dtype, shapes, ms, tiny: bool,
          dump: Callable[[dict], None] = lambda partial: None) -> dict:
    target = target_of(torch.empty(0, device=dev))
    base = k.CONFIGS[target]
    rows: list[dict] = []
    best: list[dict] = []
    per_class: dict = {}
    for M in ms:  # M outer: each M class's summary prints as soon as its cases are done
        for name, n, kdim, groups in shapes:
            w_bytes, act_bytes = _bytes(n, kdim, groups, M)
            floor = (w_bytes + act_bytes) / HBM_BPS * 1e6
            rot = _rotation(n, kdim, groups, M, fp8, l2, dev, dtype)
            p0 = rot.sets[0]
            ref = (fp8_linear_ref(p0["x2"], p0["q"], p0["s"]).view(M, groups, n) if groups == 1
                   else grouped_linear_ref(p0["x"], p0["q"], p0["s"])).float()
            case: list[dict] = []

            def record(impl: str, fn: Callable[[], object], **extra) -> None:
                try:
                    us = graph_us(fn)
                except Exception as e:  # noqa: BLE001 - a candidate may not fit (shared memory)
                    print(f"  {name} M={M} {impl}: failed {type(e).__name__}: {str(e)[:100]}", flush=True)
                    return
                row = dict(shape=name, M=M, N=n * groups, K=kdim, groups=groups, impl=impl, graph_us=round(us, 2),
                           floor_us=round(floor, 2), floor_frac=round(floor / us, 3), **extra)
                case.append(row)
                rows.append(row)

            record("twin", _twin_fn(rot, groups))
            if M <= base.decode_max_m:
                pl = k.plan(p0["x"], p0["q"])
                record("table", lambda: (lambda p: k.fp8_matmul(p["x"], p["q"], p["s"]))(rot.next()),
                       splits=pl.splits, launch=_lname(pl.launch))
            else:  # the prefill form and the dequant path, what the op runs above decode_max_m
                record("prefill form", lambda: (lambda p: k.fp8_matmul(p["x"], p["q"], p["s"], "prefill"))(rot.next()))
                scratch = torch.empty(n * groups * kdim, dtype=dtype, device=dev)
                record("dequant+mm", _dequant_mm_fn(rot, n, kdim, groups, scratch))
            for launch in _cands(M, tiny):
                seen = set()
                for pps, fused in ((1, False), (2, False), (4, False), (1, True), (2, True), (4, True)):
                    cfg = dataclasses.replace(base, decode=(k.DecodeClass(1 << 20, launch, pps, 256, fused),))
                    pl = k.plan(p0["x"], p0["q"], "decode", cfg)
                    if (pl.splits, pl.fused_sum) in seen or (fused and not pl.fused_sum):
                        continue
                    seen.add((pl.splits, pl.fused_sum))
                    try:  # correctness of every candidate (bf16 output vs the twin)
                        got = k.fp8_matmul(p0["x"], p0["q"], p0["s"], "decode", cfg).float()
                        err = float((got - ref).abs().max() / ref.abs().max())
                    except Exception as e:  # noqa: BLE001
                        print(f"  {name} M={M} {_lname(launch)}: failed {type(e).__name__}: {str(e)[:100]}",
                              flush=True)
                        break
                    record("cand", lambda cfg=cfg: (lambda p: k.fp8_matmul(p["x"], p["q"], p["s"], "decode", cfg))(
                        rot.next()), launch=_lname(launch) + ("+fused" if fused else ""), pps=pps, splits=pl.splits,
                        rel_err=err)
            cands = [r for r in case if r["impl"] == "cand"]
            ref_rows = {r["impl"]: r for r in case if r["impl"] != "cand"}
            if cands:
                b = min(cands, key=lambda r: r["graph_us"])
                best.append(b)
                refs = "  ".join(f"{i} {r['graph_us']:.1f}" for i, r in ref_rows.items())
                print(f"{name:16} M={M:<4} best {b['launch']} pps{b['pps']} splits{b['splits']:<3} "
                      f"{b['graph_us']:8.1f} us  floor {floor:6.1f} us ({b['floor_frac']:6.1%})  | {refs}"
                      f"  err {b['rel_err']:.1e}", flush=True)
            del rot, ref
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        per_class[M] = _class_summary(rows, M)
        dump(dict(rows=rows, best=best, per_class=per_class, partial=True))  # in case the run is cut short
    return dict(rows=rows, best=best, per_class=per_class)


def _class_summary(rows: list[dict], M: int) -> list[dict]:
    """The best launch + split target for one M over all shapes: geometric mean of the floor fraction."""
    if True:
        keyed: dict = {}
        for r in rows:
            if r["M"] == M and r["impl"] == "cand":
                keyed.setdefault((r["launch"], r["pps"]), []).append(r)
        n_shapes = len({r["shape"] for r in rows if r["M"] == M})
        scored = []
        for (lname, pps), rs in keyed.items():
            if len(rs) < n_shapes:  # deduped splits: fill from the same launch's nearest pps below
                have = {r["shape"] for r in rs}
                for r2 in sorted((r for r in rows if r["M"] == M and r["impl"] == "cand" and r["launch"] == lname
                                  and r["pps"] < pps and r["shape"] not in have), key=lambda r: -r["pps"]):
                    if r2["shape"] not in have:
                        rs = rs + [r2]
                        have.add(r2["shape"])
            if len(rs) == n_shapes:
                scored.append((math.exp(sum(math.log(max(r["floor_frac"], 1e-9)) for r in rs) / len(rs)), lname, pps))
        scored.sort(reverse=True)
        if scored:
            print(f"M={M:<4} best overall: " + "; ".join(f"{ln} pps{pps} {g:.1%}" for g, ln, pps in scored[:3]),
                  flush=True)
        return [dict(geomean_floor_frac=round(g, 3), launch=ln, pps=pps) for g, ln, pps in scored[:5]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", action="store_true", help="sweep the decode launch configs instead")
    ap.add_argument("--ms", type=int, nargs="+", default=None, help=f"M values (default {MS}; sweep {SWEEP_MS})")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    plat = detect_platform("cuda" if cuda else "cpu")
    fp8 = plat.fp8_dtype if cuda else torch.float8_e4m3fn
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter's bf16 dot is wrong
    shapes = SHAPES if not args.tiny else TINY_SHAPES
    if cuda:
        props = torch.cuda.get_device_properties(0)
        l2, sms = (getattr(props, "L2_cache_size", 0) or 64 << 20), props.multi_processor_count
    else:
        l2, sms = 1 << 16, 0
    res: dict = dict(date=time.strftime("%Y-%m-%d %H:%M"), device=plat.device_name, arch=plat.arch,
                     fp8=str(fp8), torch=torch.__version__, triton=triton.__version__, l2_bytes=l2, sms=sms,
                     target=target_of(torch.empty(0, device=dev)), rows=[], errors=[])
    print(f"{res['device']} ({res['target']}, {res['fp8']}), torch {res['torch']}, triton {res['triton']}", flush=True)
    t0 = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.sweep:
        ms = tuple(args.ms or (SWEEP_MS if not args.tiny else (1, 5)))
        path = Path(args.out, "bench_fp8_linear_sweep.json")
        res.update(sweep(fp8, l2, dev, dtype, shapes, ms, args.tiny,
                         lambda partial: path.write_text(json.dumps({**res, **partial}, indent=1))))
        res["seconds"] = time.perf_counter() - t0
        path.write_text(json.dumps(res, indent=1))
        print(f"wrote {Path(args.out, 'bench_fp8_linear_sweep.json')} in {res['seconds']:.0f}s")
        return
    ms = tuple(args.ms or (MS if not args.tiny else (1, 5, 40)))
    for M in ms:
        for name, n, kdim, groups in shapes:
            try:
                res["rows"] += bench_shape(name, n, kdim, groups, M, fp8, l2, dev, dtype)
            except Exception:  # noqa: BLE001
                res["errors"].append(dict(shape=name, M=M, error=traceback.format_exc()[-2000:]))
                print(res["errors"][-1]["error"], flush=True)
            if cuda:
                torch.cuda.empty_cache()
        res["seconds"] = time.perf_counter() - t0
        Path(args.out, "bench_fp8_linear.json").write_text(json.dumps(res, indent=1))  # survives a cut

    print(f"{'shape':16} {'M':>5} {'impl':36} {'eager us':>9} {'graph us':>9} {'floor us':>8} {'floor frac':>10} "
          f"{'HBM frac':>8} {'bf16 frac':>9}  note")
    for r in res["rows"]:
        note = f"{r['form']} splits={r['splits']} err={r['max_rel_err_vs_twin']:.1e}" if r["impl"] == "kernel" else ""
        if r.get("graph_us_error") or r.get("eager_us_error"):
            note += " " + (r.get("eager_us_error") or r.get("graph_us_error"))[:60]
        print(f"{r['shape']:16} {r['M']:5} {r['impl']:36} {r['eager_us'] or '-':>9} {r['graph_us'] or '-':>9} "
              f"{r['floor_us']:>8} {r.get('floor_frac', '-'):>10} {r.get('hbm_frac', '-'):>8} "
              f"{r.get('bf16_frac', '-'):>9}  {note}")
    for e in res["errors"]:
        print("ERROR", e["shape"], e["M"], e["error"].strip().splitlines()[-1])
    print(f"wrote {Path(args.out, 'bench_fp8_linear.json')} in {res['seconds']:.0f}s")


if __name__ == "__main__":
    main()
