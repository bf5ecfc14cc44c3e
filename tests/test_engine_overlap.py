"""The engine's overlap (step t+1 launched before step t's tokens are processed) against the plain
step-by-step engine: the same outputs for every sampling feature, stops, preemption and abort."""

from __future__ import annotations

import pytest
import torch

from flashport.engine.engine import Engine
from flashport.sampling_params import SamplingParams


def _engine(path, overlap: bool, **kw) -> Engine:
    args = dict(device="cpu", dtype="float32", progress=False, log=None, max_model_len=96, overlap=overlap)
    args.update(kw)
    return Engine(path, **args)


def _final_outputs(engine: Engine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict:
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            prev = final.get(out.request_id)
            assert prev is None or not prev.finished, f"{out.request_id}: an output after it finished"
            final[out.request_id] = out
    return {rid: (out.prompt_logprobs, [(o.token_ids, o.text, o.finish_reason, o.stop_reason, o.logprobs)
                                        for o in out.outputs]) for rid, out in final.items()}


def _without_logprobs(final: dict) -> dict:
    return {rid: [o[:4] for o in outs] for rid, (_, outs) in final.items()}


def _flat_logprobs(final: dict) -> tuple[list[tuple], list[float]]:
    """(request, sample, row, token) and the logprob of every logprob entry (prompt logprobs: sample -1)."""
    flat = []
    for rid, (prompt_lps, outs) in sorted(final.items()):
        rows = [(-1, prompt_lps or [])] + [(k, o[4] or []) for k, o in enumerate(outs)]
        for k, lps in rows:
            for r, d in enumerate(lps):
                flat += [(rid, k, r, tok, v) for tok, v in sorted((d or {}).items())]
    return [f[:4] for f in flat], [f[4] for f in flat]


def _all_free(engine: Engine) -> bool:
    c, cc = engine.scheduler.cache, engine.cache_config
    return (c.num_free_comp_blocks == cc.num_comp_blocks and c.num_free_window_blocks == cc.num_window_blocks
            and c.num_free_state_slots == cc.num_state_slots)


def _requests(engine: Engine, vocab: int) -> list[tuple[str, list[int], SamplingParams]]:
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, vocab, (int(n),), generator=g).tolist() for n in torch.randint(8, 50, (9,), generator=g)]
    # Tokens the greedy run produces, to stop on (found with the plain engine first).
    base = _engine_like(engine, overlap=False)
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ids = _final_outputs(base, [("g", prompts[0], greedy)])["g"][1][0][0]
    text = _final_outputs(base, [("t", prompts[1], greedy)])["t"][1][0][1]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    return [
        ("greedy", prompts[0], greedy),
        ("stop-token", prompts[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[ids[6]])),
        ("stop-string", prompts[1], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop])),
        ("seeded", prompts[2], SamplingParams(max_tokens=17, temperature=0.9, top_p=0.8, seed=3, ignore_eos=True)),
        ("penalties", prompts[3], SamplingParams(max_tokens=15, temperature=0.7, seed=4, ignore_eos=True,
                                                 presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)),
        ("logprobs", prompts[4], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, logprobs=3,
                                                prompt_logprobs=2)),
        ("n3", prompts[5], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)),
        ("eos", prompts[6], SamplingParams(max_tokens=30, temperature=1.0, seed=6)),
        ("short", prompts[7], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)),
        ("long", prompts[8], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)),
    ]


def _engine_like(engine: Engine, overlap: bool) -> Engine:
    return _engine(engine.model_dir, overlap, **engine.test_kwargs)


def _pair(path, **kw) -> tuple[Engine, Engine]:
    pair = []
    for overlap in (False, True):
        e = _engine(path, overlap, **kw)
        e.model_dir, e.test_kwargs = path, kw
        pair.append(e)
    return pair[0], pair[1]


