"""Sparse decode attention with sinks over the paged state pools (spec §5.3-§5.7), one query per sequence.

MQA: the n_h query heads share one K=V head of D dims, so a program takes BLOCK_H heads as the rows
of the matrix (Q tile [BLOCK_H, D] @ K^T [D, BLOCK_N]) and reads each key row once for all of them.
The keys of sequence b, in this order:

- its window: tokens max(0, pos+1-W) .. pos (the current token's row must already be in the pool),
  window pool row = window_block_table[b, t // B] * B + t % B; a -1 block is skipped;
- its compressed entries (CSA / HCA layers): CSA the ids in entry_ids[b] (-1 = none), HCA entries
  0 .. num_entries[b]-1; entry pool row = comp_block_table[b, e // P] * P + e % P, P = B / rate.

One online softmax (base 2) runs over all keys plus the per-head sink logit (fp32, no value); the
output o = sum p v is accumulated in fp32, rounded to the model dtype (as the model does), then its
trailing R dims are rotated by -pos·ω (spec §4 interleaved pairs; cos/sin tables [Bt, R/2]).

D = 512 is large, so the QK dot loops over BLOCK_D chunks of D, and the PV output is split over the
grid in BLOCK_DV chunks (a program owns acc [BLOCK_H, BLOCK_DV]; fewer registers, QK recomputed per
chunk). When the batch is small the keys of a sequence are also split over several programs
(flash-decoding): each writes (max, sum, acc) partials in fp32 and a combine kernel merges them with
the sink. The number of splits comes from the config table by batch-size class, never from lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from flashport.kernels.spec import TARGETS, AotSpec, target_of

_LOG2E = tl.constexpr(1.4426950408889634)

COMP_NONE, COMP_IDS, COMP_COUNT = 0, 1, 2  # SWA layer; CSA (selected ids); HCA (all closed entries)


@dataclass(frozen=True)
class DecodeAttnConfig:
    block_h: int  # query heads per program (rows of the dot; >= 16 for the MMA)
    block_n: int  # keys per step
    block_d: int  # D chunk of the QK dot
    block_dv: int  # output dims per program (D / block_dv programs per head block)
    num_warps: int
    num_stages: int
    splits: tuple[tuple[int, int], ...]  # (max batch, key splits) by batch-size class; larger batches: 1
    combine_block_h: int = 8
    combine_warps: int = 4
    amd: dict[str, int] = field(default_factory=dict)  # waves_per_eu, matrix_instr_nonkdim

    def num_splits(self, batch: int) -> int:
        return next((s for max_batch, s in self.splits if batch <= max_batch), 1)

    def options(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **self.amd}

    def combine_options(self) -> dict[str, int]:
        return {"num_warps": self.combine_warps, "num_stages": 1}


# Register budget checked ahead of time (ptxas -v / amdgcn VGPRs, pointers 16-byte aligned as the
# JIT sees them): sm_90 232 registers, sm_100 187, gfx942 235 VGPRs, no spills; BLOCK_DV = 512 (no QK recompute)
# sits at 255 on sm_90. Split counts fill the machine (132 SMs on H200, 148 on B200, 304 CUs on
# MI300X, 256 on MI355X; one 8-warp program per SM) with (D / block_dv) x splits programs per
# sequence, while the fp32 partials (splits x n_h x D x 4 B per sequence) stay small next to the KV
# rows read. To be tuned on each GPU (scripts/gpu/bench_attention.py --sweep).
CONFIGS: dict[str, DecodeAttnConfig] = {
    "sm_90": DecodeAttnConfig(64, 32, 64, 256, 8, 2, ((4, 16), (16, 8), (32, 4), (64, 2))),
    "sm_100": DecodeAttnConfig(64, 32, 128, 256, 8, 2, ((4, 16), (16, 8), (36, 4), (72, 2))),
    "gfx942": DecodeAttnConfig(64, 32, 64, 256, 8, 2, ((8, 16), (32, 8), (64, 4), (152, 2)),
                               amd={"waves_per_eu": 2, "matrix_instr_nonkdim": 16}),
    "gfx950": DecodeAttnConfig(64, 32, 64, 256, 8, 2, ((8, 16), (32, 8), (64, 4), (128, 2)),
                               amd={"waves_per_eu": 2, "matrix_instr_nonkdim": 16}),
    # Small blocks so the CPU tests cross block, chunk and split boundaries.
    "interpret": DecodeAttnConfig(16, 16, 32, 32, 4, 1, ((2, 3), (4, 2))),
}


@triton.jit
def _attend_block(acc, m_i, l_i, q_row_ptr, row_ptrs, valid, offs_h, h_mask, dv0, qk_scale,
                  D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DV: tl.constexpr):
    # One step of the online softmax over BLOCK_N key rows (row_ptrs [BLOCK_N]: first element of each).
    s = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    for d0 in tl.static_range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        qc = tl.load(q_row_ptr + offs_h[:, None] * D + offs_d[None, :], mask=h_mask[:, None], other=0.0)
        kc = tl.load(row_ptrs[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(qc, tl.trans(kc), acc=s, input_precision="ieee")  # "ieee": exact fp32 when the pools are fp32
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_N], log2 units
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys masked so far: no NaN from -inf - -inf
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    offs_v = dv0 + tl.arange(0, BLOCK_DV)
    v = tl.load(row_ptrs[:, None] + offs_v[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, BLOCK_DV]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _finish(o, out_ptr, cos_ptr, sin_ptr, b, offs_h, h_mask, dv0, H,
            D: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr):
    # o [BLOCK_H, BLOCK_DV] fp32, columns dv0.. of the normalised output. Round to the model dtype as
    # the model does, rotate the rope pairs by -pos (fp32), store.
    o = o.to(out_ptr.dtype.element_ty).to(tl.float32)
    HALF: tl.constexpr = BLOCK_DV // 2
    even = dv0 + 2 * tl.arange(0, HALF)  # [HALF] first column of each (2i, 2i+1) pair
    is_rope = even >= D - R
    pair = (even - (D - R)) // 2
    c = tl.load(cos_ptr + b * (R // 2) + pair, mask=is_rope, other=1.0).to(tl.float32)  # identity on nope dims
    s = tl.load(sin_ptr + b * (R // 2) + pair, mask=is_rope, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(o, [BLOCK_H, HALF, 2]))
    y0 = x0 * c[None, :] + x1 * s[None, :]
    y1 = x1 * c[None, :] - x0 * s[None, :]
    o = tl.reshape(tl.join(y0, y1), [BLOCK_H, BLOCK_DV])
    offs = dv0 + tl.arange(0, BLOCK_DV)
    tl.store(out_ptr + (b * H + offs_h[:, None]) * D + offs[None, :], o.to(out_ptr.dtype.element_ty),
             mask=h_mask[:, None])


@triton.jit
def _decode_attn_kernel(q_ptr, win_ptr, wbt_ptr, pos_ptr, ent_ptr, cbt_ptr, eid_ptr, nent_ptr, sink_ptr,
                        cos_ptr, sin_ptr, out_ptr, part_o_ptr, part_ml_ptr,
                        H, window_size, block_size, per_block, wbt_width, cbt_width, num_ids, mode, num_splits,
                        qk_scale,
                        D: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # 1-D grid over (batch, split, head block, D/BLOCK_DV chunk), the last fastest: programs that read
    # the same key rows run side by side and share them through L2; 1-D because grid axes 1 and 2
    # stop at 65535 and prefill chunks may pass more query rows.
    NDV: tl.constexpr = D // BLOCK_DV
    pid = tl.program_id(0)
    dv0 = (pid % NDV) * BLOCK_DV
    n_hb = tl.cdiv(H, BLOCK_H)
    offs_h = (pid // NDV % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    split = pid // (NDV * n_hb) % num_splits
    b = pid // (NDV * n_hb * num_splits)
    q_row_ptr = q_ptr + b * H * D

    pos = tl.load(pos_ptr + b)
    n_win = tl.minimum(pos + 1, window_size)
    t0 = pos + 1 - n_win  # first window token
    # mode (a runtime value: one compiled variant serves every layer kind): COMP_NONE, COMP_IDS, COMP_COUNT
    n_comp = tl.where(mode == 1, num_ids, tl.where(mode == 2, tl.load(nent_ptr + b, mask=mode == 2, other=0), 0))
    total = n_win + n_comp  # keys: [0, n_win) window, [n_win, total) compressed
    per_split = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, total)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    # One loop over the key range; each lane reads a window row (j < n_win) or an entry row.
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        valid = j < hi
        is_win = j < n_win
        t = t0 + j
        blk = tl.load(wbt_ptr + b * wbt_width + t // block_size, mask=valid & is_win, other=-1)
        row_ptrs = win_ptr + (blk * block_size + t % block_size).to(tl.int64) * D  # int64: pools pass 2^31
        ok = blk >= 0  # a released window block: nothing to read
        e = j - n_win  # entry index among the compressed keys
        in_comp = valid & (j >= n_win)  # never with COMP_NONE (n_comp = 0)
        e = tl.where(mode == 1, tl.load(eid_ptr + b * num_ids + e, mask=in_comp & (mode == 1), other=-1), e)
        in_comp = in_comp & (e >= 0) & (e < cbt_width * per_block)
        cb = tl.load(cbt_ptr + b * cbt_width + e // per_block, mask=in_comp, other=-1)
        row_ptrs = tl.where(is_win, row_ptrs, ent_ptr + (cb * per_block + e % per_block).to(tl.int64) * D)
        ok = ok | (cb >= 0)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q_row_ptr, row_ptrs, valid & ok, offs_h, h_mask, dv0,
                                      qk_scale, D, BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV)

    if num_splits == 1:
        sink = tl.load(sink_ptr + offs_h, mask=h_mask, other=0.0) * _LOG2E
        m_all = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_all)
        denom = l_i * alpha + tl.exp2(sink - m_all)
        _finish(acc * (alpha / denom)[:, None], out_ptr, cos_ptr, sin_ptr, b, offs_h, h_mask, dv0, H,
                D, R, BLOCK_H, BLOCK_DV)
    else:
        row = (b * num_splits + split) * H + offs_h  # [BLOCK_H] partial rows [Bt, S, H]
        offs_v = dv0 + tl.arange(0, BLOCK_DV)
        tl.store(part_o_ptr + row[:, None] * D + offs_v[None, :], acc, mask=h_mask[:, None])
        ml_mask = h_mask & (dv0 == 0)  # one writer per head block
        ml = part_ml_ptr + (b * num_splits + split) * 2 * H + offs_h
        tl.store(ml, m_i, mask=ml_mask)
        tl.store(ml + H, l_i, mask=ml_mask)


@triton.jit
def _decode_combine_kernel(part_o_ptr, part_ml_ptr, sink_ptr, cos_ptr, sin_ptr, out_ptr, H, num_splits,
                           D: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr):
    # grid: (batch, head blocks). Merges the splits' (max, sum, acc) with the sink, then finishes.
    b = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    sink = tl.load(sink_ptr + offs_h, mask=h_mask, other=0.0) * _LOG2E
    m_all = sink
    for s in range(num_splits):
        m_s = tl.load(part_ml_ptr + (b * num_splits + s) * 2 * H + offs_h, mask=h_mask, other=float("-inf"))
        m_all = tl.maximum(m_all, m_s)
    denom = tl.exp2(sink - m_all)
    acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
    offs_d = tl.arange(0, D)
    for s in range(num_splits):
        ml = part_ml_ptr + (b * num_splits + s) * 2 * H + offs_h
        w = tl.exp2(tl.load(ml, mask=h_mask, other=float("-inf")) - m_all)  # empty split: m = -inf, w = 0
        denom += tl.load(ml + H, mask=h_mask, other=0.0) * w
        row = (b * num_splits + s) * H + offs_h
        acc += tl.load(part_o_ptr + row[:, None] * D + offs_d[None, :], mask=h_mask[:, None], other=0.0) * w[:, None]
    _finish(acc / denom[:, None], out_ptr, cos_ptr, sin_ptr, b, offs_h, h_mask, 0, H, D, R, BLOCK_H, D)


def _check(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dim() != ndim or t.dtype not in dtypes or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous {ndim}-d tensor of {dtypes}, got "
                         f"{tuple(t.shape)} {t.dtype} contiguous={t.is_contiguous()}")


def sparse_decode_attention(q: torch.Tensor, window: torch.Tensor, window_block_table: torch.Tensor,
                            positions: torch.Tensor, sinks: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                            window_size: int, block_size: int, entries: torch.Tensor | None = None,
                            comp_block_table: torch.Tensor | None = None, entry_ids: torch.Tensor | None = None,
                            num_entries: torch.Tensor | None = None, rate: int = 0, scale: float | None = None,
                            num_splits: int | None = None, config: DecodeAttnConfig | None = None
                            ) -> torch.Tensor:
    """q [Bt, H, D] roped queries -> [Bt, H, D] de-roped attention output (see the module doc).

    window [rows, D], window_block_table [Bt, MW] int32, positions [Bt] int32, sinks [H] fp32,
    cos/sin [Bt, R/2] in q's dtype; with entries [rows, D] and comp_block_table [Bt, MC] int32: CSA
    passes entry_ids [Bt, K] int32 (-1 = none), HCA num_entries [Bt] int32. num_splits and config
    override the config table (tests, benchmark sweeps).
    """
    floats = (torch.bfloat16, torch.float16, torch.float32)
    _check("q", q, 3, floats)
    Bt, H, D = q.shape
    _check("window", window, 2, (q.dtype,))
    _check("window_block_table", window_block_table, 2, (torch.int32,))
    _check("positions", positions, 1, (torch.int32,))
    _check("sinks", sinks, 1, (torch.float32,))
    _check("cos", cos, 2, (q.dtype,))
    _check("sin", sin, 2, (q.dtype,))
    R = 2 * cos.shape[1]
    if D & (D - 1) or window.shape[1] != D:
        raise ValueError(f"window: head dim must be a power of two equal to q's {D}, got {tuple(window.shape)}")
    if window_block_table.shape[0] != Bt or positions.shape[0] != Bt or sinks.shape[0] != H:
        raise ValueError(f"window_block_table / positions / sinks: batch {Bt} and heads {H} expected, got "
                         f"{tuple(window_block_table.shape)}, {tuple(positions.shape)}, {tuple(sinks.shape)}")
    if cos.shape != (Bt, R // 2) or sin.shape != cos.shape or R > D:
        raise ValueError(f"cos/sin: expected [{Bt}, R/2] with R <= {D}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    comp, per_block, num_ids = COMP_NONE, 1, 0
    ent, cbt, eid, nent = window, window_block_table, positions, positions  # unused pointers when COMP_NONE
    if entries is not None:
        _check("entries", entries, 2, (q.dtype,))
        if entries.shape[1] != D:
            raise ValueError(f"entries: expected [rows, {D}], got {tuple(entries.shape)}")
        if comp_block_table is None:
            raise ValueError("comp_block_table: required with entries")
        _check("comp_block_table", comp_block_table, 2, (torch.int32,))
        if comp_block_table.shape[0] != Bt:
            raise ValueError(f"comp_block_table: expected batch {Bt}, got {tuple(comp_block_table.shape)}")
        if rate <= 0 or block_size % rate:
            raise ValueError(f"rate: must divide block_size {block_size}, got {rate}")
        per_block, ent, cbt = block_size // rate, entries, comp_block_table
        if entry_ids is not None:
            _check("entry_ids", entry_ids, 2, (torch.int32,))
            if entry_ids.shape[0] != Bt:
                raise ValueError(f"entry_ids: expected batch {Bt}, got {tuple(entry_ids.shape)}")
            comp, eid, num_ids = COMP_IDS, entry_ids, entry_ids.shape[1]
        elif num_entries is not None:
            _check("num_entries", num_entries, 1, (torch.int32,))
            if num_entries.shape[0] != Bt:
                raise ValueError(f"num_entries: expected [{Bt}], got {tuple(num_entries.shape)}")
            comp, nent = COMP_COUNT, num_entries
        else:
            raise ValueError("entry_ids (CSA) or num_entries (HCA): one is required with entries")
    cfg = config if config is not None else CONFIGS[target_of(q)]
    block_h = min(cfg.block_h, max(16, triton.next_power_of_2(H)))
    block_dv, block_d = min(cfg.block_dv, D), min(cfg.block_d, D)
    splits = num_splits if num_splits is not None else cfg.num_splits(Bt)
    if splits < 1:
        raise ValueError(f"num_splits: must be >= 1, got {splits}")
    qk_scale = (D ** -0.5 if scale is None else scale) * 1.4426950408889634
    out = torch.empty_like(q)
    if Bt == 0:
        return out
    part_o = part_ml = sinks  # unused pointers when not split
    if splits > 1:
        part_o = torch.empty(Bt, splits, H, D, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(Bt, splits, 2, H, dtype=torch.float32, device=q.device)
    n_hb = triton.cdiv(H, block_h)
    _decode_attn_kernel[(Bt * splits * n_hb * (D // block_dv),)](
        q, window, window_block_table, positions, ent, cbt, eid, nent, sinks, cos, sin, out, part_o, part_ml,
        H, window_size, block_size, per_block, window_block_table.shape[1], cbt.shape[1], num_ids, comp, splits,
        qk_scale,
        D=D, R=R, BLOCK_H=block_h, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        **cfg.options())
    if splits > 1:
        cbh = cfg.combine_block_h
        _decode_combine_kernel[(Bt, triton.cdiv(H, cbh))](
            part_o, part_ml, sinks, cos, sin, out, H, splits, D=D, R=R, BLOCK_H=cbh, **cfg.combine_options())
    return out


# Ahead-of-time variants: V4-Flash shapes (D 512, rope 64, 64 heads), bf16 model dtype.
_D, _R, _H = 512, 64, 64
_ATTN_SIG = {
    **{p: "*bf16" for p in ("q_ptr", "win_ptr")}, "wbt_ptr": "*i32", "pos_ptr": "*i32", "ent_ptr": "*bf16",
    "cbt_ptr": "*i32", "eid_ptr": "*i32", "nent_ptr": "*i32", "sink_ptr": "*fp32", "cos_ptr": "*bf16",
    "sin_ptr": "*bf16", "out_ptr": "*bf16", "part_o_ptr": "*fp32", "part_ml_ptr": "*fp32",
    **{p: "i32" for p in ("H", "window_size", "block_size", "per_block", "wbt_width", "cbt_width", "num_ids",
                          "mode", "num_splits")},
    "qk_scale": "fp32",
    **{p: "constexpr" for p in ("D", "R", "BLOCK_H", "BLOCK_N", "BLOCK_D", "BLOCK_DV")},
}
_COMBINE_SIG = {"part_o_ptr": "*fp32", "part_ml_ptr": "*fp32", "sink_ptr": "*fp32", "cos_ptr": "*bf16",
                "sin_ptr": "*bf16", "out_ptr": "*bf16", "H": "i32", "num_splits": "i32",
                "D": "constexpr", "R": "constexpr", "BLOCK_H": "constexpr"}


def _attn_constexprs(c: DecodeAttnConfig) -> dict[str, int]:
    return {"D": _D, "R": _R, "BLOCK_H": min(c.block_h, _H), "BLOCK_N": c.block_n,
            "BLOCK_D": c.block_d, "BLOCK_DV": c.block_dv}


AOT_SPECS: tuple[AotSpec, ...] = (
    AotSpec("decode_attention", _decode_attn_kernel, _ATTN_SIG, {t: _attn_constexprs(CONFIGS[t]) for t in TARGETS},
            {t: CONFIGS[t].options() for t in TARGETS}, uses_dot=True),
    AotSpec("decode_attention_combine", _decode_combine_kernel, _COMBINE_SIG,
            {t: {"D": _D, "R": _R, "BLOCK_H": CONFIGS[t].combine_block_h} for t in TARGETS},
            {t: CONFIGS[t].combine_options() for t in TARGETS}),
)
