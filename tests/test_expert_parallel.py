"""Expert parallelism on gloo ranks (CPU processes): the MoE layer and the engine against one process.

Each multi-rank check runs its ranks as spawned processes (`_spawn`), with a deadline so that a
failure never hangs the suite.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from flashport.distributed import ExpertShard

DEADLINE_S = 150.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world: int, port: int, args: tuple, queue) -> None:
    # torchrun's environment, so that flashport.distributed joins as under torchrun
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), FLASHPORT_EP_TIMEOUT_S="60")
    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise


def _spawn(fn, world: int, *args) -> dict[int, object]:
    """Run fn(rank, world, *args) on `world` processes; -> {rank: result} of the ranks that returned."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = time.monotonic() + DEADLINE_S
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        while not queue.empty():
            rank, status, value = queue.get()
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {DEADLINE_S} s"
        codes = [p.exitcode for p in procs]
        assert all(c == 0 for c in codes), f"exit codes {codes}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return results


# ---------------------------------------------------------------------------- shards
def test_expert_ranges_cover_every_expert_once_uneven_first():
    for E, W in [(8, 3), (256, 8), (8, 8), (6, 4), (10, 4)]:
        shards = [ExpertShard(r, W, E) for r in range(W)]
        ids = [e for s in shards for e in s.local]
        assert ids == list(range(E))
        sizes = [s.num_local for s in shards]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert all(shards[0].owner(e) == r for r, s in enumerate(shards) for e in s.local)
    from flashport.errors import FlashportError

    with pytest.raises(FlashportError, match="n_routed_experts"):
        ExpertShard(0, 9, 8)


def test_a_rank_reads_only_its_experts(tiny_model_dir):
    from flashport.distributed import ExpertParallelMoE
    from flashport.model.deepseek_v4 import DeepseekV4
    from flashport.model.loader import load_checkpoint, load_model

    full, cfg = load_model(tiny_model_dir, device="cpu", dtype=torch.float32, progress=False)
    hook = ExpertParallelMoE(ExpertShard(1, 3, cfg.n_routed_experts))  # experts 3, 4, 5
    part = DeepseekV4(cfg, torch.float32, device="cpu", moe_hook=hook)
    report = load_checkpoint(part, tiny_model_dir, cfg, progress=False, expert_range=hook.shard.local)
    # w1, w2, w3 and their scales of the 5 other experts in each of the 6 layers
    assert report.skipped_other_ranks == 6 * 5 * 3 * 2
    mine = dict(part.named_parameters())
    for name, p in full.named_parameters():
        want = p[3:6] if ".ffn.experts." in name else p
        assert torch.equal(mine[name], want), name


# ---------------------------------------------------------------------------- the MoE layer
def _moe_cfg(expert_dtype):
    from flashport.config import HASH_MOE, TOPK_MOE
    from flashport.model.tiny import tiny_config

    cfg = tiny_config()
    return dataclasses.replace(cfg, hidden_size=64, moe_intermediate_size=64, n_routed_experts=8,
                               num_experts_per_tok=3, mlp_layer_types=(TOPK_MOE, HASH_MOE) + cfg.mlp_layer_types[2:],
                               expert_dtype=expert_dtype, fp8_block_size=None)


