"""GPU check of the foundation (issue 2), in one run on the lent GPU:

A. parity with transformers 5.24 on CUDA, bf16 (and fp32), the three tiny test configs: logits of
   a 61-token prompt and 32 greedy tokens;
B. V4-Flash shapes, dummy FP8/FP4 weights, first N layers: load time, memory, prefill and decode
   throughput through `LLM` (torch reference path).

Usage (repo root): python3 scripts/gpu/foundation.py [--layers 4] [--out DIR]
Prints a summary table last; writes foundation.json to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flashport.config import ModelConfig  # noqa: E402
from flashport.platform import detect_platform  # noqa: E402


def parity(results: dict) -> None:
    import transformers
    from hf_oracle import CONFIGS, make_hf_model

    from flashport.model.loader import load_model

    results["transformers"] = transformers.__version__
    for i, name in enumerate(CONFIGS):
        with tempfile.TemporaryDirectory() as d:
            make_hf_model(name, seed=i).save_pretrained(d)
            g = torch.Generator().manual_seed(11)
            for dtype in (torch.bfloat16, torch.float32):
                hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).cuda().eval()
                ours, cfg = load_model(d, device="cuda", dtype=dtype, progress=False)
                p = torch.randint(2, cfg.vocab_size, (61,), generator=g).cuda()
                with torch.no_grad():
                    ref = hf(p[None], use_cache=False).logits[0].float()
                    gen = hf.generate(p[None], max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 61:]
                got = ours(p, [61], [ours.new_state()]).float()
                st = [ours.new_state()]
                lg = ours(p, [61], st, torch.tensor([60], device="cuda"))
                toks = []
                for _ in range(32):
                    t = lg[0].argmax()
                    toks.append(int(t))
                    lg = ours(t.view(1), [1], st)
                agree = sum(a == b for a, b in zip(toks, gen.tolist()))
                first_diff = next((k for k, (a, b) in enumerate(zip(toks, gen.tolist())) if a != b), None)
                row = dict(config=name, dtype=str(dtype).split(".")[-1],
                           max_abs=float((got - ref).abs().max()), ref_max=float(ref.abs().max()),
                           rel=float((got - ref).abs().max() / ref.abs().max()),
                           bit_equal_frac=float((got == ref).float().mean()),
                           greedy_agree=f"{agree}/32", first_divergence=first_diff)
                results.setdefault("parity", []).append(row)
                print("parity", row, flush=True)
                del hf, ours
                torch.cuda.empty_cache()


def flash_shapes(results: dict, layers: int) -> None:
    from flashport import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(ModelConfig().to_official_dict()))
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        llm = LLM(model=d, device="cuda", dtype="bfloat16", load_format="dummy", num_layers=layers, progress=False)
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        weights_gib = torch.cuda.memory_allocated() / 2**30
        out: dict = dict(layers=layers, load_s=round(load_s, 2), weights_gib=round(weights_gib, 2))
        g = torch.Generator().manual_seed(0)

        def run(batch: int, prompt_len: int, new: int) -> dict:
            prompts = [torch.randint(2, 129280, (prompt_len,), generator=g).tolist() for _ in range(batch)]
            prefill = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
            params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
            llm.generate(prompts[:1], prefill)  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            llm.generate(prompts, prefill)
            torch.cuda.synchronize()
            ttft = time.perf_counter() - t
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            torch.cuda.synchronize()
            total = time.perf_counter() - t
            decode_s = max(total - ttft, 1e-9)
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            return dict(batch=batch, prompt_len=prompt_len, new_tokens=new, prefill_s=round(ttft, 3),
                        prefill_tok_s=round(batch * prompt_len / ttft, 1),
                        decode_tok_s=round((n - batch) / decode_s, 1),
                        decode_step_ms=round(1000 * decode_s / (new - 1), 2))

        out["runs"] = [run(1, 1024, 32), run(8, 1024, 32), run(32, 256, 32)]
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results["flash_shapes"] = out
        print("flash_shapes", out, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip-parity", action="store_true")
    args = ap.parse_args()
    plat = detect_platform("cuda")
    results: dict = {"platform": {k: str(v) for k, v in vars(plat).items()}, "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d")}
    print(results, flush=True)
    if not args.skip_parity:
        parity(results)
    flash_shapes(results, args.layers)
    Path(args.out, "foundation.json").write_text(json.dumps(results, indent=1))
    print("\n== summary ==")
    for r in results.get("parity", []):
        print(f"{r['config']:>12} {r['dtype']:>9} rel {r['rel']:.2e} bit-equal {r['bit_equal_frac']:.3f} "
              f"greedy {r['greedy_agree']}")
    fs = results["flash_shapes"]
    print(f"V4-Flash shapes, {fs['layers']} layers, dummy: load {fs['load_s']} s, weights {fs['weights_gib']} GiB, "
          f"peak {fs['peak_gib']} GiB")
    for r in fs["runs"]:
        print(f"  batch {r['batch']:>3} prompt {r['prompt_len']}: prefill {r['prefill_tok_s']} tok/s, "
              f"decode {r['decode_tok_s']} tok/s ({r['decode_step_ms']} ms/step)")


if __name__ == "__main__":
    main()
