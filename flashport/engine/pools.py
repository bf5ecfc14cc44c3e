"""The state pools: every byte of per-sequence decode state, allocated once at start-up.

Three groups (spec §6), each a set of tensors indexed by a block or slot id:

- window blocks: the K=V rows of `block_size` consecutive tokens, every layer
  (window[layer] is [num_window_blocks * B, D]; row = block * B + token % B);
- compressed blocks, shared block table for all of: CSA entries [B/m per block, D], indexer keys
  [B/m, Di], HCA entries [B/m', D], and the CSA overlap state at the end of the block (the
  boundary record a prefix hit resumes from);
- state slots, one per running sequence: the compressor rows of the block not yet closed and the
  current CSA overlap. At a block boundary they are empty or equal to the boundary record, since
  B is a multiple of every compress rate.

Nothing here is allocated after construction; `bytes_per_*` size the pools from a budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flashport.config import CSA, HCA, ModelConfig
from flashport.engine.config import CacheConfig
from flashport.errors import FlashportError


def default_block_size(cfg: ModelConfig) -> int:
    """Smallest multiple of every compress rate that holds a window tail (B >= W - 1)."""
    step = math.lcm(*_rates(cfg))
    return step * max(1, math.ceil((cfg.sliding_window - 1) / step))


def _rates(cfg: ModelConfig) -> list[int]:
    # Both rates of the config, also when the layers loaded (--num-layers) use neither: the step's
    # row bookkeeping is written for both kinds.
    return [r for r in (cfg.compress_rate_csa, cfg.compress_rate_hca) if r > 0] or [1]


def check_block_size(cfg: ModelConfig, block_size: int) -> None:
    for rate in _rates(cfg):
        if block_size % rate:
            raise FlashportError(f"block_size {block_size} is not a multiple of the compress rate {rate}")
    if block_size < cfg.sliding_window - 1:
        raise FlashportError(f"block_size {block_size} is below sliding_window - 1 = {cfg.sliding_window - 1}")


@dataclass(frozen=True)
class PoolBytes:
    window_block: int
    comp_block: int
    state_slot: int


def pool_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype, entry_dtype: torch.dtype | None = None
               ) -> PoolBytes:
    """Bytes of one window block, one compressed block and one state slot. `entry_dtype`: the
    dtype of CSA / HCA entries and indexer keys (FP8 with kv_cache_dtype="fp8"; default dtype)."""
    e = torch.empty(0, dtype=dtype).element_size()
    ee = torch.empty(0, dtype=entry_dtype or dtype).element_size()
    B, D, Di, L = block_size, cfg.head_dim, cfg.index_head_dim, cfg.num_hidden_layers
    m, mh = cfg.compress_rate_csa, cfg.compress_rate_hca
    n_csa, n_hca = cfg.layer_types.count(CSA), cfg.layer_types.count(HCA)
    window = L * B * D * e
    boundary = m * (D + Di) * (e + 4)  # overlap kv (dtype) + gate (fp32), main and indexer
    comp = n_csa * ((B // m) * (D + Di) * ee + boundary) + n_hca * (B // mh) * D * ee
    slot = n_csa * ((m - 1) * 2 * (2 * D + 2 * Di) * e + boundary) + n_hca * (mh - 1) * 2 * D * e
    return PoolBytes(window, comp, slot)


class StatePools:
    def __init__(self, cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: torch.device | str,
                 entry_dtype: torch.dtype | None = None) -> None:
        """`entry_dtype`: CSA / HCA entries and indexer keys (FP8 for kv_cache_dtype="fp8");
        everything else (window rows, pending rows, overlap) stays in the model dtype."""
        check_block_size(cfg, cache.block_size)
        self.cfg, self.cache_cfg = cfg, cache
        self.entry_dtype = entry_dtype or dtype
        B, D, Di = cache.block_size, cfg.head_dim, cfg.index_head_dim
        m, mh = cfg.compress_rate_csa, cfg.compress_rate_hca
        S, NW, NC = cache.num_state_slots, cache.num_window_blocks, cache.num_comp_blocks
        # One window block and one state slot past the scheduler's ids: the scratch that the padded
        # rows of a fixed-shape decode step (engine/graphs.py) write, so they touch no real state.
        self.scratch_window_block, self.scratch_slot = NW, S
        NW, S = NW + 1, S + 1
        # Per layer: its index among the CSA (or HCA) layers, the first dim of those pools.
        self.csa_index = {layer: i for i, layer in enumerate(k for k, t in enumerate(cfg.layer_types) if t == CSA)}
        self.hca_index = {layer: i for i, layer in enumerate(k for k, t in enumerate(cfg.layer_types) if t == HCA)}
        nc, nh = len(self.csa_index), len(self.hca_index)

        def empty(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dt, device=device)

        self.window = empty(cfg.num_hidden_layers, NW * B, D)
        # compressed blocks
        self.csa_entries = empty(nc, NC * (B // m), D, dt=self.entry_dtype)
        self.index_keys = empty(nc, NC * (B // m), Di, dt=self.entry_dtype)
        self.hca_entries = empty(nh, NC * (B // mh), D, dt=self.entry_dtype)
        self.boundary = _Overlap(empty(nc, NC, m, D), empty(nc, NC, m, D, dt=torch.float32),
                                 empty(nc, NC, m, Di), empty(nc, NC, m, Di, dt=torch.float32))
        # state slots
        self.slot_overlap = _Overlap(empty(nc, S, m, D), empty(nc, S, m, D, dt=torch.float32),
                                     empty(nc, S, m, Di), empty(nc, S, m, Di, dt=torch.float32))
        self.csa_pending = (empty(nc, S, m - 1, 2 * D), empty(nc, S, m - 1, 2 * D))  # raw kv, raw gate
        self.index_pending = (empty(nc, S, m - 1, 2 * Di), empty(nc, S, m - 1, 2 * Di))
        self.hca_pending = (empty(nh, S, mh - 1, D), empty(nh, S, mh - 1, D))

    @property
    def nbytes(self) -> int:
        tensors = [self.window, self.csa_entries, self.index_keys, self.hca_entries, *self.boundary,
                   *self.slot_overlap, *self.csa_pending, *self.index_pending, *self.hca_pending]
        return sum(t.numel() * t.element_size() for t in tensors)

    def load_boundary(self, slot: int, comp_block: int) -> None:
        """Resume a sequence at the end of comp block `comp_block` (a prefix hit): its CSA
        overlap state becomes that block's boundary record. Pending rows are empty there."""
        for dst, src in zip(self.slot_overlap, self.boundary):
            dst[:, slot] = src[:, comp_block]


@dataclass(frozen=True)
class _Overlap:
    """CSA overlap state (main compressor kv, gate; indexer kv, gate), [layers, ids, rate, dim]."""

    kv: torch.Tensor
    gate: torch.Tensor
    index_kv: torch.Tensor
    index_gate: torch.Tensor

    def __iter__(self):
        return iter((self.kv, self.gate, self.index_kv, self.index_gate))
