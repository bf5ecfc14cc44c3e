"""Per-sequence decode state the model keeps between calls (spec §6.1).

This is the model's own dense state: one `SequenceState` per sequence, one `LayerState` per
layer, tensors that grow by concatenation. It is what lets a prompt be prefilled (in one or
several chunks) and then decoded token by token with results equal to one full forward. The
paged engine keeps the same quantities in pre-allocated pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from flashport.config import CSA, HCA, ModelConfig


@dataclass
class CompressorState:
    """State of one compressor (the CSA/HCA main compressor, or the CSA indexer's)."""

    pending_kv: torch.Tensor  # [p < rate, width] raw projections of tokens not yet in a closed block
    pending_gate: torch.Tensor  # [p, width] raw gate logits (model dtype, bias not added)
    entries: torch.Tensor  # [n, dim] closed compressed entries (normed, roped)
    overlap_kv: torch.Tensor | None = None  # CSA: [rate, dim] Ca half of the last closed block
    overlap_gate: torch.Tensor | None = None  # CSA: [rate, dim] fp32, its gate with the bias added
    num_earlier: int = 0  # closed entries before `entries[0]` (kept elsewhere, e.g. in a pool)

    @property
    def num_entries(self) -> int:
        return self.num_earlier + self.entries.shape[0]


@dataclass
class LayerState:
    window: torch.Tensor  # [<= window-1, head_dim] K=V of the latest tokens (roped)
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None


@dataclass
class SequenceState:
    layers: list[LayerState]
    num_tokens: int = 0  # tokens already processed (the position of the next token)

    @staticmethod
    def new(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> SequenceState:
        def comp(width: int, dim: int) -> CompressorState:
            return CompressorState(
                pending_kv=torch.empty(0, width, dtype=dtype, device=device),
                pending_gate=torch.empty(0, width, dtype=dtype, device=device),
                entries=torch.empty(0, dim, dtype=dtype, device=device))

        layers = []
        for kind in cfg.layer_types:
            st = LayerState(window=torch.empty(0, cfg.head_dim, dtype=dtype, device=device))
            if kind == CSA:
                st.compressor = comp(2 * cfg.head_dim, cfg.head_dim)
                st.indexer = comp(2 * cfg.index_head_dim, cfg.index_head_dim)
            elif kind == HCA:
                st.compressor = comp(cfg.head_dim, cfg.head_dim)
            layers.append(st)
        return SequenceState(layers=layers)


# The overlap halves of the CSA blocks a call closed: (Ca [n, rate, dim], gate [n, rate, dim] fp32).
ClosedBlocks = tuple[torch.Tensor, torch.Tensor] | None


class LayerCache(Protocol):
    """One layer's view of the state of the sequences in a batch.

    `begin(i)` gives sequence i's state before this call as a dense `LayerState` (its window
    holds the rows of the tokens before this call that the window still needs); the attention
    layer advances its compressor states in place; `commit` stores the result, given the new
    tokens' K=V rows and the CSA blocks closed by the main and the indexer compressor.
    """

    def begin(self, i: int) -> LayerState: ...

    def commit(self, i: int, st: LayerState, kv_new: torch.Tensor, closed: ClosedBlocks,
               closed_index: ClosedBlocks) -> None: ...

    def paged_rows(self) -> PagedRows | None:
        """The in-place view for the op path, or None (then begin/commit per sequence)."""


class PagedRows(Protocol):
    """A layer's pools read in place by the op path (engine/paged_rows.py): per-row block tables."""

    window_pool: torch.Tensor  # [rows, D]
    window_write: torch.Tensor  # [N] pool row of each new token
    window_table: torch.Tensor  # [N, max blocks] per query row, -1 = released
    comp_table: torch.Tensor  # [N, max blocks]
    entries: torch.Tensor | None  # this layer's CSA or HCA entries pool
    index_keys: torch.Tensor | None  # CSA: the indexer keys pool
    block_size: int

    def compress(self, comp, kv: torch.Tensor, gate: torch.Tensor, rope, eps: float, indexer: bool,
                 impl: str) -> None: ...


class ModelCache(Protocol):
    def layer(self, index: int) -> LayerCache: ...


class DenseCache:
    """`ModelCache` over the model's own per-sequence states."""

    def __init__(self, states: list[SequenceState], window: int) -> None:
        self.states, self.window = states, window

    def layer(self, index: int) -> _DenseLayer:
        return _DenseLayer(self, index)


class _DenseLayer:
    def __init__(self, cache: DenseCache, index: int) -> None:
        self.cache, self.index = cache, index

    def begin(self, i: int) -> LayerState:
        return self.cache.states[i].layers[self.index]

    def paged_rows(self) -> None:
        return None

    def commit(self, i: int, st: LayerState, kv_new: torch.Tensor, closed: ClosedBlocks,
               closed_index: ClosedBlocks) -> None:
        win = torch.cat([st.window, kv_new])
        st.window = win[max(0, win.shape[0] - (self.cache.window - 1)):]
