"""KV compressors (spec §5.5, §5.6) and the lightning indexer's scoring and top-k.

A compressor turns every `rate` tokens into one entry by a gated, per-feature softmax pooling
of projected rows, then RMSNorm and RoPE at the block's first position. The CSA form pools 2*rate
overlapping slots: the previous block's first half (Ca) and the current block's second half (Cb).
Tokens of a block not yet closed wait in the state's pending rows.
"""

from __future__ import annotations

import torch
from torch import nn

from flashport.model.layers import REFERENCE, Linear, RMSNorm, RotaryTables, apply_rope
from flashport.model.state import CompressorState


class Compressor(nn.Module):
    def __init__(self, hidden: int, dim: int, rate: int, overlap: bool, dtype: torch.dtype, norm_eps: float,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.dim, self.rate, self.overlap = dim, rate, overlap
        width = 2 * dim if overlap else dim  # CSA projects two series: Ca = [:dim], Cb = [dim:]
        self.wkv = Linear(hidden, width, dtype, device=device)
        self.wgate = Linear(hidden, width, dtype, device=device)
        self.ape = nn.Parameter(torch.empty(rate, width, dtype=torch.float32, device=device), requires_grad=False)
        self.norm = RMSNorm(dim, norm_eps, device)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> raw (kv, gate) [N, width] for all tokens of a batch."""
        return self.wkv(x), self.wgate(x)

    def update(self, st: CompressorState, kv: torch.Tensor, gate: torch.Tensor, rope: RotaryTables
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Append one sequence's new raw rows [T, width]; close every full block into `st.entries`.

        CSA returns the overlap halves of the blocks it closed, (Ca [n, rate, dim], gate [n, rate,
        dim] fp32 with the bias): block j's pair is the overlap state after it, which a paged
        cache keeps at block boundaries for prefix reuse. HCA returns None.
        """
        m, d = self.rate, self.dim
        kv = torch.cat([st.pending_kv, kv])
        gate = torch.cat([st.pending_gate, gate])
        usable = (kv.shape[0] // m) * m
        st.pending_kv, st.pending_gate = kv[usable:], gate[usable:]
        if usable == 0:
            return None
        n = usable // m
        ck = kv[:usable].view(n, m, -1)
        cg = gate[:usable].view(n, m, -1) + self.ape  # fp32
        closed = None
        if self.overlap:
            closed = ck[..., :d], cg[..., :d]
            slot_kv = ck.new_zeros(n, 2 * m, d)
            slot_gate = cg.new_full((n, 2 * m, d), float("-inf"))  # -inf: no previous block yet
            slot_kv[:, m:], slot_gate[:, m:] = ck[..., d:], cg[..., d:]
            slot_kv[1:, :m], slot_gate[1:, :m] = ck[:-1, :, :d], cg[:-1, :, :d]
            if st.overlap_kv is not None:
                slot_kv[0, :m], slot_gate[0, :m] = st.overlap_kv, st.overlap_gate
            st.overlap_kv, st.overlap_gate = ck[-1, :, :d].clone(), cg[-1, :, :d].clone()
            ck, cg = slot_kv, slot_gate
        pooled = (ck * cg.softmax(dim=1, dtype=torch.float32).to(ck.dtype)).sum(dim=1)  # [n, d]
        entries = self.norm(pooled)
        positions = (torch.arange(n, device=kv.device) + st.num_entries) * m  # each block's first token
        cos, sin = rope.cos_sin(positions, compress=True, dtype=entries.dtype)
        entries = apply_rope(entries.unsqueeze(1), cos, sin).squeeze(1)
        st.entries = torch.cat([st.entries, entries])
        return closed


class Indexer(nn.Module):
    """Lightning indexer: its own compressor at index_head_dim, a query projection from the q
    low-rank residual, per-head weights, and top-k over causally visible entries."""

    def __init__(self, hidden: int, q_lora_rank: int, n_heads: int, head_dim: int, rate: int, topk: int,
                 dtype: torch.dtype, norm_eps: float, fp8_block: tuple[int, int] | None, fp8_dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rate, self.topk = n_heads, head_dim, rate, topk
        self.compressor = Compressor(hidden, head_dim, rate, True, dtype, norm_eps, device)
        self.wq_b = Linear(q_lora_rank, n_heads * head_dim, dtype, fp8_block, fp8_dtype, device)
        self.weights_proj = Linear(hidden, n_heads, dtype, device=device)

    def queries(self, qr: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = REFERENCE
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """qr [N, q_lora], x [N, hidden] -> (q [N, heads, head_dim] roped, head weights [N, heads] fp32)."""
        q = self.wq_b(qr, impl).unflatten(-1, (self.n_heads, self.head_dim))
        q = apply_rope(q, cos, sin)
        w = self.weights_proj(x).float() * self.n_heads ** -0.5
        return q, w

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
               query_block: int = 256) -> torch.Tensor:
        """Top-k entries per query. q [T, heads, d], w [T, heads], keys [n, d], positions [T]
        -> bool mask [T, n] of selected, causally visible entries."""
        n = keys.shape[0]
        T = q.shape[0]
        visible = torch.arange(n, device=q.device) < ((positions + 1) // self.rate).unsqueeze(-1)  # [T, n]
        if n == 0:
            return visible
        k = min(self.topk, n)
        kf = keys.float().t()
        selected = torch.zeros(T, n, dtype=torch.bool, device=q.device)
        for s in range(0, T, query_block):  # bounds the [block, heads, n] score tensor
            e = min(s + query_block, T)
            scores = torch.relu(torch.matmul(q[s:e].float(), kf)) * self.head_dim ** -0.5  # [b, heads, n]
            scores = (scores * w[s:e].unsqueeze(-1)).sum(dim=1)  # [b, n]
            scores = scores.masked_fill(~visible[s:e], float("-inf"))
            idx = scores.topk(k, dim=-1).indices
            selected[s:e].scatter_(1, idx, True)
        return selected & visible
