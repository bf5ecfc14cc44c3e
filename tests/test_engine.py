"""The engine over the state pools: batching, chunked prefill, preemption, prefix reuse, abort."""

from __future__ import annotations

import pytest
import torch

from flashport.engine.engine import Engine
from flashport.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_oracle import make_hf_model

    path = tmp_path_factory.mktemp("engine-hf")
    hf = make_hf_model("swa-csa-hca", seed=5)
    hf.save_pretrained(path)
    return hf, path


def _engine(path, **kw) -> Engine:
    args = dict(device="cpu", dtype="float32", progress=False, log=None, max_model_len=256)
    args.update(kw)
    return Engine(path, **args)


def _run(engine: Engine, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[str(i)] for i in range(len(prompts))]


def _prompts(n: int, vocab: int, seed: int, lo: int = 5, hi: int = 70) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (k,), generator=g).tolist() for k in lens]


def _all_free(engine: Engine) -> bool:
    c, cc = engine.scheduler.cache, engine.cache_config
    return (c.num_free_comp_blocks == cc.num_comp_blocks and c.num_free_window_blocks == cc.num_window_blocks
            and c.num_free_state_slots == cc.num_state_slots)


def test_batched_chunked_equals_one_at_a_time_and_transformers(hf_dir):
    hf, path = hf_dir
    prompts = _prompts(6, 512, 0)
    batched = _run(_engine(path, max_num_batched_tokens=24), prompts)  # forces chunked prefill
    single = [_run(_engine(path, enable_prefix_caching=False), [p])[0] for p in prompts]
    assert batched == single
    for p, got in zip(prompts[:3], batched):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, len(p):]
        assert got == ref.tolist()


def test_preemption_under_a_small_pool(hf_dir):
    _, path = hf_dir
    prompts = _prompts(8, 512, 1, lo=30, hi=60)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    free = _run(_engine(path), prompts, params)
    # Room for about two sequences of this size at once: the scheduler must preempt.
    small = _engine(path, cache_bytes=650_000, max_model_len=96, max_num_seqs=8, max_num_batched_tokens=32)
    tight = _run(small, prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert tight == free
    assert _all_free(small)


def test_prefix_reuse_saves_the_shared_fraction(hf_dir):
    _, path = hf_dir
    g = torch.Generator().manual_seed(2)
    shared = torch.randint(2, 512, (96,), generator=g).tolist()
    prompts = [shared + torch.randint(2, 512, (8,), generator=g).tolist() for _ in range(4)]
    reuse, plain = _engine(path), _engine(path, enable_prefix_caching=False)
    out_reuse = [_run(reuse, [p])[0] for p in prompts]  # one after another: later ones hit the cache
    out_plain = [_run(plain, [p])[0] for p in prompts]
    assert out_reuse == out_plain
    total = sum(len(p) for p in prompts)
    assert plain.num_prompt_tokens_computed == total
    # The first prompt computes everything; the other three skip the shared 96 tokens.
    assert reuse.num_prompt_tokens_computed == total - 3 * 96
    # A prompt that is entirely cached: still computes its last token and generates the same.
    again = _run(reuse, [prompts[0]])[0]
    assert again == out_plain[0]
    assert _all_free(reuse)


def test_n_samples_share_the_prompt(hf_dir):
    _, path = hf_dir
    engine = _engine(path)
    prompt = _prompts(1, 512, 3, lo=40, hi=41)[0]
    engine.add_request("r", prompt, SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=7, ignore_eos=True))
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            final = out
    assert final.finished and len(final.outputs) == 3
    assert len({tuple(o.token_ids) for o in final.outputs}) > 1  # different seeds per sample
    assert engine.num_prompt_tokens_computed < 3 * len(prompt)


def test_abort_in_the_middle_frees_everything(hf_dir):
    _, path = hf_dir
    engine = _engine(path, max_num_batched_tokens=16)
    for i, p in enumerate(_prompts(4, 512, 4, lo=40, hi=60)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    for _ in range(6):
        engine.step()
    assert engine.scheduler.num_running > 0
    for i in range(4):
        engine.abort(str(i))
    assert not engine.has_unfinished() and not engine.scheduler.has_unfinished()
    assert _all_free(engine)
    assert engine.step() == []


def test_sliding_window_only_model_plans_its_pools(tiny_model_dir):
    # The first layer of the tiny model is SWA: no compressed state at all (zero-byte comp blocks).
    engine = _engine(tiny_model_dir, num_layers=1, cache_bytes=1 << 24)
    assert set(engine.model.cfg.layer_types) == {"swa"}
    assert engine.capacity.max_seqs_at_max_len >= 1
    assert len(_run(engine, [[5, 6, 7]])[0]) == GREEDY.max_tokens
