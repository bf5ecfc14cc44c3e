"""Where a decode step's time goes: the engine on V4-Flash shapes (dummy FP8/FP4 weights, first N
layers), `concurrency` requests at `isl` tokens of context, profiled over a few decode steps.

Prints: wall time per decode step, device busy time per step (sum of kernel times), their gap (host
time the device waits for), and the kernels by total device time (name, calls per step, us per
step, share). Writes profile_decode.json. Issue "Speed": measure first.

Usage (repo root): python3 scripts/gpu/profile_decode.py [--layers 4] [--concurrency 64] [--isl 8192]
                   [--steps 3] [--out DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.config import ModelConfig  # noqa: E402
from flashport.engine.engine import Engine  # noqa: E402
from flashport.model.tiny import tiny_config  # noqa: E402
from flashport.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--isl", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--out", default=".")
    ap.add_argument("--tiny", action="store_true", help="the embedded tiny config on the CPU (smoke test)")
    args = ap.parse_args()
    cuda = not args.tiny
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warm = 3
    with tempfile.TemporaryDirectory() as d:
        cfg = tiny_config() if args.tiny else ModelConfig()
        (Path(d) / "config.json").write_text(json.dumps(cfg.to_official_dict()))
        engine = Engine(d, device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32",
                        load_format="dummy", num_layers=args.layers, max_model_len=args.isl + 2 * args.concurrency + 64,
                        max_num_seqs=args.concurrency, max_num_batched_tokens=args.chunk, progress=False, log=print)
        g = torch.Generator().manual_seed(0)
        # Long enough that no request finishes while the later prompts are still being prefilled
        # (a prefill step of one chunk also decodes the requests already prefilled).
        params = SamplingParams(max_tokens=2 * args.concurrency + 64, temperature=0, ignore_eos=True)
        for i in range(args.concurrency):
            engine.add_request(str(i), torch.randint(2, cfg.vocab_size, (args.isl,), generator=g).tolist(), params)
        t0 = time.perf_counter()
        while engine.num_prompt_tokens_computed < args.concurrency * args.isl:
            engine.step()
        sync()
        print(f"prefill {time.perf_counter() - t0:.1f} s", flush=True)
        assert engine.scheduler.num_running == args.concurrency
        walls = []
        for _ in range(warm):
            t = time.perf_counter()
            engine.step()
            sync()
            walls.append(time.perf_counter() - t)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(args.steps):
                t = time.perf_counter()
                engine.step()
                sync()
                walls.append(time.perf_counter() - t)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if cuda and ev.device_type == torch.autograd.DeviceType.CUDA:
            k = per_kernel[ev.name[:90]]
            k[0] += 1
            k[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    busy = sum(v[1] for v in per_kernel.values()) / args.steps  # us per step
    wall = statistics.median(walls[warm:]) * 1e6
    rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
    res = dict(layers=args.layers, concurrency=args.concurrency, isl=args.isl, steps=args.steps,
               wall_us_per_step=round(wall), device_busy_us_per_step=round(busy),
               host_gap_us_per_step=round(wall - busy), warm_walls_ms=[round(w * 1e3, 1) for w in walls],
               kernels=[dict(name=n, calls_per_step=c / args.steps, us_per_step=round(t / args.steps, 1),
                             share=round(t / args.steps / max(busy, 1e-9), 4)) for n, (c, t) in rows[:40]])
    print(f"decode step: wall {wall / 1e3:.2f} ms, device busy {busy / 1e3:.2f} ms, gap {(wall - busy) / 1e3:.2f} ms")
    for k in res["kernels"][:30]:
        print(f"{k['us_per_step']:10.1f} us {100 * k['share']:5.1f}%  x{k['calls_per_step']:<6g} {k['name']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "profile_decode.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
