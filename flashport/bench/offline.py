"""Offline engine benchmarks: `bench throughput` and `bench latency` (no HTTP in between).

The driver keeps `concurrency` requests in flight (adding the next as one finishes), steps the
engine and reads the clock after every step (the step ends with the host copy of the sampled
tokens, so the clock sees finished GPU work). It records:

- per request: send time, the time of each step that gave it tokens, the end (stats.RequestTiming);
- per step: wall time, the sequences it ran (new tokens, context), prompt tokens and decodes in it,
  and afterwards that step's roofline floor (roofline.step_floor on the device's ceilings).

Throughput counts what the engine computed: prompt tokens run through the model (prefix hits
excluded) plus output tokens, over the wall time from the first add to the last step. The decode
rate is taken from the steady-state steps where all `concurrency` requests decode one token.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from flashport.bench.devices import MEASURED, ceilings_for, datasheet_ceilings, device_key
from flashport.bench.roofline import SeqWork, step_floor
from flashport.bench.stats import SLO, RequestTiming, run_metrics
from flashport.bench.workload import BenchRequest
from flashport.errors import FlashportError

BUILTIN_MODELS = ("v4-flash", "tiny")
GiB = 2**30


@contextmanager
def model_dir(model: str) -> Iterator[tuple[Path, str | None]]:
    """A model directory for `model`: a path as given, or a built-in config written to a temp dir
    ('v4-flash': the real V4-Flash shapes; 'tiny': the embedded tiny config), whose weights must then
    be dummy. Yields (dir, forced load format or None)."""
    if model not in BUILTIN_MODELS:
        p = Path(model)
        if not (p / "config.json").is_file():
            raise FlashportError(f"model {model!r}: not a model directory (no config.json) and not one of "
                                 f"{', '.join(BUILTIN_MODELS)}")
        yield p, None
        return
    from flashport.config import ModelConfig
    from flashport.model.tiny import tiny_config

    cfg = ModelConfig() if model == "v4-flash" else tiny_config()
    with tempfile.TemporaryDirectory(prefix="flashport-bench-") as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg.to_official_dict()))
        yield Path(d), "dummy"


@dataclass(frozen=True)
class EngineArgs:
    device: str = "auto"
    dtype: str = "auto"
    load_format: str = "auto"
    num_layers: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    gpu_memory_utilization: float = 0.9
    cache_bytes: int | None = None
    enable_prefix_caching: bool = True
    ops_impl: str = "auto"
    seed: int = 0
    extra: tuple[tuple[str, Any], ...] = ()  # further Engine keyword arguments

    def kwargs(self) -> dict[str, Any]:
        kw = dict(device=self.device, dtype=self.dtype, load_format=self.load_format, num_layers=self.num_layers,
                  max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
                  max_num_batched_tokens=self.max_num_batched_tokens,
                  gpu_memory_utilization=self.gpu_memory_utilization, cache_bytes=self.cache_bytes,
                  enable_prefix_caching=self.enable_prefix_caching, ops_impl=self.ops_impl, seed=self.seed)
        kw.update(dict(self.extra))
        return kw


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def build_engine(path: Path, forced_format: str | None, args: EngineArgs, log=print):
    from flashport.engine.engine import Engine

    kw = args.kwargs()
    if forced_format is not None:
        kw["load_format"] = forced_format
    t0 = time.perf_counter()
    engine = Engine(path, progress=False, log=log, **kw)
    _sync(engine)
    engine.bench_startup_s = time.perf_counter() - t0
    return engine


def device_name(engine) -> str:
    if engine.device.type == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return "cpu"


def memory_report(engine, peak_allocated: int | None = None) -> dict:
    """Per-GPU memory in GiB: weights, state pools, activation peak (profiled, and measured in the
    run where given), total reserved by the torch allocator."""
    cap = engine.capacity
    out = {"weights_gib": cap.weights_bytes / GiB,
           "pools_gib": (cap.window_bytes + cap.comp_bytes + cap.slot_bytes) / GiB,
           "pools_detail_gib": {"window": cap.window_bytes / GiB, "compressed": cap.comp_bytes / GiB,
                                "state_slots": cap.slot_bytes / GiB},
           "activation_profiled_gib": cap.activation_bytes / GiB,
           "decode_graphs_gib": getattr(cap, "graph_bytes", 0) / GiB,
           "entry_dtype": getattr(cap, "entry_dtype", ""),
           "capacity_tokens": cap.max_tokens, "capacity_lines": engine.capacity_report_lines()}
    if engine.device.type == "cuda":
        import torch

        base = torch.cuda.memory_allocated()
        peak = peak_allocated if peak_allocated is not None else torch.cuda.max_memory_allocated()
        out.update(allocated_gib=base / GiB, peak_allocated_gib=peak / GiB,
                   activation_peak_gib=max(0, peak - base) / GiB,
                   reserved_gib=torch.cuda.memory_reserved() / GiB,
                   device_total_gib=torch.cuda.get_device_properties(0).total_memory / GiB)
    return out


class _PlanTap:
    """Wraps engine.runner.launch / collect to see the plan of each step whose result came back
    (which sequences, which tokens) and its time: from when its launch began, or when the step
    before it came back if later, to when it came back. With the engine's overlap the step
    collected by a call was launched by the call before, so that is the device's time for it
    (the host's work between two steps included); step by step, it is the call's own time."""

    def __init__(self, engine) -> None:
        self.runner = engine.runner
        self.inner_launch, self.inner_collect = engine.runner.launch, engine.runner.collect
        self.last: list[tuple[str, int, int]] = []  # (request id, new tokens, context after)
        self.last_dt = 0.0
        self._launched: dict[int, float] = {}  # id(pending step) -> when its launch began
        self._prev_end: float | None = None
        engine.runner.launch, engine.runner.collect = self.launch, self.collect  # this engine only

    def launch(self, plan, sampling):
        t = time.perf_counter()
        pending = self.inner_launch(plan, sampling)
        self._launched[id(pending)] = t
        return pending

    def collect(self, pending):
        result = self.inner_collect(pending)
        end = time.perf_counter()
        start = self._launched.pop(id(pending), end)
        self.last_dt = end - max(start, self._prev_end if self._prev_end is not None else start)
        self._prev_end = end
        self.last = [(s.request_id, len(s.token_ids), s.start_pos + len(s.token_ids)) for s in pending.plan.seqs]
        return result

    def close(self) -> None:
        self.runner.launch, self.runner.collect = self.inner_launch, self.inner_collect


@dataclass
class StepLog:
    dt: float
    seqs: list[tuple[int, int]]  # (new tokens, context after)
    prompt_tokens: int
    decodes: int
    floor_s: float | None = None  # on the ceilings measured on the device (where known)
    floor_ds_s: float | None = None  # on the device's datasheet figures (what projections scale)


@dataclass
class OfflineRun:
    label: str
    concurrency: int
    records: list[RequestTiming]
    steps: list[StepLog]
    duration_s: float
    prompt_tokens_computed: int
    output_tokens: int
    truncated: bool
    extra: dict = field(default_factory=dict)


def run_requests(engine, requests: list[BenchRequest], concurrency: int, *, label: str = "run",
                 time_limit: float | None = None, progress: bool = True) -> OfflineRun:
    """Run `requests` keeping at most `concurrency` in flight; greedy, ignore_eos, output_len tokens each."""
    from flashport.sampling_params import SamplingParams

    if concurrency < 1:
        raise FlashportError(f"concurrency must be at least 1, got {concurrency}")
    tap = _PlanTap(engine)
    prompt_len: dict[str, int] = {}
    records: dict[str, RequestTiming] = {}
    seen: dict[str, int] = {}
    pending = list(enumerate(requests))[::-1]
    inflight: set[str] = set()
    steps: list[StepLog] = []
    truncated = False
    prompt0 = engine.num_prompt_tokens_computed
    overlap = getattr(engine, "overlap", False)
    start = time.perf_counter()
    bar = tqdm(total=len(requests), desc=label, disable=not progress, mininterval=2.0)
    try:
        while pending or inflight:
            now = time.perf_counter()
            if time_limit is not None and now - start > time_limit:
                truncated = True
                break
            while pending and len(inflight) < concurrency:
                i, r = pending.pop()
                rid = f"{label}-{i}"
                params = SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True)
                engine.add_request(rid, r.prompt if isinstance(r.prompt, str) else list(r.prompt), params)
                records[rid] = RequestTiming(start=time.perf_counter() - start, prompt_tokens=r.prompt_len)
                prompt_len[rid] = r.prompt_len
                seen[rid] = 0
                inflight.add(rid)
            t0 = time.perf_counter()
            outs = engine.step()
            if not overlap:
                _sync(engine)
            t1 = time.perf_counter()
            plan = tap.last
            tap.last = []
            if plan:
                steps.append(StepLog(
                    dt=tap.last_dt if overlap else t1 - t0, seqs=[(n, ctx) for _, n, ctx in plan],
                    prompt_tokens=sum(max(0, min(ctx, prompt_len.get(rid, 0)) - (ctx - n)) for rid, n, ctx in plan),
                    decodes=sum(1 for rid, n, ctx in plan if ctx - n >= prompt_len.get(rid, 0))))
            for out in outs:
                rec = records.get(out.request_id)
                if rec is None:
                    continue
                n = len(out.outputs[0].token_ids)
                if n > seen[out.request_id]:
                    rec.token_times.append(t1 - start)
                    rec.token_counts.append(n - seen[out.request_id])
                    seen[out.request_id] = n
                if out.finished:
                    rec.end = t1 - start
                    inflight.discard(out.request_id)
                    bar.update(1)
    except BaseException:
        for rid in inflight:
            engine.abort(rid)
        raise
    finally:
        bar.close()
        tap.close()
    duration = time.perf_counter() - start
    for rid in inflight:  # time limit: stop them; their tokens so far still count
        engine.abort(rid)
        records[rid].end = duration
        records[rid].error = "time limit"
    return OfflineRun(label, concurrency, list(records.values()), steps, duration,
                      engine.num_prompt_tokens_computed - prompt0, sum(seen.values()), truncated)


def attach_floors(run: OfflineRun, cfg, dev_name: str) -> dict:
    """Fill each step's roofline floor (native weights, bf16 state): on the ceilings measured on the
    device where known (else its datasheet's), and on its datasheet figures (for projections)."""
    key = device_key(dev_name)
    ceil = ceilings_for(dev_name)
    note = None
    if ceil is None:
        key, ceil = "H200", MEASURED["H200"]
        note = f"device {dev_name!r} has no known ceilings: floors use the H200's"
    ds = datasheet_ceilings(key)
    cache: dict[tuple, tuple[float, float]] = {}
    for s in run.steps:
        k = tuple(sorted(s.seqs))
        if k not in cache:
            work = [SeqWork(n, c) for n, c in s.seqs]
            cache[k] = (step_floor(cfg, work, ceil.tb_s, ceil.bf16_tflops).floor_s,
                        step_floor(cfg, work, ds.tb_s, ds.bf16_tflops).floor_s)
        s.floor_s, s.floor_ds_s = cache[k]
    return {"ceilings": ceil.source, "datasheet": ds.source, "note": note}


def summarize_run(run: OfflineRun, slo: SLO = SLO(), num_gpus: int = 1) -> dict:
    steps = run.steps
    prefill = [s for s in steps if s.prompt_tokens > 0]
    decode_only = [s for s in steps if s.prompt_tokens == 0]
    full = [s for s in decode_only if s.decodes == run.concurrency]
    d = run.duration_s
    res: dict[str, Any] = {
        "label": run.label, "concurrency": run.concurrency, "num_requests": len(run.records),
        "duration_s": d, "truncated": run.truncated,
        "prompt_tokens_computed": run.prompt_tokens_computed, "output_tokens": run.output_tokens,
        "output_tok_s": run.output_tokens / d, "total_tok_s": (run.prompt_tokens_computed + run.output_tokens) / d,
        "num_gpus": num_gpus,
        "output_tok_s_per_gpu": run.output_tokens / d / num_gpus,
        "total_tok_s_per_gpu": (run.prompt_tokens_computed + run.output_tokens) / d / num_gpus,
        "steps": len(steps),
    }
    if prefill:
        t = sum(s.dt for s in prefill)
        res["prefill"] = {"steps": len(prefill), "time_s": t, "prompt_tokens": sum(s.prompt_tokens for s in prefill),
                          "prompt_tok_s": sum(s.prompt_tokens for s in prefill) / t}
        if all(s.floor_s is not None for s in prefill):
            f = sum(s.floor_s for s in prefill)
            fd = sum(s.floor_ds_s for s in prefill)
            res["prefill"].update(floor_s=f, frac_of_floor=f / t, frac_of_datasheet_floor=fd / t)
    # The decode steps with every request running; else (requests finished while later prompts were
    # still being prefilled) the decode-only steps at their largest batch, so that a step time, its
    # floor and its batch describe the same steps.
    widest = max((s.decodes for s in decode_only), default=0)
    pool = full or [s for s in decode_only if s.decodes == widest]
    if pool:
        dts = [s.dt for s in pool]
        med = statistics.median(dts)
        res["decode"] = {"steps": len(pool), "all_running": bool(full), "batch": pool[0].decodes,
                         "step_ms_median": med * 1e3, "step_ms_min": min(dts) * 1e3, "step_ms_max": max(dts) * 1e3,
                         "tok_s": statistics.median(s.decodes / s.dt for s in pool),
                         "context_median": statistics.median(c for s in pool for _, c in s.seqs)}
        if all(s.floor_s is not None for s in pool):
            t = sum(dts)
            fl, fd = sum(s.floor_s for s in pool) / t, sum(s.floor_ds_s for s in pool) / t
            res["decode"].update(floor_ms=fl * med * 1e3, frac_of_floor=fl, frac_of_datasheet_floor=fd)
    if steps and all(s.floor_s is not None for s in steps):
        res["frac_of_floor_all_steps"] = sum(s.floor_s for s in steps) / sum(s.dt for s in steps)
    ok = [r for r in run.records if r.error is None]
    if ok:
        res["latency"] = {k: v for k, v in run_metrics(ok, d, slo, num_gpus).items()
                          if k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "slo", "slo_met", "goodput_req_s")}
    res["step_log"] = [{"ms": round(s.dt * 1e3, 3), "new": sum(n for n, _ in s.seqs), "seqs": len(s.seqs),
                        "prompt": s.prompt_tokens, "decodes": s.decodes,
                        "floor_ms": None if s.floor_s is None else round(s.floor_s * 1e3, 4)} for s in steps]
    res.update(run.extra)
    return res
