"""Expert parallelism on one host (issue 9): V4-Flash shapes, dummy FP8/FP4 weights, W GPUs.

Part "moe" (W spawned ranks, NCCL): one routed-MoE layer (H 4096, I 2048, 256 experts, top-6, FP4
experts, bf16), for a total batch of N tokens, each timed as the median of several calls:
  single     one GPU holding all 256 experts (rank 0 alone; the reference),
  pairs      same batch on every rank, this rank's experts, bit-exact all-reduce of the [N*6, H] pairs,
  sum        same batch on every rank, fp32 all-reduce of the [N, H] partial sums,
  a2a        each rank its own N/W tokens (data-parallel attention), all-to-all dispatch and return;
with the combine alone (the same collective on a buffer of the same size) as "comm".

Part "engine": `Engine(expert_parallel_size=W)` (rank 0 here, ranks 1..W-1 spawned by flashport),
all 43 layers, the three workloads of the anchors (c1 ISL 4096; c64 ISL 8192; c128 ISL 32768),
each cut at its time limit: prefill tok/s, decode step time and tok/s (total and per GPU), mean
TTFT, and the time of NCCL kernels in a few profiled decode steps on rank 0 ("time in
communication"). `--attention replicated` (every rank the same batch, all-reduce combine) or
`--attention data` (each rank its own requests, all-to-all dispatch): run both to compare.

NCCL_NVLS_ENABLE=0 is set for every rank (NVLink SHARP multicast is off on the lent machines).

Usage (repo root): python3 scripts/gpu/expert_parallel.py --out DIR [--ep W] [--part moe|engine|all]
                   [--attention replicated|data] [--combine pairs|sum] [--workloads A,B] [--layers 43]
                   [--budget-s 540] [--tiny]
`--tiny`: the tiny config on the CPU with 2 gloo ranks (a smoke test of the whole script).
Writes expert_parallel.json to --out and prints a table per part.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.config import ModelConfig  # noqa: E402
from flashport.distributed import ExpertParallelMoE, ExpertShard  # noqa: E402
from flashport.model.moe import ExpertWeight  # noqa: E402
from flashport.model.tiny import tiny_config  # noqa: E402

T0 = time.perf_counter()
WORKLOADS = {  # name: (concurrency, ISL, OSL, time limit s); the seed article's rows (anchors.md)
    "c1_isl4096": (1, 4096, 64, 45.0),
    "c64_isl8192": (64, 8192, 32, 150.0),
    "c128_isl32768": (128, 32768, 16, 150.0),
}
TINY_WORKLOADS = {"c1_isl16": (1, 16, 6, 30.0), "c4_isl40": (4, 40, 6, 30.0), "c8_isl64": (8, 64, 4, 30.0)}


def left(args) -> float:
    return args.budget_s - (time.perf_counter() - T0)


# ---------------------------------------------------------------------------- part "moe"
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_experts(w: ExpertWeight, g: torch.Generator, fan_in: int) -> None:
    if w.fmt == "fp4":
        w.weight.data.copy_(torch.randint(0, 256, w.weight.shape, generator=g, dtype=torch.uint8))
        byte = 127 + round(torch.log2(torch.tensor(1.0 / fan_in ** 0.5 / 2.93)).item())
        w.scale.data.copy_(torch.randint(byte - 1, byte + 2, w.scale.shape, generator=g, dtype=torch.uint8))
    else:
        w.weight.data.copy_(torch.randn(w.weight.shape, generator=g) / fan_in ** 0.5)


def _timed(fn, sync, reps: int) -> float:
    """Median ms of `reps` calls (2 warm-up calls first)."""
    for _ in range(2):
        fn()
    sync()
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


def _moe_rank(rank: int, world: int, port: int, tiny: bool, sizes: list[int], reps: int, queue) -> None:
    try:
        queue.put((rank, _moe_rank_body(rank, world, port, tiny, sizes, reps)))
    except BaseException:
        queue.put((rank, {"error": traceback.format_exc()}))
        raise


def _moe_rank_body(rank: int, world: int, port: int, tiny: bool, sizes: list[int], reps: int) -> dict:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = not tiny
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    cfg = tiny_config() if tiny else ModelConfig()
    H, I, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    dtype = torch.bfloat16 if cuda else torch.float32
    fmt = "fp4"
    impl = "auto"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    shard = ExpertShard(rank, world, E)
    g = torch.Generator().manual_seed(rank + 1)
    w13 = ExpertWeight(shard.num_local, 2 * I, H, dtype, fmt, None, torch.float8_e4m3fn, dev)
    w2 = ExpertWeight(shard.num_local, H, I, dtype, fmt, None, torch.float8_e4m3fn, dev)
    _fill_experts(w13, g, H)
    _fill_experts(w2, g, I)
    hooks = {c: ExpertParallelMoE(shard, combine=c) for c in ("pairs", "sum")}
    full = None
    if rank == 0:  # one GPU with every expert
        full = (ExpertWeight(E, 2 * I, H, dtype, fmt, None, torch.float8_e4m3fn, dev),
                ExpertWeight(E, H, I, dtype, fmt, None, torch.float8_e4m3fn, dev))
        _fill_experts(full[0], g, H)
        _fill_experts(full[1], g, I)
    rows = []
    for N in sizes:
        gen = torch.Generator().manual_seed(N)  # the same batch on every rank
        x = torch.randn(N, H, generator=gen).to(dtype).to(dev)
        experts = torch.rand(N, E, generator=gen).topk(k, dim=-1).indices.to(dev)
        weights = (torch.rand(N, k, generator=gen) / k).to(dtype).to(dev)
        row: dict = {"N": N}
        if rank == 0:
            from flashport.distributed.expert_moe import local_pairs_torch, local_pairs_triton, sum_picks

            fused = cuda
            fn = local_pairs_triton if fused else local_pairs_torch
            held = torch.ones_like(experts, dtype=torch.bool)
            row["single_ms"] = _timed(lambda: sum_picks(fn(x, weights, experts, held, full[0], full[1], 10.0), k,
                                                        fused), lambda: torch.cuda.synchronize() if cuda else None,
                                      reps)
        dist.barrier()
        for c, hook in hooks.items():
            row[f"{c}_ms"] = _timed(lambda: hook.routed(x, weights, experts, w13, w2, 10.0, impl), sync, reps)
            buf = torch.zeros(N * k, H // 2, dtype=torch.int32, device=dev) if c == "pairs" else \
                torch.zeros(N, H, dtype=torch.float32, device=dev)
            row[f"{c}_comm_ms"] = _timed(lambda: dist.all_reduce(buf), sync, reps)
            row[f"{c}_comm_mb"] = round(buf.numel() * 4 / 1e6, 2)
        per = N // world + (1 if rank < N % world else 0)  # this rank's tokens under DP attention
        start = rank * (N // world) + min(rank, N % world)
        xs, es, ws = x[start:start + per], experts[start:start + per], weights[start:start + per]
        row["a2a_ms"] = _timed(lambda: hooks["pairs"].routed_all_to_all(xs, ws, es, w13, w2, 10.0, impl), sync, reps)
        rows.append(row)
    dist.destroy_process_group()
    return {"rows": rows, "num_local_experts": shard.num_local}


def run_moe(args, res: dict) -> None:
    sizes = [1, 8, 64] if args.tiny else [1, 16, 64, 256, 1024, 4096, 8192]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_moe_rank, args=(r, args.ep, port, args.tiny, sizes, args.reps, queue))
             for r in range(args.ep)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + min(args.moe_time_limit, max(30.0, left(args)))
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    out = {}
    while not queue.empty():
        rank, value = queue.get()
        out[rank] = value
    if 0 not in out or "error" in out.get(0, {}):
        res["moe"] = {"error": out.get(0, {}).get("error", "rank 0 gave no result (time limit?)")}
        print(res["moe"]["error"], flush=True)
        return
    res["moe"] = {"world": args.ep, "rows": out[0]["rows"], "layers_per_step": args.layers}
    print(f"\nMoE layer, {args.ep} ranks (rank 0's view; ms per layer, median of {args.reps}):")
    print(f"{'N':>6} {'single':>8} {'pairs':>8} {'(comm)':>8} {'sum':>8} {'(comm)':>8} {'a2a':>8}  "
          f"{'pairs MB':>9}  speed-up pairs/sum/a2a vs single")
    for r in res["moe"]["rows"]:
        s = r["single_ms"]
        print(f"{r['N']:>6} {s:8.3f} {r['pairs_ms']:8.3f} {r['pairs_comm_ms']:8.3f} {r['sum_ms']:8.3f} "
              f"{r['sum_comm_ms']:8.3f} {r['a2a_ms']:8.3f}  {r['pairs_comm_mb']:9.2f}  "
              f"{s / r['pairs_ms']:.2f} / {s / r['sum_ms']:.2f} / {s / r['a2a_ms']:.2f}", flush=True)


# ---------------------------------------------------------------------------- part "engine"
def _comm_profile(engine, steps: int, cuda: bool) -> dict:
    """Run `steps` engine steps under the profiler: NCCL/gloo time and all device time, per step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps
    comm = total = 0.0
    for e in prof.key_averages():
        name = e.key.lower()
        if cuda:
            dt = getattr(e, "device_time_total", None)
            dt = e.cuda_time_total if dt is None else dt
            if e.device_type.name != "CUDA":
                continue
            total += dt
            if "nccl" in name:
                comm += dt
        elif "gloo" in name or "all_reduce" in name or "all_to_all" in name:
            comm += e.cpu_time_total
    return {"steps": steps, "wall_ms": round(wall * 1e3, 2), "comm_ms": round(comm / 1e3 / steps, 3),
            "device_ms": round(total / 1e3 / steps, 3) if cuda else None}


