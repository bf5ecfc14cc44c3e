"""CPU benchmark of the scheduler: time of one schedule() + update() step (no runner, no torch).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_scheduler.py [--steps 500] [--disable-gc]

Workloads (V4-Flash-like cache geometry: block_size 256, sliding_window 128):
  decode      256 requests in decode (1 token each per step), 1024-token prompts
  mixed       up to 256 running: decodes plus prefill chunks filling a 2048-token budget, requests
              finishing and new ones admitted every few steps (random prompts)
  mixed+hits  as mixed, but every prompt starts with the same 1024-token system prompt (prefix hits)
The fake runner's work (building StepResult) is not timed. Target: median < 1 ms per step.
With the default garbage collector, the max column shows full collections (they traverse every
request's token lists); --disable-gc shows the step time without them.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashport.engine.config import CacheConfig, SchedulerConfig  # noqa: E402
from flashport.engine.plan import SchedulerOutput, StepResult  # noqa: E402
from flashport.engine.request import Request  # noqa: E402
from flashport.engine.scheduler import Scheduler  # noqa: E402

BLOCK, WINDOW, NUM_SEQS = 256, 128, 256


def make(budget: int) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=NUM_SEQS, max_num_batched_tokens=budget, max_model_len=65536),
                     CacheConfig(block_size=BLOCK, num_comp_blocks=4096, num_window_blocks=1024,
                                 num_state_slots=NUM_SEQS, sliding_window=WINDOW))


def fake_result(out: SchedulerOutput, rng: random.Random) -> StepResult:
    return StepResult(sampled={s.request_id: rng.randrange(1, 100_000) for s in out.seqs if s.sample})


def timed_steps(sched: Scheduler, num_steps: int, rng: random.Random, refill=None) -> list[float]:
    times = []
    for _ in range(num_steps):
        if refill is not None:
            refill()
        t0 = time.perf_counter_ns()
        out = sched.schedule()
        t1 = time.perf_counter_ns()
        result = fake_result(out, rng)  # the runner's part: not timed
        t2 = time.perf_counter_ns()
        sched.update(out, result)
        t3 = time.perf_counter_ns()
        times.append((t1 - t0 + t3 - t2) / 1e6)
    return times


def bench_decode(num_steps: int, rng: random.Random) -> tuple[list[float], str]:
    sched = make(budget=8192)
    for i in range(NUM_SEQS):
        sched.add_request(Request(f"d{i}", [rng.randrange(1, 100_000) for _ in range(1024)], max_tokens=10**6))
    while sched.num_waiting or any(r.num_computed_tokens < r.num_tokens - 1 for r in sched.running):
        out = sched.schedule()  # prefill (untimed)
        sched.update(out, fake_result(out, rng))
    times = timed_steps(sched, num_steps, rng)
    return times, f"{sched.num_running} decoding, {NUM_SEQS} tokens/step"


def bench_mixed(num_steps: int, rng: random.Random, shared_prefix: bool) -> tuple[list[float], str]:
    sched = make(budget=2048)
    system = [rng.randrange(1, 100_000) for _ in range(1024)]
    count = iter(range(10**9))

    def refill() -> None:  # keep a few requests waiting so that every step admits / prefills
        while sched.num_waiting < 4:
            head = system if shared_prefix else [rng.randrange(1, 100_000) for _ in range(1024)]
            tail = [rng.randrange(1, 100_000) for _ in range(rng.randrange(16, 1024))]
            sched.add_request(Request(f"m{next(count)}", head + tail, max_tokens=rng.randrange(32, 512)))

    timed_steps(sched, 300, rng, refill)  # warm up into a steady state
    num_tokens = []
    times = []
    for _ in range(num_steps // 50):
        times += timed_steps(sched, 50, rng, refill)
        num_tokens.append(sched.num_running)
    cache = sched.cache
    what = (f"~{statistics.mean(num_tokens):.0f} running, 2048-token budget, "
            f"{sched.num_preemptions} preemptions, prefix hit rate {cache.prefix_hit_rate:.2f}")
    return times, what


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--disable-gc", action="store_true", help="no cyclic garbage collection while timing")
    args = parser.parse_args()
    if args.disable_gc:
        gc.disable()
    rng = random.Random(0)
    rows = [("decode", *bench_decode(args.steps, rng)),
            ("mixed", *bench_mixed(args.steps, rng, shared_prefix=False)),
            ("mixed+hits", *bench_mixed(args.steps, rng, shared_prefix=True))]
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {args.steps} timed steps each, "
          f"gc {'disabled' if args.disable_gc else 'enabled'}")
    print("| workload | median ms | p90 ms | max ms | what |")
    print("|---|---|---|---|---|")
    for name, times, what in rows:
        times.sort()
        p90 = times[int(0.9 * (len(times) - 1))]
        print(f"| {name} | {statistics.median(times):.3f} | {p90:.3f} | {times[-1]:.3f} | {what} |")
    print("torch imported:", "torch" in sys.modules)


if __name__ == "__main__":
    main()