def test_overlap_equals_step_by_step(tiny_model_dir):
    # A small token budget (chunked prefill mixed with decode) and a tight cache (preemption).
    plain, overlapped = _pair(tiny_model_dir, max_num_batched_tokens=24, cache_bytes=700_000, max_num_seqs=8)
    assert overlapped.overlap and not plain.overlap
    reqs = _requests(plain, plain.config.vocab_size)
    # EOS: make a token the seeded sampler draws early the EOS of both engines.
    probe = _final_outputs(_engine_like(plain, False), [("eos", reqs[7][1], SamplingParams(
        max_tokens=30, temperature=1.0, seed=6, ignore_eos=True))])["eos"][1][0][0]
    for e in (plain, overlapped):
        e.eos_token_ids = frozenset({probe[4]})
    want = _final_outputs(plain, reqs)
    got = _final_outputs(overlapped, reqs)
    # Logprobs to float tolerance: a stopped sequence runs one step longer with overlap, so the
    # batches (and their float reductions) differ; everything else is exact.
    assert _without_logprobs(got) == _without_logprobs(want)
    (got_keys, got_vals), (want_keys, want_vals) = _flat_logprobs(got), _flat_logprobs(want)
    assert got_keys == want_keys and len(want_keys) > 50
    assert got_vals == pytest.approx(want_vals, abs=1e-4)
    assert plain.scheduler.num_preemptions > 0 and overlapped.scheduler.num_preemptions > 0
    outs = {rid: o[1] for rid, o in want.items()}
    assert outs["stop-token"][0][2] == "stop" and outs["stop-string"][0][2] == "stop" and outs["eos"][0][2] == "stop"
    assert len(outs["eos"][0][0]) < 30 and len(outs["n3"]) == 3
    assert _all_free(plain) and _all_free(overlapped)


def test_overlap_returns_a_step_late_and_drains(tiny_model_dir):
    plain, overlapped = _pair(tiny_model_dir)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for e in (plain, overlapped):
        e.add_request("a", [5, 6, 7, 8], params)
    assert [len(o.outputs[0].token_ids) for o in plain.step()] == [1]
    assert overlapped.step() == []  # launched, not collected
    assert [len(o.outputs[0].token_ids) for o in overlapped.step()] == [1]
    steps = 2
    while overlapped.has_unfinished():
        last = overlapped.step()
        steps += 1
    # The last call only collected: the third token finished the request by length.
    assert [o.finished for o in last] == [True] and len(last[0].outputs[0].token_ids) == 3
    assert steps == 4 and _all_free(overlapped)


def test_overlap_abort_in_flight_frees_everything(tiny_model_dir):
    _, engine = _pair(tiny_model_dir, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for i in range(3):
        engine.add_request(str(i), list(range(3, 30 + 5 * i)), params)
    for _ in range(6):
        engine.step()
    assert engine.scheduler.num_running > 0
    engine.abort("1")  # its tokens of the step in flight must not come back
    seen = set()
    while engine.has_unfinished():
        seen |= {o.request_id for o in engine.step()}
        engine.abort("2")
    assert "1" not in seen and _all_free(engine)
    assert engine.step() == []


@pytest.mark.gpu
def test_overlap_with_graphs_equals_step_by_step_on_gpu(tiny_model_dir):
    # Graph replays share one logits buffer: the overlapped engine must have read it (sampling,
    # logprobs) before the next replay overwrites it.
    g = torch.Generator().manual_seed(12)
    reqs = [(str(i), torch.randint(2, 1000, (int(n),), generator=g).tolist(),
             SamplingParams(max_tokens=24, temperature=0.8 if i % 2 else 0, seed=i, ignore_eos=True,
                            logprobs=2 if i % 3 == 0 else None))
            for i, n in enumerate(torch.randint(5, 70, (7,), generator=g))]
    outs = []
    for overlap in (False, True):
        e = Engine(tiny_model_dir, device="cuda", dtype="float32", progress=False, log=None, max_model_len=256,
                   max_num_seqs=8, cache_bytes=64 * 2**20, overlap=overlap)
        assert e.runner.graphs is not None and e.overlap == overlap
        outs.append(_final_outputs(e, reqs))
    assert _without_logprobs(outs[1]) == _without_logprobs(outs[0])
    (k1, v1), (k0, v0) = _flat_logprobs(outs[1]), _flat_logprobs(outs[0])
    assert k1 == k0 and v1 == pytest.approx(v0, abs=1e-4)


def test_bench_step_times_with_overlap(tiny_model_dir):
    # The benchmark's per-step log over an overlapped engine: the same plans as step by step, each
    # timed from its launch (or the step before it) to its result, so the times add up to the run.
    from flashport.bench.offline import run_requests
    from flashport.bench.workload import BenchRequest

    reqs = [BenchRequest(prompt=tuple(range(5, 5 + n)), prompt_len=n, output_len=6) for n in (20, 33, 9)]
    runs = [run_requests(e, reqs, concurrency=2, label="t", progress=False) for e in _pair(tiny_model_dir)]
    (plain, overlapped) = runs
    assert [s.seqs for s in overlapped.steps] == [s.seqs for s in plain.steps]
    assert all(s.dt > 0 for s in overlapped.steps)
    assert sum(s.dt for s in overlapped.steps) <= overlapped.duration_s
    assert sum(s.dt for s in overlapped.steps) > 0.5 * overlapped.duration_s
