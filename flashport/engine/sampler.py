"""Batched token selection on the device, with no host sync: penalties, greedy, temperature, top-k,
top-p, min-p, per-request seeds, and raw logprobs.

Randomness is counter-based: the noise for vocabulary entry v of a row is a hash of (seed, step, v),
computed with exact integer tensor ops. A row's token therefore depends only on its own logits,
parameters, seed and step: the same whatever else is in the batch, and the same on CPU and GPU given
equal logits (the noise is bit-identical; only last-bit differences in a device's softmax could move a
top-p boundary or an exact tie).
`SamplingTensors.build` turns a batch of `SamplingParams` into device tensors (plus a few host-side
flags that let `sample` skip the stages no row uses); `sample` then returns the tokens [B] on the device.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from flashport.sampling_params import Logprobs, SamplingParams

_M32 = 0xFFFFFFFF


@dataclass
class SamplingTensors:
    """Per-row sampling state for a batch of B rows (device tensors) and host-side stage flags."""

    temperature: torch.Tensor  # [B] float32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, V = off
    top_p: torch.Tensor  # [B] float32, 1 = off
    min_p: torch.Tensor  # [B] float32, 0 = off
    seed: torch.Tensor  # [B] int64 (the request seed's low 64 bits, two's complement)
    step: torch.Tensor  # [B] int64: index of the token being sampled (output tokens so far)
    # Penalties (None when no row has any):
    presence_penalty: torch.Tensor | None = None  # [B] float32
    frequency_penalty: torch.Tensor | None = None  # [B] float32
    repetition_penalty: torch.Tensor | None = None  # [B] float32
    output_ids: torch.Tensor | None = None  # [B, Lo] int64, -1 padded; only rows with penalties filled
    prompt_ids: torch.Tensor | None = None  # [B, Lp] int64, -1 padded; None unless a row has repetition
    # Host-side flags (read without a sync). The filter flags describe the non-greedy rows only.
    all_greedy: bool = False
    random_rows: torch.Tensor | None = None  # [R] int64 rows to sample when the batch mixes greedy and random
    do_top_k: bool = False
    top_k_max: int = 0  # largest active top-k (for torch.topk)
    do_top_p: bool = False
    do_min_p: bool = False

    @property
    def do_penalties(self) -> bool:
        return self.output_ids is not None

    @classmethod
    def build(cls, params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int],
              prompt_ids: Sequence[Sequence[int]] | torch.Tensor | None,
              output_ids: Sequence[Sequence[int]] | torch.Tensor | None,
              vocab_size: int, device: torch.device | str) -> SamplingTensors:
        """Host lists -> device tensors (two host-to-device copies in the common case).

        seeds: one per row (resolve `seed=None` once per request, outside). steps: output tokens so
        far per row. prompt_ids / output_ids are only read when some row has penalties (prompt_ids
        only for a repetition penalty): ragged lists, or ready [B, L] int64 tensors padded with -1
        (e.g. kept on the device by the engine, so long prompts are not re-sent every step)."""
        B, V = len(params), vocab_size
        if not (B == len(seeds) == len(steps)) or B == 0:
            raise ValueError(f"need one seed and one step per row: {B} params, {len(seeds)} seeds, {len(steps)} steps")
        device = torch.device(device)
        greedy = [p.greedy for p in params]
        rand = [p for p, g in zip(params, greedy) if not g]
        top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
        floats = to_device(torch.tensor([[0.0 if g else p.temperature for p, g in zip(params, greedy)],
                                          [p.top_p for p in params], [p.min_p for p in params]],
                                         dtype=torch.float32), device)
        ints = to_device(torch.tensor([top_k, [_as_int64(s) for s in seeds], list(steps)], dtype=torch.int64), device)
        active_k = [k for k, g in zip(top_k, greedy) if not g and k < V]
        t = cls(temperature=floats[0], top_p=floats[1], min_p=floats[2], top_k=ints[0], seed=ints[1], step=ints[2],
                all_greedy=not rand, do_top_k=bool(active_k), top_k_max=max(active_k, default=0),
                do_top_p=any(p.top_p < 1 for p in rand), do_min_p=any(p.min_p > 0 for p in rand))
        if rand and len(rand) < B:
            t.random_rows = to_device(torch.tensor([i for i, g in enumerate(greedy) if not g]), device)
        pen = [p.has_penalties for p in params]
        if any(pen):
            if output_ids is None:
                raise ValueError("a row has penalties: output_ids are needed")
            pf = to_device(torch.tensor([[p.presence_penalty for p in params], [p.frequency_penalty for p in params],
                                          [p.repetition_penalty for p in params]], dtype=torch.float32), device)
            t.presence_penalty, t.frequency_penalty, t.repetition_penalty = pf[0], pf[1], pf[2]
            t.output_ids = _ids_tensor(output_ids, pen, device)
            if any(p.repetition_penalty != 1 for p in params):
                if prompt_ids is None:
                    raise ValueError("a row has a repetition penalty: prompt_ids are needed")
                t.prompt_ids = _ids_tensor(prompt_ids, [p.repetition_penalty != 1 for p in params], device)
        return t


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """logits [B, V] -> token ids [B] int64 on the same device. No host sync."""
    x = logits.float()
    if t.do_penalties:
        x = apply_penalties(x, t)
    if t.all_greedy:
        return x.argmax(dim=-1)
    rows = t.random_rows
    if rows is None:
        return _draw(filter_logits(x, t), t.seed, t.step)
    sub = _select_rows(t, rows)
    drawn = _draw(filter_logits(x.index_select(0, rows), sub), sub.seed, sub.step)
    return x.argmax(dim=-1).index_copy_(0, rows, drawn)


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """vLLM's penalties on raw logits (out of place): repetition (tokens seen in the prompt or the
    output: positive logits divided, negative multiplied), then frequency (x count in the output),
    then presence (once if in the output)."""
    if t.output_ids is None:
        return logits
    B, V = logits.shape
    counts = torch.zeros(B, V + 1, dtype=torch.float32, device=logits.device)
    out_idx = _pad_to_last(t.output_ids, V)
    counts.scatter_add_(1, out_idx, torch.ones_like(out_idx, dtype=torch.float32))
    counts = counts[:, :V]
    x = logits
    if t.prompt_ids is not None:
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, _pad_to_last(t.prompt_ids, V), True)
        seen = seen[:, :V] | (counts > 0)
        rep = torch.where(seen, t.repetition_penalty[:, None], 1.0)
        x = torch.where(x > 0, x / rep, x * rep)
    x = x - t.frequency_penalty[:, None] * counts
    return x - t.presence_penalty[:, None] * (counts > 0)


def filter_logits(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Non-greedy rows' logits [R, V] -> logits / temperature with the tokens that top-k, top-p and
    min-p exclude set to -inf (softmax of the result is the distribution `sample` draws from)."""
    x = logits / t.temperature[:, None]
    V = x.shape[-1]
    if t.do_top_p:
        s = x.sort(dim=-1, descending=True).values
        pos = torch.arange(V, device=x.device)
        in_k = pos < t.top_k[:, None]
        if t.do_top_k:
            s = s.masked_fill(~in_k, float("-inf"))
        p = s.softmax(dim=-1)
        c = p.cumsum(dim=-1)
        before = torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=1)  # mass of the tokens above
        # Keep the smallest prefix whose mass reaches top_p (always the top token).
        keep = ((before < t.top_p[:, None]) | (t.top_p[:, None] >= 1)) & in_k
        thresh = s.gather(1, keep.sum(dim=-1, keepdim=True) - 1)
        x = x.masked_fill(x < thresh, float("-inf"))
    elif t.do_top_k:
        vals = x.topk(t.top_k_max, dim=-1).values
        kth = vals.gather(1, t.top_k.clamp(max=t.top_k_max)[:, None] - 1)
        kth = kth.masked_fill(t.top_k[:, None] >= V, float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))
    if t.do_min_p:  # p < min_p * p_max  <=>  x < x_max + log(min_p); min_p = 0 masks nothing
        thresh = x.amax(dim=-1, keepdim=True) + torch.log(t.min_p)[:, None]
        x = x.masked_fill(x < thresh, float("-inf"))
    return x


