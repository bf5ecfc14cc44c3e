"""Fused MoE (flashport/kernels/moe*.py) on the GPU: V4-Flash routed experts, one layer.

H 4096, I 2048, E 256, top-6, FP4 experts (uint8 E2M1 + UE8M0 1x32 scales), bf16 activations,
random top-6 routing (a fresh routing per call, from a pool of input sets, and L2 flushed by
do_bench before every call). For each N:

- decode (N = 1, 8, 64, 256): floor = bytes of the distinct experts the routing touches (FP4 +
  scales, 12.98 MB per expert; expected 256 * (1 - (1 - 6/256)^N) experts) / 4.2 TB/s;
- prefill (N = 8192, and 256 / 512 / 1024 in both forms to place the form threshold): floor =
  N * 6 * 3 * 2 * H * I FLOPs / 740 TFLOP/s, and against the bf16 GEMM measured in this run;

next to the torch twin (per-expert loop, dequantize per expert, one host sync) timed the same way,
a per-kernel breakdown (route, gate/up, down, k-sum), CUDA-graph replay for the decode rows, and a
bf16 check of the kernel against the twin.

`--sweep` (or `--short-sweep`: the few candidates the sweep left open) then times candidate tile
configs of each GEMM kernel alone (gate/up, down) for decode at N = 1, 8, 64, 256 and prefill at
N = 8192, each against the same kernel's floor (its own share of
the expert bytes, or of the FLOPs), and prints the best config per (kernel, form, N). Candidates
that fail to compile or launch are recorded and skipped; the sweep stops adding candidates when
the time budget (--budget-s, whole run) runs low.

`--tiny`: small shapes on the CPU (TRITON_INTERPRET=1, fp32), a smoke test of the whole script.

Usage (repo root): python3 scripts/gpu/bench_moe.py --out DIR [--sweep | --short-sweep] [--skip-twin] [--tiny]
Prints a summary table last; writes bench_moe.json to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.kernels import moe as kmoe  # noqa: E402
from flashport.kernels import moe_gemm  # noqa: E402
from flashport.ops.moe import fp4_tileable, fused_moe_torch, tile_fp4_  # noqa: E402

H, I, E, K = 4096, 2048, 256, 6
LIMIT = 10.0
HBM_BPS, BF16_FLOPS = 4.2e12, 740e12  # measured H200 ceilings (shared/perf/anchors.md)
NUM_SETS = 4  # routings / activations cycled through, so consecutive calls touch different experts
DEV, DTYPE, TINY = "cuda", torch.bfloat16, False
T0 = time.perf_counter()


def gu_bytes() -> int:  # FP4 codes + scales of one expert's w1 and w3
    return 2 * I * H // 2 + 2 * I * H // 32


def down_bytes() -> int:
    return H * I // 2 + H * I // 32


def median_ms(fn, rep: int = 100) -> float:
    if TINY:  # the interpreter: one warm call, then one timed
        fn()
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def graph_ms(fn) -> float:
    if TINY:
        return float("nan")
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))


def ceilings() -> dict:
    if TINY:
        return dict(copy_tb_s=HBM_BPS / 1e12, bf16_gemm_tflop_s=BF16_FLOPS / 1e12)
    a = torch.empty(2**30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    copy_bps = 2 * a.numel() / (median_ms(lambda: b.copy_(a)) * 1e-3)
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    gemm_flops = 2 * 8192**3 / (median_ms(lambda: m @ m) * 1e-3)
    del a, b, m
    return dict(copy_tb_s=round(copy_bps / 1e12, 3), bf16_gemm_tflop_s=round(gemm_flops / 1e12, 1))


def make_weights(g: torch.Generator) -> dict:
    # Random FP4 experts, in the engine's tiled layout where the shapes allow (as the loader does).
    def fp4(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        packed = torch.randint(0, 256, (E, rows, cols // 2), dtype=torch.uint8, device=DEV, generator=g)
        scale = torch.randint(120, 124, (E, rows, cols // 32), dtype=torch.uint8, device=DEV, generator=g)
        return packed, scale

    (w13, s13), (w2, s2) = fp4(2 * I, H), fp4(H, I)
    tiled = fp4_tileable(w13) and fp4_tileable(w2)
    if tiled:
        tile_fp4_(w13, s13)
        tile_fp4_(w2, s2)
    return dict(w13=w13, w13_scale=s13, w2=w2, w2_scale=s2, tiled=tiled)


def make_inputs(n: int, g: torch.Generator) -> list[dict]:
    sets = []
    for _ in range(NUM_SETS):
        x = torch.randn(n, H, device=DEV, generator=g).to(DTYPE)
        experts = torch.rand(n, E, device=DEV, generator=g).topk(K, dim=-1).indices  # distinct per token
        weights = (torch.rand(n, K, device=DEV, generator=g) + 0.1).to(DTYPE)
        sets.append(dict(x=x, weights=weights, experts=experts))
    return sets


def cycling(sets: list[dict], w: dict, fn):
    it = itertools.cycle(sets)
    return lambda: fn(**next(it), **w, limit=LIMIT)


def breakdown(s: dict, w: dict, form: str) -> dict:
    x, weights, experts = s["x"], s["weights"], s["experts"]
    order, offsets = kmoe.moe_route(experts, E)
    t = w["tiled"]
    h = moe_gemm.moe_gate_up(x, order, offsets, K, w["w13"], w["w13_scale"], LIMIT, form, tiled=t)
    pairs = moe_gemm.moe_down(h, order, offsets, weights.reshape(-1), w["w2"], w["w2_scale"], form, tiled=t)
    return dict(
        route_us=1e3 * median_ms(lambda: kmoe.moe_route(experts, E)),
        gate_up_us=1e3 * median_ms(lambda: moe_gemm.moe_gate_up(x, order, offsets, K, w["w13"], w["w13_scale"],
                                                                LIMIT, form, tiled=t)),
        down_us=1e3 * median_ms(lambda: moe_gemm.moe_down(h, order, offsets, weights.reshape(-1), w["w2"],
                                                          w["w2_scale"], form, tiled=t)),
        sum_us=1e3 * median_ms(lambda: kmoe.moe_sum(pairs, K)),
    )


def check(s: dict, w: dict, form: str) -> dict:
    got = kmoe.fused_moe_triton(**s, **w, limit=LIMIT, form=form).float()
    ref = fused_moe_torch(**s, **w, limit=LIMIT).float()
    return dict(max_abs=float((got - ref).abs().max()), ref_max=float(ref.abs().max()),
                bit_equal_frac=round(float((got == ref).float().mean()), 4))


def distinct_experts(sets: list[dict]) -> float:
    return sum(int(torch.unique(s["experts"]).numel()) for s in sets) / len(sets)


def row(n: int, form: str | None, w: dict, g: torch.Generator, caps: dict, twin: bool) -> dict:
    sets = make_inputs(n, g)
    form = form or kmoe.moe_form(sets[0]["x"])
    fused = cycling(sets, w, lambda **kw: kmoe.fused_moe_triton(**kw, form=form))
    fused()
    r: dict = dict(n=n, form=form, fused_us=1e3 * median_ms(fused))
    r["experts_touched"] = distinct_experts(sets)
    r["experts_expected"] = E * (1 - (1 - K / E) ** n)
    r["bytes"] = r["experts_touched"] * (gu_bytes() + down_bytes())
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
        r["graph_us"] = 1e3 * graph_ms(lambda: kmoe.fused_moe_triton(**s, **w, limit=LIMIT, form=form))
        r["graph_frac_of_floor"] = r["floor_us"] / r["graph_us"]
    if twin:
        r["twin_us"] = 1e3 * median_ms(cycling(sets, w, fused_moe_torch), rep=100 if n < 4096 else 600)
        r["speedup_vs_twin"] = r["twin_us"] / r["fused_us"]
    r["check_vs_twin"] = check(sets[0], w, form)
    print("row", json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    return r


def candidates(kernel: str, form: str, short: bool = False) -> list[dict]:
    # Variants of the table's config (the first candidate, {}), most promising first: the sweep
    # stops adding candidates when the budget runs low. `short`: the few left open by the sweep.
    if short and not TINY:
        return [{}] + {
            # Around the table's pair-order word tiles (PLANES 4, "x2", prefetch, gate and up in one
            # K loop, the tiled weight layout): no prefetch (fewer registers, more programs per SM),
            # 128-row tiles with 8 warps, the two-loop gate/up, 128-column K steps.
            ("gate_up", "decode"): [dict(PREFETCH=False), dict(BLOCK_N=128, num_warps=8), dict(ONE_LOOP=False),
                                    dict(PREFETCH=False, BLOCK_K=128)],
            ("down", "decode"): [dict(PREFETCH=False), dict(BLOCK_N=128, num_warps=8), dict(BLOCK_K=128)],
            ("gate_up", "prefill"): [],
            ("down", "prefill"): [],
        }[(kernel, form)]
    if TINY:
        return [{}, dict(PLANES=2, PREFETCH=False, DECODE="f32"), dict(PLANES=1, PREFETCH=True)]
    if form == "decode":
        n0, n2 = (16, 64) if kernel == "gate_up" else (32, 128)
        out = [dict(DECODE="bf16"), dict(DECODE="f32"), dict(PLANES=2), dict(BLOCK_N=n0), dict(BLOCK_N=n2),
               dict(BLOCK_K=512),
               dict(BLOCK_K=128), dict(PLANES=1), dict(PREFETCH=False), dict(num_warps=8),
               dict(DECODE="f32", BLOCK_N=n0), dict(DECODE="f32", PLANES=2), dict(BLOCK_N=n0, BLOCK_K=512),
               dict(BLOCK_N=n2, BLOCK_K=128), dict(num_warps=2), dict(num_stages=2), dict(PLANES=2, BLOCK_K=128),
               dict(PLANES=1, PREFETCH=False, num_stages=3), dict(BLOCK_K=512, num_warps=8)]
        return [{}] + out
    if kernel == "gate_up":
        # The dequantization of a weight tile is shared by BLOCK_M rows: 256-row tiles halve its share.
        out = [dict(DECODE="bf16"), dict(BLOCK_M=256, num_warps=8, DECODE="bf16"), dict(DECODE="f32"),
               dict(BLOCK_M=256, DECODE="f32"), dict(BLOCK_N=128), dict(BLOCK_M=256),
               dict(BLOCK_M=256, BLOCK_N=32, DECODE="f32"), dict(PLANES=2), dict(BLOCK_K=128), dict(num_stages=4),
               dict(BLOCK_M=256, BLOCK_K=128, DECODE="f32"), dict(PREFETCH=True), dict(PLANES=8, BLOCK_K=128),
               dict(num_stages=2), dict(BLOCK_M=64, num_warps=4), dict(BLOCK_N=128, BLOCK_K=32), dict(GROUP_M=1),
               dict(GROUP_M=16), dict(PLANES=8, BLOCK_K=256), dict(num_warps=4)]
    else:
        out = [dict(DECODE="bf16"), dict(BLOCK_M=256, BLOCK_N=64, DECODE="bf16"), dict(DECODE="f32"),
               dict(BLOCK_M=256, BLOCK_N=64, DECODE="f32"), dict(BLOCK_N=64),
               dict(BLOCK_M=256, BLOCK_N=64), dict(BLOCK_M=256, DECODE="f32"), dict(PLANES=2), dict(BLOCK_K=128),
               dict(num_stages=4), dict(PREFETCH=True), dict(PLANES=8, BLOCK_K=128), dict(BLOCK_K=32),
               dict(num_stages=2), dict(BLOCK_M=64, num_warps=4), dict(BLOCK_N=256, BLOCK_K=32), dict(GROUP_M=1),
               dict(GROUP_M=16), dict(PLANES=8, BLOCK_K=256), dict(num_warps=4)]
    return [{}] + out


def sweep(w: dict, g: torch.Generator, budget_s: float, short: bool = False) -> list[dict]:
    # Tile configs of each GEMM kernel alone (informs the config tables; not used at run time).
    out: list[dict] = []
    ns = {"decode": (1, 8, 64, 256) if not TINY else (1, 5), "prefill": (8192,) if not TINY else (40,)}
    sections = (("decode", "gate_up"), ("decode", "down"), ("prefill", "gate_up"), ("prefill", "down"))
    for i, (form, kernel) in enumerate(sections):
        # Each section gets an equal share of what is left of the budget.
        deadline = time.perf_counter() + (budget_s - (time.perf_counter() - T0)) / (len(sections) - i)
        cases = []
        for n in ns[form]:
            sets = make_inputs(n, g)
            routed = []
            for s in sets:
                order, offsets = kmoe.moe_route(s["experts"], E)
                h = moe_gemm.moe_gate_up(s["x"], order, offsets, K, w["w13"], w["w13_scale"], LIMIT, form,
                                         tiled=w["tiled"])
                routed.append((s, order, offsets, h))
            nbytes = distinct_experts(sets) * (gu_bytes() if kernel == "gate_up" else down_bytes())
            flops = n * K * (2 if kernel == "gate_up" else 1) * 2 * H * I
            floor_us = max(1e6 * nbytes / HBM_BPS, 1e6 * flops / BF16_FLOPS)
            cases.append((n, routed, floor_us))
        table = moe_gemm.GATE_UP_CONFIGS if kernel == "gate_up" else moe_gemm.DOWN_CONFIGS
        base = moe_gemm.config(cases[0][1][0][0]["x"], table, form)

        def run(cfg: dict, routed_set: tuple) -> torch.Tensor:
            s, order, offsets, h = routed_set
            if kernel == "gate_up":
                return moe_gemm.moe_gate_up(s["x"], order, offsets, K, w["w13"], w["w13_scale"], LIMIT, form, cfg,
                                            tiled=w["tiled"])
            return moe_gemm.moe_down(h, order, offsets, s["weights"].reshape(-1), w["w2"], w["w2_scale"], form, cfg,
                                     tiled=w["tiled"])

        reference = run(base, cases[0][1][0]).float()  # the table config, first N, first set
        for v in candidates(kernel, form, short):
            if time.perf_counter() > deadline:
                print("sweep: budget spent, skipping", kernel, form, v, flush=True)
                continue
            cfg = {**base, **v}
            agree = None
            for n, routed, floor_us in cases:
                it = itertools.cycle(routed)

                def fn(cfg: dict = cfg) -> torch.Tensor:
                    return run(cfg, next(it))

                try:
                    if agree is None:  # same products, other order: bf16 outputs agree nearly bit for bit
                        got = run(cfg, cases[0][1][0]).float()
                        agree = dict(eq=round(float((got == reference).float().mean()), 4),
                                     max_abs=float((got - reference).abs().max()),
                                     ref_max=float(reference.abs().max()))
                    us = 1e3 * median_ms(fn, rep=40)
                except Exception as e:  # does not compile / out of shared memory: record and go on
                    us = None
                    print("sweep failed", kernel, form, json.dumps(cfg), type(e).__name__, str(e)[:300], flush=True)
                rec = dict(form=form, n=n, kernel=kernel, cfg=cfg, us=us, floor_us=floor_us,
                           frac_of_floor=None if us is None else floor_us / us, is_table=not v, vs_table=agree)
                print("sweep", json.dumps(rec), flush=True)
                out.append(rec)
                if us is None:
                    break  # the same config fails at every N
    return out


def best_of(sweep_rows: list[dict]) -> list[dict]:
    best: dict = {}
    for r in sweep_rows:
        key = (r["kernel"], r["form"], r["n"])
        if r["us"] is not None and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    table = {(r["kernel"], r["form"], r["n"]): r for r in sweep_rows if r["is_table"]}
    return [dict(**b, table_us=table.get(k, {}).get("us")) for k, b in sorted(best.items())]


def main() -> None:
    global DEV, DTYPE, TINY, H, I, E, K
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--short-sweep", action="store_true", help="--sweep with the few candidates left open")
    ap.add_argument("--skip-twin", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU (TRITON_INTERPRET=1), fp32")
    ap.add_argument("--budget-s", type=float, default=200.0,
                    help="seconds from the start; the sweep adds no candidate past its share of them")
    args = ap.parse_args()
    if args.tiny:
        DEV, DTYPE, TINY = "cpu", torch.float32, True
        H, I, E, K = 128, 64, 8, 2
    results: dict = dict(device=torch.cuda.get_device_name() if not TINY else "cpu (interpreter)",
                         torch=torch.__version__, triton=triton.__version__, date=time.strftime("%Y-%m-%d"),
                         shape=dict(H=H, I=I, E=E, k=K, weights="fp4"),
                         tables=dict(gate_up=moe_gemm.GATE_UP_CONFIGS.get("sm_90"),
                                     down=moe_gemm.DOWN_CONFIGS.get("sm_90"),
                                     prefill_min_tokens=kmoe.PREFILL_MIN_TOKENS))
    caps = ceilings()
    results["ceilings"] = caps
    print("ceilings", caps, flush=True)
    g = torch.Generator(device=DEV).manual_seed(0)
    w = make_weights(g)
    if TINY:
        plan = [(5, None), (40, "prefill")]
    else:
        plan = [(1, None), (8, None), (64, None), (256, None), (256, "prefill"), (512, "decode"), (512, "prefill"),
                (1024, "decode"), (1024, "prefill"), (8192, None)]
    results["rows"] = [row(n, form, w, g, caps, twin=not args.skip_twin) for n, form in plan]
    if args.sweep or args.short_sweep:
        results["sweep"] = sweep(w, g, args.budget_s, short=args.short_sweep and not args.sweep)
        results["sweep_best"] = best_of(results["sweep"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "bench_moe.json").write_text(json.dumps(results, indent=1))
    print(f"\n== summary: fused MoE, {results['device']}, H {H} I {I} E {E} top-{K} FP4, {DTYPE} ==")
    print(f"ceilings: copy {caps['copy_tb_s']} TB/s, bf16 GEMM {caps['bf16_gemm_tflop_s']} TFLOP/s; "
          f"run took {time.perf_counter() - T0:.0f} s")
    print(f"{'N':>5} {'form':>7} {'experts':>7} {'fused us':>9} {'graph us':>9} {'floor us':>9} {'of floor':>8} "
          f"{'TB/s':>6} {'TFLOP/s':>7} {'twin us':>9} {'speedup':>7}  route/gate_up/down/sum us  check")
    for r in results["rows"]:
        c = r["check_vs_twin"]
        print(f"{r['n']:>5} {r['form']:>7} {r['experts_touched']:>7.1f} {r['fused_us']:>9.1f} "
              f"{r.get('graph_us', float('nan')):>9.1f} {r['floor_us']:>9.1f} {r['frac_of_floor']:>8.1%} "
              f"{r['tb_s']:>6.2f} {r['tflop_s']:>7.1f} {r.get('twin_us', float('nan')):>9.1f} "
              f"{r.get('speedup_vs_twin', float('nan')):>7.1f}  "
              f"{r['route_us']:.1f}/{r['gate_up_us']:.1f}/{r['down_us']:.1f}/{r['sum_us']:.1f}  "
              f"eq {c['bit_equal_frac']:.3f} max|d| {c['max_abs']:.2e}/{c['ref_max']:.2e}")
    if "sweep" in results:
        keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "PLANES", "PREFETCH", "DECODE", "num_warps", "num_stages")
        print("\n== sweep: best config per (kernel, form, N) vs the table's ==")
        print(f"{'kernel':>7} {'form':>7} {'N':>5} {'best us':>8} {'table us':>8} {'floor us':>8} {'of floor':>8}  cfg")
        for b in results["sweep_best"]:
            cfg = " ".join(f"{k}={b['cfg'][k]}" for k in keys if k in b["cfg"])
            tus = b["table_us"] if b["table_us"] is not None else float("nan")
            print(f"{b['kernel']:>7} {b['form']:>7} {b['n']:>5} {b['us']:>8.1f} {tus:>8.1f} {b['floor_us']:>8.1f} "
                  f"{b['frac_of_floor']:>8.1%}  {cfg}  vs table {b['vs_table']}")


if __name__ == "__main__":
    main()
