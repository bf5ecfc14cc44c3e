"""One decode step of a compressor over the engine's pools (spec §5.5, §5.6; the model's form is
`Compressor.update` in flashport/model/compressor.py, the pools are flashport/engine/pools.py).

Per sequence b, one new token at position p = positions[b] with raw projections kv[b], gate[b]
[width] (model dtype) and state slot s = slots[b]:
  - p % m < m-1: the row is stored into pend_kv/pend_gate[s, p % m];
  - p % m == m-1: the token closes a block. Its slots are pooled per feature (softmax over slots
    of gate + ape in fp32, weights rounded to the model dtype, weighted sum in the model dtype),
    RMSNorm'd and RoPE'd at the block's first position p+1-m (cos/sin[b]); the entry goes to
    entries[close_rows[b]]. HCA (overlap None): width = d, the m rows of the block (the m-1
    pending rows and the new one). CSA (overlap = (ov_kv [S, m, d], ov_gate [S, m, d] fp32,
    bnd_kv [NC, m, d], bnd_gate [NC, m, d] fp32)): width = 2d, 2m slots: the previous block's
    Ca half with its biased gate, ov[s] (zero weight when p < m: no previous block), then this
    block's Cb half; afterwards this block's Ca rows and biased gates become ov[s], and also
    bnd[boundary_blocks[b]] when that is >= 0 (the record a prefix hit resumes from).
The pending rows of a closing sequence are left as they are: a slot holds p % m valid rows.
"""

from __future__ import annotations

import torch

from flashport.ops import use_triton

from flashport.model.layers import apply_rope
from flashport.model.quant import to_fp8_storage
from flashport.ops.qkv_rope import rms_norm

Overlap = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def compressor_decode_ref(kv: torch.Tensor, gate: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                          close_rows: torch.Tensor, boundary_blocks: torch.Tensor, pend_kv: torch.Tensor,
                          pend_gate: torch.Tensor, entries: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                          eps: float, cos: torch.Tensor, sin: torch.Tensor, overlap: Overlap | None = None) -> None:
    # The torch twin: Compressor.update's arithmetic on the sequences that close a block, batched.
    # Boolean indexing syncs on a GPU; this is the reference path.
    m, d = ape.shape[0], entries.shape[1]
    closing = close_rows >= 0
    keep = ~closing
    pend_kv[slots[keep], positions[keep] % m] = kv[keep]
    pend_gate[slots[keep], positions[keep] % m] = gate[keep]

    c = closing.nonzero().squeeze(1)  # [n] sequences closing a block
    s = slots[c]
    ck = torch.cat([pend_kv[s], kv[c].unsqueeze(1)], dim=1)  # [n, m, width]
    cg = torch.cat([pend_gate[s], gate[c].unsqueeze(1)], dim=1) + ape  # [n, m, width] fp32
    if overlap is None:
        slot_kv, slot_gate = ck, cg
    else:
        ov_kv, ov_gate, bnd_kv, bnd_gate = overlap
        has_prev = (positions[c] >= m).view(-1, 1, 1)
        prev_kv = torch.where(has_prev, ov_kv[s], torch.zeros((), dtype=ck.dtype, device=ck.device))
        prev_gate = torch.where(has_prev, ov_gate[s], torch.full((), float("-inf"), device=ck.device))
        slot_kv = torch.cat([prev_kv, ck[..., d:]], dim=1)  # [n, 2m, d]
        slot_gate = torch.cat([prev_gate, cg[..., d:]], dim=1)
        new_kv, new_gate = ck[..., :d], cg[..., :d]  # this block's Ca: the next block's overlap
        ov_kv[s], ov_gate[s] = new_kv, new_gate
        rec = boundary_blocks[c] >= 0
        bnd_kv[boundary_blocks[c][rec]] = new_kv[rec]
        bnd_gate[boundary_blocks[c][rec]] = new_gate[rec]
    pooled = (slot_kv * slot_gate.softmax(dim=1, dtype=torch.float32).to(slot_kv.dtype)).sum(dim=1)  # [n, d]
    out = apply_rope(rms_norm(pooled, norm_weight, eps).unsqueeze(1), cos[c], sin[c]).squeeze(1)
    entries[close_rows[c]] = out if entries.dtype == out.dtype else to_fp8_storage(out, entries.dtype)


def compressor_decode(kv: torch.Tensor, gate: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                      close_rows: torch.Tensor, boundary_blocks: torch.Tensor, pend_kv: torch.Tensor,
                      pend_gate: torch.Tensor, entries: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                      eps: float, cos: torch.Tensor, sin: torch.Tensor, overlap: Overlap | None = None,
                      impl: str = "auto") -> None:
    """kv, gate [B, width]; slots, positions, close_rows, boundary_blocks [B] int64; pend_kv, pend_gate
    [S, m-1, width]; entries [R, d] (model dtype, or FP8 for kv_cache_dtype="fp8"); ape [m, width] fp32; norm_weight [d] fp32; cos, sin [B, rope/2] at
    p+1-m. Updates the pools in place (see the module docstring)."""
    args = (kv, gate, slots, positions, close_rows, boundary_blocks, pend_kv, pend_gate, entries, ape, norm_weight,
            eps, cos, sin, overlap)
    if not use_triton(kv, impl):
        compressor_decode_ref(*args)
        return
    from flashport.kernels.compressor import compressor_decode as kernel

    kernel(*args)
