"""V4 attention (spec §5.3-§5.7): shared K=V MQA over a sliding window plus compressed entries.

Every layer attends its 128-token window; CSA layers add the top-k compressed entries the
lightning indexer selects, HCA layers add every closed entry. One softmax runs over the union
with a learned per-head sink; the output's rope dims are rotated back, then a grouped low-rank
output projection maps 64 x 512 -> hidden.

Projections run on the flat token batch [N, ...]; the attention core runs per sequence over
that sequence's state (torch reference path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flashport.config import CSA, HCA, SWA, ModelConfig
from flashport.model.compressor import Compressor, Indexer
from flashport.model.layers import REFERENCE, Linear, RMSNorm, RotaryTables, apply_rope, rms_unweighted
from flashport.model.state import LayerCache, PagedRows


@dataclass(frozen=True)
class SeqSlice:
    """Where one sequence's new tokens sit in the flat batch."""

    start: int
    length: int


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, fp8_dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        H, D, nh = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads
        blk = cfg.fp8_block_size
        self.kind = cfg.layer_types[layer]
        self.n_heads, self.head_dim, self.window = nh, D, cfg.sliding_window
        self.o_groups, self.eps = cfg.o_groups, cfg.rms_norm_eps
        self.wq_a = Linear(H, cfg.q_lora_rank, dtype, blk, fp8_dtype, device)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, device)
        self.wq_b = Linear(cfg.q_lora_rank, nh * D, dtype, blk, fp8_dtype, device)
        self.wkv = Linear(H, D, dtype, blk, fp8_dtype, device)
        self.kv_norm = RMSNorm(D, cfg.rms_norm_eps, device)
        # wo_a is block-diagonal: o_groups blocks of [o_lora_rank, nh*D/o_groups], stored stacked.
        self.wo_a = Linear(nh * D // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, dtype, blk, fp8_dtype, device)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, H, dtype, blk, fp8_dtype, device)
        self.attn_sink = nn.Parameter(torch.empty(nh, dtype=torch.float32, device=device), requires_grad=False)
        self.compressor: Compressor | None = None
        self.indexer: Indexer | None = None
        if self.kind == CSA:
            self.compressor = Compressor(H, D, cfg.compress_rate_csa, True, dtype, cfg.rms_norm_eps, device)
            self.indexer = Indexer(H, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim, cfg.compress_rate_csa,
                                   cfg.index_topk, dtype, cfg.rms_norm_eps, blk, fp8_dtype, device)
        elif self.kind == HCA:
            self.compressor = Compressor(H, D, cfg.compress_rate_hca, False, dtype, cfg.rms_norm_eps, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryTables, seqs: list[SeqSlice],
                cache: LayerCache, impl: str = REFERENCE) -> torch.Tensor:
        """x [N, hidden], positions [N] -> [N, hidden]; advances each sequence's state in `cache`."""
        N = x.shape[0]
        cos, sin = rope.cos_sin(positions, compress=self.kind != SWA, dtype=x.dtype)  # [N, rope/2]
        qr = self.q_norm(self.wq_a(x, impl), impl)  # [N, q_lora]
        q = self.wq_b(qr, impl).unflatten(-1, (self.n_heads, self.head_dim))  # [N, nh, D]
        rows = cache.paged_rows() if impl != REFERENCE else None
        if impl == REFERENCE:
            q = apply_rope(rms_unweighted(q, self.eps), cos, sin)
        else:
            from flashport.ops.qkv_rope import q_norm_rope

            q = q_norm_rope(q.contiguous(), cos, sin, self.eps, impl=impl)
        if rows is not None:
            out = self._attend_rows(x, qr, q, positions, cos, sin, rope, rows, impl)  # inverse rope included
        else:
            kv = apply_rope(self.kv_norm(self.wkv(x, impl), impl).unsqueeze(1), cos, sin).squeeze(1)  # [N, D]
            out = self._attend_per_sequence(x, qr, q, kv, positions, cos, sin, rope, seqs, cache, impl)
            out = apply_rope(out, cos, -sin)  # undo the absolute rope the values carried
        g = self.o_groups
        grouped = out.reshape(N, g, -1)  # [N, g, nh*D/g]
        if impl != REFERENCE and self.wo_a.is_quantized:
            from flashport.ops.fp8_linear import grouped_linear

            z = grouped_linear(grouped, self.wo_a.weight, self.wo_a.scale, impl=impl).reshape(N, -1)
        else:
            w_a = self.wo_a.dense_weight(x.dtype).view(g, -1, grouped.shape[-1])  # [g, o_lora, nh*D/g]
            z = torch.bmm(grouped.transpose(0, 1), w_a.transpose(1, 2)).transpose(0, 1).reshape(N, -1)
        return self.wo_b(z, impl)  # [N, hidden]

    def _attend_per_sequence(self, x: torch.Tensor, qr: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                             positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: RotaryTables,
                             seqs: list[SeqSlice], cache: LayerCache, impl: str) -> torch.Tensor:
        """Each sequence's dense state from `cache` (the reference path) -> o [N, nh, D] (roped)."""
        comp_kv = comp_gate = idx_kv = idx_gate = iq = iw = None
        if self.compressor is not None:
            comp_kv, comp_gate = self.compressor.project(x)
        if self.indexer is not None:
            idx_kv, idx_gate = self.indexer.compressor.project(x)
            iq, iw = self.indexer.queries(qr, x, cos, sin, impl)
        out = torch.empty_like(q)
        for i, seq in enumerate(seqs):
            sl = slice(seq.start, seq.start + seq.length)
            pos = positions[sl]
            st = cache.begin(i)
            win = torch.cat([st.window, kv[sl]])  # [P+T, D]: the last P+T tokens
            key_pos = pos[-1] - win.shape[0] + 1 + torch.arange(win.shape[0], device=x.device)
            d = pos.unsqueeze(-1) - key_pos  # [T, P+T] distance query - key
            allowed = (d >= 0) & (d < self.window)
            keys, closed, closed_index = win, None, None
            if self.compressor is not None:
                c = self.compressor
                closed = c.update(st.compressor, comp_kv[sl], comp_gate[sl], rope)
                entries = st.compressor.entries  # [n, D]
                if self.indexer is not None:
                    closed_index = self.indexer.compressor.update(st.indexer, idx_kv[sl], idx_gate[sl], rope)
                    visible = self.indexer.select(iq[sl], iw[sl], st.indexer.entries, pos)
                else:
                    visible = torch.arange(entries.shape[0], device=x.device) < ((pos + 1) // c.rate).unsqueeze(-1)
                keys = torch.cat([win, entries])
                allowed = torch.cat([allowed, visible], dim=-1)
            out[sl] = self._core(q[sl], keys, allowed)
            cache.commit(i, st, kv[sl], closed, closed_index)
        return out

    def _attend_rows(self, x: torch.Tensor, qr: torch.Tensor, q: torch.Tensor, positions: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, rope: RotaryTables, rows: PagedRows,
                     impl: str) -> torch.Tensor:
        """Every query row reads the pools in place through its block tables (the op path)."""
        from flashport.ops.attention import sparse_decode_attention
        from flashport.ops.qkv_rope import kv_norm_rope_store

        # The new tokens' K=V rows go into the window pool first: each row's window includes them.
        kv_norm_rope_store(self.wkv(x, impl), self.kv_norm.weight, self.eps, cos, sin, rows.window_pool,
                           rows.window_write, impl=impl)
        pos32 = positions.int()  # the attention and indexer kernels index with int32
        entry_ids = num_entries = None
        rate = 0
        if self.compressor is not None:
            rate = self.compressor.rate
            kv_c, gate_c = self.compressor.project(x)
            rows.compress(self.compressor, kv_c, gate_c, rope, self.eps, indexer=False, impl=impl)
            if self.indexer is not None:
                from flashport.ops.indexer import indexer_topk

                ix = self.indexer
                kv_i, gate_i = ix.compressor.project(x)
                rows.compress(ix.compressor, kv_i, gate_i, rope, self.eps, indexer=True, impl=impl)
                iq, iw = ix.queries(qr, x, cos, sin, impl)
                entry_ids = indexer_topk(iq.contiguous(), iw, rows.index_keys, rows.comp_table, pos32,
                                         rate=rate, block_size=rows.block_size, topk=ix.topk, impl=impl)
            else:
                num_entries = (pos32 + 1) // rate
        return sparse_decode_attention(
            q, rows.window_pool, rows.window_table, pos32, self.attn_sink, cos, sin,
            window_size=self.window, block_size=rows.block_size, entries=rows.entries,
            comp_block_table=rows.comp_table if rows.entries is not None else None, entry_ids=entry_ids,
            num_entries=num_entries, rate=rate, impl=impl)

    def _core(self, q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, query_block: int = 512
              ) -> torch.Tensor:
        """One sequence: q [T, nh, D], keys = values [K, D], allowed [T, K] -> [T, nh, D].

        Dtype flow as transformers' eager path: QK^T and the scale in the model dtype, the sink
        column joins in fp32, softmax in fp32, probabilities rounded to the model dtype for PV.
        """
        T = q.shape[0]
        out = torch.empty_like(q)
        scale = self.head_dim ** -0.5
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        kt = keys.t()
        for s in range(0, T, query_block):  # bounds the [nh, block, K] score tensor
            e = min(s + query_block, T)
            scores = torch.matmul(q[s:e].transpose(0, 1), kt) * scale + bias[s:e]  # [nh, b, K]
            sink = self.attn_sink.view(-1, 1, 1).expand(-1, e - s, 1)
            logits = torch.cat([scores, sink], dim=-1)  # promotes to fp32
            logits = logits - logits.max(dim=-1, keepdim=True).values
            probs = torch.softmax(logits, dim=-1)[..., :-1].to(q.dtype)
            out[s:e] = torch.matmul(probs, keys).transpose(0, 1)
        return out
