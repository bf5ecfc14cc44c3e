"""Carving the state pools out of one memory budget, and the start-up capacity report.

GPU: budget = gpu_memory_utilization x device memory - weights - the activation peak of a
profiling forward over `max_num_batched_tokens` tokens (the largest step the scheduler makes).
CPU: budget = `cache_bytes`.

The window pool is bounded per running sequence (its last W-1 tokens plus the block being
written), so it is sized from `max_num_seqs` and the prefill chunk, with a quarter more for
window blocks kept for prefix reuse. The state slots are one per running sequence. Everything
left goes to the compressed blocks, whose kinds (CSA entries, indexer keys, HCA entries,
boundary records) share one block table and so fill together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flashport.config import ModelConfig
from flashport.engine.config import CacheConfig, SchedulerConfig
from flashport.engine.pools import pool_bytes
from flashport.errors import FlashportError
from flashport.model.deepseek_v4 import DeepseekV4
from flashport.model.state import SequenceState

GiB = 2**30


@dataclass(frozen=True)
class CapacityReport:
    budget_bytes: int
    weights_bytes: int
    activation_bytes: int
    window_bytes: int
    comp_bytes: int
    slot_bytes: int
    max_tokens: int  # tokens the compressed pools hold over all sequences
    max_seqs_at_max_len: int
    entry_dtype: str = ""  # dtype of the compressed entries and indexer keys
    graph_bytes: int = 0  # reserved for the decode graphs (their shared pool and logits buffer)

    def lines(self, cache: CacheConfig, sched: SchedulerConfig) -> list[str]:
        return [
            f"weights {self.weights_bytes / GiB:.2f} GiB, activation peak {self.activation_bytes / GiB:.2f} GiB, "
            f"decode graphs {self.graph_bytes / GiB:.2f} GiB, state budget {self.budget_bytes / GiB:.2f} GiB",
            f"pools: window {cache.num_window_blocks} blocks ({self.window_bytes / GiB:.3f} GiB), "
            f"compressed {cache.num_comp_blocks} blocks ({self.comp_bytes / GiB:.3f} GiB), "
            f"state slots {cache.num_state_slots} ({self.slot_bytes / GiB:.3f} GiB); block = {cache.block_size} tokens"
            + (f"; entries and indexer keys in {self.entry_dtype}" if self.entry_dtype else ""),
            f"capacity: {self.max_tokens:,} tokens in cache, {self.max_seqs_at_max_len} sequences at "
            f"max_model_len {sched.max_model_len} (max_num_seqs {sched.max_num_seqs})",
        ]


def activation_peak(model: DeepseekV4, num_tokens: int) -> int:
    """Bytes a forward over `num_tokens` new tokens allocates beyond what was allocated before."""
    device = model.device
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ids = torch.randint(0, model.cfg.vocab_size, (num_tokens,), device=device)
    model(ids, [num_tokens], [SequenceState.new(model.cfg, model.dtype, device)],
          torch.tensor([num_tokens - 1], device=device))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()
    return peak


def plan_cache(model: DeepseekV4, sched: SchedulerConfig, block_size: int, *, enable_prefix_caching: bool,
               gpu_memory_utilization: float = 0.9, cache_bytes: int | None = None,
               entry_dtype: torch.dtype | None = None, graph_bytes: int = 0) -> tuple[CacheConfig, CapacityReport]:
    cfg: ModelConfig = model.cfg
    device = model.device
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    act = 0
    if device.type == "cuda" and cache_bytes is None:
        if not 0 < gpu_memory_utilization <= 1:
            raise FlashportError(f"gpu_memory_utilization = {gpu_memory_utilization}: must be in (0, 1]")
        act = activation_peak(model, sched.max_num_batched_tokens)
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(gpu_memory_utilization * total) - torch.cuda.memory_allocated(device) - act - graph_bytes
    else:
        budget = cache_bytes if cache_bytes is not None else 256 * 2**20
    b = pool_bytes(cfg, block_size, model.dtype, entry_dtype)
    per_seq_window = math.ceil((cfg.sliding_window - 1) / block_size) + 1
    num_window = sched.max_num_seqs * per_seq_window + math.ceil(sched.max_num_batched_tokens / block_size) + 1
    if enable_prefix_caching:
        num_window += num_window // 4
    num_slots = sched.max_num_seqs
    # + 1 window block and state slot: the pools' scratch (the padding rows of decode graphs)
    rest = budget - (num_window + 1) * b.window_block - (num_slots + 1) * b.state_slot
    blocks_per_seq = math.ceil(sched.max_model_len / block_size)
    if b.comp_block == 0:  # no compressed layer (e.g. only the first, sliding-window layers): blocks cost nothing
        num_comp = blocks_per_seq * sched.max_num_seqs
    else:
        num_comp = rest // b.comp_block if rest > 0 else 0
    if num_comp < blocks_per_seq:
        need = num_window * b.window_block + num_slots * b.state_slot + blocks_per_seq * b.comp_block
        raise FlashportError(
            f"the state budget ({budget / GiB:.3f} GiB) is too small: one sequence of max_model_len "
            f"{sched.max_model_len} with max_num_seqs {sched.max_num_seqs} needs {need / GiB:.3f} GiB; "
            "raise the budget (gpu_memory_utilization / cache_bytes) or lower max_model_len or max_num_seqs")
    cache = CacheConfig(block_size=block_size, num_comp_blocks=int(num_comp), num_window_blocks=num_window,
                        num_state_slots=num_slots, sliding_window=cfg.sliding_window,
                        enable_prefix_caching=enable_prefix_caching)
    report = CapacityReport(
        budget_bytes=budget, weights_bytes=weights, activation_bytes=act,
        window_bytes=num_window * b.window_block, comp_bytes=int(num_comp) * b.comp_block,
        slot_bytes=num_slots * b.state_slot, max_tokens=int(num_comp) * block_size,
        max_seqs_at_max_len=min(num_slots, int(num_comp) // blocks_per_seq),
        entry_dtype=str(entry_dtype or model.dtype).removeprefix("torch."), graph_bytes=graph_bytes)
    return cache, report
