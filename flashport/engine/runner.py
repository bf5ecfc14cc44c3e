"""Model runner: a scheduler plan -> one forward over the pools -> tokens sampled on the device.

Inputs are built on the host from the plan and uploaded once; the step's only device-to-host
copy is the sampled tokens (and the log-probabilities asked for). Decode steps go through
`DecodeGraphs` when the engine has one (padded fixed shapes, graph replay on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashport.engine.graphs import DecodeGraphs
from flashport.engine.paged_cache import PagedCache
from flashport.engine.paged_rows import PagedRowsCache
from flashport.engine.plan import SchedulerOutput, StepResult
from flashport.engine.pools import StatePools
from flashport.engine.sampler import SamplingTensors, logprob_dicts, sample
from flashport.model.attention import SeqSlice
from flashport.model.deepseek_v4 import DeepseekV4
from flashport.model.layers import REFERENCE
from flashport.sampling_params import SamplingParams


@dataclass(frozen=True)
class SeqSampling:
    """What the sampler needs to know about a request (the engine keeps it)."""

    params: SamplingParams
    seed: int
    prompt_ids: list[int]
    output_ids: list[int]


class ModelRunner:
    def __init__(self, model: DeepseekV4, pools: StatePools, max_num_batched_tokens: int,
                 graphs: DecodeGraphs | None = None) -> None:
        self.model, self.pools, self.graphs = model, pools, graphs
        self.device = model.device
        self.block_size = pools.cache_cfg.block_size
        # Token ids, positions, logits rows and pool rows of a step: one device buffer, one copy.
        self.inputs = InputBuffer(8 * max_num_batched_tokens, self.device)

    def execute(self, plan: SchedulerOutput, sampling: dict[str, SeqSampling]) -> StepResult:
        shape = self.graphs.shape_for(plan) if self.graphs is not None else None
        if shape is not None:  # a decode step: padded fixed shapes, a graph replay on a GPU
            for s in plan.seqs:
                if s.reset_state and s.start_pos > 0:
                    self.pools.load_boundary(s.state_slot, s.comp_blocks[s.start_pos // self.block_size - 1])
            return self._sample(plan, sampling, self.graphs.execute(plan, shape))
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[SeqSlice] = []
        rows: list[int] = []  # logits rows to compute
        for s in plan.seqs:
            n = len(s.token_ids)
            if s.reset_state and s.start_pos > 0:  # prefix hit: resume from the cached block's boundary
                self.pools.load_boundary(s.state_slot, s.comp_blocks[s.start_pos // self.block_size - 1])
            start = len(tokens)
            seqs.append(SeqSlice(start, n))
            tokens += s.token_ids
            positions += range(s.start_pos, s.start_pos + n)
            if s.want_prompt_logprobs:
                rows += range(start, start + n)
            elif s.sample:
                rows.append(start + n - 1)
        # The reference model gathers each sequence's state; the op path reads the pools in place.
        view = PagedCache if self.model.ops_impl == REFERENCE else PagedRowsCache
        cache = view(self.pools, list(plan.seqs), record_boundaries=self.pools.cache_cfg.enable_prefix_caching)
        ids, pos, sel, *pieces = self.inputs.upload([tokens, positions, rows, *cache.index_lists])
        cache.bind(pieces)
        logits = self.model.run(ids, pos, seqs, cache, sel).float()
        return self._sample(plan, sampling, logits)

    def _sample(self, plan: SchedulerOutput, sampling: dict[str, SeqSampling], logits: torch.Tensor) -> StepResult:
        result = StepResult()
        last_rows, who, at = [], [], 0
        prompt_lp_jobs = []
        for s in plan.seqs:
            k = len(s.token_ids) if s.want_prompt_logprobs else (1 if s.sample else 0)
            if s.want_prompt_logprobs:
                prompt_lp_jobs.append((s, at))
            if s.sample:
                last_rows.append(at + k - 1)
                who.append(s.request_id)
            at += k
        if who:
            info = [sampling[r] for r in who]
            lg = logits[torch.tensor(last_rows, device=logits.device)]
            t = SamplingTensors.build([i.params for i in info], [i.seed for i in info],
                                      [len(i.output_ids) for i in info], [i.prompt_ids for i in info],
                                      [i.output_ids for i in info], lg.shape[-1], lg.device)
            chosen = sample(lg, t)
            want = [i.params.logprobs for i in info]
            top = max((w for w in want if w is not None), default=None)
            dicts = logprob_dicts(lg, chosen, top) if top is not None else None
            for j, (rid, tok) in enumerate(zip(who, chosen.tolist())):  # the step's host sync
                result.sampled[rid] = tok
                if want[j] is not None:
                    result.logprobs[rid] = _trim(dicts[j], tok, want[j])
        for s, row in prompt_lp_jobs:
            info = sampling[s.request_id]
            # Row t of the chunk predicts the token at position start_pos + t + 1, if it is a prompt token.
            nxt = info.prompt_ids[s.start_pos + 1: s.start_pos + len(s.token_ids) + 1]
            if nxt:
                chosen = torch.tensor(nxt, device=logits.device)
                dicts = logprob_dicts(logits[row: row + len(nxt)], chosen, info.params.prompt_logprobs)
                result.prompt_logprobs[s.request_id] = (
                    s.start_pos + 1, [_trim(d, c, info.params.prompt_logprobs) for d, c in zip(dicts, nxt)])
        return result


class InputBuffer:
    """A device int64 buffer reused by every step. A step's host lists are packed into it with one
    host-to-device copy; it grows (rarely: a step with more pool rows than ever before) by doubling."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.buf = torch.empty(capacity, dtype=torch.long, device=device)

    def upload(self, lists: list[list[int]]) -> list[torch.Tensor]:
        sizes = [len(x) for x in lists]
        n = sum(sizes)
        if n > self.buf.numel():
            self.buf = torch.empty(max(n, 2 * self.buf.numel()), dtype=torch.long, device=self.buf.device)
        flat = torch.tensor([v for x in lists for v in x], dtype=torch.long)
        if self.buf.is_cuda:
            flat = flat.pin_memory()
        view = self.buf[:n]
        view.copy_(flat, non_blocking=True)
        return list(torch.split(view, sizes))


def _trim(d: dict[int, float], chosen: int, n: int) -> dict[int, float]:
    """The chosen token plus the n most likely."""
    top = sorted(d.items(), key=lambda kv: -kv[1])[:n]
    return {chosen: d[chosen], **dict(top)}
