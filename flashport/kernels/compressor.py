"""Compressor decode step over the engine's pools (spec §5.5, §5.6, §5.11; torch twin and the
pool layout: flashport/ops/compressor.py, flashport/engine/pools.py).

One program per sequence, one new token each, at position p:
  - p % m < m-1: the token's raw (kv, gate) row goes to pending row p % m of its state slot;
  - p % m == m-1: the token closes block w = (p+1)/m - 1. The block's slots (HCA: its m rows;
    CSA: the previous block's Ca half from the slot's overlap, with its biased fp32 gate, then this
    block's Cb half) are pooled per feature: weights = softmax over slots of (gate + ape) in fp32,
    rounded to the model dtype; products rounded to the model dtype and summed in fp32, rounded
    once (torch sums bf16 with an fp32 accumulator). Then RMSNorm (fp32 weight, cast once) and
    RoPE on the trailing dims at position p+1-m, stored to entries[close_row]. CSA: this block's
    Ca rows and their biased gates become the slot's overlap (and a boundary record if asked).

The softmax is exact two-pass per feature: when the slots fit one tile (CSA: 2m = 8) they are
loaded once; otherwise (HCA: m = 128) a first pass over slot chunks finds the max and the sum
(online rescaling) and a second pass forms the rounded weights, so the weights are the twin's
up to the fp32 summation order of the softmax denominator and the pooled sum (and tl.exp versus
torch's exp): fp32 results match to ~1e-6; in bf16 (interpreter, tests' shapes) the one-tile path
was bit-identical to the twin and the chunked path differed by one ulp in ~0.1% of entry elements.
The overlap state is copied raw rows and an fp32 sum: bit-identical.
Rounding goes through `round_to` (see qkv_rope.py: the interpreter's bf16 cast truncates).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashport.kernels.fp8 import FP8_E4M3FN, FP8_E4M3FNUZ, FP8_NONE, f32_to_e4m3_bits, fp8_format
from flashport.kernels.qkv_rope import DTYPES, round_to
from flashport.kernels.spec import INTERPRET, TRITON_PTR, AotSpec, target_of

# target -> elements of one slot tile (slot chunk x D), num_warps, num_stages. A CSA block (2m = 8
# slots) is one tile; an HCA block (128 slots x 512) is walked in chunks of `tile_elems // D` slots.
CONFIGS: dict[str, dict[str, int | bool]] = {
    "sm_90": dict(tile_elems=8192, num_warps=8, num_stages=1, enable_fp_fusion=False),
    "sm_100": dict(tile_elems=8192, num_warps=8, num_stages=1, enable_fp_fusion=False),
    "gfx942": dict(tile_elems=8192, num_warps=8, num_stages=1, enable_fp_fusion=False),
    "gfx950": dict(tile_elems=8192, num_warps=8, num_stages=1, enable_fp_fusion=False),
    # Small tiles on the CPU so the tests cross the chunked (two-pass) path with m = 8.
    INTERPRET: dict(tile_elems=256, num_warps=1, num_stages=1, enable_fp_fusion=False),
}


@triton.jit
def _slot_tile(j, b, slot, has_prev, new_kv, new_g, pkv_ptr, pgate_ptr, ape_ptr, okv_ptr, ogate_ptr,
               M: tl.constexpr, D: tl.constexpr, WIDTH: tl.constexpr, OVERLAP: tl.constexpr, WITH_KV: tl.constexpr):
    # Slots j [C] of the closing block -> kv, biased gate [C, D] fp32 (kv 0, gate -inf: empty slot).
    # new_kv, new_g [1, D]: the closing token's own row (slot M-1 of the current block).
    f = tl.arange(0, D)[None, :]  # [1, D]
    j2 = j[:, None]  # [C, 1]
    if OVERLAP:
        i2 = j2 - M  # row in the current block; slots 0..M-1 are the previous block's Ca
        col = f + D  # the current block contributes its Cb half
    else:
        i2 = j2
        col = f
    in_pend = (i2 >= 0) & (i2 < M - 1) & (f < D)  # [C, D]
    is_new = (i2 == M - 1) & (f < D)
    cur = (i2 >= 0) & (i2 < M) & (f < D)
    poff = (slot * (M - 1) + i2) * WIDTH + col  # [C, D] int64
    g = tl.load(pgate_ptr + poff, mask=in_pend, other=float("-inf")).to(tl.float32)
    g = tl.where(is_new, new_g, g)
    g = g + tl.load(ape_ptr + i2 * WIDTH + col, mask=cur, other=0.0)  # [C, D] fp32
    kv = g  # placeholder when the caller needs gates only
    if WITH_KV:
        kv = tl.load(pkv_ptr + poff, mask=in_pend, other=0.0).to(tl.float32)
        kv = tl.where(is_new, new_kv, kv)
    if OVERLAP:
        prev = (j2 < M) & has_prev & (f < D)  # the previous block exists iff p >= m
        ooff = (slot * M + j2) * D + f
        g = tl.where(prev, tl.load(ogate_ptr + ooff, mask=prev, other=0.0), g)
        if WITH_KV:
            kv = tl.where(prev, tl.load(okv_ptr + ooff, mask=prev, other=0.0).to(tl.float32), kv)
    return kv, g


@triton.jit
def _compressor_decode_kernel(
        kv_ptr, gate_ptr,  # [B, WIDTH] raw projections of the new tokens
        slot_ptr, pos_ptr, close_ptr, bnd_ptr,  # [B] int64
        pkv_ptr, pgate_ptr,  # [S, M-1, WIDTH] pending rows
        entries_ptr,  # [R, D] in the model dtype, or uint8 codes of an FP8 pool (ENTRY_FMT)
        ape_ptr, normw_ptr,  # [M, WIDTH] fp32, [D] fp32
        cos_ptr, sin_ptr,  # [B, ROPE/2] at each entry's first position
        okv_ptr, ogate_ptr, bkv_ptr, bgate_ptr,  # CSA: [S, M, D] overlap, [NC, M, D] boundary records
        eps,
        M: tl.constexpr, D: tl.constexpr, WIDTH: tl.constexpr, ROPE: tl.constexpr, OVERLAP: tl.constexpr,
        NUM_SLOTS: tl.constexpr, SLOT_CHUNK: tl.constexpr, M_P2: tl.constexpr, ENTRY_FMT: tl.constexpr):
    dt = kv_ptr.dtype.element_ty  # the model dtype: every rounding of the model happens in it
    b = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + b)
    pos = tl.load(pos_ptr + b)
    row = tl.load(close_ptr + b)
    r = pos % M
    if row < 0:
        # The block stays open: keep the raw row (bits copied, model dtype).
        w = tl.arange(0, WIDTH)
        ok = (w < WIDTH) & (r < M - 1)
        dst = (slot * (M - 1) + r) * WIDTH + w
        tl.store(pkv_ptr + dst, tl.load(kv_ptr + b * WIDTH + w), mask=ok)
        tl.store(pgate_ptr + dst, tl.load(gate_ptr + b * WIDTH + w), mask=ok)
    else:
        has_prev = pos >= M
        f = tl.arange(0, D)  # [D]
        col = f[None, :]  # [1, D]: the new row's columns pooled by this block
        if OVERLAP:
            col = col + D
        new_kv = tl.load(kv_ptr + b * WIDTH + col).to(tl.float32)
        new_g = tl.load(gate_ptr + b * WIDTH + col).to(tl.float32)
        j = tl.arange(0, SLOT_CHUNK)
        if NUM_SLOTS <= SLOT_CHUNK:
            kv, g = _slot_tile(j, b, slot, has_prev, new_kv, new_g, pkv_ptr, pgate_ptr, ape_ptr, okv_ptr, ogate_ptr,
                               M, D, WIDTH, OVERLAP, True)
            mx = tl.max(g, axis=0)  # [D], finite: the closing token's own slot is never empty
            e = tl.exp(g - mx[None, :])
            wt = round_to(tl.div_rn(e, tl.sum(e, axis=0)[None, :]), dt)
            acc = tl.sum(round_to(wt * kv, dt), axis=0)  # [D]
        else:
            mx = tl.full([D], float("-inf"), tl.float32)
            z = tl.zeros([D], tl.float32)
            for c in range(0, NUM_SLOTS, SLOT_CHUNK):
                _, g = _slot_tile(c + j, b, slot, has_prev, new_kv, new_g, pkv_ptr, pgate_ptr, ape_ptr, okv_ptr,
                                  ogate_ptr, M, D, WIDTH, OVERLAP, False)
                m_new = tl.maximum(mx, tl.max(g, axis=0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a chunk of empty slots only
                z = z * tl.exp(mx - m_safe) + tl.sum(tl.exp(g - m_safe[None, :]), axis=0)
                mx = m_new
            acc = tl.zeros([D], tl.float32)
            for c in range(0, NUM_SLOTS, SLOT_CHUNK):
                kv, g = _slot_tile(c + j, b, slot, has_prev, new_kv, new_g, pkv_ptr, pgate_ptr, ape_ptr, okv_ptr,
                                   ogate_ptr, M, D, WIDTH, OVERLAP, True)
                wt = round_to(tl.div_rn(tl.exp(g - mx[None, :]), z[None, :]), dt)
                acc += tl.sum(round_to(wt * kv, dt), axis=0)
        x = round_to(acc, dt)  # the pooled row in the model dtype
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=0) / D + eps))
        y = round_to(tl.load(normw_ptr + f) * (x * rstd), dt)  # [D]
        # RoPE on the trailing ROPE dims: pairs (2i, 2i+1) of the row.
        y0, y1 = tl.split(tl.reshape(y, (D // 2, 2)))  # [D/2] each
        k = tl.arange(0, D // 2) - (D - ROPE) // 2  # pair index within the rope dims
        rot = k >= 0
        cs = b * (ROPE // 2) + k
        cc = tl.load(cos_ptr + cs, mask=rot, other=1.0).to(tl.float32)
        ss = tl.load(sin_ptr + cs, mask=rot, other=0.0).to(tl.float32)
        z0 = tl.where(rot, round_to(y0 * cc - y1 * ss, dt), y0)
        z1 = tl.where(rot, round_to(y1 * cc + y0 * ss, dt), y1)
        entry = tl.reshape(tl.join(z0, z1), (D,))
        if ENTRY_FMT == 0:
            tl.store(entries_ptr + row * D + f, entry.to(dt))
        else:  # kv_cache_dtype="fp8": the entry rounded to the model dtype, then to E4M3
            tl.store(entries_ptr + row * D + f, f32_to_e4m3_bits(entry, ENTRY_FMT))
        if OVERLAP:
            # This block's Ca rows and biased gates are the overlap of the next block.
            i = tl.arange(0, M_P2)[:, None]  # [M2, 1]
            fm = f[None, :]  # [1, D]
            rows_ok = (i < M) & (fm < D)  # [M2, D]
            pend = (i < M - 1) & (fm < D)
            poff = (slot * (M - 1) + i) * WIDTH + fm
            ca = tl.load(pkv_ptr + poff, mask=pend, other=0.0)
            ca = tl.where(i == M - 1, tl.load(kv_ptr + b * WIDTH + fm), ca)
            za = tl.load(pgate_ptr + poff, mask=pend, other=0.0).to(tl.float32)
            za = tl.where(i == M - 1, tl.load(gate_ptr + b * WIDTH + fm).to(tl.float32), za)
            za = za + tl.load(ape_ptr + i * WIDTH + fm, mask=rows_ok, other=0.0)
            # Every thread has read the old overlap (above) before any thread overwrites it.
            tl.debug_barrier()
            ooff = (slot * M + i) * D + fm
            tl.store(okv_ptr + ooff, ca, mask=rows_ok)
            tl.store(ogate_ptr + ooff, za, mask=rows_ok)
            blk = tl.load(bnd_ptr + b)
            if blk >= 0:
                boff = (blk * M + i) * D + fm
                tl.store(bkv_ptr + boff, ca, mask=rows_ok)
                tl.store(bgate_ptr + boff, za, mask=rows_ok)


def _slot_chunk(D: int, num_slots: int, target: str) -> int:
    return max(1, min(triton.next_power_of_2(num_slots), int(CONFIGS[target]["tile_elems"]) // D))


def _options(target: str) -> dict[str, int | bool]:
    return {k: v for k, v in CONFIGS[target].items() if k != "tile_elems"}


def _constexprs(m: int, d: int, rope: int, overlap: bool, target: str, entry_fmt: int = FP8_NONE
                ) -> dict[str, int | bool]:
    num_slots = 2 * m if overlap else m
    return dict(M=m, D=d, WIDTH=2 * d if overlap else d, ROPE=rope, OVERLAP=overlap, NUM_SLOTS=num_slots,
                SLOT_CHUNK=_slot_chunk(d, num_slots, target), M_P2=triton.next_power_of_2(m), ENTRY_FMT=entry_fmt)


def _check(name: str, t: torch.Tensor, shape: tuple[int | None, ...], dtype: torch.dtype, device: torch.device) -> None:
    ok = (t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
          and t.dtype == dtype and t.is_contiguous() and t.device == device)
    if not ok:
        want = [("*" if s is None else s) for s in shape]
        raise ValueError(f"compressor_decode: {name} must be contiguous {dtype} {want} on {device}, "
                         f"got {t.dtype} {list(t.shape)} on {t.device} (contiguous={t.is_contiguous()})")


def compressor_decode(kv: torch.Tensor, gate: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                      close_rows: torch.Tensor, boundary_blocks: torch.Tensor, pend_kv: torch.Tensor,
                      pend_gate: torch.Tensor, entries: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                      eps: float, cos: torch.Tensor, sin: torch.Tensor,
                      overlap: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """See flashport/ops/compressor.py; updates the pools in place."""
    if kv.dim() != 2 or kv.dtype not in DTYPES:
        raise ValueError(f"compressor_decode: kv must be bf16/fp16/fp32 [B, width], got {kv.dtype} {list(kv.shape)}")
    B, width = kv.shape
    dt, dev = kv.dtype, kv.device
    if entries.dim() != 2:
        raise ValueError(f"compressor_decode: entries must be [R, d], got {list(entries.shape)}")
    d, m = entries.shape[1], ape.shape[0] if ape.dim() == 2 else 0
    if width != (2 * d if overlap is not None else d):
        raise ValueError(f"compressor_decode: kv width {width} must be {'2d' if overlap is not None else 'd'} "
                         f"for d = {d} ({'CSA' if overlap is not None else 'HCA'})")
    if d & (d - 1) or m < 1:
        raise ValueError(f"compressor_decode: d {d} must be a power of two and ape [m, width] with m >= 1")
    rope = 2 * (cos.shape[1] if cos.dim() == 2 else 0)
    if rope & (rope - 1) or not 2 <= rope <= d:
        raise ValueError(f"compressor_decode: cos must be [B, rope/2] with rope a power of two <= {d}")
    _check("kv", kv, (B, width), dt, dev)
    _check("gate", gate, (B, width), dt, dev)
    for name, t in (("slots", slots), ("positions", positions), ("close_rows", close_rows),
                    ("boundary_blocks", boundary_blocks)):
        _check(name, t, (B,), torch.int64, dev)
    _check("pend_kv", pend_kv, (None, m - 1, width), dt, dev)
    _check("pend_gate", pend_gate, (pend_kv.shape[0], m - 1, width), dt, dev)
    entry_fmt = fp8_format(entries.dtype)
    _check("entries", entries, (None, d), entries.dtype if entry_fmt else dt, dev)
    _check("ape", ape, (m, width), torch.float32, dev)
    _check("norm_weight", norm_weight, (d,), torch.float32, dev)
    _check("cos", cos, (B, rope // 2), dt, dev)
    _check("sin", sin, (B, rope // 2), dt, dev)
    if overlap is not None:
        ov_kv, ov_gate, bnd_kv, bnd_gate = overlap
        _check("ov_kv", ov_kv, (pend_kv.shape[0], m, d), dt, dev)
        _check("ov_gate", ov_gate, (pend_kv.shape[0], m, d), torch.float32, dev)
        _check("bnd_kv", bnd_kv, (None, m, d), dt, dev)
        _check("bnd_gate", bnd_gate, (bnd_kv.shape[0], m, d), torch.float32, dev)
    else:  # unused pointers: pass tensors of the dtypes the AOT signature names
        ov_kv, ov_gate, bnd_kv, bnd_gate = entries, ape, entries, ape
    if B == 0:
        return
    target = target_of(kv)
    _compressor_decode_kernel[(B,)](
        kv, gate, slots, positions, close_rows, boundary_blocks, pend_kv, pend_gate,
        entries.view(torch.uint8) if entry_fmt else entries, ape, norm_weight,
        cos, sin, ov_kv, ov_gate, bnd_kv, bnd_gate, eps,
        **_constexprs(m, d, rope, overlap is not None, target, entry_fmt), **_options(target))


def _spec(name: str, dtype: torch.dtype, m: int, d: int, rope: int, overlap: bool, fp8: bool) -> AotSpec:
    p = TRITON_PTR[dtype]
    targets = [t for t in CONFIGS if t != INTERPRET]
    sig = dict(kv_ptr=p, gate_ptr=p, slot_ptr="*i64", pos_ptr="*i64", close_ptr="*i64", bnd_ptr="*i64",
               pkv_ptr=p, pgate_ptr=p, entries_ptr="*u8" if fp8 else p, ape_ptr="*fp32", normw_ptr="*fp32",
               cos_ptr=p, sin_ptr=p, okv_ptr=p, ogate_ptr="*fp32", bkv_ptr=p, bgate_ptr="*fp32", eps="fp32")
    sig.update({k: "constexpr" for k in _constexprs(m, d, rope, overlap, INTERPRET)})
    # An FP8 pool holds the target's flavour: e4m3fnuz on MI300X, e4m3fn elsewhere.
    fmt = {t: (FP8_E4M3FNUZ if t == "gfx942" else FP8_E4M3FN) if fp8 else FP8_NONE for t in targets}
    return AotSpec(name=name, fn=_compressor_decode_kernel, signature=sig,
                   constexprs={t: _constexprs(m, d, rope, overlap, t, fmt[t]) for t in targets},
                   options={t: _options(t) for t in targets})


# What the model launches (V4-Flash): the CSA main compressor (d 512, m 4), the CSA indexer's
# (d 128, m 4) and the HCA compressor (d 512, m 128), rope 64; bf16 serving, fp32 model on the GPU.
AOT_SPECS: tuple[AotSpec, ...] = tuple(
    _spec(f"compressor_decode[{kind},d={d},m={m},{str(dt).removeprefix('torch.')}{',fp8 pool' if fp8 else ''}]",
          dt, m, d, 64, kind != "hca", fp8)
    for dt, fp8 in ((torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True))
    for kind, d, m in (("csa", 512, 4), ("indexer", 128, 4), ("hca", 512, 128))
)
