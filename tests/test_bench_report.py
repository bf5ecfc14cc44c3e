"""The offline benchmarks on the tiny model (CPU) and `bench report` from their stored results."""

import json

import pytest

from flashport.bench.report import load_results, write_report
from flashport.bench.suite import Workload, run_suite
from flashport.bench.offline import EngineArgs
from flashport.cli import main

PROJECTED_COLS = [f"{k} x8 (projected)" for k in ("H100", "H200", "MI300X", "MI355X", "B200")]


@pytest.fixture(scope="module")
def suite_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    ea = EngineArgs(device="cpu", max_model_len=96, max_num_seqs=2, max_num_batched_tokens=64,
                    cache_bytes=64 * 2**20)
    res = run_suite("tiny", workloads=[Workload(2, 64, 3, shared_prefix=48)], latency_isl=16, latency_osl=3,
                    repeats=1, engine_args=ea, out=out, time_budget=300, peer=False, peer_layers=None,
                    peer_max_layers=2, peer_batch=2, peer_batch_isl=8, prices=None, command="test", progress=False,
                    warmup=False)
    return out, res


def test_suite_results(suite_results):
    out, res = suite_results
    assert (out / "results.json").is_file()
    s = res["throughput"][0]
    # the shared prefix (48 tokens) is computed once by the priming request, then reused:
    # each of the 2 requests computes only its 16-token tail
    assert s["prompt_tokens_computed"] == 2 * 16
    assert s["prefix_prefill"]["tokens"] == 48
    assert s["output_tokens"] == 2 * 3 and not s["truncated"]
    assert s["decode"]["batch"] == 2 and s["decode"]["floor_ms"] > 0
    assert all(st["floor_ms"] > 0 for st in s["step_log"])
    lat = res["latency"]
    assert lat["ttft_ms"]["n"] == 1 and lat["tpot_ms"]["n"] == 1
    mem = res["memory"]
    assert mem["weights_gib"] > 0 and mem["pools_gib"] > 0
    assert res["meta"]["num_layers"] == 6 and res["meta"]["device"] == "cpu"


def test_report_from_stored_results(suite_results, tmp_path):
    src, _ = suite_results
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"H100": 1.0, "B200": None}))
    # a stored `bench serve` result joins the report
    from flashport.bench.stats import RequestTiming, run_metrics

    serve = run_metrics([RequestTiming(0.0, [0.1, 0.15], end=0.15, prompt_tokens=8)], 1.0)
    serve.update(label="c1", concurrency=1)
    (tmp_path / "serve-c1.json").write_text(json.dumps({"kind": "serve", "meta": {}, "result": serve}))
    out = tmp_path / "report"
    assert main(["bench", "report", str(src / "results.json"), str(tmp_path / "serve-c1.json"), "--out", str(out),
                 "--prices", str(prices)]) == 0
    for f in ("report.md", "report.json", "throughput.png", "latency.png", "steps.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rep = json.loads((out / "report.json").read_text())
    assert rep["columns"][2:7] == PROJECTED_COLS and rep["columns"][-1] == "published anchors"
    rows = {r["metric"]: r["cells"] for r in rep["rows"]}
    out_row = next(v for k, v in rows.items() if "output tok/s per GPU" in k)
    assert all(out_row[c] is not None and out_row[c] > 0 for c in PROJECTED_COLS)
    cost = next(v for k, v in rows.items() if "$ per 1M output tokens" in k)
    assert cost["B200 x8 (projected)"] is None  # price overridden to null
    # the cost formula with the overridden H100 price: $1 x 8 / (tok/s x 8 x 3600) x 1e6
    assert cost["H100 x8 (projected)"] == pytest.approx(1e6 / (out_row["H100 x8 (projected)"] * 3600))
    assert any(k.startswith("serve c1") for k in rows)
    md = (out / "report.md").read_text()
    assert "projected" in md and "shared prefix" in md and "## Method" in md
    assert any("shortened" in line for line in md.splitlines())


def test_throughput_and_latency_cli(tmp_path):
    common = ["--device", "cpu", "--cache-bytes", str(32 * 2**20), "--max-num-batched-tokens", "64",
              "--no-progress", "--out", str(tmp_path)]
    assert main(["bench", "throughput", "tiny", "--concurrency", "2", "--num-prompts", "3", "--isl", "12",
                 "--osl", "3", *common]) == 0
    doc = json.loads((tmp_path / "throughput-c2-isl12.json").read_text())
    r = doc["result"]
    assert doc["kind"] == "throughput" and r["num_requests"] == 3
    assert r["prompt_tokens_computed"] == 36 and r["output_tokens"] == 9
    assert r["total_tok_s"] == pytest.approx(45 / r["duration_s"])
    assert main(["bench", "latency", "tiny", "--isl", "8", "--osl", "3", "--repeats", "2", *common]) == 0
    lat = json.loads((tmp_path / "latency-isl8.json").read_text())["result"]
    assert lat["ttft_ms"]["n"] == 2 and lat["e2el_ms"]["p50"] >= lat["ttft_ms"]["p50"]
    # both stored files together make a report
    res = load_results([tmp_path])
    rep = write_report(res, tmp_path / "rep")
    assert any("c1 ISL 8" in r["metric"] for r in rep["rows"])


def test_bad_inputs(tmp_path):
    assert main(["bench", "report", str(tmp_path / "nothing.json")]) == 2
    (tmp_path / "x.json").write_text("{}")
    assert main(["bench", "report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert main(["bench", "throughput", str(tmp_path), "--device", "cpu"]) == 2  # no config.json
