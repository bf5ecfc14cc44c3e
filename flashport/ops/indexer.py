"""Lightning indexer, decode form: scores over the paged key pool, then top-k entry ids.

The torch twin gathers each sequence's indexer keys through the comp block table and scores them
as the model's `Indexer.select` does for one token (q . k in fp32, ReLU, x Di^-0.5, x the fp32 head
weights, sum over heads); entries not yet closed get -inf; then `topk_ids` (torch.topk). The Triton
path runs the score kernel, then the top-k kernel (`flashport.kernels.topk`): the same id set
whenever the k-th largest score is not tied (ties: lowest index first), ids in ascending order
rather than by score (attention does not depend on the order). Keys may be FP8 (e4m3fn / e4m3fnuz,
no scale). Arguments as `flashport.kernels.indexer.indexer_scores`.
"""

from __future__ import annotations

import torch

from flashport.ops import use_triton
import torch.nn.functional as F

from flashport.ops.attention import _pool_rows


def indexer_scores_torch(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, comp_block_table: torch.Tensor,
                         positions: torch.Tensor, *, rate: int, block_size: int, max_entries: int | None = None,
                         entry_chunk: int = 8192) -> torch.Tensor:
    Bt, H, Di = q.shape
    per_block = block_size // rate
    n = comp_block_table.shape[1] * per_block if max_entries is None else max_entries
    visible = ((positions.long() + 1) // rate).unsqueeze(1)  # [Bt, 1]
    qf = q.float()
    out = torch.empty(Bt, n, dtype=torch.float32, device=q.device)
    for s in range(0, n, entry_chunk):  # bounds the gathered [Bt, chunk, Di] keys and [Bt, H, chunk] scores
        ids = torch.arange(s, min(s + entry_chunk, n), device=q.device).expand(Bt, -1)
        rows, ok = _pool_rows(comp_block_table, ids, ids < visible, per_block)
        scores = torch.relu(torch.matmul(qf, keys[rows].float().transpose(1, 2))) * Di ** -0.5  # [Bt, H, c]
        scores = (scores * weights.unsqueeze(-1)).sum(dim=1)  # [Bt, c]
        out[:, s: s + entry_chunk] = scores.masked_fill(~ok, float("-inf"))
    return out


def topk_ids(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """scores [Bt, n] fp32 -> the ids of the top-k [Bt, topk] int32, -1 where fewer candidates."""
    k = min(topk, scores.shape[1])
    values, ids = scores.topk(k, dim=-1)
    ids = torch.where(values > float("-inf"), ids, -1).to(torch.int32)
    return F.pad(ids, (0, topk - k), value=-1)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, comp_block_table: torch.Tensor,
                 positions: torch.Tensor, *, rate: int, block_size: int, topk: int, max_entries: int | None = None,
                 impl: str = "auto") -> torch.Tensor:
    """One decode token per sequence: q [Bt, H, Di], weights [Bt, H] fp32 -> selected entry ids
    [Bt, topk] int32 (-1 padded), for the CSA attention's `entry_ids`. No host sync."""
    kw = dict(rate=rate, block_size=block_size, max_entries=max_entries)
    if use_triton(q, impl):
        from flashport.kernels.indexer import indexer_scores
        from flashport.kernels.topk import topk_ids_triton

        return topk_ids_triton(indexer_scores(q, weights, keys, comp_block_table, positions, **kw), topk)
    return topk_ids(indexer_scores_torch(q, weights, keys, comp_block_table, positions, **kw), topk)
