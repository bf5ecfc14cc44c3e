"""Engine configuration: frozen, built once at start-up. No torch here (the scheduler imports it)."""

from __future__ import annotations

from dataclasses import dataclass

from flashport.errors import FlashportError


@dataclass(frozen=True)
class CacheConfig:
    block_size: int  # tokens per block; a multiple of every compress rate and >= sliding_window - 1
    num_comp_blocks: int  # blocks of the compressed pools (CSA entries, indexer keys, HCA entries)
    num_window_blocks: int  # blocks of the window pool (K=V rows of recent tokens, every layer)
    num_state_slots: int  # per-sequence compressor state slots (= the most sequences running at once)
    sliding_window: int  # window length W; a running sequence needs the blocks of its last W-1 tokens
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("block_size", "num_comp_blocks", "num_window_blocks", "num_state_slots", "sliding_window"):
            if getattr(self, name) < 1:
                raise FlashportError(f"CacheConfig.{name} = {getattr(self, name)}: must be >= 1")
        if self.block_size < self.sliding_window - 1:
            raise FlashportError(f"CacheConfig.block_size = {self.block_size}: must be >= sliding_window - 1 "
                                 f"= {self.sliding_window - 1} (a prefix boundary keeps one window block)")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # requests running at once
    max_num_batched_tokens: int = 2048  # tokens per step (prefill chunks + decodes)
    max_model_len: int = 8192  # prompt + output tokens of one request

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise FlashportError(f"SchedulerConfig.{name} = {getattr(self, name)}: must be >= 1")
