"""What crosses between the scheduler (pure Python) and the model runner (torch): small dataclasses.

The runner never decides anything; the scheduler never touches a tensor.

Block tables. Every sequence has two block tables, both indexed by logical block b = token // B
(B = CacheConfig.block_size):

- `comp_blocks[b]`: the block of the *compressed* pools (CSA entries, indexer keys, HCA entries,
  and the compressor boundary state at the end of block b) holding tokens [b*B, (b+1)*B).
- `window_blocks[b]`: the block of the *window* pool holding the K=V rows of those tokens, or -1
  once the block has left the sliding window and was released by this sequence.

The compressor's pending rows and overlap for a running sequence live in its `state_slot`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScheduledSeq:
    request_id: str
    state_slot: int  # row of the per-sequence state pool (pending compressor rows, overlap)
    token_ids: tuple[int, ...]  # the tokens to run now (a prompt chunk, or the last sampled token)
    start_pos: int  # position of token_ids[0] (= tokens already in the cache for this sequence)
    comp_blocks: tuple[int, ...]  # covers positions [0, start_pos + len(token_ids))
    window_blocks: tuple[int, ...]  # same length as comp_blocks; -1 for released blocks
    # The slot must be (re)initialised before this step: True when the sequence starts (fresh or
    # after preemption). With start_pos > 0 that is a prefix-cache hit: the slot's overlap state
    # is loaded from the boundary record of comp block start_pos // B - 1.
    reset_state: bool
    sample: bool  # this chunk reaches the end of the known tokens: sample the next token
    want_prompt_logprobs: bool = False  # return logits of every row of this chunk


@dataclass(frozen=True)
class SchedulerOutput:
    seqs: tuple[ScheduledSeq, ...]
    num_batched_tokens: int
    preempted: tuple[str, ...] = ()  # moved back to waiting this step (their state is gone)
    finished_freed: tuple[str, ...] = ()  # requests whose state was released since the last step

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class StepResult:
    """What the runner hands back for one step: per scheduled seq that had `sample` set."""

    sampled: dict[str, int] = field(default_factory=dict)  # request_id -> token id
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)
    # request_id -> (index of the first entry, entries): entry i of a request's prompt logprobs
    # is for prompt token i (entry 0 is always None and never sent).
    prompt_logprobs: dict[str, tuple[int, list[dict[int, float]]]] = field(default_factory=dict)
