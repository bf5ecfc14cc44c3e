"""Sparse attention (decode rows and an 8K prefill) on the GPU: time, floor, torch twin, launch-config sweep.

V4-Flash shapes, bf16 (64 heads x 512, K=V MQA, rope 64, window 128, block size 128):

- decode, CSA layer: window 128 + 512 selected entries; HCA layer: window 128 + ctx/128 entries; at
  batch 64 / 8K context, batch 128 / 32K, and batch 8 / 8K (the split-heavy class); CSA at batch 64
  also with the entry pool in fp8 (e4m3fn, kv_cache_dtype="fp8");
- prefill: one sequence of 8192 prompt tokens, every token a query row of the same op (its window +
  CSA top-512 of its visible entries, or HCA all its visible entries), in TFLOP/s of attention FLOPs
  (4 x heads x head_dim x keys, summed over the queries), next to torch's
  scaled_dot_product_attention on a causal 8K prefill in the same run (the 324 TFLOP/s anchor:
  flash backend, bf16, hd128, batch 1 x 32 heads, FLOPs 4 x S^2/2 x heads x hd), and the same API
  at the V4 shape (64 query heads sharing one K=V head of 512, causal 8K; no flash path for hd512).

Each decode case: device time of one call (one call per input set captured in a CUDA graph, the sets
together past 4x L2, replayed; the median replay / sets; the engine runs decode in graphs too; the
table config also without a graph, triton.testing.do_bench clearing L2 between calls), bytes moved
(KV rows + queries + ids + outputs)
against 4.2 TB/s, FLOPs against 740 TFLOP/s (bf16), the floor = max of the two, and the torch twin
timed in the same run, plus the kernel-vs-twin error. `--sweep` also times ~13 launch configs
(block sizes, warps, stages) x split counts per case and prints the best per case (to fill the
per-target config table). `--tiny` runs small shapes on the CPU (TRITON_INTERPRET=1) as a smoke test.

Usage (repo root): python3 scripts/gpu/bench_attention.py --out DIR [--sweep] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.kernels import attention_decode as ad  # noqa: E402
from flashport.kernels.spec import target_of  # noqa: E402
from flashport.ops.attention import sparse_decode_attention_torch  # noqa: E402
from bench_common import BF16_FLOPS, HBM_BPS, L2_BYTES, bench_ms, rotating  # noqa: E402

SWEEP_BUDGET_S = 150.0  # the sweep stops adding configs past this (whole script <= 4 minutes)


@dataclass(frozen=True)
class Shapes:
    heads: int = 64
    head_dim: int = 512
    rope: int = 64
    window: int = 128
    block: int = 128
    rate_csa: int = 4
    rate_hca: int = 128
    topk: int = 512
    dtype: torch.dtype = torch.bfloat16  # the interpreter's bf16 dot is wrong: --tiny uses fp32


def graph_ms(calls: list, cuda: bool, budget_ms: float = 40.0) -> float:
    """Device time of one call: the calls (one per input set, together past L2) captured in one CUDA
    graph, replayed; median over replays / len(calls). No launch overhead, as the engine's graphs."""
    if not cuda:
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) * 1e3 / len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm outside the capture
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    start.record()
    g.replay()
    end.record()
    end.synchronize()
    reps = int(max(3, min(50, budget_ms / max(start.elapsed_time(end), 1e-3))))
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    del g
    return sorted(times)[len(times) // 2]


def n_sets_for(bytes_per_call: float) -> int:
    return max(1, min(16, math.ceil(4 * L2_BYTES / max(bytes_per_call, 1))))


def decode_sets(sh: Shapes, kind: str, batch: int, ctx: int, dev: torch.device, seed: int, fp8: bool = False):
    """Input sets of one decode case: (args, kwargs) for the op, plus (bytes, flops) per call."""
    g = torch.Generator(device="cpu").manual_seed(seed)  # tables and ids
    gd = torch.Generator(device=dev).manual_seed(seed)  # pool contents, drawn on the device (GBs)
    B, W, D, H = sh.block, sh.window, sh.head_dim, sh.heads
    rate = sh.rate_csa if kind == "csa" else sh.rate_hca
    per_block = B // rate
    pos = ctx - 1 - (torch.arange(batch) * 37) % B  # windows straddle two blocks; lengths differ a little
    n_lb = ctx // B + 1  # logical blocks per sequence (table width)
    n_vis = (pos + 1) // rate
    n_comp = torch.full_like(pos, sh.topk) if kind == "csa" else n_vis
    n_win = torch.clamp(pos + 1, max=W)
    esize = 1 if fp8 else sh.dtype.itemsize
    keys = int((n_win + n_comp).sum())
    bytes_call = (int(n_win.sum()) * D * sh.dtype.itemsize + int(n_comp.sum()) * D * esize
                  + 2 * batch * H * D * sh.dtype.itemsize + (batch * sh.topk * 4 if kind == "csa" else 0))
    flops = 4 * H * D * keys
    n_sets = n_sets_for(bytes_call)

    def rnd(*shape: int, dtype=sh.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gd, device=dev).to(dtype)

    # Window pool: each set owns 2 blocks per sequence (the window's two blocks), scattered.
    window = rnd(n_sets * batch * 2 * B, D)
    # Entry pool: CSA shares one big pool (random picks hit random rows); HCA sets own their blocks.
    comp_sets = 1 if kind == "csa" else n_sets
    entries = rnd(comp_sets * batch * n_lb * per_block, D)
    if fp8:
        entries = entries.to(torch.float8_e4m3fn)
    sinks = rnd(H, dtype=torch.float32)
    sets = []
    for s in range(n_sets):
        wbt = torch.full((batch, n_lb), -1, dtype=torch.int32)
        phys = (torch.randperm(batch * 2, generator=g) + s * batch * 2).view(batch, 2).int()
        wbt.scatter_(1, torch.stack([(pos - W + 1).clamp(min=0) // B, pos // B], 1), phys)
        cbt = (torch.randperm(batch * n_lb, generator=g) + (s % comp_sets) * batch * n_lb).view(batch, n_lb).int()
        angles = pos[:, None].float() * torch.rand(sh.rope // 2, generator=g)
        kw = dict(window_size=W, block_size=B, entries=entries, comp_block_table=cbt.to(dev), rate=rate)
        if kind == "csa":  # 512 distinct closed entries per sequence
            ids = torch.rand(batch, int(n_vis.min()), generator=g).argsort(dim=1)[:, : sh.topk].int()
            kw["entry_ids"] = ids.to(dev)
        else:
            kw["num_entries"] = n_vis.int().to(dev)
        args = (rnd(batch, H, D), window, wbt.to(dev), pos.int().to(dev), sinks,
                angles.cos().to(dev, sh.dtype), angles.sin().to(dev, sh.dtype))
        sets.append((args, kw))
    return sets, bytes_call, flops


def prefill_set(sh: Shapes, kind: str, n_tok: int, dev: torch.device, seed: int):
    """One sequence of n_tok prompt tokens, each a query row: (args, kwargs), bytes, flops."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    gd = torch.Generator(device=dev).manual_seed(seed)
    B, W, D, H = sh.block, sh.window, sh.head_dim, sh.heads
    rate = sh.rate_csa if kind == "csa" else sh.rate_hca
    per_block = B // rate
    n_lb = triton_cdiv(n_tok, B)
    pos = torch.arange(n_tok)
    n_vis = (pos + 1) // rate  # closed entries visible to each token
    window = torch.randn(n_lb * B, D, generator=gd, device=dev).to(sh.dtype)
    entries = torch.randn(n_lb * per_block, D, generator=gd, device=dev).to(sh.dtype)
    table = torch.randperm(n_lb, generator=g).int()  # scattered physical blocks, the same for both pools
    tables = table.expand(n_tok, n_lb).contiguous().to(dev)
    angles = pos[:, None].float() * torch.rand(sh.rope // 2, generator=g)
    kw = dict(window_size=W, block_size=B, entries=entries, comp_block_table=tables, rate=rate)
    if kind == "csa":  # top-512 of the visible entries (fewer early on: -1 pads), random scores
        scores = torch.rand(n_tok, n_lb * per_block, generator=g)
        scores = scores.masked_fill(torch.arange(n_lb * per_block) >= n_vis[:, None], -1.0)
        top = scores.topk(min(sh.topk, n_lb * per_block), dim=1)
        ids = torch.where(top.values >= 0, top.indices, -1).int()
        kw["entry_ids"] = ids.to(dev)
        n_comp = torch.clamp(n_vis, max=sh.topk)
    else:
        kw["num_entries"] = n_vis.int().to(dev)
        n_comp = n_vis
    args = (torch.randn(n_tok, H, D, generator=gd, device=dev).to(sh.dtype), window, tables, pos.int().to(dev),
            torch.randn(H, generator=gd, device=dev), angles.cos().to(dev, sh.dtype), angles.sin().to(dev, sh.dtype))
    keys = int((torch.clamp(pos + 1, max=W) + n_comp).sum())
    bytes_call = (window.numel() + entries.numel() + 2 * n_tok * H * D) * sh.dtype.itemsize
    return (args, kw), bytes_call, 4 * H * D * keys


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def row_subset(args: tuple, kw: dict, rows: torch.Tensor) -> tuple[tuple, dict]:
    """The same op restricted to some query rows (rows are independent): for the twin's error check."""
    q, window, wbt, pos, sinks, cos, sin = args
    kw = dict(kw)
    for k in ("comp_block_table", "entry_ids", "num_entries"):
        if kw.get(k) is not None:
            kw[k] = kw[k][rows].contiguous()
    return (q[rows].contiguous(), window, wbt[rows].contiguous(), pos[rows].contiguous(), sinks,
            cos[rows].contiguous(), sin[rows].contiguous()), kw


def report(name: str, ms: float, bytes_call: float, flops: float, twin_ms: float | None, extra: str = "") -> dict:
    floor_ms = max(bytes_call / HBM_BPS, flops / BF16_FLOPS) * 1e3
    row = dict(case=name, us=ms * 1e3, bytes=bytes_call, flops=flops, hbm_fraction=bytes_call / HBM_BPS * 1e3 / ms,
               tflops=flops / ms / 1e9, floor_us=floor_ms * 1e3, floor_fraction=floor_ms / ms,
               twin_us=None if twin_ms is None else twin_ms * 1e3)
    twin = "" if twin_ms is None else f" | twin {twin_ms * 1e3:9.1f} us ({twin_ms / ms:5.1f}x)"
    print(f"{name:<44} {ms * 1e3:9.1f} us {bytes_call / 1e6:8.1f} MB {row['hbm_fraction']:6.1%} of 4.2TB/s "
          f"{row['tflops']:6.1f} TF/s  floor {floor_ms * 1e3:8.1f} us ({row['floor_fraction']:6.1%}){twin} {extra}",
          flush=True)
    return row


def sweep_configs(base: ad.DecodeAttnConfig) -> dict[str, ad.DecodeAttnConfig]:
    """Candidate launch configs, most promising first (the sweep stops at its time budget). Names:
    heads per program, keys per step, output dims per program, warps, stages; "_qr": Q held in
    registers (q_regs); "_norp": no row pass. All compile for sm_90 within its shared memory."""
    out = {}
    for h, n, dv, w, st, qr, rp in (
            (32, 64, 512, 8, 2, False, True), (32, 64, 512, 8, 3, False, True), (32, 128, 512, 8, 1, False, True),
            (16, 64, 512, 8, 3, False, True), (16, 64, 512, 8, 2, False, True), (16, 128, 512, 8, 1, False, True),
            (64, 32, 256, 4, 2, True, True), (64, 16, 256, 4, 3, True, True), (64, 32, 512, 8, 2, True, True),
            (64, 32, 256, 8, 2, True, True), (64, 32, 512, 8, 3, False, True), (32, 32, 512, 8, 2, False, True),
            (32, 64, 512, 8, 2, False, False)):
        cfg = replace(base, block_h=h, block_n=n, block_dv=dv, num_warps=w, num_stages=st, q_regs=qr, row_pass=rp)
        if cfg != base:
            out[f"h{h}_n{n}_dv{dv}_w{w}_s{st}" + ("_qr" if qr else "") + ("" if rp else "_norp")] = cfg
    return out


def split_choices(rows: int, sweep: bool, tiny: bool = False) -> list[int]:
    if not sweep:
        return []
    if tiny:
        return [1, 2]
    if rows <= 16:
        return [2, 4, 8, 16]
    if rows <= 64:
        return [1, 2]
    if rows <= 256:
        return [1, 2]
    return [1]


def time_case(label: str, sets: list, bytes_call: float, flops: float, base: ad.DecodeAttnConfig,
              variants: dict, cuda: bool, sweep: bool, res: list, meta: dict, t_start: float, twin: bool = True,
              err_rows: torch.Tensor | None = None) -> None:
    (args, kw) = sets[0]
    rows = args[0].shape[0]
    eargs, ekw = (args, kw) if err_rows is None else row_subset(args, kw, err_rows)
    got = ad.sparse_decode_attention(*eargs, **ekw, config=base, num_splits=base.num_splits(rows))
    want = sparse_decode_attention_torch(*eargs, **ekw)
    err = (got.float() - want.float()).abs().max().item()
    nxt = rotating(sets)
    twin_ms = None
    if twin:
        def run_twin() -> None:
            a, k = nxt()
            sparse_decode_attention_torch(*a, **k)

        twin_ms = bench_ms(run_twin, cuda, rep_ms=50)
    best = None
    for vname, cfg in variants.items():
        if vname != "table" and time.perf_counter() - t_start > SWEEP_BUDGET_S:
            print(f"{label}: sweep budget reached, skipping the remaining configs", flush=True)
            break
        default = cfg.num_splits(rows) if vname == "table" else base.num_splits(rows)
        for splits in [default] + [s for s in split_choices(rows, sweep, not cuda) if s != default]:
            calls = [(lambda a=a, k=k, c=cfg, n=splits: ad.sparse_decode_attention(*a, **k, num_splits=n, config=c))
                     for a, k in sets]
            name = f"{label} {vname} s{splits}"
            try:
                try:
                    ms = graph_ms(calls, cuda, budget_ms=60 if vname == "table" else 30)
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:  # capture failed: time without a graph (includes launch overhead)
                    if "out of resource" in str(e):
                        raise
                    print(f"{name:<44} graph failed ({type(e).__name__}: {str(e)[:100]}); timing without",
                          flush=True)
                    torch.cuda.synchronize()
                    ms = bench_ms(lambda c=calls: c[0](), cuda, rep_ms=40)
            except Exception as e:  # a sweep variant may not fit (registers / shared memory)
                print(f"{name:<44} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                break
            first = vname == "table" and splits == default
            extra = ""
            if first:  # also with launch overhead (no graph; L2 cleared between calls)
                def kernel() -> None:
                    a, k = nxt()
                    ad.sparse_decode_attention(*a, **k, num_splits=splits, config=cfg)

                host_ms = bench_ms(kernel, cuda, rep_ms=50)
                extra = f"max|err| {err:.2e}; without graph {host_ms * 1e3:.1f} us"
            row = report(name, ms, bytes_call, flops, twin_ms if first else None, extra)
            row.update(meta, variant=vname, config=asdict(cfg), splits=splits, sets=len(sets))
            if first:
                row.update(max_abs_err=err, us_without_graph=host_ms * 1e3)
            res.append(row)
            if best is None or ms < best[0]:
                best = (ms, vname, splits)
    if best and sweep:
        print(f"BEST {label}: {best[1]} s{best[2]} {best[0] * 1e3:.1f} us", flush=True)


def sdpa_baselines(dev: torch.device, cuda: bool, tiny: bool, res: dict) -> None:
    """torch SDPA causal prefill: the anchor's hd128 flash shape and the V4 shape (MQA, hd512)."""
    import torch.nn.functional as F

    S = 256 if tiny else 8192
    cases = [(f"sdpa causal hd128 b1 h32 S{S} (anchor)", 32, 32, 128),
             (f"sdpa causal V4 shape hq64 hkv1 hd512 S{S}", 64, 1, 512)]
    for name, hq, hkv, hd in cases:
        try:
            q = torch.randn(1, hq, S, hd, device=dev, dtype=torch.bfloat16 if cuda else torch.float32)
            k = torch.randn(1, hkv, S, hd, device=dev, dtype=q.dtype)
            v = torch.randn_like(k)
            fn = (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != hq))
            ms = bench_ms(fn, cuda, rep_ms=100)
        except Exception as e:  # out of memory or no kernel for the shape
            print(f"{name:<44} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        flops = 4 * hq * hd * S * S / 2
        print(f"{name:<44} {ms * 1e3:9.1f} us  {flops / ms / 1e9:6.1f} TF/s", flush=True)
        res["sdpa"].append(dict(case=name, us=ms * 1e3, flops=flops, tflops=flops / ms / 1e9, seq=S, q_heads=hq,
                                kv_heads=hkv, head_dim=hd))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", action="store_true", help="also time alternative configs and split counts")
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        sh = Shapes(heads=16, head_dim=64, rope=16, window=8, block=8, rate_hca=8, topk=8, dtype=torch.float32)
        decode_cases = [("csa", 2, 64, False), ("hca", 3, 64, False), ("csa", 2, 64, True)]
        prefill_tokens = 48
    else:
        sh = Shapes()
        decode_cases = [("csa", 64, 8192, False), ("hca", 64, 8192, False), ("csa", 128, 32768, False),
                        ("hca", 128, 32768, False), ("csa", 8, 8192, False), ("csa", 64, 8192, True)]
        prefill_tokens = 8192
    target = target_of(torch.empty(0, device=dev))
    table = ad.CONFIGS[target]
    base = table.decode
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name() if cuda else "cpu", "target": target,
                 "shapes": {k: str(v) for k, v in asdict(sh).items()}, "hbm_Bps": HBM_BPS, "bf16_flops": BF16_FLOPS,
                 "table_config": asdict(table), "decode": [], "prefill": [], "sdpa": []}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"{res['device']}  torch {res['torch']}  triton {res.get('triton')}  target {target}  "
          f"table {asdict(table)}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every case: a run cut short still leaves its results
        res["seconds"] = time.perf_counter() - t_start
        (out / "bench_attention.json").write_text(json.dumps(res, indent=1))

    torch.manual_seed(0)
    variants = {"table": base, **(sweep_configs(base) if args.sweep else {})}
    if args.tiny:  # the interpreter: tiny blocks only
        variants = {k: replace(v, block_h=16, block_dv=min(v.block_dv, 32), block_n=16) for k, v in variants.items()}
        variants = dict(list(variants.items())[:3])
    for kind, batch, ctx, fp8 in decode_cases:
        sets, bytes_call, flops = decode_sets(sh, kind, batch, ctx, dev, seed=batch + ctx, fp8=fp8)
        label = f"{kind}{'-fp8' if fp8 else ''} b{batch} {ctx // 1024}K"
        # fp8 and the small batch: the table config plus the sweep's split counts only.
        v = variants if not fp8 and batch >= 64 else {"table": base}
        time_case(label, sets, bytes_call, flops, base, v, cuda, args.sweep, res["decode"],
                  dict(kind=kind, batch=batch, ctx=ctx, fp8=fp8), t_start)
        del sets
        save()
    for kind in ("csa", "hca"):
        one, bytes_call, flops = prefill_set(sh, kind, prefill_tokens, dev, seed=7)
        n = prefill_tokens
        err_rows = torch.cat([torch.arange(min(64, n)), torch.arange(n // 2, n // 2 + 32), torch.arange(n - 32, n)])
        err_rows = err_rows[err_rows < n].unique().to(dev)
        pre = table.pick(n)
        pvariants = {"table": pre, **{k: replace(v, splits=()) for k, v in variants.items() if k != "table"}}
        time_case(f"prefill {kind} {n} tok", [one], bytes_call, flops, pre, pvariants, cuda, args.sweep,
                  res["prefill"], dict(kind=kind, tokens=n), t_start, twin=False, err_rows=err_rows)
        del one
        save()
    sdpa_baselines(dev, cuda, args.tiny, res)
    save()
    print(f"wrote {out / 'bench_attention.json'} after {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
