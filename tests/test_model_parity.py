"""The model against transformers 5.24 (the oracle), on three tiny configs.

Every comparison runs our model loaded from the directory transformers' `save_pretrained` wrote,
so the HF-name loader path is part of what is checked.
"""

from __future__ import annotations

import pytest
import torch

from hf_oracle import CONFIGS, make_hf_model

transformers = pytest.importorskip("transformers")

from flashport.model.loader import load_model  # noqa: E402

NAMES = list(CONFIGS)
LENGTHS = [61, 37, 50]  # unequal; long enough that CSA drops entries and HCA closes several blocks


@pytest.fixture(scope="module", params=NAMES)
def pair(request, tmp_path_factory):
    hf = make_hf_model(request.param, seed=NAMES.index(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours, cfg = load_model(path, device="cpu", dtype=torch.float32, progress=False)
    return hf, ours, cfg


def _prompts(vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g) for n in LENGTHS]


def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids.unsqueeze(0), use_cache=False).logits[0].float()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_config_exercises_compression(pair):
    _, _, cfg = pair
    n = min(LENGTHS)
    if "csa" in cfg.layer_types:
        assert n // cfg.compress_rate_csa > cfg.index_topk  # top-k must drop entries
    if "hca" in cfg.layer_types:
        assert n // cfg.compress_rate_hca >= 3  # several closed HCA blocks


def test_batched_full_forward_matches_transformers(pair):
    hf, ours, cfg = pair
    prompts = _prompts(cfg.vocab_size, 1)
    logits = ours(torch.cat(prompts), [len(p) for p in prompts], [ours.new_state() for _ in prompts])
    start = 0
    for p in prompts:
        ref = _hf_logits(hf, p)
        assert _rel_err(logits[start:start + len(p)].float(), ref) < 1e-4
        start += len(p)


def test_prefill_then_decode_equals_full_forward(pair):
    hf, ours, cfg = pair
    prompts = _prompts(cfg.vocab_size, 2)[:2]
    refs = [_hf_logits(hf, p) for p in prompts]
    states = [ours.new_state() for _ in prompts]
    prefill = [13, 22]  # prefill lengths, then one token per step for both sequences together
    out = ours(torch.cat([p[:k] for p, k in zip(prompts, prefill)]), prefill, states)
    got = [[out[:prefill[0]]], [out[prefill[0]:]]]
    for t in range(max(len(p) for p in prompts)):
        live = [i for i, p in enumerate(prompts) if prefill[i] + t < len(p)]
        if not live:
            break
        toks = torch.stack([prompts[i][prefill[i] + t] for i in live])
        step = ours(toks, [1] * len(live), [states[i] for i in live])
        for row, i in enumerate(live):
            got[i].append(step[row:row + 1])
    for i, ref in enumerate(refs):
        assert _rel_err(torch.cat(got[i]).float(), ref) < 1e-4


def test_chunked_prefill_equals_full_forward(pair):
    hf, ours, cfg = pair
    p = _prompts(cfg.vocab_size, 3)[0]
    ref = _hf_logits(hf, p)
    st = ours.new_state()
    chunks = [ours(p[s:s + 7], [len(p[s:s + 7])], [st]) for s in range(0, len(p), 7)]
    assert _rel_err(torch.cat(chunks).float(), ref) < 1e-4


def test_greedy_generation_matches_transformers_generate(pair):
    hf, ours, cfg = pair
    p = _prompts(cfg.vocab_size, 4)[1]
    n_new = 32
    with torch.no_grad():
        ref = hf.generate(p.unsqueeze(0), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)[0, len(p):]
    states = [ours.new_state()]
    logits = ours(p, [len(p)], states, torch.tensor([len(p) - 1]))
    got = []
    for _ in range(n_new):
        tok = int(logits[0].argmax())
        got.append(tok)
        logits = ours(torch.tensor([tok]), [1], states)
    ref = ref.tolist()
    if got != ref:
        # A divergence is only acceptable at a near-tie of the oracle's own logits (spec §5.6).
        k = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
        full = _hf_logits(hf, torch.tensor(p.tolist() + ref[:k]))[-1]
        top2 = full.topk(2).values
        assert (top2[0] - top2[1]).item() < 1e-4, f"token {k}: ours {got[k]} vs transformers {ref[k]}"


def test_bf16_dtype_flow_is_bit_exact(tmp_path):
    # transformers' real mixed precision comes from from_pretrained(dtype=bf16) (spec §10 gotcha 3).
    name = NAMES[0]
    make_hf_model(name, seed=7).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours, cfg = load_model(tmp_path, device="cpu", dtype=torch.bfloat16, progress=False)
    p = _prompts(cfg.vocab_size, 5)[0]
    with torch.no_grad():
        ref = hf(p.unsqueeze(0), use_cache=False).logits[0]
    got = ours(p, [len(p)], [ours.new_state()])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref)
