"""The batched device sampler: greedy, seeded draws independent of the batch, the sampled distribution,
top-k / top-p / min-p exclusion, penalties against a plain-Python reference, logprobs, validation."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch

from flashport.engine.sampler import (SamplingTensors, apply_penalties, compute_logprobs, filter_logits,
                                      gumbel_from_bits, logprob_dicts, random_bits, sample,
                                      to_logprob_dicts, top_logprobs, use_compiled_draw)
from flashport.errors import RequestError
from flashport.sampling_params import SamplingParams as SP


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build(params, seeds=None, steps=None, prompt_ids=None, output_ids=None, V=100, device="cpu"):
    B = len(params)
    return SamplingTensors.build(params, seeds if seeds is not None else [0] * B,
                                 steps if steps is not None else [0] * B, prompt_ids, output_ids, V, device)


def _chi2_bound(df: int, z: float = 4.0) -> float:
    """Upper quantile of chi-square(df) at ~3e-5 (Wilson-Hilferty)."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    n = counts.sum().item()
    exp = probs.double() * n
    big = exp >= 5  # pool the rare cells into one
    stat = (((counts[big].double() - exp[big]) ** 2) / exp[big]).sum().item()
    df = int(big.sum()) - 1
    if (~big).any() and exp[~big].sum() > 0:
        stat += ((counts[~big].sum().double() - exp[~big].sum()) ** 2 / exp[~big].sum()).item()
        df += 1
    return stat, df


def test_greedy_is_argmax_even_in_a_mixed_batch():
    g = _gen(1)
    x = torch.randn(6, 50, generator=g)
    params = [SP(temperature=0), SP(temperature=1.0, seed=3), SP(temperature=0, top_k=3, top_p=0.5),
              SP(temperature=0.5, top_p=0.9), SP(temperature=0), SP(temperature=1e-7)]
    tok = sample(x, _build(params, seeds=list(range(6)), V=50))
    greedy = [0, 2, 4, 5]
    assert tok[greedy].tolist() == x.argmax(-1)[greedy].tolist()
    assert sample(x, _build([SP(temperature=0)] * 6, V=50)).tolist() == x.argmax(-1).tolist()
    t = _build([SP(temperature=0)] * 6, V=50)
    assert t.all_greedy and t.output_ids is None and t.random_rows is None


def test_seeded_row_is_the_same_alone_or_in_any_batch_and_across_calls():
    g = _gen(2)
    V = 500
    p = SP(temperature=0.9, top_k=100, top_p=0.95, min_p=0.01)
    others = [SP(temperature=0), SP(temperature=1.3), SP(temperature=0.7, top_k=3),
              SP(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5), SP(temperature=0.5, min_p=0.2)]
    for step in range(8):
        row = torch.randn(1, V, generator=g)
        alone = sample(row, _build([p], [1234], [step], [[1, 2]], [[3]], V)).item()
        for k in range(1, len(others) + 1):
            ps = others[:k] + [p] + others[k:]
            x = torch.randn(len(ps), V, generator=g)
            x[k] = row[0]
            ids = [[5, 6, 7]] * len(ps)
            seeds = [int(s) for s in torch.randint(0, 2**40, (len(ps),), generator=g)]
            seeds[k] = 1234
            steps = [int(s) for s in torch.randint(0, 100, (len(ps),), generator=g)]
            steps[k] = step
            t = SamplingTensors.build(ps, seeds, steps, ids, ids, V, "cpu")
            assert sample(x, t)[k].item() == alone
        assert sample(row, _build([p], [1234], [step], None, None, V)).item() == alone  # and again


