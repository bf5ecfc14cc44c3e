"""Latency statistics from per-request timestamps: TTFT, TPOT, ITL, E2EL, goodput, throughput.

Every benchmark (offline, latency, serve) records one `RequestTiming` per request: when it was
sent, when each output token arrived, and how many tokens went in and came out. Everything in the
report is computed from those records here, so the definitions live in one place
(shared/perf/anchors.md "Metric definitions"):

- TTFT: first token time - send time;
- TPOT: (last token time - first token time) / (output tokens - 1), for requests with >= 2 tokens;
- ITL: every gap between consecutive token arrivals (a chunk of several tokens counts once);
- E2EL: last token (or end) time - send time;
- goodput: requests per second that finished and met the SLO (TTFT <= ttft_ms, TPOT <= tpot_ms);
- output / total tok/s: tokens of the successful requests over the wall time of the run.

Percentiles interpolate linearly between order statistics (numpy's default), no numpy needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 200.0
    tpot_ms: float = 50.0

    def __post_init__(self) -> None:
        if not (self.ttft_ms > 0 and self.tpot_ms > 0):
            raise ValueError(f"SLO limits must be positive, got ttft_ms={self.ttft_ms}, tpot_ms={self.tpot_ms}")


@dataclass
class RequestTiming:
    """One request's clock readings (seconds, any common origin) and token counts."""

    start: float
    token_times: list[float] = field(default_factory=list)  # arrival of each output chunk
    token_counts: list[int] = field(default_factory=list)  # tokens in each chunk (1 if left empty)
    end: float | None = None
    prompt_tokens: int = 0
    output_tokens: int | None = None  # None: sum of token_counts (or len(token_times))
    ok: bool = True
    error: str | None = None

    @property
    def num_output(self) -> int:
        if self.output_tokens is not None:
            return self.output_tokens
        return sum(self.token_counts) if self.token_counts else len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def e2el(self) -> float | None:
        last = self.end if self.end is not None else (self.token_times[-1] if self.token_times else None)
        return None if last is None else last - self.start

    @property
    def tpot(self) -> float | None:
        n = self.num_output
        if n < 2 or len(self.token_times) < 1:
            return None
        last = self.token_times[-1]
        return (last - self.token_times[0]) / (n - 1)

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks; nan if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """mean, p50, p90, p99 (and n) of `values` x scale (e.g. 1000 for seconds -> ms)."""
    xs = [x * scale for x in values]
    if not xs:
        return {"n": 0, "mean": math.nan, "p50": math.nan, "p90": math.nan, "p99": math.nan}
    return {"n": len(xs), "mean": sum(xs) / len(xs), "p50": percentile(xs, 50), "p90": percentile(xs, 90),
            "p99": percentile(xs, 99)}


def meets_slo(r: RequestTiming, slo: SLO) -> bool:
    if not r.ok or r.ttft is None:
        return False
    if r.ttft * 1000 > slo.ttft_ms:
        return False
    tpot = r.tpot
    return tpot is None or tpot * 1000 <= slo.tpot_ms


def run_metrics(records: list[RequestTiming], duration_s: float, slo: SLO = SLO(), num_gpus: int = 1) -> dict:
    """Aggregate metrics of a run that lasted `duration_s` seconds of wall time (ms for latencies)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1, got {num_gpus}")
    good = [r for r in records if r.ok]
    out_tok = sum(r.num_output for r in good)
    in_tok = sum(r.prompt_tokens for r in good)
    itl = [g for r in good for g in r.itls]
    met = sum(meets_slo(r, slo) for r in good)
    return {
        "requests": len(records),
        "completed": len(good),
        "failed": len(records) - len(good),
        "duration_s": duration_s,
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "request_throughput": len(good) / duration_s,
        "output_tok_s": out_tok / duration_s,
        "total_tok_s": (in_tok + out_tok) / duration_s,
        "output_tok_s_per_gpu": out_tok / duration_s / num_gpus,
        "total_tok_s_per_gpu": (in_tok + out_tok) / duration_s / num_gpus,
        "num_gpus": num_gpus,
        "ttft_ms": summarize([r.ttft for r in good if r.ttft is not None], 1000),
        "tpot_ms": summarize([r.tpot for r in good if r.tpot is not None], 1000),
        "itl_ms": summarize(itl, 1000),
        "e2el_ms": summarize([r.e2el for r in good if r.e2el is not None], 1000),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "slo_met": met,
        "goodput_req_s": met / duration_s,
    }
