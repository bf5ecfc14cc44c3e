"""`flashport bench suite`: every engine measurement of the report in one process, then the report.

One engine serves all workloads (so start-up is paid once): it is built with the largest
concurrency and length of the workloads. In order, each phase checked against the time budget
(a phase that would not fit is skipped and says so in the results):

1. warm-up: a few short requests at each workload's concurrency (Triton compiles its kernels for
   the shapes it meets; those seconds are not measured);
2. latency: single requests at ISL (fresh random prompts, so no prefix hit), `repeats` times;
3. throughput: each workload `C,ISL,OSL[,shared=P][,n=N]`; with `shared=P` all prompts share their
   first P tokens: one request computes them first (timed and reported as the prefix prefill), then
   the workload runs with the prefix reused, so it decodes at long context without prefilling
   C x ISL tokens (stated in the report);
4. memory: the capacity report and the allocator's peak over the run;
5. the peer (transformers, bf16) on the same GPU after the engine is freed;
6. the report (report.py) from the results.
"""

from __future__ import annotations

import gc
import json
import platform as _platform
import time
from dataclasses import dataclass
from pathlib import Path

from flashport.bench.offline import (EngineArgs, attach_floors, build_engine, device_name, memory_report,
                                     model_dir, run_requests, summarize_run)
from flashport.bench.stats import SLO, RequestTiming, run_metrics
from flashport.bench.workload import random_requests
from flashport.errors import FlashportError


@dataclass(frozen=True)
class Workload:
    concurrency: int
    isl: int
    osl: int
    shared_prefix: int = 0
    num_requests: int | None = None  # default: = concurrency
    target_osl: int | None = None  # the OSL the report projects to (anchors: 1024)

    @property
    def n(self) -> int:
        return self.num_requests or self.concurrency

    @property
    def name(self) -> str:
        s = f"c{self.concurrency} ISL {self.isl} OSL {self.osl}"
        return s + (f" shared prefix {self.shared_prefix}" if self.shared_prefix else "")

    @classmethod
    def parse(cls, text: str) -> Workload:
        """'C,ISL,OSL[,shared=P][,n=N][,target=T]' e.g. '64,8192,64' or '128,32768,64,shared=32512'."""
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            c, isl, osl = (int(x) for x in parts[:3])
            kw = {}
            for p in parts[3:]:
                key, val = p.split("=")
                kw[{"shared": "shared_prefix", "n": "num_requests", "target": "target_osl"}[key]] = int(val)
        except (ValueError, KeyError):
            raise FlashportError(f"--workload {text!r}: expected C,ISL,OSL[,shared=P][,n=N][,target=T]") from None
        if min(c, isl, osl) < 1 or not 0 <= kw.get("shared_prefix", 0) < isl:
            raise FlashportError(f"--workload {text!r}: C, ISL, OSL must be >= 1 and shared < ISL")
        return cls(c, isl, osl, **kw)


def _cuda_reset_peak(engine) -> None:
    if engine.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak(engine) -> int | None:
    if engine.device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    return None