def _workload(engine, name: str, conc: int, isl: int, osl: int, limit: float, args, cuda: bool) -> dict:
    """`conc` requests of `isl` random tokens, `osl` output tokens each, cut at `limit` seconds.

    A decode step = a step in which every request produced a token, after a step that did too
    (rank 0 sees every request's outputs in both attention modes, but only its own scheduler)."""
    from flashport.sampling_params import SamplingParams

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    vocab = engine.config.vocab_size
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    params = SamplingParams(max_tokens=osl, temperature=0, ignore_eos=True)
    ids = [f"{name}-{i}" for i in range(conc)]
    start = time.perf_counter()
    for rid in ids:
        engine.add_request(rid, torch.randint(2, vocab, (isl,), generator=g).tolist(), params)
    moe = engine.parallel.moe
    bytes0 = moe.comm_bytes
    prefill_s, decode, first_token, profiled = 0.0, [], {}, None
    out_tokens, all_before = 0, False
    limit = min(limit, max(5.0, left(args) - 20))
    while engine.has_unfinished() and time.perf_counter() - start < limit:
        if all_before and profiled is None and len(decode) >= 2:
            profiled = _comm_profile(engine, 3, cuda)
            out_tokens += 3 * conc
            continue
        b = moe.comm_bytes
        t = time.perf_counter()
        outs = engine.step()
        sync()
        now = time.perf_counter()
        dt = now - t
        every = len(outs) == conc and all(o.outputs[0].token_ids for o in outs)
        if every and all_before:
            decode.append((dt, moe.comm_bytes - b))
        else:
            prefill_s += dt
        all_before = every
        for o in outs:
            if o.outputs[0].token_ids and o.request_id not in first_token:
                first_token[o.request_id] = now - start
        out_tokens += len(outs)
    elapsed = time.perf_counter() - start
    finished = not engine.has_unfinished()
    for rid in ids:
        engine.abort(rid)
    W = engine.parallel.world_size
    prompt_done = isl * len(first_token)  # prompts fully computed (a partial one at the cut is left out)
    r = {"concurrency": conc, "isl": isl, "osl": osl, "finished": finished, "elapsed_s": round(elapsed, 1),
         "prompts_done": len(first_token), "prefill_s": round(prefill_s, 2),
         "prefill_tok_s": round(prompt_done / max(prefill_s, 1e-9), 1),
         "prefill_tok_s_per_gpu": round(prompt_done / max(prefill_s, 1e-9) / W, 1),
         "ttft_s_mean": round(statistics.mean(first_token.values()), 3) if first_token else None,
         "total_tok_s": round((prompt_done + out_tokens) / elapsed, 1),
         "total_tok_s_per_gpu": round((prompt_done + out_tokens) / elapsed / W, 1),
         "rank0_comm_bytes_prefill": moe.comm_bytes - bytes0 - sum(b for _, b in decode),
         "decode_steps": len(decode)}
    if decode:
        med = statistics.median(d for d, _ in decode)
        r.update(decode_step_ms=round(med * 1e3, 2), decode_tok_s=round(conc / med, 1),
                 decode_tok_s_per_gpu=round(conc / med / W, 1), tpot_ms=round(med * 1e3, 2),
                 rank0_comm_mb_per_decode_step=round(statistics.median(b for _, b in decode) / 1e6, 3))
    if profiled is not None:
        r["decode_profile"] = profiled
    return r


