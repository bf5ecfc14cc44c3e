"""Sparse decode attention over the paged pools: the torch twin and the dispatching op.

The twin gathers each sequence's keys (window tail + compressed entries) from the pools through
the block tables into a padded batch with a mask, then follows the dtype flow of the model's
`Attention._core` for one query row (QK^T and the scale in the model dtype, the fp32 sink column,
softmax in fp32, probabilities rounded to the model dtype for PV) and its inverse rope
(`apply_rope(o, cos, -sin)`). The entry pool may be fp8 (float8_e4m3fn / float8_e4m3fnuz, no scale):
its rows are cast to q's dtype. Arguments as `flashport.kernels.attention_decode.sparse_decode_attention`.
"""

from __future__ import annotations

import torch

from flashport.model.layers import apply_rope
from flashport.ops import use_triton


def _pool_rows(table: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, per_block: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical ids [Bt, n] (valid where `valid`) -> (pool rows [Bt, n] int64, valid and block held)."""
    ids = torch.where(valid, ids, 0)
    col = (ids // per_block).clamp(max=table.shape[1] - 1)
    blk = table.long().gather(1, col)
    valid = valid & (blk >= 0) & (ids < table.shape[1] * per_block)
    return torch.where(valid, blk * per_block + ids % per_block, 0), valid


def sparse_decode_attention_torch(q: torch.Tensor, window: torch.Tensor, window_block_table: torch.Tensor,
                                  positions: torch.Tensor, sinks: torch.Tensor, cos: torch.Tensor,
                                  sin: torch.Tensor, *, window_size: int, block_size: int,
                                  entries: torch.Tensor | None = None, comp_block_table: torch.Tensor | None = None,
                                  entry_ids: torch.Tensor | None = None, num_entries: torch.Tensor | None = None,
                                  rate: int = 0, scale: float | None = None) -> torch.Tensor:
    Bt, H, D = q.shape
    dev = q.device
    # Window slot j holds token pos - W + 1 + j (tokens before 0 are masked).
    t = positions.long().unsqueeze(1) - window_size + 1 + torch.arange(window_size, device=dev)  # [Bt, W]
    rows, allowed = _pool_rows(window_block_table, t, t >= 0, block_size)
    keys = window[rows]  # [Bt, W, D]
    if entries is not None:
        per_block = block_size // rate
        if entry_ids is not None:  # CSA: the selected ids, -1 = none
            ids = entry_ids.long()
            ok = ids >= 0
        else:  # HCA: every closed entry
            ids = torch.arange(comp_block_table.shape[1] * per_block, device=dev).expand(Bt, -1)
            ok = ids < num_entries.long().unsqueeze(1)
        crow, ok = _pool_rows(comp_block_table, ids, ok, per_block)
        keys = torch.cat([keys, entries[crow].to(q.dtype)], dim=1)  # [Bt, W + K, D]; fp8 entries: no scale
        allowed = torch.cat([allowed, ok], dim=1)
    scale = D ** -0.5 if scale is None else scale
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=dev).masked_fill(~allowed, float("-inf"))
    scores = torch.matmul(q, keys.transpose(1, 2)) * scale + bias.unsqueeze(1)  # [Bt, H, K] model dtype
    logits = torch.cat([scores, sinks.view(1, H, 1).expand(Bt, H, 1)], dim=-1)  # promotes to fp32
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)[..., :-1].to(q.dtype)
    out = torch.matmul(probs, keys)  # [Bt, H, D]
    return apply_rope(out, cos, -sin)


def sparse_decode_attention(q: torch.Tensor, window: torch.Tensor, window_block_table: torch.Tensor,
                            positions: torch.Tensor, sinks: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                            window_size: int, block_size: int, entries: torch.Tensor | None = None,
                            comp_block_table: torch.Tensor | None = None, entry_ids: torch.Tensor | None = None,
                            num_entries: torch.Tensor | None = None, rate: int = 0, scale: float | None = None,
                            impl: str = "auto") -> torch.Tensor:
    """One query row per decode token or prefill token: q [Bt, H, D] -> [Bt, H, D] (window + CSA/HCA
    entries, sinks, inverse rope). The current token's K=V row must already be in the window pool."""
    kw = dict(window_size=window_size, block_size=block_size, entries=entries, comp_block_table=comp_block_table,
              entry_ids=entry_ids, num_entries=num_entries, rate=rate, scale=scale)
    if use_triton(q, impl):
        from flashport.kernels.attention_decode import sparse_decode_attention as kernel

        return kernel(q, window, window_block_table, positions, sinks, cos, sin, **kw)
    return sparse_decode_attention_torch(q, window, window_block_table, positions, sinks, cos, sin, **kw)
