"""Token selection on the device: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

A row's random draw uses only that request's own generator, so a seeded request gives the same
tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

from flashport.sampling_params import Logprobs, SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row's logits [V] -> probabilities after temperature, top-k and top-p (fp32)."""
    x = logits.float() / params.temperature
    V = x.shape[-1]
    if 0 < params.top_k < V:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
           ) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64, on the device)."""
    out = torch.argmax(logits, dim=-1)
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = filtered_probs(logits[i], p)
        # Exponential race: argmax p / E with E ~ Exp(1) draws from p, without a host sync.
        e = torch.empty_like(probs).exponential_(generator=g)
        out[i] = torch.argmax(probs / e)
    return out


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, n: int) -> list[Logprobs]:
    """Raw-model log-probabilities: for each row the top-n tokens plus the chosen one.

    logits [B, V], chosen [B] -> B dicts token id -> log-probability (host values)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = lp.gather(1, chosen.view(-1, 1)).squeeze(1)
    rows: list[Logprobs] = []
    if n > 0:
        vals, ids = lp.topk(min(n, lp.shape[-1]), dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
    for b, (c, clp) in enumerate(zip(chosen.tolist(), chosen_lp.tolist())):
        d = {c: clp}
        if n > 0:
            for t, v in zip(ids[b], vals[b]):
                d.setdefault(t, v)
        rows.append(d)
    return rows