def run_suite(model: str, *, workloads: list[Workload], latency_isl: int, latency_osl: int, repeats: int,
              engine_args: EngineArgs, out: Path, time_budget: float, peer: bool, peer_layers: int | None,
              peer_max_layers: int, peer_batch: int, peer_batch_isl: int, prices: str | None,
              command: str, slo: SLO = SLO(), progress: bool = True, warmup: bool = True) -> dict:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def left() -> float:
        return time_budget - (time.perf_counter() - t_start)

    def save() -> None:  # after every phase, so a run stopped from outside keeps what it measured
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))

    res: dict = {"meta": {"date": time.strftime("%Y-%m-%d"), "time_utc": time.strftime("%H:%M:%S", time.gmtime()),
                          "command": command, "model": model, "torch": torch.__version__,
                          "python": _platform.python_version(), "time_budget_s": time_budget,
                          "engine_args": {k: v for k, v in engine_args.kwargs().items()}},
                 "skipped": [], "errors": [], "throughput": []}
    try:
        import triton

        res["meta"]["triton"] = triton.__version__
    except ImportError:
        res["meta"]["triton"] = None
    with model_dir(model) as (path, forced):
        from flashport.config import ModelConfig

        full_cfg = ModelConfig.from_hf(path)
        lines: list[str] = []
        engine = build_engine(path, forced, engine_args, log=lines.append)
        print("\n".join(lines), flush=True)
        cfg = engine.model.cfg
        dev = device_name(engine)
        res["meta"].update(device=dev, num_layers=cfg.num_hidden_layers, full_layers=full_cfg.num_hidden_layers,
                           model_config=full_cfg.to_official_dict(),
                           weights=("dummy (random), checkpoint formats: " +
                                    ("FP8 dense + FP4 experts" if full_cfg.expert_dtype == "fp4" else "as configured"))
                           if (forced or engine_args.load_format) == "dummy" else "checkpoint",
                           startup_s=engine.bench_startup_s)
        vocab = cfg.vocab_size
        seed = 100
        if warmup:
            t = time.perf_counter()
            sizes = sorted({1} | {w.concurrency for w in workloads})
            for c in sizes:
                reqs = random_requests(c, min(64, engine.sched_config.max_model_len - 8), 4, vocab, seed=seed)
                seed += 1
                run_requests(engine, reqs, c, label=f"warmup{c}", progress=False)
            res["meta"]["warmup_s"] = time.perf_counter() - t
            print(f"warm-up: {res['meta']['warmup_s']:.1f} s", flush=True)
        _cuda_reset_peak(engine)

        # --- latency: single requests
        if repeats > 0:
            est = 2.0 + 0.0005 * latency_isl + 0.05 * latency_osl
            if left() < est * repeats:
                res["skipped"].append(f"latency (budget left {left():.0f} s)")
            else:
                try:
                    res["latency"] = _latency_phase(engine, cfg, dev, latency_isl, latency_osl, repeats, seed, slo)
                    lat = res["latency"]
                    print(f"latency c1 ISL {latency_isl}: TTFT p50 {lat['ttft_ms']['p50']:.1f} ms, "
                          f"TPOT p50 {lat['tpot_ms']['p50']:.2f} ms", flush=True)
                except Exception as e:  # e.g. out of memory: keep what the other phases measure
                    res["errors"].append(f"latency: {type(e).__name__}: {str(e)[:300]}")
                seed += repeats + 1
                save()

        # --- throughput workloads
        for i, w in enumerate(workloads):
            est = _estimate(w)
            # keep time for what follows: the later workloads (up to 45 s each) and the peer (60 s)
            reserve = sum(min(_estimate(x), 45.0) for x in workloads[i + 1:]) + (60.0 if peer else 0.0)
            if left() < min(est, 60):
                res["skipped"].append(f"{w.name} (budget left {left():.0f} s, estimate {est:.0f} s)")
                continue
            try:
                s = _workload_phase(engine, cfg, dev, w, seed, slo, max(30.0, left() - 5 - reserve), progress)
            except Exception as e:
                res["errors"].append(f"{w.name}: {type(e).__name__}: {str(e)[:300]}")
                continue
            finally:
                seed += 1
                save()
            res["throughput"].append(s)
            save()
            dec = s.get("decode", {})
            print(f"{w.name}: {s['duration_s']:.1f} s, output {s['output_tok_s']:.0f} tok/s, total "
                  f"{s['total_tok_s']:.0f} tok/s; prefill {s.get('prefill', {}).get('prompt_tok_s', 0):.0f} tok/s; "
                  f"decode step {dec.get('step_ms_median', float('nan')):.1f} ms "
                  f"({100 * (dec.get('frac_of_floor') or 0):.1f}% of floor)", flush=True)

        res["memory"] = memory_report(engine, _peak(engine))
        res["meta"]["engine_s"] = time.perf_counter() - t_start
        save()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

        # --- the peer
        if peer:
            if left() < 60:
                res["skipped"].append(f"peer (budget left {left():.0f} s)")
            else:
                from flashport.bench.peer import run_peer

                dev_t = "cuda" if engine_args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
                try:
                    res["peer"] = run_peer(full_cfg, device=dev_t, num_layers=peer_layers, isl=latency_isl,
                                           osl=max(2, min(16, latency_osl)), batch=peer_batch, batch_isl=peer_batch_isl,
                                           max_layers=peer_max_layers, deadline=t_start + time_budget)
                except Exception as e:  # the peer is a comparison: its failure must not lose our results
                    res["peer"] = {"error": f"{type(e).__name__}: {e}"}
    res["meta"]["total_s"] = time.perf_counter() - t_start
    save()
    from flashport.bench.report import write_report

    write_report(res, out, prices=prices)
    return res


