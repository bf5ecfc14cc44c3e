"""`flashport bench serve` against a real tiny-model server on loopback: a complete JSON result,
both load modes (fixed concurrency, Poisson rate), and failed requests counted."""

import json
import subprocess
import sys

import pytest
from server_util import ServerProcess

from flashport.bench.serve import run_serve_bench
from flashport.bench.workload import random_requests


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    srv = ServerProcess(tiny_model_dir, "--served-model-name", "tiny", "--max-num-seqs", "4")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


def test_bench_serve_cli_writes_complete_json(server, tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "flashport", "bench", "serve", "--base-url", server.base_url, "--concurrency", "2",
           "--num-prompts", "4", "--isl", "12", "--osl", "5", "--vocab-size", "1000", "--out", str(tmp_path),
           "--no-progress", "--duration", "20"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    files = list(tmp_path.glob("serve-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["kind"] == "serve"
    r = doc["result"]
    assert r["model"] == "tiny" and r["requests"] == 4 and r["completed"] == 4 and r["failed"] == 0
    assert r["output_tokens"] == 4 * 5 and r["input_tokens"] == 4 * 12  # usage counts from the server
    for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert set(r[m]) == {"n", "mean", "p50", "p90", "p99"} and r[m]["n"] > 0
        assert r[m]["p50"] <= r[m]["p99"]
    assert r["e2el_ms"]["p50"] >= r["ttft_ms"]["p50"]
    for k in ("request_throughput", "output_tok_s", "total_tok_s", "goodput_req_s", "duration_s"):
        assert r[k] >= 0
    assert r["slo"] == {"ttft_ms": 200.0, "tpot_ms": 50.0}
    assert len(r["per_request"]) == 4


def test_poisson_rate_and_failures(server):
    reqs = random_requests(3, 8, 3, 1000, seed=3)
    res = run_serve_bench(server.base_url, reqs, model="tiny", concurrency=None, request_rate=20.0, duration=20.0,
                          progress=False)
    assert res["completed"] == 3 and res["request_rate"] == 20.0
    # an unknown model name: the server answers with an error, each request counts as failed
    bad = run_serve_bench(server.base_url, reqs[:2], model="no-such-model", concurrency=2, request_rate=None,
                          duration=20.0, progress=False)
    assert bad["failed"] == 2 and bad["completed"] == 0
    assert "HTTPError" in bad["errors"] and "HTTP 404" in bad["first_errors"][0]
