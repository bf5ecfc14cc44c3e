"""Scheduler: continuous batching with chunked prefill, prefix reuse and preemption. No torch.

One engine step is schedule() -> runner executes the SchedulerOutput -> update(output, result).

Policy (vLLM v1 shaped), within max_num_batched_tokens tokens and max_num_seqs sequences:
  1. RUNNING requests in admission order: a decode gets its 1 token, a request still in prefill
     gets a chunk (as much of its remaining known tokens as the token budget allows). When the
     blocks do not fit, the most recently admitted running request is preempted (state freed,
     back to the front of the waiting queue, recomputed from its prompt + output on resume) and
     the allocation retried. The request at the head of `running` (the earliest admitted) is
     never preempted: when nobody is left behind it, its chunk shrinks to what fits, and
     add_request guarantees that at least one token always fits. So the head always progresses,
     finishes in finite time, and every request eventually reaches the head (no starvation).
  2. If nobody was preempted this step: WAITING requests FCFS (resumed ones first). A request's
     prefix-cache hit is looked up when it is admitted; the last admitted may get a partial chunk.
     A request is admitted only when its whole first chunk fits (or nothing is running), so a new
     admission does not immediately force a preemption of itself.

Prompt logprobs: a request asking for them skips the prefix cache until every prompt position's
logprobs have been returned once, and a chunk gets `want_prompt_logprobs` while it covers prompt
positions not returned yet. After a preemption in the middle of the prompt the recomputed chunks
may return some positions again: the engine places rows by position (start_pos + row) and keeps
the first value, so nothing is recomputed *because of* logprobs.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque

from flashport.engine.cache import CacheManager, PrefixHit
from flashport.engine.config import CacheConfig, SchedulerConfig
from flashport.engine.plan import ScheduledSeq, SchedulerOutput, StepResult
from flashport.engine.request import Request, RequestStatus
from flashport.errors import RequestError

# Building a frozen dataclass sets each field through object.__setattr__ (~2 us for ScheduledSeq, so
# 0.5 ms per step at 256 sequences); filling the new instance's __dict__ builds the same object in
# ~1 us. Done only while ScheduledSeq is a plain dataclass (a __dict__, no __post_init__) with
# exactly these fields, else the constructor; test_scheduler compares the two.
_SEQ_FIELDS = ("request_id", "state_slot", "token_ids", "start_pos", "comp_blocks", "window_blocks",
               "reset_state", "sample", "want_prompt_logprobs")
_FAST_SEQ = (tuple(f.name for f in dataclasses.fields(ScheduledSeq)) == _SEQ_FIELDS
             and "__slots__" not in vars(ScheduledSeq) and not hasattr(ScheduledSeq, "__post_init__"))


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        self.config = scheduler_config
        self.cache_config = cache_config
        self.cache = CacheManager(cache_config)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()  # WAITING / PREEMPTED, FCFS
        self.running: list[Request] = []  # RUNNING, in admission order; running[0] is the head
        self._arrivals = itertools.count()
        self._freed_ids: list[str] = []  # released since the last schedule() (SchedulerOutput.finished_freed)
        self.num_preemptions = 0

    # ---- queue ----------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise RequestError(f"request id {req.request_id!r} is already in use")
        num_prompt = req.num_prompt_tokens
        if num_prompt == 0:
            raise RequestError(f"request {req.request_id!r}: the prompt is empty")
        if req.max_tokens < 1:
            raise RequestError(f"request {req.request_id!r}: max_tokens = {req.max_tokens}: must be >= 1")
        max_len = self.config.max_model_len
        if num_prompt >= max_len:
            raise RequestError(f"request {req.request_id!r}: the prompt has {num_prompt} tokens, "
                               f"max_model_len is {max_len}: it must be shorter")
        # The last sampled token is never computed: at most num_max_tokens - 1 tokens are cached.
        num_max_tokens = min(num_prompt + req.max_tokens, max_len)
        num_comp, num_window = self.cache.blocks_needed_alone(num_max_tokens - 1)
        cc = self.cache_config
        if num_comp > cc.num_comp_blocks or num_window > cc.num_window_blocks:
            raise RequestError(
                f"request {req.request_id!r}: {num_prompt} prompt + up to {req.max_tokens} output tokens "
                f"need {num_comp} compressed blocks (and {num_window} window blocks) of {cc.block_size} "
                f"tokens, the cache has {cc.num_comp_blocks} (and {cc.num_window_blocks}): "
                f"lower max_tokens or the prompt length, or give the cache more memory")
        req.arrival_order = next(self._arrivals)
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        """Drop a request now, waiting or running; its blocks and slot are free at once."""
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """The engine saw EOS / a stop string (FINISHED_STOPPED), or aborts. None if unknown."""
        if not status.is_finished:
            raise ValueError(f"finish({request_id!r}, {status}): not a finished status")
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._release(req)
        req.status = status
        return req

    def _release(self, req: Request) -> None:
        if req.state_slot != -1:
            self._freed_ids.append(req.request_id)
        self.cache.free(req)

    def _preempt(self, req: Request) -> None:
        self.cache.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- one step -------------------------------------------------------------------------------

    @staticmethod
    def _make_seq(req: Request, num_new: int, reset_state: bool) -> ScheduledSeq:
        start = req.num_computed_tokens
        end = start + num_new
        num_prompt = len(req.prompt_token_ids)
        num_tokens = num_prompt + len(req.output_token_ids)
        if end == num_tokens and num_new == 1 and start >= num_prompt:
            token_ids: tuple[int, ...] = (req.output_token_ids[-1],)  # decode: the last sampled token
        else:
            token_ids = req.token_slice(start, end)
        want_prompt_logprobs = (req.want_prompt_logprobs and start < num_prompt
                                and end > req.num_prompt_logprob_tokens)
        if _FAST_SEQ:
            seq = object.__new__(ScheduledSeq)
            object.__setattr__(seq, "__dict__", {
                "request_id": req.request_id, "state_slot": req.state_slot, "token_ids": token_ids,
                "start_pos": start, "comp_blocks": req.comp_blocks, "window_blocks": req.window_blocks,
                "reset_state": reset_state, "sample": end == num_tokens, "want_prompt_logprobs": want_prompt_logprobs})
            return seq
        return ScheduledSeq(req.request_id, req.state_slot, token_ids, start, req.comp_blocks, req.window_blocks,
                            reset_state, end == num_tokens, want_prompt_logprobs)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        cache = self.cache
        size = cache.block_size
        running = self.running
        make_seq = self._make_seq
        seqs: list[ScheduledSeq] = []
        preempted: list[str] = []

        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            num_computed = req.num_computed_tokens
            num_new = len(req.prompt_token_ids) + len(req.output_token_ids) - num_computed  # >= 1 while RUNNING
            if num_new > budget:
                num_new = budget
            if num_computed + num_new <= len(req.comp_blocks) * size:  # fast path: no new block
                seqs.append(make_seq(req, num_new, False))
                budget -= num_new
                i += 1
                continue
            while True:
                num_fit = cache.num_fitting_tokens(req, num_new)
                if num_fit == num_new:
                    break
                if len(running) - 1 > i:  # someone admitted later: preempt the latest, retry
                    victim = running.pop()
                    self._preempt(victim)
                    preempted.append(victim.request_id)
                    continue
                if num_fit > 0:  # nobody behind us: run the part that fits
                    num_new = num_fit
                    break
                if i == 0:  # cannot happen: add_request checked that one token always fits alone
                    raise RuntimeError(f"{req.request_id}: alone in the cache and no block fits")
                running.pop()  # we are the latest admitted: preempt ourselves
                self._preempt(req)
                preempted.append(req.request_id)
                num_new = 0
                break
            if num_new == 0:
                break
            cache.allocate(req, num_new)
            seqs.append(make_seq(req, num_new, False))
            budget -= num_new
            i += 1

        if not preempted:
            max_running = self.config.max_num_seqs
            while self.waiting and budget > 0 and len(running) < max_running and cache.free_slots:
                req = self.waiting[0]
                hit = self._find_hit(req)
                num_new = min(req.num_tokens - hit.num_blocks * cache.block_size, budget)
                num_fit = cache.num_fitting_tokens(req, num_new, hit)
                if num_fit < num_new:
                    if running or num_fit == 0:
                        break  # FCFS: later requests do not overtake the head of the queue
                    num_new = num_fit
                self.waiting.popleft()
                cache.admit(req, hit)
                cache.allocate(req, num_new)
                req.status = RequestStatus.RUNNING
                running.append(req)
                seqs.append(self._make_seq(req, num_new, True))
                budget -= num_new

        freed, self._freed_ids = tuple(self._freed_ids), []
        return SchedulerOutput(tuple(seqs), self.config.max_num_batched_tokens - budget,
                               tuple(preempted), freed)

    def _find_hit(self, req: Request) -> PrefixHit:
        if req.want_prompt_logprobs and req.num_prompt_logprob_tokens < req.num_prompt_tokens:
            return PrefixHit()  # every prompt row must be computed once for its logprobs
        return self.cache.find_prefix_hit(req)

    def update(self, output: SchedulerOutput, result: StepResult) -> list[Request]:
        """Account for an executed step; returns the requests that finished (by length) in it."""
        finished: list[Request] = []
        max_len = self.config.max_model_len
        requests, sampled, cache = self.requests, result.sampled, self.cache
        size, num_window_back = cache.block_size, cache.sliding_window - 1
        is_running = RequestStatus.RUNNING
        for seq in output.seqs:
            request_id = seq.request_id
            req = requests.get(request_id)
            if req is None or req.status is not is_running:
                continue  # aborted or finished by the engine between schedule() and update()
            num_computed = req.num_computed_tokens
            assert num_computed == seq.start_pos, (request_id, num_computed, seq.start_pos)
            num_computed += len(seq.token_ids)
            req.num_computed_tokens = num_computed
            if seq.want_prompt_logprobs:
                req.num_prompt_logprob_tokens = max(req.num_prompt_logprob_tokens,
                                                    min(req.num_prompt_tokens, num_computed))
            # Same tests as on_computed's first lines: skip the call when no block boundary was crossed.
            if (num_computed // size > req.num_registered_blocks
                    or (num_computed - num_window_back) // size > req.num_window_released):
                cache.on_computed(req)
            if seq.sample:
                token_id = sampled.get(request_id)
                if token_id is None:
                    raise RuntimeError(f"StepResult has no sampled token for {request_id!r}")
                output_ids = req.output_token_ids
                output_ids.append(token_id)
                if len(output_ids) >= req.max_tokens or len(req.prompt_token_ids) + len(output_ids) >= max_len:
                    del requests[request_id]
                    self._release(req)
                    req.status = RequestStatus.FINISHED_LENGTH
                    finished.append(req)
        if finished:  # one O(num_running) pass instead of a list.remove per finished request
            self.running = [r for r in self.running if r.status == RequestStatus.RUNNING]
        return finished
