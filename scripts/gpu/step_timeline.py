"""Where the wall time of a decode step goes, host vs device: the engine on V4-Flash shapes (dummy
FP8/FP4 weights, first N layers), `concurrency` requests at `isl` tokens of context, decode steps
timed with the engine's overlap off and on (issue "Speed", the host-time goal).

For each mode, over `--steps` decode steps (no synchronization besides the engine's own):
  wall            time per engine.step() call (steady state: one step per call in both modes)
  graph           device time of the graph replay (CUDA events around it)
  sampling        device time from the end of the replay to the sampled tokens' copy (events)
  device idle     wall - graph - sampling: the time the device waits for the host
  host segments   perf_counter time of the host's parts: schedule, update, input build + replay
                  launch (graphs.execute), sampling launch, collect (waiting for the tokens),
                  output processing (detokenization, stop checks)
Then the graph of one bucket replayed back to back under the profiler: the sum of its kernels'
times vs its replay time gives the device's own gaps between kernels inside the graph.

Usage (repo root): python3 scripts/gpu/step_timeline.py [--layers 20] [--concurrency 64]
                   [--isl 8192] [--steps 12] [--out DIR]
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
from flashport.sampling_params import SamplingParams  # noqa: E402


class Timers:
    """Wraps methods of live objects with perf_counter timers (instance attributes: this run only)."""

    def __init__(self) -> None:
        self.t: dict[str, list[float]] = defaultdict(list)
        self._undo: list[tuple[object, str]] = []

    def wrap(self, obj: object, name: str, key: str) -> None:
        inner = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                self.t[key].append(time.perf_counter() - t0)

        setattr(obj, name, timed)
        self._undo.append((obj, name))

    def reset(self) -> None:
        self.t.clear()

    def close(self) -> None:
        for obj, name in self._undo:
            delattr(obj, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--isl", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    res: dict = dict(layers=args.layers, concurrency=args.concurrency, isl=args.isl, steps=args.steps,
                     device=torch.cuda.get_device_name(), torch=torch.__version__)
    with tempfile.TemporaryDirectory() as d:
        cfg = ModelConfig()
        (Path(d) / "config.json").write_text(json.dumps(cfg.to_official_dict()))
        n_out = 6 * args.steps + 64
        engine = Engine(d, device="cuda", dtype="bfloat16", load_format="dummy", num_layers=args.layers,
                        max_model_len=args.isl + n_out + 64, max_num_seqs=args.concurrency,
                        max_num_batched_tokens=args.chunk, progress=False, log=print)
        g = torch.Generator().manual_seed(0)
        params = SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True)
        for i in range(args.concurrency):
            engine.add_request(str(i), torch.randint(2, cfg.vocab_size, (args.isl,), generator=g).tolist(), params)
        t0 = time.perf_counter()
        while engine.num_prompt_tokens_computed < args.concurrency * args.isl or engine.scheduler.num_waiting:
            engine.step()
        torch.cuda.synchronize()
        print(f"prefill {time.perf_counter() - t0:.1f} s", flush=True)

        graphs, runner = engine.runner.graphs, engine.runner
        events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # replay start, replay end
        sample_end: list[torch.cuda.Event] = []
        run_inner, launch_inner = graphs._run, runner._launch_sampling

        def run_timed(b):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            run_inner(b)
            e1.record()
            events.append((e0, e1))

        def launch_timed(*a, **k):
            p = launch_inner(*a, **k)
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            sample_end.append(e)
            return p

        graphs._run, runner._launch_sampling = run_timed, launch_timed
        timers = Timers()
        timers.wrap(engine.scheduler, "schedule", "schedule")
        timers.wrap(engine.scheduler, "update", "update")
        timers.wrap(graphs, "execute", "inputs_and_replay_launch")
        timers.wrap(runner, "_launch_sampling", "sampling_launch")
        timers.wrap(runner, "collect", "collect_wait")
        timers.wrap(engine, "_apply_result", "output_processing")
        modes = {}
        for overlap in (False, True):
            engine.overlap = overlap
            if not overlap:
                engine.step()  # collects the prefill's last step in flight (the engine's default is overlap)
            for _ in range(3):  # warm-up (and the first overlapped call only launches)
                engine.step()
            torch.cuda.synchronize()
            events.clear()
            sample_end.clear()
            timers.reset()
            walls = []
            for _ in range(args.steps):
                t = time.perf_counter()
                engine.step()
                walls.append(time.perf_counter() - t)
            torch.cuda.synchronize()
            n = min(len(events), len(sample_end))
            graph_ms = [events[i][0].elapsed_time(events[i][1]) for i in range(n)]
            sample_ms = [events[i][1].elapsed_time(sample_end[i]) for i in range(n)]
            wall = statistics.median(walls) * 1e3
            m = dict(wall_ms=round(wall, 3), graph_ms=round(statistics.median(graph_ms), 3),
                     sampling_ms=round(statistics.median(sample_ms), 3),
                     walls_ms=[round(w * 1e3, 2) for w in walls],
                     host_ms={k: round(statistics.median(v) * 1e3, 3) for k, v in sorted(timers.t.items())})
            m["device_idle_ms"] = round(wall - m["graph_ms"] - m["sampling_ms"], 3)
            m["device_idle_frac"] = round(m["device_idle_ms"] / wall, 4)
            modes["overlap" if overlap else "step_by_step"] = m
            print(f"overlap={overlap}: wall {wall:.2f} ms, graph {m['graph_ms']:.2f} ms, sampling "
                  f"{m['sampling_ms']:.3f} ms, device idle {m['device_idle_ms']:.2f} ms "
                  f"({100 * m['device_idle_frac']:.1f}%); host {m['host_ms']}", flush=True)
        res["modes"] = modes
        graphs._run, runner._launch_sampling = run_inner, launch_inner
        timers.close()

        # The graph alone, back to back: replay time vs the sum of its kernels.
        bucket = next(b for b in graphs._buckets.values() if b.graph is not None and b.shape.rows == args.concurrency)
        reps = 5
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            bucket.graph.replay()
        e1.record()
        torch.cuda.synchronize()
        replay_ms = e0.elapsed_time(e1) / reps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                bucket.graph.replay()
            torch.cuda.synchronize()
        kernels = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
        busy_ms = sum(ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
                      for ev in kernels) / 1e3 / reps
        res["graph_alone"] = dict(shape=[bucket.shape.rows, bucket.shape.width], replay_ms=round(replay_ms, 3),
                                  kernel_busy_ms=round(busy_ms, 3), kernels_per_replay=len(kernels) / reps,
                                  in_graph_gap_ms=round(replay_ms - busy_ms, 3))
        print(f"graph alone {res['graph_alone']}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "step_timeline.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
