"""One generation request as the scheduler sees it: token ids, progress counters, block tables.

No torch and no sampling logic: the engine's sampling parameters ride along as an opaque payload.

Progress is counters (vLLM v1 style): `num_computed_tokens` (tokens whose state is in the cache)
catches up to `num_tokens` (prompt + output). While RUNNING, num_computed_tokens < num_tokens
always holds: a step either runs a prompt chunk that ends before the known tokens, or reaches the
end and samples one more token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()  # back in the waiting queue, state freed; resumes by recomputation
    FINISHED_STOPPED = enum.auto()  # EOS / stop token / stop string (decided by the engine)
    FINISHED_LENGTH = enum.auto()  # max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED})


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    sampling_params: Any = None  # opaque to the scheduler; the engine's SamplingParams
    want_prompt_logprobs: bool = False
    arrival_order: int = -1  # set by Scheduler.add_request (FCFS tie-break, monotone)

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    # Block tables, indexed by logical block b = token // block_size; always the same length.
    # comp_blocks: never -1 while held. window_blocks: a prefix of -1 (released, out of window).
    # Tuples: replaced (not mutated) when they change, about once per block_size tokens, so a
    # ScheduledSeq shares them without a copy and never sees a later change.
    comp_blocks: tuple[int, ...] = ()
    window_blocks: tuple[int, ...] = ()
    state_slot: int = -1  # -1 while not holding one (waiting / preempted / finished)
    num_cached_tokens: int = 0  # prefix-cache hit of the latest admission (tokens not computed)
    num_preemptions: int = 0

    # Bookkeeping owned by the CacheManager (invariants in cache.py).
    block_hashes: list[int] = field(default_factory=list)  # chained hash of each full block
    num_window_released: int = 0  # window_blocks[:num_window_released] are all -1
    num_registered_blocks: int = 0  # leading full computed blocks already offered to the cache
    # Prompt positions [0, n) whose prompt logprobs were already returned (survives preemption).
    num_prompt_logprob_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids  # a copy: O(n), not for the hot path

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens [start, end) of prompt + output without concatenating the two lists."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return tuple(self.prompt_token_ids[start:end])
        if start >= num_prompt:
            return tuple(self.output_token_ids[start - num_prompt:end - num_prompt])
        return tuple(self.prompt_token_ids[start:]) + tuple(self.output_token_ids[:end - num_prompt])