def _fill(moe, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in moe.named_parameters():
        if p.dtype == torch.int64:  # hash table: k distinct experts per token id
            p.data.copy_(torch.rand(p.shape[0], 8, generator=g).topk(p.shape[1], dim=-1).indices)
        elif p.dtype == torch.uint8 and name.endswith("scale"):
            p.data.copy_(torch.randint(121, 124, p.shape, generator=g, dtype=torch.uint8))
        elif p.dtype == torch.uint8:
            p.data.copy_(torch.randint(0, 256, p.shape, generator=g, dtype=torch.uint8))
        else:
            p.data.copy_((torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5).to(p.dtype))


def _moe_pair(cfg, layer, dtype, hook):
    """A one-process MoE and this rank's expert-parallel MoE holding the same weights."""
    from flashport.model.moe import MoE

    full = MoE(cfg, layer, dtype, torch.float8_e4m3fn)
    _fill(full, 1)
    ep = MoE(cfg, layer, dtype, torch.float8_e4m3fn, ep=hook)
    lo, hi = hook.shard.local.start, hook.shard.local.stop
    for (name, p), (_, q) in zip(full.named_parameters(), ep.named_parameters()):
        q.data.copy_(p.data[lo:hi] if name.startswith("experts.") else p.data)
    return full, ep


def _moe_rank(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from flashport.distributed import ExpertParallelMoE

    dist.init_process_group("gloo", rank=rank, world_size=world)
    out: dict = {}
    g = torch.Generator().manual_seed(7)
    x32 = torch.randn(9, 64, generator=g)
    tokens = torch.randint(0, 1024, (9,), generator=g)
    for fmt in (None, "fp4"):
        cfg = _moe_cfg(fmt)
        for dtype in (torch.float32, torch.bfloat16):
            for combine in ("pairs", "sum"):
                hook = ExpertParallelMoE(ExpertShard(rank, world, 8), combine=combine, check_routing=True)
                for layer in (0, 1):  # top-k, hash
                    full, ep = _moe_pair(cfg, layer, dtype, hook)
                    x = x32.to(dtype)
                    # (the Triton interpreter is slow: the fused path once; its EP part is format-blind)
                    fused = fmt is None and dtype == torch.float32 and combine == "pairs" and layer == 0
                    impls = ("reference", "torch") + (("triton",) if fused else ())
                    for impl in impls:
                        ref = full(x, tokens, impl)
                        got = ep(x, tokens, impl)
                        key = f"{fmt}/{dtype}/{combine}/layer{layer}/{impl}"
                        out[key] = (torch.equal(ref, got), (ref.float() - got.float()).abs().max().item())
    # A rank with no pairs: the hash table sends every token to experts 0-2 (rank 0's).
    cfg = _moe_cfg(None)
    hook = ExpertParallelMoE(ExpertShard(rank, world, 8))
    full, ep = _moe_pair(cfg, 1, torch.float32, hook)
    for m in (full, ep):
        m.gate.tid2eid.data.copy_(torch.tensor([0, 1, 2]).expand(1024, 3))
    out["no_pairs"] = torch.equal(full(x32, tokens, "torch"), ep(x32, tokens, "torch"))
    # All-to-all: each rank its own tokens (rank 1 none); one process runs them back to back.
    counts = [5, 0, 3, 4][:world]
    xs = torch.randn(sum(counts), 64, generator=g)
    ts = torch.randint(0, 1024, (sum(counts),), generator=g)
    start = sum(counts[:rank])
    mine = slice(start, start + counts[rank])
    for layer in (0, 1):
        full, ep = _moe_pair(cfg, layer, torch.float32, hook)
        w, e = full.gate(xs, ts)  # the routing of the whole batch (a GEMM's rounding depends on its rows)
        ref = full._routed(xs, w, e)[mine]
        got = hook.routed_all_to_all(xs[mine], w[mine], e[mine], ep.experts.w13, ep.experts.w2, ep.limit, "torch")
        out[f"all_to_all/layer{layer}"] = (torch.equal(ref, got), (ref - got).abs().max().item() if len(got) else 0)
    dist.destroy_process_group()
    return out


def test_moe_layer_on_3_uneven_ranks_matches_one_process():
    results = _spawn(_moe_rank, 3)
    assert sorted(results) == [0, 1, 2]
    for rank, out in results.items():
        for key, value in out.items():
            if "/sum/" in key and "float32" in key:
                assert value[1] < 1e-6, (rank, key, value)  # fp32 partials added in another order
            elif "/sum/" in key:
                assert value[1] < 0.02, (rank, key, value)  # bf16: at most an ulp here and there
            elif isinstance(value, tuple):
                assert value[0], (rank, key, value)  # "pairs": bit-identical, fp32 and bf16
            else:
                assert value, (rank, key)


# ---------------------------------------------------------------------------- the engine
GREEDY = dict(max_tokens=8, temperature=0.0, ignore_eos=True)


def _engine_rank(rank: int, world: int, model_dir: str, prompts: list, engine_args: dict,
                 env: dict | None = None) -> list | None:
    from flashport import LLM, SamplingParams

    os.environ.update(env or {})

    # Ranks > 0 become workers inside LLM(...) and exit there when rank 0 closes the group.
    llm = LLM(model=model_dir, progress=False, expert_parallel_size=world, **engine_args)
    outs = llm.generate(prompts, SamplingParams(**GREEDY))
    second = llm.generate(prompts[:1], SamplingParams(**GREEDY))  # the workers idle between calls
    group = llm.engine.parallel
    group.close()
    placed = group.front.placed if group.front is not None else None
    return [o.outputs[0].token_ids for o in outs] + [second[0].outputs[0].token_ids], placed


def _one_process(model_dir: str, prompts: list, engine_args: dict) -> list:
    from flashport import LLM, SamplingParams

    llm = LLM(model=model_dir, progress=False, **engine_args)
    outs = llm.generate(prompts, SamplingParams(**GREEDY))
    return [o.outputs[0].token_ids for o in outs] + [outs[0].outputs[0].token_ids]


ENGINE_ARGS = dict(device="cpu", dtype="float32", max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def six_expert_dir(tmp_path_factory):
    """The tiny model with 6 routed experts: 4 ranks hold 2, 2, 1, 1."""
    from flashport.model.tiny import random_weights, tiny_config, write_official_checkpoint

    cfg = dataclasses.replace(tiny_config(), n_routed_experts=6)
    return write_official_checkpoint(tmp_path_factory.mktemp("six") / "m", cfg, random_weights(cfg, 3))


def test_engine_on_4_uneven_ranks_reference_path(six_expert_dir):
    prompts = [[5, 9, 200, 31, 7, 77, 12, 600, 3], [44, 2, 901], list(range(100, 130))]
    args = dict(ENGINE_ARGS, ops_impl="reference")
    want = _one_process(str(six_expert_dir), prompts, args)
    got = _spawn(_engine_rank, 4, str(six_expert_dir), prompts, args)
    assert got[0] == (want, None)


def test_engine_with_data_parallel_attention_on_2_ranks(tiny_model_dir):
    # Each rank runs its own requests (rank 0 places them: 0, 1, 0); the MoE dispatches by
    # all-to-all; in the second call rank 1 has no requests and joins every step with no tokens.
    prompts = ["The sea is calm tonight.", "A second, somewhat longer prompt about rivers and boats.", "Hi"]
    want = _one_process(str(tiny_model_dir), prompts, ENGINE_ARGS)
    got = _spawn(_engine_rank, 2, str(tiny_model_dir), prompts, ENGINE_ARGS, {"FLASHPORT_EP_ATTENTION": "data"})
    assert got[0] == (want, [3, 1])  # requests per rank


# ---------------------------------------------------------------------------- one host: spawn, dead rank
_DRIVER = textwrap.dedent("""
    import json, sys, time
    from flashport import LLM, SamplingParams
    model_dir, prompts, want = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(model=model_dir, device="cpu", dtype="float32", max_num_batched_tokens=16, progress=False,
              expert_parallel_size=2)
    p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
    time.sleep(0.5)  # the worker idles between calls
    got.append(llm.generate(prompts[:1], p)[0].outputs[0].token_ids)
    print("SAME" if got == want else f"DIFFERENT {got}", flush=True)
    (worker,) = llm.engine.parallel.workers
    worker.kill()
    time.sleep(0.5)
    llm.generate(prompts[:1], p)
    print("NOT STOPPED", flush=True)
""")


def test_engine_on_2_spawned_ranks_gives_the_one_process_output_and_a_dead_rank_stops_it(tiny_model_dir):
    # One host: rank 0 here spawns rank 1 (`python -m flashport.distributed.launch`); the op path (torch twins).
    prompts = ["The sea is calm tonight.", "A second, somewhat longer prompt about rivers and boats."]
    want = _one_process(str(tiny_model_dir), prompts, ENGINE_ARGS)
    env = dict(os.environ, FLASHPORT_EP_TIMEOUT_S="30", FLASHPORT_EP_EXIT_GRACE_S="10")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(tiny_model_dir), json.dumps(prompts), json.dumps(want)],
                          capture_output=True, text=True, timeout=DEADLINE_S, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert "SAME" in proc.stdout, proc.stdout + proc.stderr
    assert "NOT STOPPED" not in proc.stdout
    assert proc.returncode != 0
    assert "expert parallel rank 1" in proc.stderr and "killed by signal 9" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < DEADLINE_S
