"""Decode graphs on the GPU (engine/graphs.py): correctness, then the launch overhead recovered.

(a) Correctness, tiny checkpoint (flashport.model.tiny), fp32 and bf16: the same requests through
    an engine with enforce_eager=True (unpadded eager decode), the padded decode run eagerly
    (DecodeGraphs capture=False) and graph replay. Greedy tokens must match; graph replay against
    the padded eager path must match bit for bit (same shapes, same kernels), logits included.
(b) V4-Flash shapes, dummy weights, the first --layers layers, --batch sequences at --context
    tokens: decode step time, unpadded eager vs graph replay. Contexts are filled cheaply through
    prefix caching: request 0 prefills one --context-token prompt; the other requests share its
    first (context - block) tokens (cached blocks, a prefix hit) and prefill only their own last
    block of distinct tokens. Then, with every request decoding: engine.step() with graphs vs
    without (alternating rounds), and the forward alone: the padded eager forward vs the replay of
    its graph (CUDA events), with the step's host-side input build + upload timed apart.

Usage (repo root): python3 scripts/gpu/graph_check.py --out DIR [--layers 20] [--batch 64] [--context 8192]
                   [--steps 12] [--iters 30] [--tiny]   (--tiny: CPU smoke, tiny shapes, no capture)
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
from flashport.engine.graphs import DecodeGraphs  # noqa: E402
from flashport.model.tiny import tiny_config, write_tiny_checkpoint  # noqa: E402
from flashport.sampling_params import SamplingParams  # noqa: E402

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def free(dev: str) -> None:
    import gc

    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- (a) correctness
def run_requests(engine: Engine, prompts: list[list[int]], max_tokens: int, record: list | None = None
                 ) -> dict[str, list[int]]:
    runner = engine.runner
    if record is not None:
        sample = runner._launch_sampling

        def spy(plan, sampling, logits):
            if runner.graphs is not None and runner.graphs.shape_for(plan) is not None:
                record.append(logits.detach().clone())
            return sample(plan, sampling, logits)

        runner._launch_sampling = spy
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    done: dict[str, list[int]] = {}
    # Requests join over time and finish at different lengths: batch sizes move across buckets.
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 3 == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, SamplingParams(max_tokens=max_tokens - 2 * (i % 5), temperature=0,
                                                         ignore_eos=True) if i % 2 else params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    return done


def correctness(dev: str, tiny: bool, num_prompts: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 1024, (int(n),), generator=g).tolist()
               for n in torch.randint(5, 150, (10 if tiny else num_prompts,), generator=g)]
    max_tokens = 12 if tiny else 40
    with tempfile.TemporaryDirectory() as d:
        write_tiny_checkpoint(Path(d), seed=0)
        for dtype in ("float32", "bfloat16"):
            if tiny and dtype == "bfloat16":
                continue  # the CPU smoke runs fp32 only (bf16 on a CPU is slow)
            common = dict(device=dev, dtype=dtype, progress=False, log=None, max_model_len=256,
                          max_num_seqs=16, max_num_batched_tokens=256, cache_bytes=256 * 2**20)
            t = time.perf_counter()
            eager = run_requests(Engine(d, enforce_eager=True, **common), prompts, max_tokens)
            free(dev)
            e = Engine(d, enforce_eager=True, **common)
            e.runner.graphs = DecodeGraphs(e.model, e.pools, max_num_seqs=16, max_model_len=256, capture=False)
            pad_logits: list[torch.Tensor] = []
            padded = run_requests(e, prompts, max_tokens, pad_logits)
            del e
            free(dev)
            graph_logits: list[torch.Tensor] = []
            if dev == "cuda":
                e = Engine(d, **common)
                assert e.runner.graphs is not None, "the engine did not enable graphs"
                graphs = run_requests(e, prompts, max_tokens, graph_logits)
                n_graphs = sum(b.graph is not None for b in e.runner.graphs._buckets.values())
                failed = e.runner.graphs.failed
                captured = e.runner.graphs.captured_bytes
                del e
                free(dev)
            else:
                graphs, graph_logits, n_graphs, captured, failed = padded, pad_logits, 0, 0, None
            bit_exact = len(graph_logits) == len(pad_logits) and all(
                torch.equal(a, b) for a, b in zip(graph_logits, pad_logits))
            ids = sorted(eager, key=int)
            row = dict(case=f"tiny {dtype}", requests=len(ids),
                       tokens_equal_eager_vs_graph=sum(eager[i] == graphs[i] for i in ids),
                       tokens_equal_eager_vs_padded=sum(eager[i] == padded[i] for i in ids),
                       tokens_equal_padded_vs_graph=sum(padded[i] == graphs[i] for i in ids),
                       graph_logits_bit_exact_vs_padded=bit_exact, decode_steps_compared=len(graph_logits),
                       graphs_captured=n_graphs, captured_mib=round(captured / 2**20, 1), capture_failed=failed,
                       seconds=round(time.perf_counter() - t, 1))
            for i in ids:
                if eager[i] != graphs[i]:
                    k = next(j for j, (a, b) in enumerate(zip(eager[i], graphs[i])) if a != b)
                    row["first_divergence"] = f"request {i} at output token {k} of {len(eager[i])}"
                    break
            rows.append(row)
            say(f"(a) {row}")
    return rows


# ---------------------------------------------------------------------------------- (b) timing
def timing(args, dev: str) -> dict:
    res: dict = {}
    max_tokens = 2 * args.rounds * args.steps + 32  # every request runs through all timing steps
    with tempfile.TemporaryDirectory() as d:
        cfg = tiny_config() if args.tiny else ModelConfig()
        (Path(d) / "config.json").write_text(json.dumps(cfg.to_official_dict()))
        lines: list[str] = []
        t = time.perf_counter()
        engine = Engine(d, device=dev, dtype="bfloat16" if dev == "cuda" else "float32", load_format="dummy",
                        num_layers=args.layers, max_model_len=args.context + max_tokens,
                        max_num_seqs=args.batch, max_num_batched_tokens=args.chunk, progress=False,
                        log=lines.append)
        sync(dev)
        res["startup_s"] = round(time.perf_counter() - t, 1)
        res["capacity"] = list(lines)
        say("(b) engine up: " + " | ".join(lines))
        graphs = engine.runner.graphs
        if graphs is None:  # the CPU smoke: the padded path runs eagerly
            graphs = DecodeGraphs(engine.model, engine.pools, max_num_seqs=args.batch,
                                  max_model_len=engine.sched_config.max_model_len, capture=False)
            engine.runner.graphs = graphs
        B = engine.cache_config.block_size
        g = torch.Generator().manual_seed(1)
        shared = torch.randint(2, cfg.vocab_size, (args.context - B,), generator=g).tolist()
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

        def run_until(cond, label: str) -> None:
            t = time.perf_counter()
            n = 0
            while not cond():
                engine.step()
                n += 1
            sync(dev)
            say(f"(b) {label}: {n} steps, {time.perf_counter() - t:.1f} s")
            res[f"{label}_s"] = round(time.perf_counter() - t, 1)

        engine.add_request("0", shared + torch.randint(2, cfg.vocab_size, (B,), generator=g).tolist(), params)
        run_until(lambda: engine.num_prompt_tokens_computed >= args.context, "prefill_first")
        for i in range(1, args.batch):
            engine.add_request(str(i), shared + torch.randint(2, cfg.vocab_size, (B,), generator=g).tolist(), params)
        target = args.context + (args.batch - 1) * B
        run_until(lambda: engine.num_prompt_tokens_computed >= target and engine.scheduler.num_running == args.batch,
                  "prefill_rest")
        res["prompt_tokens_computed"] = engine.num_prompt_tokens_computed

        # engine.step(): with graphs vs eager (graphs detached), alternating rounds. The first
        # round of each also absorbs compiles / the capture of this bucket, and is dropped.
        steps = {"graph": [], "eager": []}
        saved = engine.runner.graphs
        for rnd in range(2 * args.rounds):
            mode = "graph" if rnd % 2 == 0 else "eager"
            engine.runner.graphs = saved if mode == "graph" else None
            for k in range(args.steps):
                t = time.perf_counter()
                engine.step()
                sync(dev)
                if rnd >= 2:
                    steps[mode].append(time.perf_counter() - t)
        engine.runner.graphs = saved
        for mode, xs in steps.items():
            res[f"step_ms_{mode}"] = round(statistics.median(xs) * 1000, 2) if xs else None
            res[f"step_ms_{mode}_min"] = round(min(xs) * 1000, 2) if xs else None
        say(f"(b) engine.step median: graph {res['step_ms_graph']} ms, eager {res['step_ms_eager']} ms")

        # The forward alone at the padded shape: eager (padded) vs the graph's replay; the host part.
        plan = engine.scheduler.schedule()  # a decode plan; run (idempotent enough for timing), never updated
        shape = graphs.shape_for(plan)
        res["shape"] = dict(rows=shape.rows, width=shape.width, real_rows=len(plan.seqs),
                            context=plan.seqs[0].start_pos)
        b = graphs._bucket(shape)
        host = []
        for _ in range(args.iters):
            t = time.perf_counter()
            _upload_only(graphs, plan, shape)
            host.append(time.perf_counter() - t)
        res["host_build_upload_ms"] = round(statistics.median(host) * 1000, 3)

        def timed(fn) -> tuple[float, float]:
            for _ in range(3):
                fn()
            sync(dev)
            wall = []
            for _ in range(args.iters):
                t = time.perf_counter()
                fn()
                sync(dev)
                wall.append(time.perf_counter() - t)
            dev_ms = float("nan")
            if dev == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(args.iters):
                    fn()
                e.record()
                torch.cuda.synchronize()
                dev_ms = s.elapsed_time(e) / args.iters
            return statistics.median(wall) * 1000, dev_ms

        res["forward_eager_padded_ms"], res["forward_eager_padded_back_to_back_ms"] = (
            round(x, 3) for x in timed(lambda: graphs._forward(b)))
        if b.graph is not None:
            res["forward_graph_ms"], res["forward_graph_back_to_back_ms"] = (
                round(x, 3) for x in timed(b.graph.replay))
            res["recovered_ms"] = round(res["forward_eager_padded_ms"] - res["forward_graph_ms"], 3)
            res["graphs_captured"] = sum(x.graph is not None for x in graphs._buckets.values())
            res["captured_mib"] = round(graphs.captured_bytes / 2**20, 1)
            res["graph_reserve_gib"] = round(engine.capacity.graph_bytes / 2**30, 3)
        res["capture_failed"] = graphs.failed
        if dev == "cuda":
            res["memory_gib"] = dict(allocated=round(torch.cuda.memory_allocated() / 2**30, 2),
                                     reserved=round(torch.cuda.memory_reserved() / 2**30, 2),
                                     peak=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        say(f"(b) forward: {res}")
    return res


def _upload_only(graphs: DecodeGraphs, plan, shape) -> None:
    """The host side of a graph step: build the padded inputs and upload them (no replay)."""
    from flashport.engine.paged_rows import PagedRowsCache

    b = graphs._bucket(shape)
    n, pad = len(plan.seqs), shape.rows - len(plan.seqs)
    cache = PagedRowsCache(graphs.pools, list(plan.seqs), graphs.pools.cache_cfg.enable_prefix_caching, shape)
    graphs._upload(b, [[s.token_ids[0] for s in plan.seqs] + [0] * pad,
                       [s.start_pos for s in plan.seqs] + [0] * pad, *cache.index_lists])
    assert n <= shape.rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--steps", type=int, default=8, help="engine steps per timing round")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds per mode (the first is dropped)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=24, help="requests of the correctness part")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: tiny config and sizes, no capture")
    args = ap.parse_args()
    dev = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.layers, args.batch, args.context, args.chunk = 6, 5, 40, 64
        args.steps, args.rounds, args.iters = 2, 2, 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    if not args.skip_correctness:
        res["correctness"] = correctness(dev, args.tiny, args.prompts)
        (out / "graph_check.json").write_text(json.dumps(res, indent=1))
    res["timing"] = timing(args, dev)
    (out / "graph_check.json").write_text(json.dumps(res, indent=1))

    print("\n== (a) correctness: tiny model, greedy tokens (requests equal / total) ==")
    print(f"{'case':14} {'eager=graph':>12} {'eager=padded':>13} {'padded=graph':>13} {'logits bit-exact':>17} "
          f"{'graphs':>7}")
    for r in res.get("correctness", []):
        n = r["requests"]
        print(f"{r['case']:14} {r['tokens_equal_eager_vs_graph']:>8}/{n:<3} {r['tokens_equal_eager_vs_padded']:>9}/{n:<3} "
              f"{r['tokens_equal_padded_vs_graph']:>9}/{n:<3} {str(r['graph_logits_bit_exact_vs_padded']):>17} "
              f"{r['graphs_captured']:>7}  {r.get('first_divergence', '')}")
    t = res["timing"]
    print(f"\n== (b) decode step, {args.layers} layers, batch {args.batch}, context {args.context} ==")
    for k in ("step_ms_eager", "step_ms_graph", "forward_eager_padded_ms", "forward_graph_ms", "recovered_ms",
              "forward_eager_padded_back_to_back_ms", "forward_graph_back_to_back_ms", "host_build_upload_ms",
              "captured_mib", "graph_reserve_gib", "graphs_captured", "capture_failed", "prefill_first_s", "prefill_rest_s", "startup_s"):
        print(f"  {k:40} {t.get(k)}")
    print(f"\nwrote {out / 'graph_check.json'} ({time.perf_counter() - T0:.0f} s)")


if __name__ == "__main__":
    main()
