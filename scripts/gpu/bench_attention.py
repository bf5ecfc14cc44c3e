"""Sparse decode attention and the lightning indexer on the GPU (issue "Kernels I", items 1 and 2).

V4-Flash shapes, bf16 (64 heads x 512, K=V MQA, rope 64, window 128, block size 128):

- decode attention, CSA layer: window 128 + 512 selected entries; HCA layer: window 128 + ctx/128
  entries; at batch 64 / 8K context and batch 128 / 32K;
- the indexer (64 heads x 128, top-512) at 32K and 128K context, batch 64: the score kernel alone and
  with torch.topk (the op).

Each case: median time (triton.testing.do_bench, which also clears L2 between runs, over input sets
rotated so that the bytes touched exceed L2), bytes moved (KV rows + queries + index ids / keys +
outputs) against 4.2 TB/s, FLOPs against 740 TFLOP/s (bf16), and the torch twin timed in the same run,
plus the kernel-vs-twin error. `--sweep` also times alternative launch configs and split counts
(to fill the per-target config tables). `--tiny` runs small shapes (a CPU smoke test of the script,
TRITON_INTERPRET=1).

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
from flashport.kernels import indexer as ix  # noqa: E402
from flashport.kernels.spec import target_of  # noqa: E402
from flashport.ops.attention import sparse_decode_attention_torch  # noqa: E402
from flashport.ops.indexer import indexer_scores_torch, topk_ids  # noqa: E402

HBM_BPS, BF16_FLOPS = 4.2e12, 740e12
L2_BYTES = 50 * 2**20  # H200; rotation keeps the bytes of one cycle of input sets above 4x this


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
    index_heads: int = 64
    index_dim: int = 128
    dtype: torch.dtype = torch.bfloat16  # the interpreter's bf16 dot is wrong: --tiny uses fp32


def bench_ms(fn, cuda: bool, rep_ms: int = 200) -> float:
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def rotating(sets: list):
    state = {"i": 0}

    def next_set():
        s = sets[state["i"] % len(sets)]
        state["i"] += 1
        return s

    return next_set


def n_sets_for(bytes_per_call: float) -> int:
    return max(1, min(16, math.ceil(4 * L2_BYTES / max(bytes_per_call, 1))))


def attention_sets(sh: Shapes, kind: str, batch: int, ctx: int, dev: torch.device, seed: int):
    """Input sets of one attention case: (args, kwargs) for the op, plus (bytes, flops) per call."""
    g = torch.Generator(device="cpu").manual_seed(seed)  # tables and ids
    gd = torch.Generator(device=dev).manual_seed(seed)  # pool contents, drawn on the device (GBs)
    B, W, D, H = sh.block, sh.window, sh.head_dim, sh.heads
    rate = sh.rate_csa if kind == "csa" else sh.rate_hca
    per_block = B // rate
    pos = ctx - 1 - (torch.arange(batch) * 37) % B  # windows straddle two blocks; lengths differ a little
    n_lb = ctx // B + 1  # logical blocks per sequence (table width)
    n_vis = (pos + 1) // rate
    n_comp = torch.full_like(pos, sh.topk) if kind == "csa" else n_vis
    keys = int((torch.clamp(pos + 1, max=W) + n_comp).sum())
    bytes_call = keys * D * 2 + 2 * batch * H * D * 2 + (batch * sh.topk * 4 if kind == "csa" else 0)
    flops = 4 * H * D * keys
    n_sets = n_sets_for(bytes_call)

    def rnd(*shape: int, dtype=sh.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gd, device=dev).to(dtype)

    # Window pool: each set owns 2 blocks per sequence (the window's two blocks), scattered.
    window = rnd(n_sets * batch * 2 * B, D)
    # Entry pool: CSA shares one big pool (random picks hit random rows); HCA sets own their blocks.
    comp_sets = 1 if kind == "csa" else n_sets
    entries = rnd(comp_sets * batch * n_lb * per_block, D)
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


def indexer_sets(sh: Shapes, batch: int, ctx: int, dev: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    gd = torch.Generator(device=dev).manual_seed(seed)
    B, rate, HI, DI = sh.block, sh.rate_csa, sh.index_heads, sh.index_dim
    per_block = B // rate
    pos = ctx - 1 - (torch.arange(batch) * 37) % B
    n_lb = ctx // B + 1
    n_ent = int(((pos + 1) // rate).sum())
    max_entries = n_lb * per_block
    bytes_call = n_ent * DI * 2 + batch * HI * (DI * 2 + 4) + batch * max_entries * 4
    flops = 2 * HI * DI * n_ent
    n_sets = n_sets_for(bytes_call)
    keys = torch.randn(n_sets * batch * n_lb * per_block, DI, generator=gd, device=dev).to(sh.dtype)
    sets = []
    for s in range(n_sets):
        cbt = (torch.randperm(batch * n_lb, generator=g) + s * batch * n_lb).view(batch, n_lb).int()
        q = torch.randn(batch, HI, DI, generator=g).to(dev, sh.dtype)
        w = (torch.randn(batch, HI, generator=g) * HI ** -0.5).to(dev)
        sets.append(((q, w, keys, cbt.to(dev), pos.int().to(dev)), dict(rate=rate, block_size=B)))
    return sets, bytes_call, flops


def report(name: str, ms: float, bytes_call: float, flops: float, twin_ms: float | None, extra: str = "") -> dict:
    floor_ms = max(bytes_call / HBM_BPS, flops / BF16_FLOPS) * 1e3
    row = dict(case=name, us=ms * 1e3, bytes=bytes_call, flops=flops, hbm_fraction=bytes_call / HBM_BPS * 1e3 / ms,
               flop_fraction=flops / BF16_FLOPS * 1e3 / ms, floor_us=floor_ms * 1e3, floor_fraction=floor_ms / ms,
               twin_us=None if twin_ms is None else twin_ms * 1e3)
    twin = "" if twin_ms is None else f" | twin {twin_ms * 1e3:9.1f} us ({twin_ms / ms:5.1f}x)"
    print(f"{name:<40} {ms * 1e3:9.1f} us  {bytes_call / 1e6:8.1f} MB {row['hbm_fraction']:6.1%} of 4.2TB/s  "
          f"{flops / 1e9:7.2f} GF {row['flop_fraction']:6.1%} of 740TF  floor {floor_ms * 1e3:7.1f} us "
          f"({row['floor_fraction']:6.1%}){twin} {extra}", flush=True)
    return row


def run_attention(sh: Shapes, cases, dev, cuda: bool, sweep: bool, res: dict) -> None:
    target = target_of(torch.empty(0, device=dev))
    base = ad.CONFIGS[target]
    variants = {"table": base}
    if sweep:
        variants.update({
            "dv512_n16": replace(base, block_dv=512, block_n=16),
            "dv512_n16_d128": replace(base, block_dv=512, block_n=16, block_d=128),
            "h32_dv512_n16": replace(base, block_h=32, block_dv=512, block_n=16),
            "n16": replace(base, block_n=16), "n64": replace(base, block_n=64),
            "d128": replace(base, block_d=128), "stages3": replace(base, num_stages=3),
            "stages1": replace(base, num_stages=1), "warps4": replace(base, num_warps=4),
        })
    for kind, batch, ctx in cases:
        sets, bytes_call, flops = attention_sets(sh, kind, batch, ctx, dev, seed=batch + ctx)
        (args, kw) = sets[0]
        got = ad.sparse_decode_attention(*args, **kw)
        want = sparse_decode_attention_torch(*args, **kw)
        err = (got.float() - want.float()).abs().max().item()
        nxt = rotating(sets)

        def twin() -> None:
            a, k = nxt()
            sparse_decode_attention_torch(*a, **k)

        twin_ms = bench_ms(twin, cuda, rep_ms=100)
        splits_default = base.num_splits(batch)
        for vname, cfg in variants.items():
            split_list = [None] + ([s for s in (1, 2, 4, 8) if s != splits_default] if sweep else [])
            for splits in split_list:
                def kernel() -> None:
                    a, k = nxt()
                    ad.sparse_decode_attention(*a, **k, num_splits=splits, config=cfg)

                name = f"attn {kind} b{batch} ctx{ctx // 1024}K {vname} s{splits or splits_default}"
                try:
                    ms = bench_ms(kernel, cuda)
                except Exception as e:  # a sweep variant may not fit (registers / shared memory)
                    print(f"{name:<40} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                row = report(name, ms, bytes_call, flops, twin_ms if vname == "table" and splits is None else None,
                             f"max|err| {err:.2e}" if vname == "table" and splits is None else "")
                row.update(kind=kind, batch=batch, ctx=ctx, variant=vname, config=asdict(cfg),
                           splits=splits or splits_default, max_abs_err=err, sets=len(sets))
                res["attention"].append(row)


def run_indexer(sh: Shapes, cases, dev, cuda: bool, sweep: bool, res: dict) -> None:
    target = target_of(torch.empty(0, device=dev))
    base = ix.CONFIGS[target]
    variants = {"table": base}
    if sweep:
        for bn in (32, 64, 128):
            for kpp in (256, 1024):
                for st in (2, 3):
                    variants[f"n{bn}_k{kpp}_s{st}"] = replace(base, block_n=bn, keys_per_prog=kpp, num_stages=st)
    for batch, ctx in cases:
        sets, bytes_call, flops = indexer_sets(sh, batch, ctx, dev, seed=ctx)
        nxt = rotating(sets)
        (args, kw) = sets[0]
        got, want = ix.indexer_scores(*args, **kw), indexer_scores_torch(*args, **kw)
        fin = want > float("-inf")
        rel = ((got[fin] - want[fin]).abs().max() / want[fin].abs().max()).item()
        a_ids, b_ids = topk_ids(got, sh.topk), topk_ids(want, sh.topk)
        same = sum(len(set(x) & set(y)) for x, y in zip(a_ids.tolist(), b_ids.tolist()))
        recall = same / max(1, int((b_ids >= 0).sum()))

        def twin() -> None:
            a, k = nxt()
            topk_ids(indexer_scores_torch(*a, **k), sh.topk)

        def op() -> None:
            a, k = nxt()
            topk_ids(ix.indexer_scores(*a, **k), sh.topk)

        scores0 = ix.indexer_scores(*args, **kw)
        twin_ms = bench_ms(twin, cuda, rep_ms=100)
        op_ms = bench_ms(op, cuda)
        topk_ms = bench_ms(lambda: topk_ids(scores0, sh.topk), cuda)
        row = report(f"indexer+topk b{batch} ctx{ctx // 1024}K", op_ms, bytes_call, flops, twin_ms,
                     f"topk alone {topk_ms * 1e3:.1f} us; rel err {rel:.1e}, top-k recall {recall:.4f}")
        row.update(kind="indexer_topk", batch=batch, ctx=ctx, topk_us=topk_ms * 1e3, rel_err=rel, recall=recall)
        res["indexer"].append(row)
        for vname, cfg in variants.items():
            def scores() -> None:
                a, k = nxt()
                ix.indexer_scores(*a, **k, config=cfg)

            name = f"indexer scores b{batch} ctx{ctx // 1024}K {vname}"
            try:
                ms = bench_ms(scores, cuda)
            except Exception as e:
                print(f"{name:<40} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            row = report(name, ms, bytes_call, flops, None)
            row.update(kind="indexer_scores", batch=batch, ctx=ctx, variant=vname, config=asdict(cfg))
            res["indexer"].append(row)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", action="store_true", help="also time alternative configs and split counts")
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        sh = Shapes(heads=16, head_dim=64, rope=16, window=8, block=8, rate_hca=8, topk=8, index_heads=16,
                    index_dim=32, dtype=torch.float32)
        attn_cases = [("csa", 2, 64), ("hca", 3, 64)]
        index_cases = [(2, 96)]
    else:
        sh = Shapes()
        attn_cases = [(k, b, c) for b, c in ((64, 8192), (128, 32768)) for k in ("csa", "hca")]
        index_cases = [(64, 32768), (64, 131072)]
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name() if cuda else "cpu", "target": target_of(torch.empty(0, device=dev)),
                 "shapes": {k: str(v) for k, v in asdict(sh).items()}, "hbm_Bps": HBM_BPS, "bf16_flops": BF16_FLOPS, "attention": [], "indexer": []}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"{res['device']}  torch {res['torch']}  triton {res.get('triton')}  target {res['target']}")
    torch.manual_seed(0)
    run_attention(sh, attn_cases, dev, cuda, args.sweep, res)
    run_indexer(sh, index_cases, dev, cuda, args.sweep, res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_attention.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out / 'bench_attention.json'}")


if __name__ == "__main__":
    main()