def _estimate(w: Workload) -> float:
    """Seconds on an H200 (~4K prompt tok/s, ~0.3 s a decode step): to plan the time budget."""
    return 5.0 + (w.concurrency * (w.isl - w.shared_prefix) + w.shared_prefix) / 4000 + w.osl * 0.3


def _latency_phase(engine, cfg, dev: str, isl: int, osl: int, repeats: int, seed: int, slo: SLO) -> dict:
    recs: list[RequestTiming] = []
    runs = []
    for r in range(repeats + 1):  # the first is a warm-up at the full length
        reqs = random_requests(1, isl, osl, cfg.vocab_size, seed=seed + r)
        run = run_requests(engine, reqs, 1, label=f"latency{r}", progress=False)
        if r == 0:
            continue
        attach_floors(run, cfg, dev)
        runs.append(summarize_run(run, slo))
        recs.extend(run.records)
    m = run_metrics(recs, sum(x["duration_s"] for x in runs), slo)
    pre = [x["prefill"] for x in runs if "prefill" in x]
    dec = [x["decode"] for x in runs if "decode" in x]
    return {"isl": isl, "osl": osl, "repeats": repeats,
            "ttft_ms": m["ttft_ms"], "tpot_ms": m["tpot_ms"], "itl_ms": m["itl_ms"], "e2el_ms": m["e2el_ms"],
            "prefill_frac_of_floor": _mean([p.get("frac_of_floor") for p in pre]),
            "prefill_frac_of_datasheet_floor": _mean([p.get("frac_of_datasheet_floor") for p in pre]),
            "decode_frac_of_floor": _mean([d.get("frac_of_floor") for d in dec]),
            "decode_frac_of_datasheet_floor": _mean([d.get("frac_of_datasheet_floor") for d in dec]),
            "decode_floor_ms": _mean([d.get("floor_ms") for d in dec]),
            "runs": runs}


def _workload_phase(engine, cfg, dev: str, w: Workload, seed: int, slo: SLO, time_limit: float,
                    progress: bool) -> dict:
    extra: dict = {"workload": {"concurrency": w.concurrency, "isl": w.isl, "osl": w.osl,
                                "shared_prefix": w.shared_prefix, "num_requests": w.n,
                                "target_osl": w.target_osl or 1024}}
    reqs = random_requests(w.n, w.isl, w.osl, cfg.vocab_size, seed=seed, shared_prefix=w.shared_prefix)
    if w.shared_prefix:
        # compute the shared prefix once (a request of the prefix + 1 token: same seed, same prefix),
        # so the workload's prompts reuse it from the prefix cache; timed and reported on its own
        prime = random_requests(1, w.shared_prefix + 1, 1, cfg.vocab_size, seed=seed, shared_prefix=w.shared_prefix)
        p_run = run_requests(engine, prime, 1, label=f"prefix{w.concurrency}", progress=progress)
        attach_floors(p_run, cfg, dev)
        pre = summarize_run(p_run, slo).get("prefill", {})
        extra["prefix_prefill"] = {"tokens": w.shared_prefix, "time_s": p_run.duration_s,
                                   "prompt_tok_s": p_run.prompt_tokens_computed / p_run.duration_s,
                                   "frac_of_floor": pre.get("frac_of_floor"),
                                   "frac_of_datasheet_floor": pre.get("frac_of_datasheet_floor")}
    run = run_requests(engine, reqs, w.concurrency, label=f"c{w.concurrency}", time_limit=time_limit,
                       progress=progress)
    run.extra = extra
    attach_floors(run, cfg, dev)
    return summarize_run(run, slo)


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None
