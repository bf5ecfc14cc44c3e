"""flashport.bench: percentiles, latency metrics, goodput and throughput from synthetic timestamps;
the cost formula and the price table; workload parsing and datasets; kernel-result extraction."""

import json
import math

import pytest

from flashport.bench.cost import cost_per_million, load_prices
from flashport.bench.kernels import extract_cases
from flashport.bench.stats import SLO, RequestTiming, meets_slo, percentile, run_metrics, summarize
from flashport.bench.suite import Workload
from flashport.bench.workload import load_requests, random_requests
from flashport.errors import FlashportError


def test_percentile_known_answers():
    xs = [15, 20, 35, 40, 50]
    assert percentile(xs, 0) == 15
    assert percentile(xs, 100) == 50
    assert percentile(xs, 50) == 35
    assert percentile(xs, 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * 15 (numpy 'linear')
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 90) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)
    s = summarize([1.0, 2.0, 3.0, 4.0], scale=1000)
    assert s == {"n": 4, "mean": 2500.0, "p50": 2500.0, "p90": pytest.approx(3700.0), "p99": pytest.approx(3970.0)}


def test_request_timing_metrics():
    # sent at 1.0; tokens at 1.2, 1.3, 1.5 (the last chunk carries 2 tokens): 4 tokens
    r = RequestTiming(start=1.0, token_times=[1.2, 1.3, 1.5], token_counts=[1, 1, 2], end=1.55, prompt_tokens=10)
    assert r.num_output == 4
    assert r.ttft == pytest.approx(0.2)
    assert r.tpot == pytest.approx((1.5 - 1.2) / 3)
    assert r.itls == pytest.approx([0.1, 0.2])
    assert r.e2el == pytest.approx(0.55)
    one = RequestTiming(start=0.0, token_times=[0.05], end=0.05)
    assert one.tpot is None and one.num_output == 1


def test_goodput_and_throughput():
    slo = SLO(ttft_ms=200, tpot_ms=50)
    fast = RequestTiming(0.0, [0.1, 0.14, 0.18], end=0.18, prompt_tokens=100)  # TTFT 100 ms, TPOT 40 ms: meets
    slow_first = RequestTiming(0.0, [0.3, 0.31], end=0.31, prompt_tokens=100)  # TTFT 300 ms: misses
    slow_decode = RequestTiming(1.0, [1.1, 1.2, 1.3], end=1.3, prompt_tokens=100)  # TPOT 100 ms: misses
    usage = RequestTiming(0.0, [0.1, 0.2], end=0.2, prompt_tokens=100, output_tokens=11)  # TPOT 10 ms: meets
    failed = RequestTiming(0.0, [], ok=False, error="HTTP 500", prompt_tokens=100)
    assert meets_slo(fast, slo) and meets_slo(usage, slo)
    assert not meets_slo(slow_first, slo) and not meets_slo(slow_decode, slo) and not meets_slo(failed, slo)
    m = run_metrics([fast, slow_first, slow_decode, usage, failed], duration_s=2.0, slo=slo, num_gpus=2)
    assert m["requests"] == 5 and m["completed"] == 4 and m["failed"] == 1
    assert m["slo_met"] == 2 and m["goodput_req_s"] == pytest.approx(1.0)
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["output_tokens"] == 3 + 2 + 3 + 11
    assert m["output_tok_s"] == pytest.approx(19 / 2)
    assert m["total_tok_s"] == pytest.approx((400 + 19) / 2)
    assert m["output_tok_s_per_gpu"] == pytest.approx(19 / 4)
    assert m["ttft_ms"]["p50"] == pytest.approx(100.0)  # of 100, 300, 100, 100
    assert m["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert m["itl_ms"]["n"] == 2 + 1 + 2 + 1
    assert m["e2el_ms"]["p99"] == pytest.approx(309.7)  # of 180, 310, 300, 200: rank 2.97
    with pytest.raises(ValueError):
        run_metrics([fast], duration_s=0)


def test_cost_formula_and_prices(tmp_path):
    # $4 / GPU-hour x 8 GPUs at 10,000 tok/s: 32 $/h over 36M tokens/h = $0.888... per 1M
    assert cost_per_million(10_000, 4.0, 8) == pytest.approx(32 / 36)
    assert cost_per_million(1000, 3.6, 1) == pytest.approx(1.0)
    assert cost_per_million(0, 3.0, 1) is None and cost_per_million(100, None, 1) is None
    p = tmp_path / "prices.json"
    p.write_text(json.dumps({"H200": 3.2, "MI355X": 4.5, "B200": None}))
    prices = load_prices(p)
    assert prices["H200"] == 3.2 and prices["MI355X"] == 4.5 and prices["B200"] is None
    assert prices["H100"] == 2.95  # untouched default
    p.write_text(json.dumps({"H200": "cheap"}))
    with pytest.raises(FlashportError, match="H200"):
        load_prices(p)
    with pytest.raises(FlashportError, match="not found"):
        load_prices(tmp_path / "missing.json")


def test_workloads_and_datasets(tmp_path):
    w = Workload.parse("128,32768,64,shared=32512,target=1024")
    assert (w.concurrency, w.isl, w.osl, w.shared_prefix, w.n, w.target_osl) == (128, 32768, 64, 32512, 128, 1024)
    with pytest.raises(FlashportError, match="workload"):
        Workload.parse("64,8192")
    with pytest.raises(FlashportError):
        Workload.parse("4,16,4,shared=16")
    reqs = random_requests(3, 10, 4, 50, seed=1, shared_prefix=6)
    assert [r.prompt_len for r in reqs] == [10, 10, 10]
    assert reqs[0].prompt[:6] == reqs[2].prompt[:6] and reqs[0].prompt != reqs[1].prompt
    assert all(2 <= t < 50 for r in reqs for t in r.prompt)
    assert random_requests(3, 10, 4, 50, seed=1, shared_prefix=6) == reqs  # seeded
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"prompt_token_ids": [5, 6, 7], "output_len": 9}\n\n{"prompt": "hello world, a prompt"}\n')
    got = load_requests(jl, None, 16)
    assert got[0].prompt == (5, 6, 7) and got[0].output_len == 9 and got[1].output_len == 16
    sg = tmp_path / "sharegpt.json"
    sg.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi there"},
                                                 {"from": "gpt", "value": "hello"}]},
                              {"conversations": [{"from": "gpt", "value": "no human turn"}]}]))
    got = load_requests(sg, 5, 7)
    assert len(got) == 1 and got[0].prompt == "hi there" and got[0].output_len == 7
    jl.write_text('{"nothing": 1}\n')
    with pytest.raises(FlashportError, match="entry 0"):
        load_requests(jl, None, 4)


