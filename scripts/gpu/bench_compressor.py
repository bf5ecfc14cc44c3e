"""Benchmark of the decode-step compressor and the q/kv norm+RoPE kernels (issue "Kernels I" items
3 and 4) on V4-Flash shapes, bf16.

compressor_decode, one new token per sequence, batch 64 and 256, three compressors:
  csa      d 512, width 1024, m 4    (2m = 8 slots, overlap state)
  indexer  d 128, width 256,  m 4
  hca      d 512, width 512,  m 128
and two position mixes:
  close    every sequence closes a block (the worst step: all pending rows read, entries written)
  decode   B/m sequences (at least one) close a block, the others only store a pending row (a
           typical step)
q_norm_rope at N = 64 and 8192 ([N, 64, 512]) and kv_norm_rope_store ([N, 512] + window pool rows).

Each is timed eagerly (do_bench median, launch overhead included) and as a CUDA graph
(do_bench_cudagraph median: what a graph-replayed decode step pays), with inputs and pool rows
rotated over copies that together exceed 2x L2; the torch twin is timed in the same run (it syncs
once on a boolean index, so it has no graph time). Bytes: what the step must move: rows read (new
kv/gate, pending rows, old overlap, ape, norm weight) and written (pending row, entry, overlap,
boundary record); floor = bytes / 4.2e12 B/s. Each case also checks the kernel against the twin on
the GPU (max |diff| and the fraction of bf16 elements that differ). --sweep times the kernels at
other entries of their config tables (tile sizes, warps).

Usage (repo root): python3 scripts/gpu/bench_compressor.py --out DIR [--sweep]
Writes DIR/bench_compressor.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.kernels import compressor as kc  # noqa: E402
from flashport.kernels import qkv_rope as kq  # noqa: E402
from flashport.kernels.spec import target_of  # noqa: E402
from flashport.ops.compressor import compressor_decode  # noqa: E402
from flashport.ops.qkv_rope import kv_norm_rope_store, q_norm_rope  # noqa: E402

HBM_BPS = 4.2e12
DT = torch.bfloat16
E = 2  # bytes per bf16 element
EPS = 1e-6
ROPE = 64
KINDS = {"csa": (512, 4, True), "indexer": (128, 4, True), "hca": (512, 128, False)}  # d, m, overlap
BLOCK = 128  # the engine's block size for V4-Flash: CSA boundary records at (p+1) % 128 == 0


def _time(fn: Callable[[], object], graph: bool = True) -> dict:
    out: dict = {}
    modes = [("eager_us", lambda: do_bench(fn, warmup=25, rep=100, return_mode="median"))]
    if graph:
        modes.append(("graph_us", lambda: do_bench_cudagraph(fn, rep=100, return_mode="median")))
    for mode, bench in modes:
        try:
            out[mode] = round(bench() * 1e3, 2)
        except Exception as e:  # noqa: BLE001 - record and go on: one failing path must not end the run
            out[mode] = None
            out[f"{mode}_error"] = f"{type(e).__name__}: {e}"[:300]
            torch.cuda.synchronize()
    return out


def _fracs(row: dict, nbytes: int) -> None:
    for mode in ("eager_us", "graph_us"):
        if row.get(mode):
            row[mode.replace("_us", "_hbm_frac")] = round(nbytes / (row[mode] * 1e-6) / HBM_BPS, 3)


def _copies(set_bytes: int, l2: int, cap: int = 64) -> int:
    return max(2, min(cap, -(-2 * l2 // max(set_bytes, 1))))


# ---------------------------------------------------------------- compressor
def _positions(B: int, m: int, mix: str, g: torch.Generator) -> torch.Tensor:
    if mix == "close":  # block w >= 1 closes (CSA has a previous block); some at a record boundary
        return torch.randint(1, 16384 // m, (B,), generator=g) * m + m - 1
    pos = torch.randint(m, 16384 - m, (B,), generator=g)
    pos = pos - (pos % m == m - 1).long()  # leave the block open (p % m = m-2) ...
    k = max(1, B // m)  # ... except in B/m sequences (at least one): a closing program sets the latency
    pos[:k] = pos[:k] // m * m + m - 1
    return pos


def _compressor_bytes(pos: torch.Tensor, d: int, m: int, overlap: bool) -> int:
    width = 2 * d if overlap else d
    closes = (pos % m) == m - 1
    n_close, n_open = int(closes.sum()), int((~closes).sum())
    new_row = 2 * width * E  # kv + gate of the new token (read by every program)
    total = len(pos) * new_row + n_open * new_row  # ... and written to a pending row by open ones
    per_close = 2 * (m - 1) * width * E + d * E  # pending rows read, entry written
    if overlap:
        has_prev = int((closes & (pos >= m)).sum())
        records = int((closes & ((pos + 1) % BLOCK == 0)).sum())
        total += has_prev * m * d * (E + 4) + n_close * m * d * (E + 4) + records * m * d * (E + 4)
    total += n_close * per_close + (m * width * 4 + d * 4 if n_close else 0)  # + ape, norm weight once
    return total


def bench_compressor(kind: str, B: int, mix: str, l2: int, graph: bool = True) -> dict:
    d, m, overlap = KINDS[kind]
    width = 2 * d if overlap else d
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(B * 7 + m)
    pos0 = _positions(B, m, mix, g)
    nbytes = _compressor_bytes(pos0, d, m, overlap)
    n = _copies(nbytes, l2)
    S, R, NC = n * B, n * B, n * B
    pend_kv = torch.randn(S, m - 1, width, device=dev, dtype=DT)
    pend_gate = torch.randn(S, m - 1, width, device=dev, dtype=DT)
    entries = torch.zeros(R, d, device=dev, dtype=DT)
    ape = torch.randn(m, width, device=dev)
    w = torch.rand(d, device=dev) + 0.5
    ov = None
    if overlap:
        ov = (torch.randn(S, m, d, device=dev, dtype=DT), torch.randn(S, m, d, device=dev),
              torch.zeros(NC, m, d, device=dev, dtype=DT), torch.zeros(NC, m, d, device=dev))
    sets = []
    for i in range(n):  # copy i: the same positions, slots / entry rows / records [i*B, (i+1)*B)
        pos = pos0
        ids = torch.arange(i * B, (i + 1) * B)
        closes = (pos % m) == m - 1
        ang = (pos + 1 - m).float()[:, None] * torch.rand(ROPE // 2)
        sets.append(dict(
            kv=torch.randn(B, width, device=dev, dtype=DT), gate=torch.randn(B, width, device=dev, dtype=DT),
            slots=ids.to(dev), positions=pos.to(dev), close_rows=torch.where(closes, ids, -1).to(dev),
            boundary_blocks=torch.where(closes & ((pos + 1) % BLOCK == 0), ids, -1).to(dev),
            cos=ang.cos().to(dev, DT), sin=ang.sin().to(dev, DT)))
    it = iter(range(1 << 62))

    def call(impl: str, s: dict | None = None) -> None:
        s = s or sets[next(it) % n]
        compressor_decode(s["kv"], s["gate"], s["slots"], s["positions"], s["close_rows"], s["boundary_blocks"],
                          pend_kv, pend_gate, entries, ape, w, EPS, s["cos"], s["sin"], ov, impl=impl)

    # Correctness on copy 0: kernel vs twin from the same pool contents.
    pools = [pend_kv, pend_gate, entries, *(ov or ())]
    saved = [t.clone() for t in pools]
    call("torch", sets[0])
    want = [t.clone() for t in pools]
    for t, s0 in zip(pools, saved):
        t.copy_(s0)
    call("triton", sets[0])
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(pools, want)]
    neq = sum(int((a != b).sum()) for a, b in zip(pools, want))
    rows = sets[0]["close_rows"][sets[0]["close_rows"] >= 0]
    ent_frac = float((entries[rows] != want[2][rows]).float().mean()) if rows.numel() else 0.0
    del saved, want

    row = dict(op="compressor_decode", kind=kind, B=B, mix=mix, d=d, width=width, m=m,
               closing=int(((pos0 % m) == m - 1).sum()), bytes=nbytes, copies=n,
               max_abs_diff_vs_twin=max(diffs), elems_differ_vs_twin=neq, entry_elems_differ_frac=round(ent_frac, 5))
    row["kernel"] = _time(lambda: call("triton"), graph)
    _fracs(row["kernel"], nbytes)
    row["twin"] = _time(lambda: call("torch"), graph=False)
    _fracs(row["twin"], nbytes)
    return row


# ---------------------------------------------------------------- q / kv norm + rope
def bench_qkv(op: str, N: int, l2: int, graph: bool = True) -> dict:
    dev = torch.device("cuda")
    H, D = (64, 512) if op == "q_norm_rope" else (1, 512)
    nbytes = 2 * N * H * D * E + 2 * N * (ROPE // 2) * E + (N * D * E + N * 8 + D * 4 if op != "q_norm_rope" else 0)
    n = _copies(nbytes, l2)
    pool = torch.zeros(n * N, D, device=dev, dtype=DT)
    w = torch.rand(D, device=dev) + 0.5
    sets = []
    for i in range(n):
        ang = torch.rand(N, ROPE // 2, device=dev) * 1000
        x = torch.randn(N, H, D, device=dev, dtype=DT) * 3
        sets.append(dict(x=x if op == "q_norm_rope" else x.view(N, D), cos=ang.cos().to(DT), sin=ang.sin().to(DT),
                         rows=torch.arange(i * N, (i + 1) * N, device=dev)))
    it = iter(range(1 << 62))

    def call(impl: str, s: dict | None = None) -> torch.Tensor:
        s = s or sets[next(it) % n]
        if op == "q_norm_rope":
            return q_norm_rope(s["x"], s["cos"], s["sin"], EPS, impl=impl)
        return kv_norm_rope_store(s["x"], w, EPS, s["cos"], s["sin"], pool, s["rows"], impl=impl)

    want = call("torch", sets[0])
    got = call("triton", sets[0])
    row = dict(op=op, N=N, H=H, D=D, bytes=nbytes, copies=n,
               max_abs_diff_vs_twin=(got.float() - want.float()).abs().max().item(),
               elems_differ_frac=round(float((got != want).float().mean()), 6))
    del want, got
    row["kernel"] = _time(lambda: call("triton"), graph)
    _fracs(row["kernel"], nbytes)
    row["twin"] = _time(lambda: call("torch"), graph and op == "q_norm_rope")
    _fracs(row["twin"], nbytes)
    return row


def sweep(l2: int) -> list[dict]:
    """Other table entries for this target: compressor tile x warps, q/kv rows x warps."""
    target = target_of(torch.empty(0, device="cuda"))
    out = []
    base_c, base_q = dict(kc.CONFIGS[target]), dict(kq.CONFIGS[target])
    for tile in (4096, 8192, 16384):
        for warps in (4, 8, 16):
            kc.CONFIGS[target] = {**base_c, "tile_elems": tile, "num_warps": warps}
            for kind in ("csa", "hca"):
                r = bench_compressor(kind, 256, "close", l2, graph=True)
                out.append(dict(sweep="compressor", tile_elems=tile, num_warps=warps, kind=kind, kernel=r["kernel"]))
                print(json.dumps(out[-1]), flush=True)
    kc.CONFIGS[target] = base_c
    for elems in (2048, 4096, 8192):
        for warps in (4, 8):
            kq.CONFIGS[target] = {**base_q, "elems": elems, "num_warps": warps}
            for op in ("q_norm_rope", "kv_norm_rope_store"):
                r = bench_qkv(op, 8192, l2, graph=False)
                out.append(dict(sweep=op, elems=elems, num_warps=warps, N=8192, kernel=r["kernel"]))
                print(json.dumps(out[-1]), flush=True)
    kq.CONFIGS[target] = base_q
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
    target = target_of(torch.empty(0, device="cuda"))
    results: dict = dict(device=props.name, target=target, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                         l2_bytes=l2, configs=dict(compressor=kc.CONFIGS[target], qkv_rope=kq.CONFIGS[target]),
                         rows=[])
    import triton

    results["triton"] = triton.__version__
    print({k: v for k, v in results.items() if k != "rows"}, flush=True)
    for kind in KINDS:
        for B in (64, 256):
            for mix in ("close", "decode"):
                r = bench_compressor(kind, B, mix, l2)
                results["rows"].append(r)
                print(json.dumps(r), flush=True)
    for op in ("q_norm_rope", "kv_norm_rope_store"):
        for N in (64, 8192):
            r = bench_qkv(op, N, l2)
            results["rows"].append(r)
            print(json.dumps(r), flush=True)
    if args.sweep:
        results["sweep"] = sweep(l2)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "bench_compressor.json").write_text(json.dumps(results, indent=1))

    print("\n== summary (us; frac = bytes / time / 4.2 TB/s) ==")
    print(f"{'case':<44} {'bytes':>10} {'kernel':>8} {'graph':>8} {'frac(g)':>8} {'twin':>9} {'diff':>9}")
    for r in results["rows"]:
        name = (f"{r['op']} {r['kind']} B={r['B']} {r['mix']} ({r['closing']} close)" if r["op"] == "compressor_decode"
                else f"{r['op']} N={r['N']}")
        k, t = r["kernel"], r["twin"]
        print(f"{name:<44} {r['bytes']:>10} {k.get('eager_us') or '-':>8} {k.get('graph_us') or '-':>8} "
              f"{k.get('graph_hbm_frac') or k.get('eager_hbm_frac') or '-':>8} {t.get('eager_us') or '-':>9} "
              f"{r['max_abs_diff_vs_twin']:>9.2e}")


if __name__ == "__main__":
    main()
