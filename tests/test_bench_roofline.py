"""The roofline model of a V4 step against the hand counts of spec §11 and docs/perf/engine-baseline.md."""

import pytest

from flashport.bench.roofline import (SeqWork, decode_ops, expected_distinct_experts, floor, prefill_ops, step_floor,
                                      step_ops, totals)
from flashport.config import ModelConfig

CFG = ModelConfig()  # the real V4-Flash config


def _op(ops, name):
    return next(o for o in ops if o.name == name)


def test_batch1_hand_counts():
    ops = decode_ops(CFG, batch=1, context=4096)
    t = totals(ops)
    assert t["weight_flops"] == pytest.approx(26.5e9, rel=0.01)  # 2 x weights touched
    assert t["weight_bytes"] == pytest.approx(11.2e9, rel=0.01)  # FP8 dense + FP4 experts + bf16 + fp32 HC
    # the parts the spec lists
    assert _op(ops, "experts").weight_bytes == pytest.approx(3.45e9, rel=0.01)
    assert _op(ops, "head").weight_bytes == pytest.approx(1.06e9, rel=0.01)
    assert _op(ops, "mhc").weight_bytes == pytest.approx(0.135e9, rel=0.02)
    fp8_dense = _op(ops, "attn_proj").weight_bytes + _op(ops, "shared_expert").weight_bytes
    assert fp8_dense == pytest.approx(5.7e9, rel=0.02)
    # per layer parameter counts: attention 107.0 M, 6 experts 151 M, shared 25.2 M, router 1.05 M
    assert _op(ops, "attn_proj").flops / 2 / 43 == pytest.approx(107.0e6, rel=0.005)
    assert _op(ops, "experts").flops / 2 / 43 == pytest.approx(151e6, rel=0.005)
    assert _op(ops, "shared_expert").flops / 2 / 43 == pytest.approx(25.2e6, rel=0.005)
    assert _op(ops, "router").flops / 2 / 43 == pytest.approx(1.05e6, rel=0.005)
    # bf16-dequantized: ~13.8 B parameters x 2 = 27.6 GB; the spec's count includes the embedding table,
    # which a step only gathers rows from (so the roofline reads one row per token)
    bf16 = totals(decode_ops(CFG, 1, 4096, weights="bf16"))["weight_bytes"]
    assert bf16 + 2 * CFG.vocab_size * CFG.hidden_size == pytest.approx(27.6e9, rel=0.01)


@pytest.mark.parametrize("context, gflop", [(4096, 2.6), (32768, 5.6)])
def test_attention_and_indexer_flops(context, gflop):
    t = totals(decode_ops(CFG, 1, context))
    assert t["state_flops"] == pytest.approx(gflop * 1e9, rel=0.02)


def test_state_bytes():
    L = 1 << 20
    ops = decode_ops(CFG, 1, L)
    # indexer keys 1,344 * L bytes; window 5.6 MB + CSA selected 11 MB + HCA 160 * L (+ the new rows)
    assert _op(ops, "indexer").other_bytes == pytest.approx(1344 * L, rel=0.001)
    att = _op(ops, "attention").other_bytes
    assert att == pytest.approx(5.6e6 + 11e6 + 160 * L, rel=0.01)


def test_expert_coverage_and_floors():
    assert expected_distinct_experts(256, 6, 1) == pytest.approx(6.0)
    assert expected_distinct_experts(256, 6, 64) == pytest.approx(199, abs=1)  # anchors: ~199 at B = 64
    assert expected_distinct_experts(256, 6, 10**6) == pytest.approx(256)
    # batch 1: memory-bound, about 2.3 ms on the H200 datasheet (spec §11)
    f = step_floor(CFG, [SeqWork(1, 4096)], 4.8, 989)
    assert f.bound == "memory" and f.floor_s == pytest.approx(2.34e-3, rel=0.01)
    # docs/perf/engine-baseline.md: 20 layers, batch 64, 8K context, 4.2 TB/s: 57.6 GB of weights, ~14.0 ms
    sub = CFG.with_num_layers(20)
    ops = decode_ops(sub, 64, 8192)
    assert totals(ops)["weight_bytes"] == pytest.approx(57.6e9, rel=0.01)
    assert step_floor(sub, [SeqWork(1, 8192)] * 64, 4.2, 740).floor_s == pytest.approx(14.0e-3, rel=0.02)
    # a 4K prefill is compute-bound
    pre = floor(prefill_ops(CFG, 1, 4096), 4.8, 989)
    assert pre.bound == "compute"
    assert pre.flops == pytest.approx(4096 * 26.5e9, rel=0.06)
    # 8 GPUs: bytes split 8 ways, plus collectives
    one = step_floor(CFG, [SeqWork(1, 8192)] * 64, 4.8, 989)
    eight = step_floor(CFG, [SeqWork(1, 8192)] * 64, 4.8, 989, num_gpus=8, link_gb_s=450)
    assert eight.mem_s == pytest.approx(one.mem_s / 8)
    assert eight.comm_s > 0 and eight.floor_s == pytest.approx(eight.mem_s + eight.comm_s)
    with pytest.raises(ValueError, match="link"):
        step_floor(CFG, [SeqWork(1, 10)], 4.8, 989, num_gpus=8)


def test_mixed_step_and_bad_input():
    mixed = step_ops(CFG.with_num_layers(4), [SeqWork(1, 1000), SeqWork(512, 2048)])
    t = totals(mixed)
    assert t["weight_flops"] > 0 and t["other_bytes"] > 0
    with pytest.raises(ValueError):
        SeqWork(0, 5)
    with pytest.raises(ValueError):
        step_ops(CFG, [SeqWork(1, 1)], weights="fp16")
