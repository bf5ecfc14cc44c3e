"""Engine baseline on the GPU (issue 3): V4-Flash shapes, dummy FP8/FP4 weights, first N layers.

Start-up capacity report, then `concurrency` requests with random `isl`-token prompts and `osl`
output tokens (ignore_eos) through `Engine.step()`: prefill throughput, and decode throughput
from the steps where every running request decodes one token. Torch reference path.

Usage (repo root): python3 scripts/gpu/engine_baseline.py [--layers 20] [--concurrency 64] [--isl 8192]
                   [--osl 16] [--chunk 8192] [--time-limit 420] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.config import ModelConfig  # noqa: E402
from flashport.engine.engine import Engine  # noqa: E402
from flashport.model.tiny import tiny_config  # noqa: E402
from flashport.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--isl", type=int, default=8192)
    ap.add_argument("--osl", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--time-limit", type=float, default=420.0)
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the embedded tiny config (a CPU smoke test)")
    args = ap.parse_args()
    cuda = args.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    res: dict = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name() if cuda else "cpu"}
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        cfg = tiny_config() if args.tiny else ModelConfig()
        (Path(d) / "config.json").write_text(json.dumps(cfg.to_official_dict()))
        t0 = time.perf_counter()
        engine = Engine(d, device=args.device, dtype="bfloat16" if cuda else "float32", load_format="dummy", num_layers=args.layers,
                        max_model_len=args.isl + args.osl, max_num_seqs=args.concurrency,
                        max_num_batched_tokens=args.chunk, progress=False, log=lines.append)
        sync()
        res["startup_s"] = round(time.perf_counter() - t0, 1)
        res["capacity"] = lines
        if cuda:
            res["memory_gib"] = {"allocated": round(torch.cuda.memory_allocated() / 2**30, 2),
                                 "reserved": round(torch.cuda.memory_reserved() / 2**30, 2)}
        print("\n".join(lines), flush=True)
        g = torch.Generator().manual_seed(0)
        params = SamplingParams(max_tokens=args.osl, temperature=0, ignore_eos=True)
        for i in range(args.concurrency):
            engine.add_request(str(i), torch.randint(2, cfg.vocab_size, (args.isl,), generator=g).tolist(), params)
        prefill_s, decode_steps, start = 0.0, [], time.perf_counter()
        while engine.has_unfinished() and time.perf_counter() - start < args.time_limit:
            # A decode-only step: every prompt was computed before it, all requests still running.
            is_decode = (engine.num_prompt_tokens_computed >= args.concurrency * args.isl
                         and engine.scheduler.num_running == args.concurrency)
            t = time.perf_counter()
            engine.step()
            sync()
            dt = time.perf_counter() - t
            if is_decode:
                decode_steps.append(dt)
            else:
                prefill_s += dt
            print(f"step {engine.num_steps}: {dt * 1000:.0f} ms, running {engine.scheduler.num_running}", flush=True)
        res["prefill_s"] = round(prefill_s, 1)
        res["prefill_tok_s"] = round(engine.num_prompt_tokens_computed / max(prefill_s, 1e-9), 1)
        res["decode_steps"] = len(decode_steps)
        if decode_steps:
            med = statistics.median(decode_steps)
            res["decode_step_ms_median"] = round(med * 1000, 1)
            res["decode_tok_s"] = round(args.concurrency / med, 1)
        res["finished"] = not engine.has_unfinished()
        if cuda:
            res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    Path(args.out, "engine_baseline.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
