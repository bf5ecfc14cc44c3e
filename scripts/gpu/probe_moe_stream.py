"""Probe: how fast can a Triton kernel only STREAM the routed experts' FP4 bytes in the MoE decode
kernel's tile order? (issue "Speed": every MoE decode variant lands at ~1 TB/s, 25% of the bytes
floor, whatever its decode or tile; this separates the access pattern from the arithmetic.)

A program per (expert, BLOCK_N-row column tile), as in `_moe_gate_up_kernel`; each K step loads
BLOCK_N rows x STEP bytes as int32 words and XORs them into a register tile (no decode, no dot).
LAYOUT "rows": the checkpoint's layout [E, rows, K/2] (row r of a tile is 2 KB away from row r+1,
each K step reads STEP bytes of every row). LAYOUT "tiles": the same bytes stored tile by tile, each
K step of a tile one contiguous BLOCK_N x STEP chunk. Prints GB/s per variant against a torch copy.

Usage: python3 scripts/gpu/probe_moe_stream.py [--out DIR] [--tiny]   (--tiny: CPU interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--tiny" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _stream_kernel(w_ptr, out_ptr, rows_per_e, row_bytes, n_tiles,
                   BLOCK_N: tl.constexpr, STEP: tl.constexpr, TILED: tl.constexpr):
    pid = tl.program_id(0)
    e = pid // n_tiles
    t = pid % n_tiles
    w32 = w_ptr.to(tl.pointer_type(tl.int32))
    words = row_bytes // 4
    base = e.to(tl.int64) * rows_per_e * words + t.to(tl.int64) * BLOCK_N * words
    r = tl.arange(0, BLOCK_N)[:, None]
    c = tl.arange(0, STEP // 4)[None, :]
    acc = tl.zeros((BLOCK_N, STEP // 4), dtype=tl.int32)
    for k in range(0, words, STEP // 4):
        if TILED:  # K step k of this tile: BLOCK_N x STEP contiguous bytes
            offs = base + k * BLOCK_N + r * (STEP // 4) + c
        else:  # row-major rows of row_bytes each
            offs = base + r * words + k + c
        acc = acc ^ tl.load(w32 + offs)
    tl.store(out_ptr + pid * BLOCK_N * (STEP // 4) + r * (STEP // 4) + c, acc)


def time_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev = "cpu" if args.tiny else "cuda"
    # V4-Flash w13 of one layer: 256 experts x 4096 rows (gate + up) x 2048 bytes (4096 FP4 codes).
    E, rows, row_bytes = (2, 128, 256) if args.tiny else (256, 4096, 2048)
    w = torch.randint(0, 255, (E, rows, row_bytes), dtype=torch.uint8, device=dev)
    nbytes = w.numel()
    out = []
    if not args.tiny:
        dst = torch.empty_like(w)
        ms = time_ms(lambda: dst.copy_(w))
        out.append(dict(variant="torch copy (read + write)", gb_s=2 * nbytes / ms / 1e6))
        del dst
    variants = [(64, 32, False, 4, 1), (64, 64, False, 4, 1), (64, 128, False, 4, 1), (64, 32, False, 4, 3),
                (64, 32, True, 4, 1), (64, 64, True, 4, 1), (64, 128, True, 4, 1), (64, 32, True, 4, 3),
                (128, 32, False, 4, 1), (128, 64, False, 8, 1), (64, 256, False, 4, 1), (64, 256, True, 4, 1)]
    if args.tiny:
        variants = [(64, 32, False, 4, 1), (64, 32, True, 4, 1)]
    ref = None
    for bn, step, tiled, warps, stages in variants:
        n_tiles = rows // bn
        acc = torch.empty(E * n_tiles * bn * (step // 4), dtype=torch.int32, device=dev)

        def run(bn=bn, step=step, tiled=tiled, warps=warps, stages=stages, n_tiles=n_tiles, acc=acc):
            _stream_kernel[(E * n_tiles,)](w, acc, rows, row_bytes, n_tiles, BLOCK_N=bn, STEP=step, TILED=tiled,
                                           num_warps=warps, num_stages=stages)

        run()
        if not tiled and bn == 64 and step == 32:  # the XOR of every word, a check that all bytes were read
            ref = int(acc.view(-1).cpu().numpy().astype("int64").sum())
        rec = dict(variant=f"BLOCK_N {bn}, {step} B per row per K step, {'tiles' if tiled else 'rows'}, "
                           f"{warps} warps, {stages} stages", block_n=bn, step=step, tiled=tiled, warps=warps,
                   stages=stages)
        if not args.tiny:
            ms = time_ms(run)
            rec["gb_s"] = nbytes / ms / 1e6
            rec["us"] = ms * 1e3
        out.append(rec)
        print(json.dumps(rec), flush=True)
    print("check (xor sum of the rows variant)", ref)
    for r in out:
        if "gb_s" in r:
            print(f"{r['gb_s']:8.0f} GB/s  {r['variant']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "probe_moe_stream.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
