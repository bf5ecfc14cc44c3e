"""Decode graphs (engine/graphs.py): buckets, the padded fixed-shape decode path equal to the
unpadded one, padding rows that touch no real pool row, and (GPU) graph replay equal to eager."""

from __future__ import annotations

import pytest
import torch

from flashport.engine.engine import Engine
from flashport.engine.graphs import (DecodeGraphs, batch_buckets, is_decode_step, pick, profile_decode_bytes,
                                     width_buckets)
from flashport.engine.paged_rows import PaddedShape, PagedRowsCache
from flashport.engine.plan import ScheduledSeq, SchedulerOutput
from flashport.sampling_params import SamplingParams


def test_buckets():
    assert batch_buckets(256) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert batch_buckets(50) == (1, 2, 4, 8, 16, 24, 32, 48, 50)
    assert batch_buckets(1) == (1,)
    assert batch_buckets(300)[-3:] == (192, 256, 300)
    assert batch_buckets(10, (8, 4, 4)) == (4, 8, 10)
    assert width_buckets(64) == (16, 32, 64)
    assert width_buckets(65) == (16, 32, 64, 65)
    assert width_buckets(3) == (3,)
    assert [pick(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    with pytest.raises(ValueError, match="max_num_seqs"):
        batch_buckets(0)
    with pytest.raises(ValueError, match="batch sizes"):
        batch_buckets(8, (0, 2))


def _seq(rid: str, n: int, **kw) -> ScheduledSeq:
    args = dict(request_id=rid, state_slot=0, token_ids=(1,) * n, start_pos=10, comp_blocks=(0, 1),
                window_blocks=(0, 1), reset_state=False, sample=True)
    args.update(kw)
    return ScheduledSeq(**args)


def test_is_decode_step():
    plan = lambda *s: SchedulerOutput(tuple(s), sum(len(x.token_ids) for x in s))  # noqa: E731
    assert is_decode_step(plan(_seq("a", 1), _seq("b", 1)))
    assert not is_decode_step(plan(_seq("a", 1), _seq("b", 2)))
    assert not is_decode_step(plan(_seq("a", 1, sample=False)))
    assert not is_decode_step(plan(_seq("a", 1, want_prompt_logprobs=True)))
    assert not is_decode_step(plan())


def _engine(path, **kw) -> Engine:
    args = dict(device="cpu", dtype="float32", progress=False, log=None, max_model_len=256, max_num_seqs=8,
                ops_impl="torch", max_num_batched_tokens=64)
    args.update(kw)
    return Engine(path, **args)


def _padded(engine: Engine) -> DecodeGraphs:
    g = DecodeGraphs(engine.model, engine.pools, max_num_seqs=engine.sched_config.max_num_seqs,
                     max_model_len=engine.sched_config.max_model_len, capture=False)
    engine.runner.graphs = g
    return g


def _prompts(n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(2, 1024, (k,), generator=g).tolist() for k in lens]


def _drive(engine: Engine, graphs: bool) -> tuple[dict[str, list[int]], list[torch.Tensor], list[tuple]]:
    """A fixed scenario: requests join at set steps, finish at different lengths (joining and
    leaving), contexts cross block boundaries (B = 8) and the 16-block width bucket (128 tokens)."""
    if graphs:
        _padded(engine)
    logits_seen, shapes = [], []
    runner = engine.runner
    sample = runner._launch_sampling

    def spy(plan, sampling, logits):
        logits_seen.append(logits.detach().clone())
        shapes.append(runner.graphs.shape_for(plan) if runner.graphs is not None else None)
        return sample(plan, sampling, logits)

    runner._launch_sampling = spy
    prompts = _prompts(7, 3, 5, 60) + [_prompts(1, 4, 118, 119)[0]]  # the last one crosses 128 tokens
    joins = {0: [0, 1, 2], 3: [3, 7], 9: [4, 5], 15: [6]}
    done: dict[str, list[int]] = {}
    step = 0
    while step in joins or engine.has_unfinished() or step <= max(joins):
        for i in joins.get(step, []):
            engine.add_request(str(i), prompts[i], SamplingParams(max_tokens=6 + 3 * i, temperature=0,
                                                                  ignore_eos=True))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    return done, logits_seen, shapes


def test_padded_decode_equals_unpadded(tiny_model_dir):
    eager_tokens, eager_logits, _ = _drive(_engine(tiny_model_dir), graphs=False)
    pad_tokens, pad_logits, shapes = _drive(_engine(tiny_model_dir), graphs=True)
    assert pad_tokens == eager_tokens
    assert len(pad_logits) == len(eager_logits)
    used = {s for s in shapes if s is not None}
    # Padded rows (3 of 4, 5 of 8, ...) and both width buckets (16 and 32 blocks) were exercised.
    assert any(s.width == 32 for s in used) and any(s.width == 16 for s in used), used
    assert any(s.rows == 8 for s in used) and any(s.rows == 4 for s in used), used
    for a, b in zip(pad_logits, eager_logits):
        assert a.shape == b.shape
        # Not bit-exact: a CPU fp32 matmul's summation order depends on its row count (measured
        # differences ~5e-6 on logits ~1e-2..1); the greedy tokens above are exact.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def _pool_tensors(pools) -> dict[str, torch.Tensor]:
    out = {"window": pools.window, "csa_entries": pools.csa_entries, "index_keys": pools.index_keys,
           "hca_entries": pools.hca_entries}
    for name in ("boundary", "slot_overlap"):
        for k, t in zip(("kv", "gate", "index_kv", "index_gate"), getattr(pools, name)):
            out[f"{name}.{k}"] = t
    for name in ("csa_pending", "index_pending", "hca_pending"):
        for k, t in enumerate(getattr(pools, name)):
            out[f"{name}.{k}"] = t
    return out


def _scrub(pools, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies with the scratch window block and scratch slot zeroed (padding may write them)."""
    B = pools.cache_cfg.block_size
    out = {}
    for name, t in tensors.items():
        t = t.clone()
        if name == "window":
            t[:, pools.scratch_window_block * B: (pools.scratch_window_block + 1) * B] = 0
        elif name.startswith(("slot_overlap", "csa_pending", "index_pending", "hca_pending")):
            t[:, pools.scratch_slot] = 0
        out[name] = t
    return out


def test_padding_rows_touch_no_real_pool_row(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    for i, p in enumerate(_prompts(3, 7, 20, 40)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    while engine.scheduler.num_running < 3 or engine.num_prompt_tokens_computed < sum(
            len(p) for p in _prompts(3, 7, 20, 40)):
        engine.step()
    pools = engine.pools
    g = _padded(engine)
    for _ in range(12):  # several decode steps, crossing CSA / HCA closes and a block boundary
        plan = engine.scheduler.schedule()
        shape = g.shape_for(plan)
        assert shape is not None and shape.rows == 4 and len(plan.seqs) == 3
        start = {k: t.clone() for k, t in _pool_tensors(pools).items()}
        g.execute(plan, shape)
        padded_after = _scrub(pools, _pool_tensors(pools))
        for k, t in _pool_tensors(pools).items():  # back to the start, then the unpadded step
            t.copy_(start[k])
        engine.runner.graphs = None
        result = engine.runner.execute(plan, {s.request_id: engine._seqs[s.request_id].sampling for s in plan.seqs})
        engine.runner.graphs = g
        eager_after = _scrub(pools, _pool_tensors(pools))
        before = _scrub(pools, start)
        for k in eager_after:
            # Outside the scratch, the padded step changed only what the unpadded step changed ...
            stray = (padded_after[k] != before[k]) & (eager_after[k] == before[k])
            assert not stray.any(), f"{k}: padding wrote {int(stray.sum())} values of real rows"
            # ... and to the same values (up to the row-count-dependent fp32 rounding, see above).
            torch.testing.assert_close(padded_after[k], eager_after[k], rtol=1e-4, atol=2e-5, msg=k)
        engine.scheduler.update(plan, result)


def test_padded_cache_rejects_a_prefill(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    with pytest.raises(ValueError, match="decode only"):
        PagedRowsCache(engine.pools, [_seq("a", 2)], True, PaddedShape(4, 16))
    with pytest.raises(ValueError, match="rows"):
        PagedRowsCache(engine.pools, [_seq("a", 1), _seq("b", 1)], True, PaddedShape(1, 16))
    with pytest.raises(ValueError, match="width"):
        PagedRowsCache(engine.pools, [_seq("a", 1, comp_blocks=(0,) * 17, window_blocks=(0,) * 17)], True,
                       PaddedShape(1, 16))


def test_no_graphs_on_cpu_or_reference(tiny_model_dir):
    e = _engine(tiny_model_dir)
    assert e.runner.graphs is None
    # The memory profile of the largest bucket runs (on throwaway pools) and measures 0 off a GPU.
    assert profile_decode_bytes(e.model, e.cache_config.block_size, 8, 256) == 0
    with pytest.raises(ValueError, match="graph capture needs"):
        e = _engine(tiny_model_dir)
        DecodeGraphs(e.model, e.pools, max_num_seqs=8, max_model_len=256, capture=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_equals_eager_on_gpu(tiny_model_dir, dtype):
    prompts = _prompts(6, 11, 5, 70)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = []
    for eager in (True, False):
        e = Engine(tiny_model_dir, device="cuda", dtype=dtype, progress=False, log=None, max_model_len=256,
                   max_num_seqs=8, enforce_eager=eager, cache_bytes=64 * 2**20)
        assert (e.runner.graphs is None) == eager
        for i, p in enumerate(prompts):
            e.add_request(str(i), p, params)
        done = {}
        while e.has_unfinished():
            for out in e.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        outs.append(done)
        if not eager:
            assert e.runner.graphs._buckets and all(b.graph is not None for b in e.runner.graphs._buckets.values())
    assert outs[0] == outs[1]
