"""First GPU check of the op path: the engine with Triton kernels (ops_impl="auto") against the
reference model, on the tiny checkpoint (fp32, bf16) and on V4-Flash shapes (dummy weights).

Usage (repo root): python3 scripts/gpu/kernels_check.py [--layers 4] [--out DIR]
Prints, per case: greedy tokens equal (of all), max |prompt logprob difference|, decode ms/step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.config import ModelConfig  # noqa: E402
from flashport.engine.engine import Engine  # noqa: E402
from flashport.model.tiny import write_tiny_checkpoint  # noqa: E402
from flashport.sampling_params import SamplingParams  # noqa: E402


def run(path: str, impl: str, dtype: str, prompts: list[list[int]], max_tokens: int, **kw) -> dict:
    engine = Engine(path, device="cuda", dtype=dtype, progress=False, log=None, ops_impl=impl, **kw)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, prompt_logprobs=0)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done, steps = {}, []
    while engine.has_unfinished():
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = engine.step()
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - t)
        for o in outs:
            if o.finished:
                done[o.request_id] = o
    res = [done[str(i)] for i in range(len(prompts))]
    decode = sorted(steps[-max(1, max_tokens // 2):])
    del engine
    torch.cuda.empty_cache()
    return dict(outs=res, decode_ms=1000 * decode[len(decode) // 2])


def compare(name: str, path: str, dtype: str, prompts: list[list[int]], max_tokens: int, **kw) -> dict:
    ref = run(path, "reference", dtype, prompts, max_tokens, **kw)
    try:
        got = run(path, "auto", dtype, prompts, max_tokens, **kw)
    except Exception as e:  # report and go on: this is the first time these kernels run on a GPU
        return dict(case=name, error=f"{type(e).__name__}: {e}"[:2000])
    equal = total = 0
    first_div = []
    lp = 0.0
    for r, g in zip(ref["outs"], got["outs"]):
        a, b = r.outputs[0].token_ids, g.outputs[0].token_ids
        equal += sum(x == y for x, y in zip(a, b))
        total += len(a)
        first_div.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None))
        for dr, dg in zip(r.prompt_logprobs[1:], g.prompt_logprobs[1:]):
            lp = max(lp, abs(next(iter(dr.values())) - next(iter(dg.values()))))
    return dict(case=name, tokens_equal=f"{equal}/{total}", first_divergence=first_div, max_prompt_logprob_diff=lp,
                decode_ms_reference=round(ref["decode_ms"], 2), decode_ms_kernels=round(got["decode_ms"], 2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)  # layers 0-1 SWA, 2 CSA, 3 HCA
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    results = []
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tiny = Path(d) / "tiny"
        write_tiny_checkpoint(tiny, seed=0)
        prompts = [torch.randint(2, 1000, (n,), generator=g).tolist() for n in (37, 5, 64, 130)]
        for dtype in ("float32", "bfloat16"):
            r = compare(f"tiny {dtype}", str(tiny), dtype, prompts, 16, max_model_len=512, cache_bytes=1 << 28)
            print(r, flush=True)
            results.append(r)
        flash = Path(d) / "flash"
        flash.mkdir()
        (flash / "config.json").write_text(json.dumps(ModelConfig().to_official_dict()))
        prompts = [torch.randint(2, 129280, (n,), generator=g).tolist() for n in (1000, 300, 2000, 64)]
        r = compare(f"V4-Flash {args.layers} layers bf16 dummy", str(flash), "bfloat16", prompts, 12,
                    load_format="dummy", num_layers=args.layers, max_model_len=4096, max_num_seqs=16)
        print(r, flush=True)
        results.append(r)
    Path(args.out, "kernels_check.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