# ---------------------------------------------------------------------------- counter-based RNG
# All values are kept in [0, 2^32) inside int64 tensors; a multiplication by a 32-bit constant uses
# the constant's signed representative (|c| <= 2^31), so the int64 product never overflows and its
# low 32 bits are the unsigned product's.

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    return (x * (c - (1 << 32) if c >= 1 << 31 else c)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (xorshift-multiply, 'lowbias32' constants)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_bits(seed: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """seed [B], step [B] int64 -> [B, n] int64 hash values in [0, 2^32), one per (seed, step, index)."""
    words = (seed & _M32, (seed >> 32) & _M32, step & _M32, (step >> 32) & _M32)
    k1 = torch.full_like(seed, 0x243F6A88)
    k2 = torch.full_like(seed, 0x85A308D3)
    for w1, w2 in zip(words, reversed(words)):  # two independent 32-bit lanes: a 64-bit row key
        k1 = _mix32(k1 ^ w1)
        k2 = _mix32(k2 ^ w2)
    idx = _mul32(torch.arange(n, dtype=torch.int64, device=seed.device), 0x9E3779B9)
    x = _mix32((idx[None, :] + k1[:, None]) & _M32)
    return _mix32(x ^ k2[:, None])


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] float32 standard Gumbel noise, one value per (seed, step, index)."""
    return gumbel_from_bits(random_bits(seed, step, n))


def gumbel_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hash values -> finite Gumbel noise, via 23-bit uniforms in [2^-24, 1 - 2^-24] (exact in
    float32; with 24 bits, 1 - 2^-25 would round to 1 and give an infinite value)."""
    u = ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log1p(-u))  # -log1p(-u) ~ Exp(1), accurate for the small values that win


