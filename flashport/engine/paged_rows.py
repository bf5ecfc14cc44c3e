"""The model's view of the pools for the op path: every query row reads the pools in place.

Where `PagedCache` gathers a dense state per sequence (the reference path), this view gives the
attention layer per-row block tables, so the attention and indexer ops (Triton on a GPU, their
torch twins on the CPU) read each row's window tail and compressed entries straight from the
pools, whether the row is a decode token or one token of a prefill chunk. The compressors run as
one batched op for the sequences with one new token, and per sequence (torch) for chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashport.config import CSA, HCA, ModelConfig
from flashport.engine.plan import ScheduledSeq
from flashport.engine.pools import StatePools
from flashport.model.compressor import Compressor
from flashport.model.layers import RotaryTables
from flashport.model.quant import to_fp8_storage
from flashport.model.state import CompressorState


@dataclass
class _Chunk:
    """A sequence with several new tokens: its compressors run per sequence."""

    slot: int
    rows: slice  # its tokens in the flat batch
    start: int
    csa_write: torch.Tensor  # entries-pool rows of the CSA blocks the chunk closes
    hca_write: torch.Tensor
    boundaries: list[tuple[int, int]]  # (comp block, index among the chunk's closed CSA blocks)


@dataclass(frozen=True)
class PaddedShape:
    """A fixed-shape decode step (engine/graphs.py): `rows` one-token rows, block tables `width`
    wide. The rows past the real sequences are padding: token 0 at position 0 of a fresh sequence
    whose window block is the pools' scratch block and whose state slot is the scratch slot, so
    they write only scratch and read only what they wrote."""

    rows: int
    width: int


class PagedRowsCache:
    def __init__(self, pools: StatePools, seqs: list[ScheduledSeq], record_boundaries: bool,
                 padded: PaddedShape | None = None, tables: bool = True) -> None:
        # tables=False (padded decode steps only): the block tables (index_lists[2:4]) are left None
        # for the caller to fill (DecodeGraphs keeps each row's table between steps).
        self.pools, self.cfg = pools, pools.cfg
        cfg: ModelConfig = pools.cfg
        B = pools.cache_cfg.block_size
        m, mh = cfg.compress_rate_csa, cfg.compress_rate_hca
        if padded is None:
            w_max = max(len(s.window_blocks) for s in seqs)
            c_max = max(len(s.comp_blocks) for s in seqs)
        else:
            _check_padded(seqs, padded)
            w_max = c_max = padded.width
        row_seq, window_write, wtab, ctab = [], [], [], []
        dec = ([], [], [], [], [], [])  # rows, slots, positions, csa close row, hca close row, boundary block
        chunk_lists: list[list[int]] = []
        chunks = []
        row = 0
        for i, s in enumerate(seqs):
            n, start = len(s.token_ids), s.start_pos
            end = start + n
            wb, cb = s.window_blocks, s.comp_blocks
            row_seq += [i] * n
            window_write += [wb[t // B] * B + t % B for t in range(start, end)]
            if tables:
                wtab += list(wb) + [-1] * (w_max - len(wb))
                ctab += list(cb) + [-1] * (c_max - len(cb))
            if n == 1:
                e = end // m - 1  # the CSA entry this token closes, if end % m == 0
                eh = end // mh - 1
                dec[0].append(row)
                dec[1].append(s.state_slot)
                dec[2].append(start)
                dec[3].append(cb[e // (B // m)] * (B // m) + e % (B // m) if end % m == 0 else -1)
                dec[4].append(cb[eh // (B // mh)] * (B // mh) + eh % (B // mh) if end % mh == 0 else -1)
                dec[5].append(cb[end // B - 1] if record_boundaries and end % B == 0 else -1)
            else:
                chunk_lists += [_rows(cb, start // m, end // m, B // m), _rows(cb, start // mh, end // mh, B // mh)]
                bounds = [(cb[k - 1], k * B // m - 1 - start // m) for k in range(start // B + 1, end // B + 1)]
                chunks.append((s.state_slot, slice(row, row + n), start, bounds if record_boundaries else []))
            row += n
        num_seqs = len(seqs)
        if padded is not None:  # padding rows: a fresh sequence's first token, on scratch state
            pad = padded.rows - num_seqs
            row_seq += range(num_seqs, padded.rows)
            window_write += [pools.scratch_window_block * B] * pad
            if tables:
                wtab += ([pools.scratch_window_block] + [-1] * (w_max - 1)) * pad
                ctab += [-1] * (c_max * pad)
            dec[0].extend(range(num_seqs, padded.rows))
            dec[1].extend([pools.scratch_slot] * pad)
            for k in range(2, 6):
                dec[k].extend([0 if k == 2 else -1] * pad)
            num_seqs = padded.rows
        if not tables and padded is None:
            raise ValueError("tables=False is for padded decode steps only")
        self.index_lists = [row_seq, window_write, wtab if tables else None, ctab if tables else None, *dec,
                            *chunk_lists]
        self._num_seqs, self._w_max, self._c_max = num_seqs, w_max, c_max
        self._chunk_meta = chunks

    def bind(self, pieces: list[torch.Tensor]) -> None:
        row_seq, self.window_write, wtab, ctab, *rest = pieces
        S = self._num_seqs
        self.window_table = wtab.view(S, self._w_max).int()[row_seq]  # [N, w_max] int32, per query row
        self.comp_table = ctab.view(S, self._c_max).int()[row_seq]  # [N, c_max] int32
        (self.dec_rows, self.dec_slots, self.dec_positions, self.dec_csa_close, self.dec_hca_close,
         self.dec_boundary) = rest[:6]
        lists = rest[6:]
        self.chunks = [_Chunk(slot, rows, start, lists[2 * k], lists[2 * k + 1], bounds)
                       for k, (slot, rows, start, bounds) in enumerate(self._chunk_meta)]

    def layer(self, index: int) -> PagedRowsLayer:
        return PagedRowsLayer(self, index)


def _check_padded(seqs: list[ScheduledSeq], padded: PaddedShape) -> None:
    if len(seqs) > padded.rows:
        raise ValueError(f"PaddedShape.rows = {padded.rows}: the step has {len(seqs)} sequences")
    for s in seqs:
        if len(s.token_ids) != 1:
            raise ValueError(f"PaddedShape: sequence {s.request_id!r} has {len(s.token_ids)} new tokens; a "
                             "padded step is decode only (one token per sequence)")
        if len(s.comp_blocks) > padded.width or len(s.window_blocks) > padded.width:
            raise ValueError(f"PaddedShape.width = {padded.width}: sequence {s.request_id!r} holds "
                             f"{len(s.comp_blocks)} blocks")


def _rows(comp_blocks: tuple[int, ...], lo: int, hi: int, per_block: int) -> list[int]:
    return [comp_blocks[j // per_block] * per_block + j % per_block for j in range(lo, hi)]


class PagedRowsLayer:
    """One layer's pools and the step's row metadata (see `PagedRowsCache`)."""

    def __init__(self, cache: PagedRowsCache, layer: int) -> None:
        self.c, self.layer = cache, layer
        kind = cache.cfg.layer_types[layer]
        p = cache.pools
        self.csa = p.csa_index.get(layer) if kind == CSA else None
        self.hca = p.hca_index.get(layer) if kind == HCA else None
        self.block_size = p.cache_cfg.block_size
        self.window_pool = p.window[layer]
        self.entries = (p.csa_entries[self.csa] if self.csa is not None
                        else p.hca_entries[self.hca] if self.hca is not None else None)
        self.index_keys = p.index_keys[self.csa] if self.csa is not None else None

    def paged_rows(self) -> PagedRowsLayer:
        return self

    @property
    def window_write(self) -> torch.Tensor:
        return self.c.window_write

    @property
    def window_table(self) -> torch.Tensor:
        return self.c.window_table

    @property
    def comp_table(self) -> torch.Tensor:
        return self.c.comp_table

    def compress(self, comp: Compressor, kv: torch.Tensor, gate: torch.Tensor, rope: RotaryTables, eps: float,
                 indexer: bool, impl: str) -> None:
        """Advance one compressor (the layer's main one, or its indexer's) by the step's rows
        kv, gate [N, width] (raw projections), writing entries, pending rows, overlap and
        boundary records into the pools."""
        from flashport.ops.compressor import compressor_decode

        c, p, m = self.c, self.c.pools, comp.rate
        if self.csa is not None:
            i = self.csa
            pend = p.index_pending if indexer else p.csa_pending
            pend_kv, pend_gate = pend[0][i], pend[1][i]
            ov, bd = p.slot_overlap, p.boundary
            overlap = ((ov.index_kv[i], ov.index_gate[i], bd.index_kv[i], bd.index_gate[i]) if indexer
                       else (ov.kv[i], ov.gate[i], bd.kv[i], bd.gate[i]))
            entries = p.index_keys[i] if indexer else p.csa_entries[i]
            close = c.dec_csa_close
        else:
            i = self.hca
            pend_kv, pend_gate = p.hca_pending[0][i], p.hca_pending[1][i]
            overlap, entries, close = None, p.hca_entries[i], c.dec_hca_close
        if c.dec_rows.numel():
            cos, sin = rope.cos_sin(c.dec_positions + 1 - m, compress=True, dtype=kv.dtype)
            boundary = c.dec_boundary if overlap is not None else torch.full_like(c.dec_boundary, -1)
            compressor_decode(kv[c.dec_rows], gate[c.dec_rows], c.dec_slots, c.dec_positions, close, boundary,
                              pend_kv, pend_gate, entries, comp.ape, comp.norm.weight, eps, cos, sin,
                              overlap, impl=impl)
        for ch in c.chunks:  # several new tokens: the torch compressor on this sequence's state
            r = ch.start % m
            has_overlap = overlap is not None and ch.start >= m
            st = CompressorState(pending_kv=pend_kv[ch.slot, :r], pending_gate=pend_gate[ch.slot, :r],
                                 entries=kv.new_empty(0, entries.shape[1]), num_earlier=ch.start // m, overlap_kv=overlap[0][ch.slot] if has_overlap else None,
                                 overlap_gate=overlap[1][ch.slot] if has_overlap else None)
            closed = comp.update(st, kv[ch.rows], gate[ch.rows], rope)
            write = ch.csa_write if overlap is not None else ch.hca_write
            new = st.entries  # [closed, d] in the model dtype
            if entries.dtype == new.dtype:
                entries.index_copy_(0, write, new)
            else:  # an FP8 pool (kv_cache_dtype="fp8"): index_copy_ has no FP8 kernels, its bytes do
                entries.view(torch.uint8).index_copy_(0, write, to_fp8_storage(new, entries.dtype).view(torch.uint8))
            n = st.pending_kv.shape[0]
            pend_kv[ch.slot, :n] = st.pending_kv
            pend_gate[ch.slot, :n] = st.pending_gate
            if overlap is not None and st.overlap_kv is not None:
                overlap[0][ch.slot] = st.overlap_kv
                overlap[1][ch.slot] = st.overlap_gate
                for block, j in ch.boundaries:
                    overlap[2][block], overlap[3][block] = closed[0][j], closed[1][j]
