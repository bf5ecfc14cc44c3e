"""Sparse attention with sinks over the paged state pools (spec §5.3-§5.7), one program per query row.

A query row is a decode token or one token of a prefill chunk; each row has its own position and
block tables. MQA: the n_h query heads share one K=V head of D dims, so a program takes BLOCK_H heads
as the rows of the matrix (Q tile [BLOCK_H, D] @ K^T [D, BLOCK_N]) and reads each key row once for all
of them. The keys of row b, in this order:

- its window: tokens max(0, pos+1-W) .. pos (the current token's row must already be in the pool),
  window pool row = window_block_table[b, t // B] * B + t % B; a -1 block is skipped;
- its compressed entries (CSA / HCA layers): CSA the ids in entry_ids[b] (-1 = none), HCA entries
  0 .. num_entries[b]-1; entry pool row = comp_block_table[b, e // P] * P + e % P, P = B / rate.
  The entry pool may hold fp8 (e4m3fn, or e4m3fnuz on gfx942; no scale, like an fp8 KV cache with
  scale 1.0): rows are converted to q's dtype after the load. The window pool is in q's dtype.

One online softmax (base 2) runs over all keys plus the per-head sink logit (fp32, no value); the
output o = sum p v is accumulated in fp32, rounded to the model dtype (as the model does), then its
trailing R dims are rotated by -pos·ω (spec §4 interleaved pairs; cos/sin tables [Bt, R/2]).

The Q tile [BLOCK_H, D] is loaded once per program. Each step loads BLOCK_N key rows [BLOCK_N, D]
once and uses the same tile as K (QK^T over all D) and as V (PV); with BLOCK_DV < D the output is
split over the grid in BLOCK_DV chunks (a program owns acc [BLOCK_H, BLOCK_DV], fewer registers, the
QK dot repeated per chunk, V re-read from cache). The window and the compressed entries run as two
loops (each with uniform index math and one pool dtype), pipelined by the compiler (num_stages).
When the batch is small the keys of a row are also split over several programs (flash-decoding):
each writes (max, sum, acc) partials in fp32 and a combine kernel merges them with the sink. The
number of splits comes from the config table by row-count class, never from lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import triton
import triton.language as tl

from flashport.kernels.fp8 import e4m3_bits_to_f32
from flashport.kernels.spec import TARGETS, AotSpec, target_of

_LOG2E = tl.constexpr(1.4426950408889634)

COMP_NONE, COMP_IDS, COMP_COUNT = 0, 1, 2  # SWA layer; CSA (selected ids); HCA (all closed entries)
# Entry pool formats (ENT_FMT): the pool's own float dtype (= q's), or fp8 bytes passed as uint8 and
# bitcast in the kernel (so one signature per pointer type serves every target).
ENT_NATIVE, ENT_E4M3FN, ENT_E4M3FNUZ, ENT_E4M3FNUZ_SOFT = 0, 1, 2, 3
ROW_PASS_N = tl.constexpr(256)  # entries resolved per step of the row pass
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


@dataclass(frozen=True)
class DecodeAttnConfig:
    block_h: int  # query heads per program (rows of the dot; >= 16 for the MMA)
    block_n: int  # keys per step
    block_dv: int  # output dims per program (D / block_dv programs per head block); >= D: all of D
    num_warps: int
    num_stages: int
    splits: tuple[tuple[int, int], ...]  # (max rows, key splits) by row-count class; more rows: 1
    row_pass: bool = True  # resolve entry ids to pool rows before the key loop (see the kernel)
    q_regs: bool = False  # hold Q in registers as the A operand of the QK dot (see the kernel)
    combine_block_h: int = 8
    combine_warps: int = 4
    amd: dict[str, int] = field(default_factory=dict)  # waves_per_eu, matrix_instr_nonkdim

    def num_splits(self, rows: int) -> int:
        return next((s for max_rows, s in self.splits if rows <= max_rows), 1)

    def options(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **self.amd}

    def combine_options(self) -> dict[str, int]:
        return {"num_warps": self.combine_warps, "num_stages": 1}


@dataclass(frozen=True)
class AttnTable:
    """A target's launch configs: `decode` for batches of decode rows, `prefill` from `prefill_rows`
    query rows on (prefill chunks: many rows fill the machine without key splits)."""

    decode: DecodeAttnConfig
    prefill: DecodeAttnConfig
    prefill_rows: int

    def pick(self, rows: int) -> DecodeAttnConfig:
        return self.prefill if rows >= self.prefill_rows else self.decode


# Register budget checked ahead of time (ptxas -v on the AOT PTX, pointers 16-byte aligned as the JIT
# sees them). sm_90 (measured on one H200, 2026-11-29, triton 3.6, scripts/gpu/bench_attention.py):
# BLOCK_H 32 x BLOCK_N 64, 8 warps, 2 stages runs mma.sync at 230 registers, no spills; with BLOCK_N 32
# (the first table) CSA batch 64 @ 8K took 89.7 us against 66.6 us for BLOCK_N 64 (row pass off, no graph),
# BLOCK_H 64 (wgmma) spills (255 registers) and was slower; key splits only lost at batch >= 64; CSA
# batch 8 took 121-141 us over 2..16 splits in that first sweep (launch-bound, timed without a graph).
# Then the table below with the row pass (CUDA-graph times): CSA b64 8K 52.3 us, HCA b64 8K 22.5 us,
# CSA b128 32K 101 us, HCA b128 32K 68.3 us, CSA b8 8K (8 splits) 20.6 us. The q_regs / BLOCK_H 16
# variants of the sweep list are not measured. sm_100 / gfx942 / gfx950: not measured on those
# devices; sm_90's shape (gfx942: BLOCK_N 32 for its 64 KB LDS), splits scaled by SM / CU count.
_SM90 = DecodeAttnConfig(32, 64, 512, 8, 2, ((8, 8), (16, 4), (32, 2)))
_SM100 = DecodeAttnConfig(32, 64, 512, 8, 2, ((8, 8), (18, 4), (36, 2)))
_AMD = dict(waves_per_eu=1, matrix_instr_nonkdim=16)
_GFX942 = DecodeAttnConfig(32, 32, 512, 8, 2, ((16, 8), (64, 4), (112, 2)), amd=_AMD)
_GFX950 = DecodeAttnConfig(32, 32, 512, 8, 2, ((16, 8), (64, 4), (96, 2)), amd=_AMD)
_INTERPRET = DecodeAttnConfig(16, 16, 32, 4, 1, ((2, 3), (4, 2)))
CONFIGS: dict[str, AttnTable] = {
    "sm_90": AttnTable(_SM90, replace(_SM90, splits=()), 1024),
    # sm_100 / gfx942 / gfx950: not measured on those devices (see above).
    "sm_100": AttnTable(_SM100, replace(_SM100, splits=()), 1024),
    "gfx942": AttnTable(_GFX942, replace(_GFX942, splits=()), 1024),
    "gfx950": AttnTable(_GFX950, replace(_GFX950, splits=()), 1024),
    # Small blocks so the CPU tests cross block, chunk and split boundaries; from 7 rows the prefill
    # form (full-D output tile, no splits).
    "interpret": AttnTable(_INTERPRET, DecodeAttnConfig(16, 32, 64, 4, 1, ()), 7),
}


@triton.jit
def _to_model(x, dtype: tl.constexpr, ENT_FMT: tl.constexpr):
    # A loaded entry tile (pool dtype, or fp8 bytes) -> the model dtype.
    if ENT_FMT == 1:  # ENT_E4M3FN (jit code reads only constexpr globals, hence the literals)
        x = x.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    elif ENT_FMT == 2:  # ENT_E4M3FNUZ
        x = x.to(tl.float8e4b8, bitcast=True).to(tl.float32)
    elif ENT_FMT == 3:  # ENT_E4M3FNUZ_SOFT: the interpreter has no e4m3fnuz; decode the bits
        x = e4m3_bits_to_f32(x, 2)  # kernels/fp8.py format 2 = e4m3fnuz
    return x.to(dtype)


@triton.jit
def _attend_block(acc, m_i, l_i, q, kv, v_ptrs, ok, dv0, qk_scale, dtype: tl.constexpr,
                  D: tl.constexpr, BLOCK_DV: tl.constexpr, ENT_FMT: tl.constexpr):
    # One online-softmax step over BLOCK_N key rows: q [BLOCK_H, D], kv [BLOCK_N, D] (model dtype),
    # ok [BLOCK_N] (rows to count); v_ptrs [BLOCK_N] first element of each row, read only when
    # BLOCK_DV < D (the output chunk dv0 .. dv0 + BLOCK_DV).
    s = tl.dot(q, tl.trans(kv), input_precision="ieee")  # "ieee": exact fp32 when the pools are fp32
    s = tl.where(ok[None, :], s * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_N], log2 units
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys masked so far: no NaN from -inf - -inf
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if BLOCK_DV == D:
        v = kv
    else:
        offs_v = dv0 + tl.arange(0, BLOCK_DV)
        v = _to_model(tl.load(v_ptrs[:, None] + offs_v[None, :], mask=ok[:, None], other=0), dtype, ENT_FMT)
    acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision="ieee")
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
                        cos_ptr, sin_ptr, out_ptr, part_o_ptr, part_ml_ptr, rows_ptr,
                        H, window_size, block_size, per_block, wbt_width, cbt_width, num_ids, mode, num_splits,
                        rows_stride, qk_scale,
                        D: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, ENT_FMT: tl.constexpr,
                        ROW_PASS: tl.constexpr, Q_REGS: tl.constexpr):
    # 1-D grid over (row, split, head block, D/BLOCK_DV chunk), the last fastest: programs that read
    # the same key rows run side by side and share them through L2; 1-D because grid axes 1 and 2
    # stop at 65535 and prefill chunks may pass more query rows.
    dtype: tl.constexpr = q_ptr.dtype.element_ty
    NDV: tl.constexpr = D // BLOCK_DV
    pid = tl.program_id(0)
    dv0 = (pid % NDV) * BLOCK_DV
    n_hb = tl.cdiv(H, BLOCK_H)
    offs_h = (pid // NDV % n_hb) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    split = pid // (NDV * n_hb) % num_splits
    b = pid // (NDV * n_hb * num_splits)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + (b * H + offs_h[:, None]) * D + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    if Q_REGS:
        # An exact fp32 round trip through a runtime 1.0: Q is then a computed value, which the compiler
        # keeps in registers as the wgmma A operand instead of re-reading the whole [BLOCK_H, D] tile
        # from shared memory for every key block.
        q = (q.to(tl.float32) * (qk_scale * 0.0 + 1.0)).to(dtype)

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
    # Window keys [lo, min(hi, n_win)).
    w_hi = tl.minimum(hi, n_win)
    for start in range(lo, w_hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        t = t0 + j
        blk = tl.load(wbt_ptr + b * wbt_width + t // block_size, mask=j < w_hi, other=-1)
        ok = blk >= 0  # outside the range, or a released window block: nothing to read
        row_ptrs = win_ptr + (blk * block_size + t % block_size).to(tl.int64) * D  # int64: pools pass 2^31
        kv = tl.load(row_ptrs[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)  # [BLOCK_N, D]
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kv, row_ptrs, ok, dv0, qk_scale, dtype, D, BLOCK_DV, 0)
    # Compressed keys [max(lo, n_win), hi) (none with COMP_NONE: hi <= n_win).
    c_lo = tl.maximum(lo, n_win)
    if ROW_PASS:
        # First resolve this program's entries to pool rows (id -> block table -> row, -1 = none) into
        # the scratch rows_ptr[b, e]: the key loop then has one indirection, like the window's, which
        # the compiler pipelines; two dependent loads per step would stall it. Programs of the same
        # row and split write the same values.
        for start in range(c_lo, hi, ROW_PASS_N):
            e = start - n_win + tl.arange(0, ROW_PASS_N)
            valid = e < hi - n_win
            e_id = tl.where(mode == 1, tl.load(eid_ptr + b * num_ids + e, mask=valid & (mode == 1), other=-1), e)
            in_range = valid & (e_id >= 0) & (e_id < cbt_width * per_block)
            cb = tl.load(cbt_ptr + b * cbt_width + e_id // per_block, mask=in_range, other=-1)
            tl.store(rows_ptr + b * rows_stride + e, tl.where(cb >= 0, cb * per_block + e_id % per_block, -1),
                     mask=valid)
        tl.debug_barrier()  # the stores above are visible to every thread of the program
    for start in range(c_lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        valid = j < hi
        e = j - n_win  # entry index among the compressed keys
        if ROW_PASS:
            row = tl.load(rows_ptr + b * rows_stride + e, mask=valid, other=-1)
        else:
            e = tl.where(mode == 1, tl.load(eid_ptr + b * num_ids + e, mask=valid & (mode == 1), other=-1), e)
            in_range = valid & (e >= 0) & (e < cbt_width * per_block)
            cb = tl.load(cbt_ptr + b * cbt_width + e // per_block, mask=in_range, other=-1)
            row = tl.where(cb >= 0, cb * per_block + e % per_block, -1)
        ok = row >= 0
        row_ptrs = ent_ptr + row.to(tl.int64) * D
        kv = _to_model(tl.load(row_ptrs[:, None] + offs_d[None, :], mask=ok[:, None], other=0), dtype, ENT_FMT)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kv, row_ptrs, ok, dv0, qk_scale, dtype, D, BLOCK_DV,
                                      ENT_FMT)

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
    # grid: (rows, head blocks). Merges the splits' (max, sum, acc) with the sink, then finishes.
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
    """q [Bt, H, D] roped queries (one row per decode token or prefill token) -> [Bt, H, D] de-roped
    attention output (see the module doc).

    window [rows, D], window_block_table [Bt, MW] int32, positions [Bt] int32, sinks [H] fp32,
    cos/sin [Bt, R/2] in q's dtype; with entries [rows, D] (q's dtype, or float8_e4m3fn /
    float8_e4m3fnuz) and comp_block_table [Bt, MC] int32: CSA passes entry_ids [Bt, K] int32
    (-1 = none), HCA num_entries [Bt] int32. num_splits and config override the config table
    (tests, benchmark sweeps).
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
    if D & (D - 1) or D < 16 or window.shape[1] != D:
        raise ValueError(f"window: head dim must be a power of two >= 16 equal to q's {D}, got "
                         f"{tuple(window.shape)}")
    if window_block_table.shape[0] != Bt or positions.shape[0] != Bt or sinks.shape[0] != H:
        raise ValueError(f"window_block_table / positions / sinks: batch {Bt} and heads {H} expected, got "
                         f"{tuple(window_block_table.shape)}, {tuple(positions.shape)}, {tuple(sinks.shape)}")
    if cos.shape != (Bt, R // 2) or sin.shape != cos.shape or R > D:
        raise ValueError(f"cos/sin: expected [{Bt}, R/2] with R <= {D}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    comp, per_block, num_ids, ent_fmt = COMP_NONE, 1, 0, ENT_NATIVE
    ent, cbt, eid, nent = window, window_block_table, positions, positions  # unused pointers when COMP_NONE
    if entries is not None:
        _check("entries", entries, 2, (q.dtype, *FP8_DTYPES))
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
        if entries.dtype in FP8_DTYPES:  # raw bytes, bitcast in the kernel by format
            ent = entries.view(torch.uint8)
            ent_fmt = (ENT_E4M3FN if entries.dtype == torch.float8_e4m3fn
                       else ENT_E4M3FNUZ_SOFT if entries.device.type == "cpu" else ENT_E4M3FNUZ)
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
    cfg = config if config is not None else CONFIGS[target_of(q)].pick(Bt)
    block_h = min(cfg.block_h, max(16, triton.next_power_of_2(H)))
    block_dv, block_n, options = min(cfg.block_dv, D), cfg.block_n, cfg.options()
    if q.element_size() == 4 and q.device.type != "cpu":  # fp32 models: half the tile bytes, one stage
        block_n, options = max(16, block_n // 2), {**options, "num_stages": 1}
    splits = num_splits if num_splits is not None else cfg.num_splits(Bt)
    if splits < 1:
        raise ValueError(f"num_splits: must be >= 1, got {splits}")
    qk_scale = (D ** -0.5 if scale is None else scale) * 1.4426950408889634
    out = torch.empty_like(q)
    if Bt == 0:
        return out
    part_o = part_ml = sinks  # unused pointers when not split
    rows_stride = num_ids if comp == COMP_IDS else cbt.shape[1] * per_block if comp == COMP_COUNT else 0
    rows = positions  # unused pointer without entries or row pass
    if cfg.row_pass and comp != COMP_NONE:
        rows = torch.empty(Bt, max(rows_stride, 1), dtype=torch.int32, device=q.device)
    if splits > 1:
        part_o = torch.empty(Bt, splits, H, D, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(Bt, splits, 2, H, dtype=torch.float32, device=q.device)
    n_hb = triton.cdiv(H, block_h)
    _decode_attn_kernel[(Bt * splits * n_hb * (D // block_dv),)](
        q, window, window_block_table, positions, ent, cbt, eid, nent, sinks, cos, sin, out, part_o, part_ml, rows,
        H, window_size, block_size, per_block, window_block_table.shape[1], cbt.shape[1], num_ids, comp, splits,
        rows_stride, qk_scale,
        D=D, R=R, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_DV=block_dv, ENT_FMT=ent_fmt, ROW_PASS=cfg.row_pass,
        Q_REGS=cfg.q_regs, **options)
    if splits > 1:
        cbh = cfg.combine_block_h
        _decode_combine_kernel[(Bt, triton.cdiv(H, cbh))](
            part_o, part_ml, sinks, cos, sin, out, H, splits, D=D, R=R, BLOCK_H=cbh, **cfg.combine_options())
    return out


# Ahead-of-time variants: V4-Flash shapes (D 512, rope 64, 64 heads), bf16 model dtype; the entry pool
# in bf16, or fp8 bytes (e4m3fnuz on gfx942, e4m3fn elsewhere: the format each target's fp8 KV cache uses).
_D, _R, _H = 512, 64, 64
_FP8_FMT = {t: ENT_E4M3FNUZ if t == "gfx942" else ENT_E4M3FN for t in TARGETS}


def _attn_sig(ent: str) -> dict[str, str]:
    return {
        **{p: "*bf16" for p in ("q_ptr", "win_ptr")}, "wbt_ptr": "*i32", "pos_ptr": "*i32", "ent_ptr": ent,
        "cbt_ptr": "*i32", "eid_ptr": "*i32", "nent_ptr": "*i32", "sink_ptr": "*fp32", "cos_ptr": "*bf16",
        "sin_ptr": "*bf16", "out_ptr": "*bf16", "part_o_ptr": "*fp32", "part_ml_ptr": "*fp32", "rows_ptr": "*i32",
        **{p: "i32" for p in ("H", "window_size", "block_size", "per_block", "wbt_width", "cbt_width", "num_ids",
                              "mode", "num_splits", "rows_stride")},
        "qk_scale": "fp32",
        **{p: "constexpr" for p in ("D", "R", "BLOCK_H", "BLOCK_N", "BLOCK_DV", "ENT_FMT", "ROW_PASS", "Q_REGS")},
    }


_COMBINE_SIG = {"part_o_ptr": "*fp32", "part_ml_ptr": "*fp32", "sink_ptr": "*fp32", "cos_ptr": "*bf16",
                "sin_ptr": "*bf16", "out_ptr": "*bf16", "H": "i32", "num_splits": "i32",
                "D": "constexpr", "R": "constexpr", "BLOCK_H": "constexpr"}


def attn_constexprs(c: DecodeAttnConfig, ent_fmt: int = ENT_NATIVE) -> dict[str, int]:
    """The kernel's constexprs for config c at the V4-Flash shapes (AOT specs, benchmark sweep filter)."""
    return {"D": _D, "R": _R, "BLOCK_H": min(c.block_h, _H), "BLOCK_N": c.block_n,
            "BLOCK_DV": min(c.block_dv, _D), "ENT_FMT": ent_fmt, "ROW_PASS": c.row_pass,
            "Q_REGS": c.q_regs}


def attn_aot_spec(name: str, configs: dict[str, DecodeAttnConfig], fp8: bool = False) -> AotSpec:
    return AotSpec(name, _decode_attn_kernel, _attn_sig("*u8" if fp8 else "*bf16"),
                   {t: attn_constexprs(configs[t], _FP8_FMT[t] if fp8 else ENT_NATIVE) for t in configs},
                   {t: configs[t].options() for t in configs}, uses_dot=True)


AOT_SPECS: tuple[AotSpec, ...] = (
    attn_aot_spec("decode_attention", {t: CONFIGS[t].decode for t in TARGETS}),
    attn_aot_spec("decode_attention[fp8]", {t: CONFIGS[t].decode for t in TARGETS}, fp8=True),
    attn_aot_spec("decode_attention[prefill]", {t: CONFIGS[t].prefill for t in TARGETS}),
    attn_aot_spec("decode_attention[prefill,fp8]", {t: CONFIGS[t].prefill for t in TARGETS}, fp8=True),
    AotSpec("decode_attention_combine", _decode_combine_kernel, _COMBINE_SIG,
            {t: {"D": _D, "R": _R, "BLOCK_H": CONFIGS[t].decode.combine_block_h} for t in TARGETS},
            {t: CONFIGS[t].decode.combine_options() for t in TARGETS}),
)
