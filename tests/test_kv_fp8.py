"""kv_cache_dtype="fp8": compressed entries and indexer keys stored as E4M3 in the pools."""

from __future__ import annotations

import pytest
import torch

from flashport.engine.engine import Engine
from flashport.engine.pools import pool_bytes
from flashport.errors import FlashportError
from flashport.model.quant import to_fp8_storage
from flashport.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=0)


def _engine(path, **kw) -> Engine:
    args = dict(device="cpu", dtype="float32", progress=False, log=None, max_model_len=512, ops_impl="torch")
    args.update(kw)
    return Engine(path, **args)


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams = PARAMS) -> list:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[str(i)] for i in range(len(prompts))]


def _prompts(seed: int, lens: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 1000, (n,), generator=g).tolist() for n in lens]


def _prompt_lp(out) -> list[float]:
    return [next(iter(d.values())) for d in out.prompt_logprobs[1:]]


def test_fp8_pools_hold_the_cast_entries_in_half_the_bytes(tiny_model_dir):
    prompts = _prompts(0, (200, 37, 130))
    ref = _engine(tiny_model_dir)
    fp8 = _engine(tiny_model_dir, kv_cache_dtype="fp8")
    assert fp8.pools.csa_entries.dtype == fp8.pools.index_keys.dtype == torch.float8_e4m3fn
    assert fp8.pools.window.dtype == torch.float32  # window rows stay in the model dtype
    cfg, B = ref.model.cfg, ref.cache_config.block_size
    b32, b8 = pool_bytes(cfg, B, torch.float32), pool_bytes(cfg, B, torch.float32, torch.float8_e4m3fn)
    assert b8.comp_block < b32.comp_block and b8.window_block == b32.window_block
    assert fp8.cache_config.num_comp_blocks > ref.cache_config.num_comp_blocks  # same budget, more blocks
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    _run(ref, prompts, one), _run(fp8, prompts, one)
    # The first compressed layer sees the same inputs in both runs (prompts only: the sampled
    # tokens may differ): its FP8 entries and indexer keys are the model-dtype ones cast (both
    # engines place blocks alike).
    first = cfg.layer_types.index("csa")
    i = ref.pools.csa_index[first]
    for name in ("csa_entries", "index_keys"):
        want = getattr(ref.pools, name)[i]
        got = getattr(fp8.pools, name)[i][: want.shape[0]]
        assert want.abs().sum() > 0
        assert torch.equal(got.view(torch.uint8), to_fp8_storage(want, torch.float8_e4m3fn).view(torch.uint8)), name
    # Later layers carry the rounding on. Measured on this random tiny model: mean |prompt
    # log-prob difference| 0.07-0.18 per prompt, max 1.8 (docs/perf/kv-fp8.md).
    a, b = _run(_engine(tiny_model_dir), prompts), _run(_engine(tiny_model_dir, kv_cache_dtype="fp8"), prompts)
    diffs = torch.tensor([abs(x - y) for ra, rb in zip(a, b) for x, y in zip(_prompt_lp(ra), _prompt_lp(rb))])
    assert 0 < diffs.mean() < 0.3, diffs.mean()


def test_fp8_prefix_reuse_and_chunking_give_the_same_tokens(tiny_model_dir):
    shared = _prompts(2, (260,))[0]
    prompts = [shared + [5, 6, 7], shared + [9]]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)  # prompt log-probs would skip the cache
    one_by_one = [_run(_engine(tiny_model_dir, kv_cache_dtype="fp8", enable_prefix_caching=False), [p], greedy)[0]
                  for p in prompts]
    engine = _engine(tiny_model_dir, kv_cache_dtype="fp8", max_num_batched_tokens=48)
    _run(engine, [shared], greedy)
    before = engine.num_prompt_tokens_computed
    reused = _run(engine, prompts, greedy)
    assert engine.num_prompt_tokens_computed - before < len(prompts[0])  # the shared blocks were reused
    assert [o.outputs[0].token_ids for o in reused] == [o.outputs[0].token_ids for o in one_by_one]


def test_fp8_needs_the_op_path_and_a_known_name(tiny_model_dir):
    with pytest.raises(FlashportError, match="op path"):
        _engine(tiny_model_dir, kv_cache_dtype="fp8", ops_impl="reference")
    with pytest.raises(FlashportError, match="kv_cache_dtype 'int4'"):
        _engine(tiny_model_dir, kv_cache_dtype="int4")
