"""The benchmark report of V4-Flash on one GPU (issue 7): `flashport bench suite` with the report's settings.

V4-Flash shapes, first 20 layers, dummy FP8/FP4 weights, one engine for all workloads
(max_num_batched_tokens 8192, gpu_memory_utilization 0.88), then the transformers peer:

- c1 ISL 4096 OSL 32, 3 repeats (after one warm-up request): TTFT, TPOT, E2EL;
- c64 ISL 8192 OSL 64 (shortened from 1024; projected to 1024 in the report);
- c128 ISL 32768 OSL 64 with a 32,512-token shared prefix (computed once, then reused: prefilling
  128 distinct 32K prompts would take ~20 minutes);
- c64 ISL 512 OSL 16: the same shape as the peer's batch run (for the ratio; last, as the least
  important: skipped first when time runs short);
- memory per GPU; cost per 1M tokens; the transformers DeepseekV4ForCausalLM (bf16) ratio on as
  many layers as fit (at most 8);
- the report: DIR/report.md, report.json, results.json, throughput.png, latency.png, steps.png.

Each phase checks the time budget (--time-budget, default 420 s) and is skipped, saying so, when it
would not fit; results.json is rewritten after every phase.

Usage (repo root): python3 scripts/gpu/report_v4flash.py --out DIR [--tiny] [--time-budget S]
`--tiny`: the same flow on the tiny config on the CPU (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.cli import main  # noqa: E402

GPU_ARGS = [
    "v4-flash", "--num-layers", "20", "--device", "cuda", "--max-num-batched-tokens", "8192",
    "--gpu-memory-utilization", "0.88",
    "--workload", "64,8192,128,target=1024",
    "--workload", "128,32768,64,shared=32512,target=1024",
    "--workload", "64,512,16,target=1024",
    "--latency-isl", "4096", "--latency-osl", "32", "--repeats", "3",
    "--peer-max-layers", "8", "--peer-batch", "64", "--peer-batch-isl", "512",
]
TINY_ARGS = [
    "tiny", "--device", "cpu", "--cache-bytes", str(64 * 2**20), "--max-num-batched-tokens", "256",
    "--workload", "4,16,4,target=64",
    "--workload", "4,64,8,target=64",
    "--workload", "4,128,8,shared=96,target=64",
    "--latency-isl", "32", "--latency-osl", "4", "--repeats", "2",
    "--peer-max-layers", "2", "--peer-batch", "4", "--peer-batch-isl", "16", "--no-progress",
]


def run() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--time-budget", type=float, default=420.0)
    a = ap.parse_args()
    argv = ["bench", "suite", *(TINY_ARGS if a.tiny else GPU_ARGS), "--out", a.out, "--time-budget", str(a.time_budget)]
    print("flashport " + " ".join(argv), flush=True)
    sys.argv = ["flashport", *argv]  # the command the report records
    return main(argv)


if __name__ == "__main__":
    sys.exit(run())
