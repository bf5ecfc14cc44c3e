"""The model through the op layer equals the reference model: the torch twins, and the Triton
kernels (under the interpreter on the CPU), on the tiny checkpoint in the official FP8/FP4 format.

Dense path (the model's own state) and engine path (the pools read in place by the attention,
indexer and compressor ops) both.
"""

from __future__ import annotations

import math

import pytest
import torch

from flashport.engine.engine import Engine
from flashport.model.loader import load_model
from flashport.sampling_params import SamplingParams

IMPLS = ["torch", "triton"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("impl", IMPLS)
def test_dense_forward_through_ops_equals_reference(tiny_model_dir, impl):
    ref, cfg = load_model(tiny_model_dir, device="cpu", dtype=torch.float32, progress=False)
    ops, _ = load_model(tiny_model_dir, device="cpu", dtype=torch.float32, progress=False, ops_impl=impl)
    # Where the kernels run, the FP4 experts are loaded into their tiled layout (the reference's are not).
    assert all(w.tiled == (impl == "triton")
               for layer in ops.layers for w in (layer.ffn.experts.w13, layer.ffn.experts.w2))
    assert not any(layer.ffn.experts.w13.tiled for layer in ref.layers)
    g = torch.Generator().manual_seed(11)
    n = 23 if impl == "torch" else 10  # the interpreter is slow; 10 tokens still close CSA and HCA blocks
    ids = torch.randint(2, cfg.vocab_size, (n,), generator=g)
    want = ref(ids, [n], [ref.new_state()])
    got = ops(ids, [n], [ops.new_state()])
    assert _rel(got, want) < 1e-4


def _engine_run(path, impl: str, lengths: tuple[int, ...], max_tokens: int) -> list:
    engine = Engine(path, device="cpu", dtype="float32", progress=False, log=None, ops_impl=impl,
                    max_model_len=128, max_num_batched_tokens=16)
    g = torch.Generator().manual_seed(12)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, prompt_logprobs=0)
    prompts = [torch.randint(2, 1000, (n,), generator=g).tolist() for n in lengths]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[str(i)] for i in range(len(prompts))]


# The interpreter is slow: the kernels get a shorter run (a chunked prompt, a one-token prompt
# that becomes a decode, and decode steps that close compressor blocks).
@pytest.mark.parametrize("impl, lengths, max_tokens", [("torch", (21, 9), 5), ("triton", (9, 1), 2)])
def test_engine_through_ops_equals_reference(tiny_model_dir, impl, lengths, max_tokens):
    want = _engine_run(tiny_model_dir, "reference", lengths, max_tokens)
    got = _engine_run(tiny_model_dir, impl, lengths, max_tokens)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for dw, dg in zip(w.prompt_logprobs[1:], g.prompt_logprobs[1:]):
            (tw, lw), = dw.items()
            (tg, lg), = dg.items()
            assert tw == tg and math.isclose(lw, lg, abs_tol=1e-4)