def test_kernel_case_extraction():
    data = {"device": "x", "rows": [
        {"n": 64, "form": "decode", "fused_us": 200.0, "floor_us": 50.0, "twin_us": 4000.0},
        {"case": "rmsnorm", "graph_us": 10.0, "frac_of_floor": 0.5},
        {"note": "no timing here"}]}
    cases = extract_cases(data)
    assert len(cases) == 2
    assert cases[0]["case"] == "form=decode n=64" and cases[0]["time_us"] == 200.0 and cases[0]["frac"] == 0.25
    assert cases[1]["time_us"] == 10.0 and cases[1]["frac"] == 0.5


def test_kernel_runner_tabulates_scripts(tmp_path, monkeypatch):
    import flashport.bench.kernels as kernels

    script = tmp_path / "bench_fake.py"
    script.write_text("import json, sys, pathlib\n"
                      "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
                      "json.dump({'rows': [{'case': 'a', 'kernel_us': 8.0, 'floor_us': 2.0}], 'tiny': '--tiny' in sys.argv},"
                      " open(out / 'bench_fake.json', 'w'))\n# accepts --tiny\n")
    monkeypatch.setattr(kernels, "find_scripts", lambda root=None: [script])
    res = kernels.run_kernel_benches(tmp_path / "out", tiny=True)
    r = res["scripts"]["bench_fake"]
    assert r["rc"] == 0 and r["cases"] == [{"case": "case=a", "time_us": 8.0, "floor_us": 2.0, "frac": 0.25}]
    assert json.loads((tmp_path / "out" / "bench_fake" / "bench_fake.json").read_text())["tiny"] is True
    assert "25.0%" in kernels.render_table(res)


def test_peer_layer_budget():
    from flashport.bench.peer import layer_bytes_bf16, layers_that_fit
    from flashport.config import ModelConfig

    cfg = ModelConfig()
    assert layer_bytes_bf16(cfg) == pytest.approx(13.2e9, rel=0.02)  # bf16 experts dominate a V4-Flash layer
    # an H200 after the engine is freed (~150 GB), 24 GiB kept for activations: 9 layers, capped at 8
    assert layers_that_fit(cfg, 150e9, 24 * 2**30, cap=8) == 8
    assert layers_that_fit(cfg, 150e9, 24 * 2**30, cap=20) == 9
    assert layers_that_fit(cfg, 20e9, 24 * 2**30, cap=8) == 0