def test_different_seeds_and_steps_give_different_draws():
    V, n = 1000, 64
    x = torch.zeros(n, V)  # uniform: every draw is pure noise
    params = [SP(temperature=1.0)] * n
    by_seed = sample(x, _build(params, seeds=list(range(n)), V=V)).tolist()
    by_step = sample(x, _build(params, seeds=[7] * n, steps=list(range(n)), V=V)).tolist()
    assert len(set(by_seed)) > n * 0.9 and len(set(by_step)) > n * 0.9
    assert by_seed != by_step
    # Seeds are taken modulo 2^64: negative and huge seeds work, and 2^64 + s is s.
    big = sample(x[:3], _build(params[:3], seeds=[-1, 2**70 + 5, 5], V=V)).tolist()
    assert big[1] == big[2]
    bits = random_bits(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), 4)
    assert bits.min() >= 0 and bits.max() < 2**32 and len({tuple(r) for r in bits.tolist()}) == 3
    assert torch.isfinite(gumbel_from_bits(torch.tensor([0, 1, 2**31, 2**32 - 512, 2**32 - 1]))).all()


@pytest.mark.parametrize("vary", ["step", "seed"])
def test_sampled_distribution_matches_softmax(vary):
    g = _gen(3)
    V, n, T = 12, 20000, 0.7
    logits = torch.randn(V, generator=g) * 1.5
    params = [SP(temperature=T)] * n
    idx = list(range(n))
    t = _build(params, seeds=[99] * n if vary == "step" else idx, steps=idx if vary == "step" else [3] * n, V=V)
    tok = sample(logits.expand(n, V), t)
    stat, df = _chi2(torch.bincount(tok, minlength=V), torch.softmax(logits.double() / T, -1))
    assert stat < _chi2_bound(df), (stat, df)


def _reference_allowed(x: torch.Tensor, p: SP, slack: float = 1e-4) -> set[int]:
    """Tokens a row may draw: plain Python on float64; slack makes the set a superset at the boundaries."""
    V = x.shape[0]
    z = (x.double() / p.temperature).tolist()
    order = sorted(range(V), key=lambda i: -z[i])
    keep = set(range(V))
    if 0 < p.top_k < V:
        kth = z[order[p.top_k - 1]]
        keep = {i for i in keep if z[i] >= kth}
    if p.top_p < 1:
        m = max(z[i] for i in keep)
        w = {i: math.exp(z[i] - m) for i in keep}
        tot = sum(w.values())
        mass, kept = 0.0, set()
        for i in sorted(keep, key=lambda i: -z[i]):
            if mass >= p.top_p + slack:
                break
            kept.add(i)
            mass += w[i] / tot
        keep = kept
    if p.min_p > 0:
        m = max(z[i] for i in keep)
        keep = {i for i in keep if math.exp(z[i] - m) >= p.min_p * (1 - slack)}
    return keep


