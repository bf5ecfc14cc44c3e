"""`flashport bench ...`: the argument parsers and their handlers (heavy imports stay inside)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from flashport.errors import FlashportError


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("model", help="model directory, or 'v4-flash' (the real V4-Flash shapes) or 'tiny' (the "
                                 "embedded tiny config), both with dummy weights")
    g.add_argument("--num-layers", type=int, default=None, help="run only the first N layers (stated in results)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    g.add_argument("--load-format", choices=["auto", "safetensors", "dummy"], default="auto")
    g.add_argument("--max-model-len", type=int, default=None, help="default: the longest workload")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens per step (default 8192)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--cache-bytes", type=int, default=None, help="state pool budget (CPU; overrides the fraction)")
    g.add_argument("--ops-impl", choices=["auto", "reference", "torch", "triton"], default="auto")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other Engine keyword argument (JSON value), repeatable")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="directory for the JSON results (default: print only)")
    p.add_argument("--slo-ttft-ms", type=float, default=200.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _make_engine_args(a: argparse.Namespace, max_model_len: int, max_num_seqs: int):
    from flashport.bench.offline import EngineArgs

    extra = []
    for kv in a.engine_arg:
        k, sep, v = kv.partition("=")
        if not sep:
            raise FlashportError(f"--engine-arg {kv!r}: expected KEY=VALUE")
        try:
            extra.append((k, json.loads(v)))
        except json.JSONDecodeError:
            extra.append((k, v))
    return EngineArgs(device=a.device, dtype=a.dtype, load_format=a.load_format, num_layers=a.num_layers,
                      max_model_len=a.max_model_len or max_model_len, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=a.max_num_batched_tokens,
                      gpu_memory_utilization=a.gpu_memory_utilization, cache_bytes=a.cache_bytes,
                      enable_prefix_caching=not a.no_prefix_caching, ops_impl=a.ops_impl, extra=tuple(extra))


def _slo(a):
    from flashport.bench.stats import SLO

    return SLO(a.slo_ttft_ms, a.slo_tpot_ms)


def _write(a, name: str, doc: dict) -> None:
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(doc, indent=1, default=str))
        print(f"wrote {out / name}")


def _print_summary(s: dict) -> None:
    keys = ("duration_s", "output_tok_s", "total_tok_s", "output_tok_s_per_gpu", "total_tok_s_per_gpu")
    for k in keys:
        if k in s:
            print(f"{k:<24} {s[k]:.2f}")
    for part in ("prefill", "decode"):
        if part in s:
            print(f"{part:<24} " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in s[part].items()))
    lat = s.get("latency") or s
    for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        if m in lat and lat[m].get("n"):
            d = lat[m]
            print(f"{m:<24} mean {d['mean']:.2f}  p50 {d['p50']:.2f}  p90 {d['p90']:.2f}  p99 {d['p99']:.2f}")


def _meta(engine, a) -> dict:
    from flashport.bench.offline import device_name

    cfg = engine.model.cfg
    return {"date": time.strftime("%Y-%m-%d"), "device": device_name(engine), "model": a.model,
            "num_layers": cfg.num_hidden_layers, "command": "flashport " + " ".join(map(shlex.quote, sys.argv[1:]))}


def _cmd_throughput(a: argparse.Namespace) -> int:
    from flashport.bench.offline import (attach_floors, build_engine, memory_report, model_dir, run_requests,
                                         summarize_run)
    from flashport.bench.workload import load_requests, random_requests

    with model_dir(a.model) as (path, forced):
        ea = _make_engine_args(a, a.isl + a.osl, a.concurrency)
        engine = build_engine(path, forced, ea)
        cfg = engine.model.cfg
        n = a.num_prompts or a.concurrency
        if a.dataset:
            reqs = load_requests(a.dataset, n, a.osl, engine.tokenizer, engine.sched_config.max_model_len)
        else:
            reqs = random_requests(n, a.isl, a.osl, cfg.vocab_size, seed=a.seed, shared_prefix=a.shared_prefix)
        run = run_requests(engine, reqs, a.concurrency, label=f"c{a.concurrency}", time_limit=a.time_limit,
                           progress=not a.no_progress)
        meta = _meta(engine, a)
        floors = attach_floors(run, cfg, meta["device"])
        run.extra = {"workload": {"concurrency": a.concurrency, "isl": a.isl, "osl": a.osl,
                                  "shared_prefix": a.shared_prefix, "num_requests": n, "target_osl": a.osl,
                                  "dataset": a.dataset}, "floors": floors}
        s = summarize_run(run, _slo(a))
        mem = memory_report(engine)
    _print_summary(s)
    print("memory GiB: " + ", ".join(f"{k}={v:.2f}" for k, v in mem.items() if isinstance(v, float)))
    _write(a, f"throughput-c{a.concurrency}-isl{a.isl}.json",
           {"kind": "throughput", "meta": meta, "result": s, "memory": mem})
    return 0


def _cmd_latency(a: argparse.Namespace) -> int:
    from flashport.bench.offline import attach_floors, build_engine, model_dir, run_requests, summarize_run
    from flashport.bench.stats import run_metrics
    from flashport.bench.workload import random_requests

    with model_dir(a.model) as (path, forced):
        engine = build_engine(path, forced, _make_engine_args(a, a.isl + a.osl, 1))
        meta = _meta(engine, a)
        recs, runs = [], []
        for r in range(a.repeats + a.warmup):
            reqs = random_requests(1, a.isl, a.osl, engine.model.cfg.vocab_size, seed=a.seed + r)
            run = run_requests(engine, reqs, 1, label=f"latency{r}", progress=False)
            if r < a.warmup:
                continue
            attach_floors(run, engine.model.cfg, meta["device"])
            runs.append(summarize_run(run, _slo(a)))
            recs += run.records
    m = run_metrics(recs, sum(x["duration_s"] for x in runs), _slo(a))
    pre = [x["prefill"] for x in runs if "prefill" in x]
    dec = [x["decode"] for x in runs if "decode" in x]

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    res = {"isl": a.isl, "osl": a.osl, "repeats": a.repeats, "ttft_ms": m["ttft_ms"], "tpot_ms": m["tpot_ms"],
           "itl_ms": m["itl_ms"], "e2el_ms": m["e2el_ms"],
           "prefill_frac_of_floor": mean([p.get("frac_of_floor") for p in pre]),
           "prefill_frac_of_datasheet_floor": mean([p.get("frac_of_datasheet_floor") for p in pre]),
           "decode_frac_of_floor": mean([d.get("frac_of_floor") for d in dec]),
           "decode_frac_of_datasheet_floor": mean([d.get("frac_of_datasheet_floor") for d in dec]), "runs": runs}
    _print_summary(res)
    _write(a, f"latency-isl{a.isl}.json", {"kind": "latency", "meta": meta, "result": res})
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from flashport.bench.serve import run_serve_bench
    from flashport.bench.workload import load_requests, random_requests

    if a.concurrency is None and a.request_rate is None:
        raise FlashportError("bench serve needs --concurrency or --request-rate")
    if a.dataset:
        reqs = load_requests(a.dataset, a.num_prompts, a.osl)
    else:
        reqs = random_requests(a.num_prompts, a.isl, a.osl, a.vocab_size, seed=a.seed)
    res = run_serve_bench(a.base_url, reqs, model=a.served_model, concurrency=a.concurrency,
                          request_rate=a.request_rate, duration=a.duration, chat=a.endpoint == "chat",
                          api_key=a.api_key, slo=_slo(a), num_gpus=a.num_gpus, seed=a.seed, timeout=a.request_timeout,
                          progress=not a.no_progress)
    _print_summary(res)
    print(f"requests {res['requests']}, failed {res['failed']}, goodput {res['goodput_req_s']:.3f} req/s "
          f"(SLO TTFT <= {a.slo_ttft_ms} ms, TPOT <= {a.slo_tpot_ms} ms)")
    meta = {"date": time.strftime("%Y-%m-%d"), "command": "flashport " + " ".join(map(shlex.quote, sys.argv[1:]))}
    _write(a, f"serve-{res['label'].replace(' ', '').replace('/', '_')}.json",
           {"kind": "serve", "meta": meta, "result": res})
    return 0 if res["completed"] else 1


def _cmd_kernels(a: argparse.Namespace) -> int:
    from flashport.bench.kernels import run_kernel_benches

    res = run_kernel_benches(Path(a.out or "bench-kernels"), tiny=a.tiny, only=a.only, timeout=a.timeout)
    return 0 if all(r["rc"] == 0 for r in res["scripts"].values()) else 1


def _cmd_report(a: argparse.Namespace) -> int:
    from flashport.bench.report import load_results, write_report

    res = load_results(a.results)
    write_report(res, Path(a.out or "bench-report"), prices=a.prices)
    return 0


def _cmd_suite(a: argparse.Namespace) -> int:
    from flashport.bench.suite import Workload, run_suite

    workloads = [Workload.parse(w) for w in a.workload]
    longest = max([w.isl + w.osl for w in workloads] + [a.latency_isl + a.latency_osl])
    ea = _make_engine_args(a, longest, max([w.concurrency for w in workloads] + [1]))
    run_suite(a.model, workloads=workloads, latency_isl=a.latency_isl, latency_osl=a.latency_osl,
              repeats=a.repeats, engine_args=ea, out=Path(a.out or "bench-report"), time_budget=a.time_budget,
              peer=not a.no_peer, peer_layers=a.peer_layers, peer_max_layers=a.peer_max_layers,
              peer_batch=a.peer_batch, peer_batch_isl=a.peer_batch_isl, prices=a.prices,
              command="flashport " + " ".join(map(shlex.quote, sys.argv[1:])), slo=_slo(a),
              progress=not a.no_progress, warmup=not a.no_warmup)
    return 0


def _cmd_roofline(a: argparse.Namespace) -> int:
    from flashport.bench.devices import DEVICES, MEASURED, datasheet_ceilings
    from flashport.bench.offline import model_dir
    from flashport.bench.roofline import SeqWork, ops_table, step_floor, step_ops, totals
    from flashport.config import ModelConfig

    with model_dir(a.model) as (path, _):
        cfg = ModelConfig.from_hf(path)
    if a.num_layers:
        cfg = cfg.with_num_layers(a.num_layers)
    seqs = [SeqWork(a.new_tokens, a.context)] * a.batch
    ops = step_ops(cfg, seqs, weights=a.weights)
    print(f"{'op':<15} {'layers':>6} {'weights GB':>11} {'state GB':>9} {'GFLOP':>10}")
    for r in ops_table(ops):
        print(f"{r['op']:<15} {r['layers']:>6} {r['weight_gb']:>11.3f} {r['other_gb']:>9.3f} {r['gflop']:>10.1f}")
    t = totals(ops)
    print(f"{'total':<15} {'':>6} {t['weight_bytes'] / 1e9:>11.3f} {t['other_bytes'] / 1e9:>9.3f} {t['flops'] / 1e9:>10.1f}")
    key = a.gpu
    c = MEASURED.get(key) if a.measured_ceilings else None
    c = c or datasheet_ceilings(key)
    f = step_floor(cfg, seqs, c.tb_s, c.bf16_tflops, num_gpus=a.gpus, link_gb_s=DEVICES[key].link_gb_s,
                   weights=a.weights)
    print(f"floor on {a.gpus} x {key} ({c.source}): {f.floor_s * 1e3:.3f} ms ({f.bound}-bound; memory "
          f"{f.mem_s * 1e3:.3f} ms, compute {f.compute_s * 1e3:.3f} ms, collectives {f.comm_s * 1e3:.3f} ms)")
    return 0


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, serve, kernels, report, suite, roofline")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)

    tp = bsub.add_parser("throughput", help="offline engine run at a concurrency, ISL and OSL")
    _engine_args(tp)
    tp.add_argument("--concurrency", type=int, default=64)
    tp.add_argument("--isl", type=int, default=1024)
    tp.add_argument("--osl", type=int, default=128)
    tp.add_argument("--num-prompts", type=int, default=None, help="default: = concurrency")
    tp.add_argument("--shared-prefix", type=int, default=0, help="random prompts share their first N tokens")
    tp.add_argument("--dataset", default=None, help="JSONL ({'prompt' | 'prompt_token_ids', 'output_len'}) or "
                                                    "ShareGPT JSON instead of random prompts")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    _common(tp)
    tp.set_defaults(func=_cmd_throughput)

    lt = bsub.add_parser("latency", help="single requests at an ISL: TTFT, TPOT, E2EL over repeats")
    _engine_args(lt)
    lt.add_argument("--isl", type=int, default=4096)
    lt.add_argument("--osl", type=int, default=32)
    lt.add_argument("--repeats", type=int, default=5)
    lt.add_argument("--warmup", type=int, default=1)
    lt.add_argument("--seed", type=int, default=0)
    _common(lt)
    lt.set_defaults(func=_cmd_latency)

    sv = bsub.add_parser("serve", help="load generator for any OpenAI-compatible endpoint")
    sv.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    sv.add_argument("--served-model", default=None, help="model name (default: the first of /v1/models)")
    sv.add_argument("--api-key", default=None)
    sv.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    sv.add_argument("--concurrency", type=int, default=None, help="requests in flight (fixed concurrency)")
    sv.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second")
    sv.add_argument("--num-prompts", type=int, default=100)
    sv.add_argument("--duration", type=float, default=None, help="stop sending after this many seconds")
    sv.add_argument("--isl", type=int, default=1024)
    sv.add_argument("--osl", type=int, default=128)
    sv.add_argument("--vocab-size", type=int, default=1000, help="random token ids are drawn below this")
    sv.add_argument("--dataset", default=None)
    sv.add_argument("--num-gpus", type=int, default=1, help="GPUs behind the endpoint (for per-GPU figures)")
    sv.add_argument("--request-timeout", type=float, default=600.0)
    sv.add_argument("--seed", type=int, default=0)
    _common(sv)
    sv.set_defaults(func=_cmd_serve)

    kn = bsub.add_parser("kernels", help="run every scripts/gpu/bench_*.py and tabulate time vs floor")
    kn.add_argument("--out", default=None)
    kn.add_argument("--tiny", action="store_true", help="the scripts' --tiny CPU smoke mode")
    kn.add_argument("--only", nargs="*", default=None, help="substrings of script names")
    kn.add_argument("--timeout", type=float, default=600.0, help="per script")
    kn.set_defaults(func=_cmd_kernels)

    rp = bsub.add_parser("report", help="the report (Markdown, JSON, PNG) from stored results")
    rp.add_argument("results", nargs="+", help="result JSON files or directories")
    rp.add_argument("--out", default=None, help="output directory (default bench-report)")
    rp.add_argument("--prices", default=None, help="JSON {device: $/GPU-hour} overriding the defaults")
    rp.set_defaults(func=_cmd_report)

    su = bsub.add_parser("suite", help="latency + throughput workloads + memory + the transformers peer, then "
                                       "the report, in one process")
    _engine_args(su)
    su.add_argument("--workload", action="append", default=[], metavar="C,ISL,OSL[,shared=P][,n=N][,target=T]",
                    help="repeatable (default: 64,8192,64)")
    su.add_argument("--latency-isl", type=int, default=4096)
    su.add_argument("--latency-osl", type=int, default=32)
    su.add_argument("--repeats", type=int, default=3, help="latency repeats (0: none)")
    su.add_argument("--time-budget", type=float, default=450.0, help="seconds; phases that would not fit are skipped")
    su.add_argument("--no-peer", action="store_true")
    su.add_argument("--peer-layers", type=int, default=None, help="default: as many as fit (up to --peer-max-layers)")
    su.add_argument("--peer-max-layers", type=int, default=8)
    su.add_argument("--peer-batch", type=int, default=64)
    su.add_argument("--peer-batch-isl", type=int, default=512)
    su.add_argument("--prices", default=None)
    su.add_argument("--no-warmup", action="store_true")
    _common(su)
    su.set_defaults(func=_cmd_suite)

    rf = bsub.add_parser("roofline", help="bytes, FLOPs and floor of one step of a model")
    rf.add_argument("model", help="model directory, 'v4-flash' or 'tiny'")
    rf.add_argument("--num-layers", type=int, default=None)
    rf.add_argument("--batch", type=int, default=1)
    rf.add_argument("--context", type=int, default=4096)
    rf.add_argument("--new-tokens", type=int, default=1, help="per sequence (1 = decode)")
    rf.add_argument("--weights", choices=["native", "bf16"], default="native")
    rf.add_argument("--gpu", choices=["H100", "H200", "MI300X", "MI355X", "B200"], default="H200")
    rf.add_argument("--gpus", type=int, default=1)
    rf.add_argument("--measured-ceilings", action="store_true", help="use our measured H200 ceilings")
    rf.set_defaults(func=_cmd_roofline)
