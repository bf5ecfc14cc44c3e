"""Fused MoE (flashport/kernels/moe*.py) on the GPU: V4-Flash routed experts, one layer.

H 4096, I 2048, E 256, top-6, FP4 experts (uint8 E2M1 + UE8M0 1x32 scales), bf16 activations,
random top-6 routing (a fresh routing per call, from a pool of input sets, and L2 flushed by
do_bench before every call). For each N:

- decode (N = 1, 8, 64, 256): floor = bytes of the distinct experts the routing touches (FP4 +
  scales, 13.4 MB per expert; expected 256 * (1 - (1 - 6/256)^N) experts) / 4.2 TB/s;
- prefill (N = 8192, and 1024 / 2048 in both forms to place the form threshold): floor =
  N * 6 * 3 * 2 * H * I FLOPs / 740 TFLOP/s, and against the bf16 GEMM measured in this run;

next to the torch twin (per-expert loop, dequantize per expert, one host sync) timed the same way,
a per-kernel breakdown (route, gate/up, down, k-sum), CUDA-graph replay for the decode rows, and a
bf16 check of the kernel against the twin. `--sweep` also times alternative tile configs.

Usage (repo root): python3 scripts/gpu/bench_moe.py --out DIR [--sweep] [--skip-twin]
Prints a summary table last; writes bench_moe.json to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.kernels import moe as kmoe  # noqa: E402
from flashport.kernels import moe_gemm  # noqa: E402
from flashport.ops.moe import fused_moe_torch  # noqa: E402

H, I, E, K = 4096, 2048, 256, 6
LIMIT = 10.0
HBM_BPS, BF16_FLOPS = 4.2e12, 740e12  # measured H200 ceilings (shared/perf/anchors.md)
EXPERT_BYTES = 3 * H * I // 2 + 3 * H * I // 32  # FP4 codes + UE8M0 scales of w1, w3, w2
NUM_SETS = 4  # routings / activations cycled through, so consecutive calls touch different experts


def median_ms(fn, rep: int = 200) -> float:
    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def ceilings() -> dict:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy_bps = 2 * a.numel() / (median_ms(lambda: b.copy_(a)) * 1e-3)
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    gemm_flops = 2 * 8192**3 / (median_ms(lambda: m @ m) * 1e-3)
    del a, b, m
    return dict(copy_tb_s=round(copy_bps / 1e12, 3), bf16_gemm_tflop_s=round(gemm_flops / 1e12, 1))


def make_weights(g: torch.Generator) -> dict:
    def fp4(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        packed = torch.randint(0, 256, (E, rows, cols // 2), dtype=torch.uint8, device="cuda", generator=g)
        scale = torch.randint(120, 124, (E, rows, cols // 32), dtype=torch.uint8, device="cuda", generator=g)
        return packed, scale

    (w13, s13), (w2, s2) = fp4(2 * I, H), fp4(H, I)
    return dict(w13=w13, w13_scale=s13, w2=w2, w2_scale=s2)


def make_inputs(n: int, g: torch.Generator) -> list[dict]:
    sets = []
    for _ in range(NUM_SETS):
        x = torch.randn(n, H, dtype=torch.bfloat16, device="cuda", generator=g)
        experts = torch.rand(n, E, device="cuda", generator=g).topk(K, dim=-1).indices  # distinct per token
        weights = (torch.rand(n, K, device="cuda", generator=g) + 0.1).to(torch.bfloat16)
        sets.append(dict(x=x, weights=weights, experts=experts))
    return sets


def cycling(sets: list[dict], w: dict, fn):
    it = itertools.cycle(sets)
    return lambda: fn(**next(it), **w, limit=LIMIT)


def breakdown(s: dict, w: dict, form: str) -> dict:
    x, weights, experts = s["x"], s["weights"], s["experts"]
    order, offsets = kmoe.moe_route(experts, E)
    h = moe_gemm.moe_gate_up(x, order, offsets, K, w["w13"], w["w13_scale"], LIMIT, form)
    pairs = moe_gemm.moe_down(h, order, offsets, weights.reshape(-1), w["w2"], w["w2_scale"], form)
    return dict(
        route_us=1e3 * median_ms(lambda: kmoe.moe_route(experts, E)),
        gate_up_us=1e3 * median_ms(lambda: moe_gemm.moe_gate_up(x, order, offsets, K, w["w13"], w["w13_scale"],
                                                                LIMIT, form)),
        down_us=1e3 * median_ms(lambda: moe_gemm.moe_down(h, order, offsets, weights.reshape(-1), w["w2"],
                                                          w["w2_scale"], form)),
        sum_us=1e3 * median_ms(lambda: kmoe.moe_sum(pairs, K)),
    )


def check(s: dict, w: dict) -> dict:
    got = kmoe.fused_moe_triton(**s, **w, limit=LIMIT).float()
    ref = fused_moe_torch(**s, **w, limit=LIMIT).float()
    return dict(max_abs=float((got - ref).abs().max()), ref_max=float(ref.abs().max()),
                bit_equal_frac=round(float((got == ref).float().mean()), 4))


def row(n: int, form: str | None, w: dict, g: torch.Generator, caps: dict, twin: bool) -> dict:
    sets = make_inputs(n, g)
    form = form or kmoe.moe_form(sets[0]["x"])
    fused = cycling(sets, w, lambda **kw: kmoe.fused_moe_triton(**kw, form=form))
    fused()
    torch.cuda.synchronize()
    r: dict = dict(n=n, form=form, fused_us=1e3 * median_ms(fused))
    distinct = [int(torch.unique(s["experts"]).numel()) for s in sets]
    r["experts_touched"] = sum(distinct) / len(distinct)
    r["experts_expected"] = E * (1 - (1 - K / E) ** n)
    r["bytes"] = r["experts_touched"] * EXPERT_BYTES
    r["flops"] = n * K * 3 * 2 * H * I
    r["floor_mem_us"] = 1e6 * r["bytes"] / HBM_BPS
    r["floor_flop_us"] = 1e6 * r["flops"] / BF16_FLOPS
    r["floor_us"] = max(r["floor_mem_us"], r["floor_flop_us"])
    r["frac_of_floor"] = r["floor_us"] / r["fused_us"]
    r["tb_s"] = r["bytes"] / (r["fused_us"] * 1e-6) / 1e12
    r["tflop_s"] = r["flops"] / (r["fused_us"] * 1e-6) / 1e12
    r["frac_of_measured_gemm"] = r["tflop_s"] / caps["bf16_gemm_tflop_s"]
    r["frac_of_measured_copy"] = r["tb_s"] / caps["copy_tb_s"]
    r.update(breakdown(sets[0], w, form))
    if form == "decode":
        s = sets[0]
        r["graph_us"] = 1e3 * float(do_bench_cudagraph(
            lambda: kmoe.fused_moe_triton(**s, **w, limit=LIMIT, form=form), rep=100, return_mode="median"))
    if twin:
        r["twin_us"] = 1e3 * median_ms(cycling(sets, w, fused_moe_torch), rep=100 if n < 4096 else 1000)
        r["speedup_vs_twin"] = r["twin_us"] / r["fused_us"]
        r["check_vs_twin"] = check(sets[0], w)
    print("row", json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    return r


def sweep(w: dict, g: torch.Generator) -> list[dict]:
    # Alternative tile configs, one kernel at a time (informs the config tables; not used at run time).
    out = []
    plans = [
        ("decode", 64, "gate_up", [dict(BLOCK_N=n, BLOCK_K=k, num_warps=nw)
                                   for n in (32, 64) for k in (64, 128, 256) for nw in (4, 8)]
         + [dict(SCALE_AFTER_DOT=False), dict(num_stages=2), dict(num_stages=3)]),
        ("decode", 64, "down", [dict(BLOCK_N=n, BLOCK_K=k, num_warps=nw)
                                for n in (32, 64, 128) for k in (64, 128, 256) for nw in (4, 8)]
         + [dict(SCALE_AFTER_DOT=False)]),
        ("prefill", 8192, "gate_up", [dict(BLOCK_M=m, BLOCK_N=n, num_warps=nw)
                                      for m in (64, 128) for n in (64, 128) for nw in (4, 8)]
         + [dict(BLOCK_K=128), dict(BLOCK_K=32), dict(SCALE_AFTER_DOT=True), dict(GROUP_M=1), dict(GROUP_M=16)]),
        ("prefill", 8192, "down", [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=8)
                                   for m in (64, 128) for n in (64, 128) for k in (64, 128)]
         + [dict(SCALE_AFTER_DOT=True), dict(BLOCK_M=256, BLOCK_N=64, num_warps=8)]),
    ]
    for form, n, kernel, variants in plans:
        s = make_inputs(n, g)[0]
        order, offsets = kmoe.moe_route(s["experts"], E)
        base_table = moe_gemm.GATE_UP_CONFIGS if kernel == "gate_up" else moe_gemm.DOWN_CONFIGS
        base = moe_gemm.config(s["x"], base_table, form)
        h = moe_gemm.moe_gate_up(s["x"], order, offsets, K, w["w13"], w["w13_scale"], LIMIT, form)
        for v in [{}] + variants:
            cfg = {**base, **v}

            def fn(cfg: dict = cfg) -> torch.Tensor:
                if kernel == "gate_up":
                    return moe_gemm.moe_gate_up(s["x"], order, offsets, K, w["w13"], w["w13_scale"], LIMIT, form, cfg)
                return moe_gemm.moe_down(h, order, offsets, s["weights"].reshape(-1), w["w2"], w["w2_scale"], form, cfg)

            try:
                us = 1e3 * median_ms(fn, rep=50)
            except Exception as e:  # out of shared memory / registers: record and go on
                us = None
                print("sweep failed", kernel, form, cfg, type(e).__name__, str(e)[:200], flush=True)
            rec = dict(form=form, n=n, kernel=kernel, cfg=cfg, us=us, is_table=not v)
            print("sweep", json.dumps(rec), flush=True)
            out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--skip-twin", action="store_true")
    args = ap.parse_args()
    results: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                         date=time.strftime("%Y-%m-%d"), shape=dict(H=H, I=I, E=E, k=K, weights="fp4"))
    caps = ceilings()
    results["ceilings"] = caps
    print("ceilings", caps, flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = make_weights(g)
    plan = [(1, None), (8, None), (64, None), (256, None), (1024, "decode"), (1024, "prefill"),
            (2048, "decode"), (2048, "prefill"), (8192, None)]
    results["rows"] = [row(n, form, w, g, caps, twin=not args.skip_twin) for n, form in plan]
    if args.sweep:
        results["sweep"] = sweep(w, g)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "bench_moe.json").write_text(json.dumps(results, indent=1))
    print(f"\n== summary: fused MoE, {results['device']}, H {H} I {I} E {E} top-{K} FP4, bf16 ==")
    print(f"ceilings measured: copy {caps['copy_tb_s']} TB/s, bf16 GEMM {caps['bf16_gemm_tflop_s']} TFLOP/s")
    print(f"{'N':>5} {'form':>7} {'experts':>7} {'fused us':>9} {'graph us':>9} {'floor us':>9} {'of floor':>8} "
          f"{'TB/s':>6} {'TFLOP/s':>7} {'twin us':>9} {'speedup':>7}  route/gate_up/down/sum us")
    for r in results["rows"]:
        print(f"{r['n']:>5} {r['form']:>7} {r['experts_touched']:>7.1f} {r['fused_us']:>9.1f} "
              f"{r.get('graph_us', float('nan')):>9.1f} {r['floor_us']:>9.1f} {r['frac_of_floor']:>8.1%} "
              f"{r['tb_s']:>6.2f} {r['tflop_s']:>7.1f} {r.get('twin_us', float('nan')):>9.1f} "
              f"{r.get('speedup_vs_twin', float('nan')):>7.1f}  "
              f"{r['route_us']:.1f}/{r['gate_up_us']:.1f}/{r['down_us']:.1f}/{r['sum_us']:.1f}")
    for r in results["rows"]:
        if "check_vs_twin" in r:
            print(f"  check N={r['n']} {r['form']}: {r['check_vs_twin']}")


if __name__ == "__main__":
    main()
