"""kv_cache_dtype="fp8" against the model dtype: the same engine, same prompts, greedy.

Compressed entries and indexer keys stored as E4M3 (no scale, saturating) versus bf16 / fp32.
Reported per case: greedy tokens equal (of all), first divergence per prompt, max and mean
|difference| of the prompt tokens' log-probabilities (the logits' differences up to the per-row
shift that log-softmax removes), pool bytes per token of both.

Cases: the tiny checkpoint (fp32 and bf16; on a CPU fp32 only) and, on a GPU, V4-Flash shapes with
dummy FP8/FP4 weights and --layers layers (prompts of 1-3K tokens, so that CSA / HCA entries carry
weight).

Usage (repo root): python3 scripts/gpu/kv_fp8_accuracy.py [--layers 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.config import ModelConfig  # noqa: E402
from flashport.engine.engine import Engine  # noqa: E402
from flashport.engine.pools import pool_bytes  # noqa: E402
from flashport.model.tiny import write_tiny_checkpoint  # noqa: E402
from flashport.sampling_params import SamplingParams  # noqa: E402


def run(path: str, kv: str, prompts: list[list[int]], max_tokens: int, **kw) -> tuple[list, dict]:
    """-> the finished outputs and (model dtype, entry dtype, compressed bytes per token); the engine
    and its pools are freed before returning (the next engine sizes its pools from free memory)."""
    engine = Engine(path, progress=False, log=None, kv_cache_dtype=kv, **kw)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, prompt_logprobs=0)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    cfg, B, p = engine.model.cfg, engine.cache_config.block_size, engine.pools
    info = dict(dtype=str(engine.model.dtype), entry_dtype=str(p.entry_dtype),
                comp_bytes_per_token=pool_bytes(cfg, B, engine.model.dtype, p.entry_dtype).comp_block / B)
    del engine, p
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [done[str(i)] for i in range(len(prompts))], info


def compare(name: str, path: str, prompts: list[list[int]], max_tokens: int, **kw) -> dict:
    ref, e_ref = run(path, "auto", prompts, max_tokens, **kw)
    got, e_fp8 = run(path, "fp8", prompts, max_tokens, **kw)
    equal = total = 0
    first_div, diffs = [], []
    for r, g in zip(ref, got):
        a, b = r.outputs[0].token_ids, g.outputs[0].token_ids
        equal += sum(x == y for x, y in zip(a, b))
        total += len(a)
        first_div.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None))
        for dr, dg in zip(r.prompt_logprobs[1:], g.prompt_logprobs[1:]):
            diffs.append(abs(next(iter(dr.values())) - next(iter(dg.values()))))
    res = dict(case=name, dtype=e_ref["dtype"], fp8=e_fp8["entry_dtype"],
               tokens_equal=f"{equal}/{total}", first_divergence=first_div,
               max_prompt_logprob_diff=max(diffs), mean_prompt_logprob_diff=sum(diffs) / len(diffs),
               comp_bytes_per_token=dict(auto=e_ref["comp_bytes_per_token"], fp8=e_fp8["comp_bytes_per_token"]))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)  # V4-Flash layers 0-1 SWA, 2 CSA, 3 HCA
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    results = []
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tiny = Path(d) / "tiny"
        write_tiny_checkpoint(tiny, seed=0)
        prompts = [torch.randint(2, 1000, (n,), generator=g).tolist() for n in (37, 5, 64, 300)]
        for dtype in ("float32", "bfloat16") if gpu else ("float32",):
            r = compare(f"tiny {dtype}", str(tiny), prompts, 16, dtype=dtype, max_model_len=512, cache_bytes=1 << 28)
            print(json.dumps(r), flush=True)
            results.append(r)
        if gpu:
            flash = Path(d) / "flash"
            flash.mkdir()
            (flash / "config.json").write_text(json.dumps(ModelConfig().to_official_dict()))
            prompts = [torch.randint(2, 129280, (n,), generator=g).tolist() for n in (1000, 3000, 2000, 64)]
            r = compare(f"V4-Flash {args.layers} layers dummy", str(flash), prompts, 12, dtype="bfloat16",
                        load_format="dummy", num_layers=args.layers, max_model_len=4096, max_num_seqs=16,
                        gpu_memory_utilization=0.5)
            print(json.dumps(r), flush=True)
            results.append(r)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "kv_fp8_accuracy.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
