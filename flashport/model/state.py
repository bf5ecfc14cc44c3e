"""Per-sequence decode state the model keeps between calls (spec §6.1).

This is the model's own dense state: one `SequenceState` per sequence, one `LayerState` per
layer, tensors that grow by concatenation. It is what lets a prompt be prefilled (in one or
several chunks) and then decoded token by token with results equal to one full forward. The
paged engine keeps the same quantities in pre-allocated pools.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def num_entries(self) -> int:
        return self.entries.shape[0]


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