def test_top_k_top_p_min_p_never_pick_excluded_tokens():
    g = _gen(4)
    V, rows, draws = 64, 48, 300
    x = torch.randn(rows, V, generator=g) * 2
    params = []
    for r in range(rows):
        u = torch.rand(4, generator=g).tolist()
        params.append(SP(temperature=0.3 + 1.5 * u[0], top_k=[-1, 1, 5, 20][r % 4],
                         top_p=[1.0, 0.5, 0.9, 0.05][(r // 4) % 4], min_p=[0.0, 0.1, 0.3][(r // 16) % 3]))
    allowed = [_reference_allowed(x[r], params[r]) for r in range(rows)]
    big_x = x.repeat(draws, 1)
    big_p = params * draws
    n = len(big_p)
    tok = sample(big_x, _build(big_p, seeds=[int(s) for s in torch.randint(0, 2**62, (n,), generator=g)],
                               steps=list(range(n)), V=V)).view(draws, rows)
    for r in range(rows):
        seen = set(tok[:, r].tolist())
        assert seen <= allowed[r], (r, params[r], seen - allowed[r])
        assert int(x[r].argmax()) in allowed[r]
    # And the filtered logits are exactly -inf outside a strict (no slack) reference set.
    f = filter_logits(x, _build(params, V=V))
    for r in range(rows):
        assert set(torch.nonzero(f[r] > float("-inf")).flatten().tolist()) <= allowed[r]


@pytest.mark.parametrize("kw", [dict(top_k=4), dict(top_p=0.7), dict(min_p=0.2), dict(top_k=6, top_p=0.8, min_p=0.05)])
def test_filtered_distribution_matches_the_renormalised_reference(kw):
    g = _gen(5)
    V, n, T = 16, 20000, 0.9
    logits = torch.randn(V, generator=g) * 1.5
    p = SP(temperature=T, **kw)
    allowed = _reference_allowed(logits, p, slack=0.0)
    ref = torch.softmax(logits.double() / T, -1)
    mask = torch.zeros(V, dtype=torch.bool)
    mask[list(allowed)] = True
    ref = torch.where(mask, ref, 0.0)
    ref /= ref.sum()
    tok = sample(logits.expand(n, V), _build([p] * n, seeds=[11] * n, steps=list(range(n)), V=V))
    counts = torch.bincount(tok, minlength=V)
    assert (counts[~mask] == 0).all()
    stat, df = _chi2(counts[mask], ref[mask])
    assert stat < _chi2_bound(df), (stat, df)


def test_tiny_top_p_top_k_1_and_min_p_1_keep_only_the_top_token():
    g = _gen(6)
    x = torch.randn(30, 200, generator=g)
    for p in (SP(top_p=1e-6), SP(top_k=1), SP(min_p=1.0), SP(top_p=1e-6, top_k=7, min_p=0.5)):
        t = _build([p] * 30, seeds=list(range(30)), steps=list(range(30)), V=200)
        assert sample(x, t).tolist() == x.argmax(-1).tolist()


def _reference_penalties(logits: list[float], p: SP, prompt: list[int], output: list[int]) -> list[float]:
    counts = Counter(output)
    seen = set(prompt) | set(output)
    out = []
    for v, x in enumerate(logits):
        if v in seen:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        x -= p.frequency_penalty * counts[v]
        x -= p.presence_penalty * (1 if counts[v] else 0)
        out.append(x)
    return out


def test_penalties_match_a_plain_python_reference():
    g = _gen(7)
    V, B = 40, 12
    x = torch.randn(B, V, generator=g) * 3
    params, prompts, outputs = [], [], []
    for b in range(B):
        u = torch.rand(3, generator=g).tolist()
        params.append(SP(temperature=0 if b % 3 == 0 else 1.0,
                         presence_penalty=0.0 if b % 4 == 1 else round(4 * u[0] - 2, 3),
                         frequency_penalty=0.0 if b % 5 == 2 else round(4 * u[1] - 2, 3),
                         repetition_penalty=1.0 if b % 2 else round(0.5 + 1.5 * u[2], 3)))
        prompts.append(torch.randint(0, V, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist())
        outputs.append(torch.randint(0, V, (int(torch.randint(0, 25, (1,), generator=g)),), generator=g).tolist())
    params[5] = SP()  # a row with no penalties at all is left alone
    t = _build(params, prompt_ids=prompts, output_ids=outputs, V=V)
    got = apply_penalties(x, t)
    ref = torch.tensor([_reference_penalties(x[b].tolist(), params[b], prompts[b], outputs[b]) for b in range(B)])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    assert torch.equal(got[5], x[5])
    greedy = [b for b in range(B) if params[b].greedy]
    assert sample(x, t)[greedy].tolist() == ref.argmax(-1)[greedy].tolist()
    # Only frequency / presence: no prompt tensor is built; no penalties: nothing is built.
    t2 = _build([SP(frequency_penalty=0.5), SP()], prompt_ids=prompts[:2], output_ids=outputs[:2], V=V)
    assert t2.prompt_ids is None and t2.output_ids is not None
    assert t2.output_ids[1].eq(-1).all()  # the row without penalties gets no ids
    assert _build([SP(), SP(temperature=0)], V=V).output_ids is None
    # Ready -1-padded tensors (as an engine may keep on the device) give the same result as lists.
    pad = max(map(len, prompts))
    as_tensor = torch.tensor([r + [-1] * (pad - len(r)) for r in prompts])
    t3 = _build(params, prompt_ids=as_tensor, output_ids=outputs, V=V)
    assert torch.equal(apply_penalties(x, t3), got)


def test_logprobs_are_the_raw_log_softmax():
    g = _gen(8)
    x = torch.randn(5, 30, generator=g) * 2
    tokens = torch.randint(0, 30, (5,), generator=g)
    ref = torch.log_softmax(x, -1)
    tok_lp, ids, vals = compute_logprobs(x, tokens, 4)
    torch.testing.assert_close(tok_lp, ref.gather(1, tokens[:, None]).squeeze(1))
    torch.testing.assert_close(vals, ref.topk(4, -1).values)
    assert torch.equal(ids, ref.topk(4, -1).indices)
    dicts = to_logprob_dicts(tokens, tok_lp, ids, vals, num_top=[0, 1, 2, 3, 4])
    assert logprob_dicts(x, tokens, [0, 1, 2, 3, 4]) == dicts
    for b, d in enumerate(dicts):
        tok = int(tokens[b])
        assert next(iter(d)) == tok and math.isclose(d[tok], ref[b, tok].item(), abs_tol=1e-6)
        assert set(ref[b].topk(b).indices.tolist()) | {tok} == set(d)
    assert top_logprobs(x, tokens, 2) == to_logprob_dicts(tokens, *compute_logprobs(x, tokens, 2))
    assert all(len(d) <= 3 and set(ref[b].topk(2).indices.tolist()) <= set(d)
               for b, d in enumerate(logprob_dicts(x, tokens, 2)))
    t0, i0, v0 = compute_logprobs(x, tokens, 0)
    assert i0.shape == (5, 0) and v0.shape == (5, 0)
    assert [set(d) for d in top_logprobs(x, tokens, 0)] == [{int(t)} for t in tokens]


@pytest.mark.parametrize("kw, field", [
    (dict(n=0), "n"), (dict(n=129), "n"), (dict(n=2.0), "n"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p"), (dict(min_p=float("nan")), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty")])
def test_invalid_new_sampling_params(kw, field):
    with pytest.raises(RequestError, match=field):
        SP(**kw)


def test_new_sampling_params_defaults_and_has_penalties():
    p = SP(n=128, min_p=1.0, presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.5)
    assert p.n == 128 and p.has_penalties
    assert not SP().has_penalties and SP().n == 1
    assert SP(repetition_penalty=1.1).has_penalties and SP(presence_penalty=0.1).has_penalties


@pytest.mark.gpu
def test_gpu_matches_cpu_and_does_not_sync():
    g = _gen(9)
    V, B = 129280, 16
    x = torch.randn(B, V, generator=g) * 3
    params = [SP(temperature=0.8, top_k=[0, 50][b % 2], top_p=[1.0, 0.9][(b // 2) % 2], min_p=[0.0, 0.05][b // 8],
                 repetition_penalty=1.1 if b == 3 else 1.0, presence_penalty=0.5 if b == 5 else 0.0)
              for b in range(B)]
    params[0] = SP(temperature=0)
    ids = [list(range(b, b + 20)) for b in range(B)]
    seeds, steps = list(range(100, 100 + B)), list(range(B))
    cpu = sample(x, SamplingTensors.build(params, seeds, steps, ids, ids, V, "cpu"))
    t = SamplingTensors.build(params, seeds, steps, ids, ids, V, "cuda")
    xc = x.cuda()
    torch.cuda.synchronize()
    with warnings.catch_warnings():  # "a prototype feature" warning
        warnings.simplefilter("ignore")
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(xc, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(random_bits(t.seed, t.step, 1000).cpu(), random_bits(t.seed.cpu(), t.step.cpu(), 1000))
    assert out.cpu().tolist() == cpu.tolist()
    use_compiled_draw(True)
    try:
        assert sample(xc, t).cpu().tolist() == cpu.tolist()
    finally:
        use_compiled_draw(False)