def _draw_eager(x: torch.Tensor, seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    # Gumbel-max: argmax(x + G) is distributed as softmax(x); -inf entries are never picked.
    return (x + gumbel_noise(seed, step, x.shape[-1])).argmax(dim=-1)


_draw = _draw_eager


def use_compiled_draw(enabled: bool = True) -> None:
    """Fuse the noise and the draw into one kernel with torch.compile (same tokens, bit for bit).

    In eager mode the hash is ~25 passes over a [B, V] int64 tensor: on an H200 with V = 129280,
    ~4.4 ms at B = 256 eager vs ~0.13 ms compiled (and ~1.5 vs ~0.07 ms at B = 1, launch-bound).
    The first call compiles (seconds); dynamic shapes avoid recompiling for each batch size."""
    global _draw
    _draw = torch.compile(_draw_eager, dynamic=True) if enabled else _draw_eager


# ---------------------------------------------------------------------------- logprobs
def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor, num_top: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-model logprobs (log_softmax of the logits before penalties and temperature), on the device.

    logits [B, V], tokens [B] -> (token_logprob [B], top_ids [B, k], top_logprobs [B, k]), k = min(num_top, V)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    tok = lp.gather(1, tokens.view(-1, 1).long()).squeeze(1)
    k = min(max(num_top, 0), lp.shape[-1])
    if k == 0:
        empty = lp.new_empty(lp.shape[0], 0)
        return tok, empty.long(), empty
    vals, ids = lp.topk(k, dim=-1)
    return tok, ids, vals


def to_logprob_dicts(tokens: torch.Tensor | Sequence[int], token_logprobs: torch.Tensor | Sequence[float],
                     top_ids: torch.Tensor | Sequence[Sequence[int]],
                     top_logprobs: torch.Tensor | Sequence[Sequence[float]],
                     num_top: int | Sequence[int] | None = None) -> list[Logprobs]:
    """Host side, from `compute_logprobs`' outputs: per row {token id: logprob}, the chosen token
    first, then the row's top `num_top` (an int for all rows or one per row; default: all columns)."""
    tokens, token_logprobs, top_ids, top_logprobs = (v.tolist() if isinstance(v, torch.Tensor) else v
                                                     for v in (tokens, token_logprobs, top_ids, top_logprobs))
    rows: list[Logprobs] = []
    for b, (tok, tlp) in enumerate(zip(tokens, token_logprobs)):
        n = num_top if num_top is None or isinstance(num_top, int) else num_top[b]
        d = {tok: tlp}
        for i, v in zip(top_ids[b][:n], top_logprobs[b][:n]):
            d.setdefault(i, v)
        rows.append(d)
    return rows


def logprob_dicts(logits: torch.Tensor, chosen: torch.Tensor, num_top: int | Sequence[int]) -> list[Logprobs]:
    """Raw-model logprobs as host dicts: for each row the chosen token plus its top `num_top` (an int
    for all rows, or one per row). logits [B, V], chosen [B]."""
    k = num_top if isinstance(num_top, int) else max(num_top, default=0)
    return to_logprob_dicts(chosen, *compute_logprobs(logits, chosen, k), num_top=num_top)


top_logprobs = logprob_dicts  # the earlier name, same semantics


# ---------------------------------------------------------------------------- helpers
def _as_int64(seed: int | None) -> int:
    s = int(seed or 0) & 0xFFFFFFFFFFFFFFFF
    return s - (1 << 64) if s >= 1 << 63 else s


def _ids_tensor(ids: Sequence[Sequence[int]] | torch.Tensor, use: list[bool], device: torch.device) -> torch.Tensor:
    """Token ids of the rows in `use` (other rows stay empty) -> [B, L] int64 on the device, -1 padded.
    A ready tensor is used as it is: rows without penalties are left unchanged by them anyway."""
    if isinstance(ids, torch.Tensor):
        return ids.to(device=device, dtype=torch.int64, non_blocking=True)
    return to_device(_pad([r if u else () for r, u in zip(ids, use)]), device)


def _pad(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Ragged host lists -> [B, Lmax] int64, -1 padded (one C-speed copy per row)."""
    out = torch.full((len(rows), max(map(len, rows), default=0)), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = torch.frombuffer(array("q", r), dtype=torch.int64)
    return out


def _pad_to_last(ids: torch.Tensor, V: int) -> torch.Tensor:
    return torch.where(ids < 0, V, ids)  # padding goes to the extra column V, dropped afterwards


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor -> `device` without waiting for the device (pinned, non-blocking copy)."""
    if device.type == "cpu":
        return x
    return x.pin_memory().to(device, non_blocking=True)


def _select_rows(t: SamplingTensors, rows: torch.Tensor) -> SamplingTensors:
    return replace(t, temperature=t.temperature.index_select(0, rows), top_k=t.top_k.index_select(0, rows),
                   top_p=t.top_p.index_select(0, rows), min_p=t.min_p.index_select(0, rows),
                   seed=t.seed.index_select(0, rows), step=t.step.index_select(0, rows),
                   presence_penalty=None, frequency_penalty=None, repetition_penalty=None,
                   output_ids=None, prompt_ids=None, random_rows=None)
