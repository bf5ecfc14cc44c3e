"""Prometheus metrics for GET /metrics (text exposition format).

Engine state is read at scrape time from the bridge's last `EngineStats` snapshot (the engine
thread takes one after every step), so scraping never touches the engine itself. Request-level
counters and histograms are fed by the bridge (`Observer`) and the HTTP middleware.

    flashport_requests_running                 sequences in the running batch (n > 1 counts n)
    flashport_requests_waiting                 sequences waiting in the scheduler (new or preempted)
    flashport_requests_queued                  requests waiting for their first output (bounded by --max-waiting)
    flashport_requests_in_flight               requests admitted and not finished
    flashport_cache_usage_ratio{kind}          held fraction of each state pool: compressed, window, state_slot
    flashport_cache_free_blocks{kind}          free (or evictable prefix-cache) blocks / slots per pool
    flashport_cache_total_blocks{kind}         pool sizes
    flashport_prefix_cache_hit_rate            prompt tokens served from the prefix cache / prompt tokens admitted
    flashport_preemptions_total                sequences preempted (recomputed later)
    flashport_engine_steps_total               engine steps run
    flashport_engine_up                        1 while the engine thread runs
    flashport_prompt_tokens_total              prompt tokens of admitted requests
    flashport_generation_tokens_total          tokens generated
    flashport_time_to_first_token_seconds      arrival -> first generated token (histogram)
    flashport_time_per_output_token_seconds    mean interval between later tokens, per request (histogram)
    flashport_e2e_request_latency_seconds      arrival -> finished or aborted (histogram)
    flashport_requests_finished_total{reason}  stop, length, aborted (client gone), shutdown, engine_error
    flashport_requests_rejected_total{reason}  queue_full, shutting_down
    flashport_http_requests_total{route,status}
    process_*                                  resident memory, CPU time, open fds (Linux)
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from flashport.server.bridge import AsyncEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineCollector:
    def __init__(self, metrics: "ServerMetrics") -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        bridge = self._m.bridge
        if bridge is None:
            return
        s = bridge.stats
        yield GaugeMetricFamily("flashport_requests_running", "Sequences in the running batch.", value=s.num_running)
        yield GaugeMetricFamily("flashport_requests_waiting", "Sequences waiting in the scheduler.",
                                value=s.num_waiting)
        yield GaugeMetricFamily("flashport_requests_queued",
                                "Requests waiting for their first output (bounded by --max-waiting).",
                                value=bridge.num_queued)
        yield GaugeMetricFamily("flashport_requests_in_flight", "Requests admitted and not finished.",
                                value=bridge.num_in_flight)
        usage = GaugeMetricFamily("flashport_cache_usage_ratio", "Held fraction of each state pool.",
                                  labels=["kind"])
        free = GaugeMetricFamily("flashport_cache_free_blocks", "Free or evictable blocks (slots) per pool.",
                                 labels=["kind"])
        total = GaugeMetricFamily("flashport_cache_total_blocks", "Blocks (slots) per pool.", labels=["kind"])
        for kind, (num_free, num_total) in s.pools.items():
            usage.add_metric([kind], 1.0 - num_free / num_total if num_total else 0.0)
            free.add_metric([kind], num_free)
            total.add_metric([kind], num_total)
        yield usage
        yield free
        yield total
        yield GaugeMetricFamily("flashport_prefix_cache_hit_rate",
                                "Prompt tokens served from the prefix cache / prompt tokens admitted.",
                                value=s.prefix_hit_rate)
        yield CounterMetricFamily("flashport_preemptions", "Sequences preempted.", value=s.num_preemptions)
        yield CounterMetricFamily("flashport_engine_steps", "Engine steps run.", value=s.num_steps)
        yield GaugeMetricFamily("flashport_engine_up", "1 while the engine thread runs.",
                                value=1.0 if bridge.alive else 0.0)


class ServerMetrics:
    """The server's registry; also the bridge's `Observer`."""

    def __init__(self) -> None:
        disable_created_metrics()  # no `*_created` series (process-wide; nothing else here uses them)
        self.registry = CollectorRegistry()
        self.bridge: AsyncEngine | None = None
        r = self.registry
        ProcessCollector(registry=r)
        r.register(_EngineCollector(self))
        self.prompt_tokens = Counter("flashport_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("flashport_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("flashport_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("flashport_time_per_output_token_seconds",
                              "Mean interval between generated tokens after the first, per request.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("flashport_e2e_request_latency_seconds", "Arrival to finished or aborted.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.finished = Counter("flashport_requests_finished", "Requests ended, by reason.", ["reason"], registry=r)
        self.rejected = Counter("flashport_requests_rejected", "Requests refused with 503, by reason.", ["reason"],
                                registry=r)
        self.http = Counter("flashport_http_requests", "HTTP requests by route and status.", ["route", "status"],
                            registry=r)
        for reason in ("stop", "length", "aborted", "shutdown", "engine_error"):
            self.finished.labels(reason)
        for reason in ("queue_full", "shutting_down"):
            self.rejected.labels(reason)

    # ---- Observer
    def on_admitted(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_tokens(self, num_new_tokens: int) -> None:
        self.generation_tokens.inc(num_new_tokens)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_finished(self, reason: str, e2e_s: float, tpot_s: float | None) -> None:
        self.finished.labels(reason).inc()
        self.e2e.observe(e2e_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    # ---- exposition
    def render(self) -> bytes:
        return generate_latest(self.registry)
