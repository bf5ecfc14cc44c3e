"""Model runner: a scheduler plan -> one forward over the pools -> tokens sampled on the device.

Inputs are built on the host from the plan and uploaded once; the step's only device-to-host
copy is the sampled tokens (and the log-probabilities asked for). Decode steps go through
`DecodeGraphs` when the engine has one (padded fixed shapes, graph replay on a GPU).

A step is two calls: `launch` queues all of its device work (inputs, forward, sampling, and
asynchronous copies of the tokens and logprobs into pinned host memory) without waiting for the
device; `collect` waits for those copies and returns the `StepResult`. Between the two the host
is free: the engine launches the next step there before it processes this one's tokens
(engine.py, "overlap"). `execute` = collect(launch(...)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flashport.engine.graphs import DecodeGraphs
from flashport.engine.paged_cache import PagedCache
from flashport.engine.paged_rows import PagedRowsCache
from flashport.engine.plan import SchedulerOutput, StepResult
from flashport.engine.pools import StatePools
from flashport.engine.sampler import SamplingTensors, compute_logprobs, sample, to_device, to_logprob_dicts
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


@dataclass
class PendingStep:
    """A launched step: its device work is queued; `ModelRunner.collect` turns it into a StepResult.
    The tensors below are host tensors (pinned on a GPU) that asynchronous copies are filling."""

    plan: SchedulerOutput
    who: list[str] = field(default_factory=list)  # request ids of the sampled rows, in row order
    tokens: torch.Tensor | None = None  # [len(who)] int64
    # Logprobs of the sampled rows: (wanted per row or None, compute_logprobs' three outputs)
    logprobs: tuple[list[int | None], tuple[torch.Tensor, ...]] | None = None
    # Prompt logprobs: (request id, position of the first entry, the prompt tokens, top n, outputs)
    prompt: list[tuple[str, int, list[int], int, tuple[torch.Tensor, ...]]] = field(default_factory=list)
    done: torch.cuda.Event | None = None  # recorded after the copies (GPU)


class ModelRunner:
    def __init__(self, model: DeepseekV4, pools: StatePools, max_num_batched_tokens: int,
                 graphs: DecodeGraphs | None = None) -> None:
        self.model, self.pools, self.graphs = model, pools, graphs
        self.device = model.device
        self.block_size = pools.cache_cfg.block_size
        # Token ids, positions, logits rows and pool rows of a step: one device buffer, one copy.
        self.inputs = InputBuffer(8 * max_num_batched_tokens, self.device)

    def execute(self, plan: SchedulerOutput, sampling: dict[str, SeqSampling]) -> StepResult:
        """Run one step and wait for its tokens."""
        return self.collect(self.launch(plan, sampling))

    def launch(self, plan: SchedulerOutput, sampling: dict[str, SeqSampling]) -> PendingStep:
        """Queue the step's device work; no wait for the device (see the module docstring)."""
        return self._launch_sampling(plan, sampling, self._forward(plan))

    def _forward(self, plan: SchedulerOutput) -> torch.Tensor:
        """The step's forward -> logits [rows, vocab] fp32 (a graph step's: a buffer the next
        graph step overwrites, so everything that reads it is queued before this returns)."""
        shape = self.graphs.shape_for(plan) if self.graphs is not None else None
        if shape is not None:  # a decode step: padded fixed shapes, a graph replay on a GPU
            for s in plan.seqs:
                if s.reset_state and s.start_pos > 0:
                    self.pools.load_boundary(s.state_slot, s.comp_blocks[s.start_pos // self.block_size - 1])
            return self.graphs.execute(plan, shape)
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
        return self.model.run(ids, pos, seqs, cache, sel).float()

    def _launch_sampling(self, plan: SchedulerOutput, sampling: dict[str, SeqSampling],
                         logits: torch.Tensor) -> PendingStep:
        """Sampling and logprobs on the device, their results copied to the host asynchronously."""
        p = PendingStep(plan)
        last_rows, who, at = [], p.who, 0
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
            first = last_rows[0]
            if last_rows == list(range(first, first + len(last_rows))):  # every decode step: a slice
                lg = logits[first: first + len(last_rows)]
            else:
                lg = logits.index_select(0, to_device(torch.tensor(last_rows), logits.device))
            t = SamplingTensors.build([i.params for i in info], [i.seed for i in info],
                                      [len(i.output_ids) for i in info], [i.prompt_ids for i in info],
                                      [i.output_ids for i in info], lg.shape[-1], lg.device)
            chosen = sample(lg, t)
            p.tokens = _to_host(chosen)
            want = [i.params.logprobs for i in info]
            top = max((w for w in want if w is not None), default=None)
            if top is not None:
                p.logprobs = (want, tuple(_to_host(x) for x in compute_logprobs(lg, chosen, top)))
        for s, row in prompt_lp_jobs:
            info = sampling[s.request_id]
            # Row t of the chunk predicts the token at position start_pos + t + 1, if it is a prompt token.
            nxt = info.prompt_ids[s.start_pos + 1: s.start_pos + len(s.token_ids) + 1]
            if nxt:
                k = info.params.prompt_logprobs
                out = compute_logprobs(logits[row: row + len(nxt)], to_device(torch.tensor(nxt), logits.device), k)
                p.prompt.append((s.request_id, s.start_pos + 1, nxt, k, tuple(_to_host(x) for x in out)))
        if logits.is_cuda:
            p.done = torch.cuda.Event()
            p.done.record()
        return p

    def collect(self, p: PendingStep) -> StepResult:
        """Wait for a launched step's copies; -> its StepResult (the step's one host wait)."""
        if p.done is not None:
            p.done.synchronize()
        result = StepResult()
        if p.tokens is not None:
            tokens = p.tokens.tolist()
            dicts = None
            if p.logprobs is not None:
                want, out = p.logprobs
                dicts = to_logprob_dicts(tokens, *out, num_top=max(w for w in want if w is not None))
            for j, (rid, tok) in enumerate(zip(p.who, tokens)):
                result.sampled[rid] = tok
                if dicts is not None and want[j] is not None:
                    result.logprobs[rid] = _trim(dicts[j], tok, want[j])
        for rid, first, nxt, k, out in p.prompt:
            dicts = to_logprob_dicts(nxt, *out, num_top=k)
            result.prompt_logprobs[rid] = (first, [_trim(d, c, k) for d, c in zip(dicts, nxt)])
        return result


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor into pinned host memory (no wait); a CPU tensor as it is."""
    if not x.is_cuda:
        return x
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    out.copy_(x, non_blocking=True)
    return out


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
