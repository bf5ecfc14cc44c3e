"""The model's view of the pools for one step: where each sequence's state rows live.

For every sequence of the step this computes, on the host from its block tables, the pool rows
to read (window tail, closed entries) and to write (the new tokens' window rows, the entries
this chunk closes, the boundary records of blocks it completes); the runner uploads them with
its other inputs in one copy (`bind`); then this hands the attention layers a `LayerCache` that gathers a dense `LayerState` per sequence and
scatters the result back (torch reference path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashport.config import CSA, HCA, ModelConfig
from flashport.engine.plan import ScheduledSeq
from flashport.engine.pools import StatePools
from flashport.model.state import ClosedBlocks, CompressorState, LayerState


@dataclass
class _SeqRows:
    """Flat pool rows of one sequence for this step (device int64 tensors)."""

    slot: int
    start: int  # position of the first new token
    end: int  # position after the last new token
    window_read: torch.Tensor  # tokens [start - (W-1), start)
    window_write: torch.Tensor  # tokens [start, end)
    csa_read: torch.Tensor  # entries [0, start // m)
    csa_write: torch.Tensor  # entries [start // m, end // m)
    hca_read: torch.Tensor
    hca_write: torch.Tensor
    boundaries: list[tuple[int, int]]  # (comp block, index among this chunk's closed CSA blocks)


class PagedCache:
    def __init__(self, pools: StatePools, seqs: list[ScheduledSeq], record_boundaries: bool) -> None:
        self.pools, self.cfg = pools, pools.cfg
        cfg: ModelConfig = pools.cfg
        B = pools.cache_cfg.block_size
        W, m, mh = cfg.sliding_window, cfg.compress_rate_csa, cfg.compress_rate_hca
        lists: list[list[int]] = []
        shapes = []
        for s in seqs:
            start, end = s.start_pos, s.start_pos + len(s.token_ids)
            wb, cb = s.window_blocks, s.comp_blocks
            parts = [
                [wb[t // B] * B + t % B for t in range(max(0, start - (W - 1)), start)],
                [wb[t // B] * B + t % B for t in range(start, end)],
                _entry_rows(cb, 0, start // m, B // m),
                _entry_rows(cb, start // m, end // m, B // m),
                _entry_rows(cb, 0, start // mh, B // mh),
                _entry_rows(cb, start // mh, end // mh, B // mh),
            ]
            lists += parts
            # Blocks completed by this chunk: boundary k*B with start < k*B <= end. The CSA block
            # closing there is entry k*B/m - 1, the j-th this chunk closes.
            bounds = [(cb[k - 1], k * B // m - 1 - start // m) for k in range(start // B + 1, end // B + 1)]
            shapes.append((s.state_slot, start, end, bounds if record_boundaries else []))
        self.index_lists = lists  # uploaded by the runner together with its own inputs
        self._shapes = shapes
        self.seqs: list[_SeqRows] = []

    def bind(self, pieces: list[torch.Tensor]) -> None:
        """The device tensors of `index_lists`, in order."""
        self.seqs = [_SeqRows(slot, start, end, *pieces[6 * i: 6 * i + 6], bounds)
                     for i, (slot, start, end, bounds) in enumerate(self._shapes)]

    def layer(self, index: int) -> _PagedLayer:
        return _PagedLayer(self, index)


def _entry_rows(comp_blocks: tuple[int, ...], lo: int, hi: int, per_block: int) -> list[int]:
    return [comp_blocks[j // per_block] * per_block + j % per_block for j in range(lo, hi)]


class _PagedLayer:
    def __init__(self, cache: PagedCache, layer: int) -> None:
        self.c, self.layer = cache, layer
        kind = cache.cfg.layer_types[layer]
        self.csa = cache.pools.csa_index.get(layer) if kind == CSA else None
        self.hca = cache.pools.hca_index.get(layer) if kind == HCA else None

    def paged_rows(self) -> None:
        return None  # the reference path: begin / commit per sequence

    def begin(self, i: int) -> LayerState:
        p, s, cfg = self.c.pools, self.c.seqs[i], self.c.cfg
        st = LayerState(window=p.window[self.layer][s.window_read])
        if self.csa is not None:
            c, m = self.csa, cfg.compress_rate_csa
            has_overlap = s.start >= m  # a CSA block has closed before this chunk
            ov = p.slot_overlap
            st.compressor = CompressorState(
                pending_kv=p.csa_pending[0][c, s.slot, : s.start % m], pending_gate=p.csa_pending[1][c, s.slot, : s.start % m],
                entries=p.csa_entries[c][s.csa_read],
                overlap_kv=ov.kv[c, s.slot] if has_overlap else None,
                overlap_gate=ov.gate[c, s.slot] if has_overlap else None)
            st.indexer = CompressorState(
                pending_kv=p.index_pending[0][c, s.slot, : s.start % m],
                pending_gate=p.index_pending[1][c, s.slot, : s.start % m],
                entries=p.index_keys[c][s.csa_read],
                overlap_kv=ov.index_kv[c, s.slot] if has_overlap else None,
                overlap_gate=ov.index_gate[c, s.slot] if has_overlap else None)
        elif self.hca is not None:
            h, mh = self.hca, cfg.compress_rate_hca
            st.compressor = CompressorState(
                pending_kv=p.hca_pending[0][h, s.slot, : s.start % mh],
                pending_gate=p.hca_pending[1][h, s.slot, : s.start % mh],
                entries=p.hca_entries[h][s.hca_read])
        return st

    def commit(self, i: int, st: LayerState, kv_new: torch.Tensor, closed: ClosedBlocks,
               closed_index: ClosedBlocks) -> None:
        p, s = self.c.pools, self.c.seqs[i]
        p.window[self.layer].index_copy_(0, s.window_write, kv_new)
        if self.csa is not None:
            c = self.csa
            n_old = s.csa_read.shape[0]
            p.csa_entries[c].index_copy_(0, s.csa_write, st.compressor.entries[n_old:])
            p.index_keys[c].index_copy_(0, s.csa_write, st.indexer.entries[n_old:])
            for pend, comp in ((p.csa_pending, st.compressor), (p.index_pending, st.indexer)):
                n = comp.pending_kv.shape[0]
                pend[0][c, s.slot, :n] = comp.pending_kv
                pend[1][c, s.slot, :n] = comp.pending_gate
            ov = p.slot_overlap
            if st.compressor.overlap_kv is not None:
                ov.kv[c, s.slot] = st.compressor.overlap_kv
                ov.gate[c, s.slot] = st.compressor.overlap_gate
                ov.index_kv[c, s.slot] = st.indexer.overlap_kv
                ov.index_gate[c, s.slot] = st.indexer.overlap_gate
            b = p.boundary
            for block, j in s.boundaries:
                b.kv[c, block], b.gate[c, block] = closed[0][j], closed[1][j]
                b.index_kv[c, block], b.index_gate[c, block] = closed_index[0][j], closed_index[1][j]
        elif self.hca is not None:
            h = self.hca
            n_old = s.hca_read.shape[0]
            p.hca_entries[h].index_copy_(0, s.hca_write, st.compressor.entries[n_old:])
            n = st.compressor.pending_kv.shape[0]
            p.hca_pending[0][h, s.slot, :n] = st.compressor.pending_kv
            p.hca_pending[1][h, s.slot, :n] = st.compressor.pending_gate
