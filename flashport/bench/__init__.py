"""`flashport bench`: throughput, latency and serving benchmarks, the roofline of a V4 step, the report.

    stats.py     TTFT / TPOT / ITL / E2EL, percentiles, goodput, throughput from request timestamps
    roofline.py  bytes and FLOPs of every op of a step (any V4 config), its floor on 1 or N GPUs
    devices.py   accelerator datasheets and prices; the ceilings measured on our H200
    cost.py      cost per 1M tokens; the price table and its --prices override
    workload.py  seeded random prompts (optionally with a shared prefix), JSONL / ShareGPT files
    offline.py   engine runs at a concurrency: per-request timings, per-step floors, memory
    serve.py     streaming load generator for any OpenAI-compatible endpoint
    peer.py      the transformers DeepseekV4ForCausalLM baseline
    kernels.py   runs every scripts/gpu/bench_*.py and tabulates time against floor
    suite.py     all of it in one process, for the report
    report.py    the report: Markdown, JSON, PNG; projections to other devices
    cli.py       the `flashport bench` subcommands

See docs/bench.md.
"""
