"""Timing helpers shared by the kernel benchmarks in scripts/gpu/ (imported as a sibling module:
a script's own folder is on sys.path when it runs)."""

from __future__ import annotations

import time

HBM_BPS, BF16_FLOPS = 4.2e12, 740e12  # measured H200 ceilings (shared/perf/anchors.md)
L2_BYTES = 50 * 2**20  # H200; rotating input sets keep one cycle above 4x this


def bench_ms(fn, cuda: bool, rep_ms: int = 100) -> float:
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")
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