def run_engine(args, res: dict) -> None:
    from flashport.engine.engine import Engine

    cuda = not args.tiny
    os.environ["FLASHPORT_EP_COMBINE"] = args.combine
    os.environ["FLASHPORT_EP_ATTENTION"] = args.attention
    workloads = TINY_WORKLOADS if args.tiny else WORKLOADS
    if args.workloads:
        workloads = {k: v for k, v in workloads.items() if k in args.workloads.split(",")}
    lines: list[str] = []
    eng: dict = {"world": args.ep, "combine": args.combine, "attention": args.attention, "layers": args.layers,
                 "workloads": {}}
    res["engine"] = eng
    with tempfile.TemporaryDirectory() as d:
        cfg = tiny_config() if args.tiny else ModelConfig()
        (Path(d) / "config.json").write_text(json.dumps(cfg.to_official_dict()))
        t0 = time.perf_counter()
        engine = Engine(d, device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32",
                        load_format="dummy", num_layers=args.layers,
                        max_model_len=max(i + o for _, i, o, _ in workloads.values()),
                        max_num_seqs=max(c for c, _, _, _ in workloads.values()),
                        max_num_batched_tokens=args.chunk, progress=False, log=lines.append,
                        expert_parallel_size=args.ep)
        eng["startup_s"] = round(time.perf_counter() - t0, 1)
        eng["capacity"] = lines
        print("\n".join(lines), flush=True)
        if cuda:
            eng["rank0_memory_gib"] = {"allocated": round(torch.cuda.memory_allocated() / 2**30, 2),
                                       "reserved": round(torch.cuda.memory_reserved() / 2**30, 2)}
        for name, (conc, isl, osl, limit) in workloads.items():
            if left(args) < 30:
                eng["workloads"][name] = {"skipped": "time budget"}
                continue
            print(f"workload {name} ...", flush=True)
            try:
                eng["workloads"][name] = _workload(engine, name, conc, isl, osl, limit, args, cuda)
            except Exception:
                eng["workloads"][name] = {"error": traceback.format_exc()}
                print(eng["workloads"][name]["error"], flush=True)
                break
            print(json.dumps(eng["workloads"][name]), flush=True)
        if cuda:
            eng["rank0_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        engine.parallel.close()
    print(f"\nEngine, {args.ep} ranks, attention {args.attention}, combine {args.combine}, {args.layers} layers "
          f"(startup {eng['startup_s']} s):")
    print(f"{'workload':>16} {'prefill tok/s':>14} {'/GPU':>8} {'TTFT s':>7} {'decode ms':>10} {'dec tok/s':>10} "
          f"{'/GPU':>8} {'comm ms/step':>12} {'device ms':>10} {'done':>5}")
    for name, r in eng["workloads"].items():
        if "prefill_tok_s" not in r:
            print(f"{name:>16} {next(iter(r.values()))[:60]!s}")
            continue
        prof = r.get("decode_profile", {})
        print(f"{name:>16} {r['prefill_tok_s']:14.1f} {r['prefill_tok_s_per_gpu']:8.1f} {r['ttft_s_mean'] or 0:7.2f} "
              f"{r.get('decode_step_ms', 0):10.2f} {r.get('decode_tok_s', 0):10.1f} "
              f"{r.get('decode_tok_s_per_gpu', 0):8.1f} "
              f"{prof.get('comm_ms', 0):12.3f} {prof.get('device_ms') or 0:10.3f} {str(r['finished']):>5}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ep", type=int, default=None, help="ranks (default: every visible GPU; --tiny: 2)")
    ap.add_argument("--part", choices=["moe", "engine", "all"], default="all")
    ap.add_argument("--combine", choices=["pairs", "sum"], default="pairs", help="the engine part's combine")
    ap.add_argument("--attention", choices=["replicated", "data"], default="replicated",
                    help="the engine part: every rank the same batch, or each rank its own requests (all-to-all)")
    ap.add_argument("--layers", type=int, default=None, help="model layers (default: all 43; --tiny: 6)")
    ap.add_argument("--workloads", default=None, help="comma-separated subset of the workload names")
    ap.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--moe-time-limit", type=float, default=150.0)
    ap.add_argument("--budget-s", type=float, default=540.0, help="the whole run")
    ap.add_argument("--tiny", action="store_true", help="tiny config, CPU, gloo (a smoke test)")
    args = ap.parse_args()
    if args.tiny:
        args.ep = args.ep or 2
        args.chunk = min(args.chunk, 32)
        args.reps = min(args.reps, 3)
    else:
        args.ep = args.ep or torch.cuda.device_count()
        if args.ep < 2:
            raise SystemExit(f"expert parallel needs at least 2 GPUs, {torch.cuda.device_count()} visible")
    args.layers = args.layers or (tiny_config() if args.tiny else ModelConfig()).num_hidden_layers
    res: dict = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                 "device": "cpu" if args.tiny else torch.cuda.get_device_name(),
                 "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.part in ("moe", "all"):
            run_moe(args, res)
        if args.part in ("engine", "all"):
            run_engine(args, res)
    finally:
        res["wall_s"] = round(time.perf_counter() - T0, 1)
        (out / "expert_parallel.json").write_text(json.dumps(res, indent=1))
        print(f"\nwrote {out / 'expert_parallel.json'} ({res['wall_s']} s)", flush=True)


if __name__ == "__main__":
    main()
