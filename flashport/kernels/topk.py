"""Row-wise top-k ids of fp32 scores (the lightning indexer's selection), without a sort.

scores [R, n] fp32 -> ids [R, k] int32: the ids of the k largest finite scores of each row, -1
padded where a row has fewer than k finite scores (-inf marks entries that are not candidates).
Same contract as `flashport.ops.indexer.topk_ids` (torch.topk), except for the order of the ids
in a row: here they come in ascending index order (attention does not care about order).

One program per row. Each score maps to an order-preserving int32 key (fp32 bits, the negative
ones with their magnitude bits flipped), so "the k-th largest score" is an integer search:
  1. one pass: the number of finite scores, the largest key and, for rows longer than
     `cand_block` (optional, off in the measured tables), the maximum of each of K_PAD >= k
     groups (index % K_PAD). When every group has
     a finite score, the smallest group maximum L has at least k keys >= it: a lower bound of the
     threshold. The keys >= L (the candidates, typically a few thousand of a 32K..262K row) and
     their ids go to a per-row scratch in index order; if they fit `cand_block`, steps 2-3 run on
     that tile in registers, else (heavy ties, rows mostly -inf) on the whole row from L up;
  2. bisection on the key T: the largest T with count(key >= T) >= k, stopping early as soon
     as some T has exactly k keys at or above it (with distinct random scores that happens
     after ~20 passes, each one count over the tile / row); or, for a tile in registers with
     `radix` (optional), a 4-pass radix select with 256-bin histograms;
  3. one pass writing the ids of key > T, then of key == T in ascending index order until k
     ids are written (the tie rule: lowest index first), compacted by a prefix sum.
Without ties at the k-th value the id set equals torch.topk's. A row of up to `max_block` entries
is loaded once and stays in registers; longer rows (up to 262144 entries and beyond) are read
chunk by chunk (twice with pruning: step 1 and the candidate write; on every pass without).
Scores must not be NaN (the indexer's never are); -0.0 ranks just below +0.0. No host sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from flashport.kernels.spec import INTERPRET, TARGETS, AotSpec, target_of


@dataclass(frozen=True)
class TopkConfig:
    max_block: int  # largest row tile held in registers; longer rows loop over chunks of this size
    num_warps: int
    cand_block: int = 0  # rows longer than this prune to <= this many candidates first (0: never)
    radix: bool = False  # tiles in registers: radix select (4 histogram passes) instead of bisection
    min_block: int = 1024  # smallest tile (short rows still get enough lanes)
    amd: dict[str, int] = field(default_factory=dict)

    def block(self, n: int) -> int:
        """The row tile for rows of n entries: a power of two in [min_block, max_block]."""
        return max(self.min_block, min(self.max_block, triton.next_power_of_2(max(n, 1))))

    def options(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": 1, **self.amd}


# sm_90: measured on the H200 (scripts/gpu/bench_indexer.py --sweep, 2026-11-29): bisection on 4096-key
# tiles, 8 warps, no pruning: 27.1 us at batch 64 / 32K (8224 entries a row), 124.9 us at 128K, 217 us
# for 8192 prefill rows of 2080 (torch.topk: 191 / 252 / 642 us). Pruning + radix select (cand_block
# 4096, radix) measured slower on Triton 3.6: 41.7 / 126.8 / 624.5 us (its histogram is costly), so
# both are off; they stay as options for other targets / Triton versions. sm_100 / gfx942 / gfx950:
# not measured on those devices; sized like sm_90 (64-wide AMD waves: half the warps, same lanes).
CONFIGS: dict[str, TopkConfig] = {
    "sm_90": TopkConfig(max_block=4096, num_warps=8),
    "sm_100": TopkConfig(max_block=4096, num_warps=8),
    "gfx942": TopkConfig(max_block=4096, num_warps=4),
    "gfx950": TopkConfig(max_block=4096, num_warps=4),
    INTERPRET: TopkConfig(max_block=64, num_warps=4, cand_block=32, radix=True, min_block=16),  # tests: all paths
}

# key(-inf) = 0xFF800000 ^ 0x7FFFFFFF as int32 = -2139095041 (a literal in the jit code below).


@triton.jit
def _key(x):
    # fp32 -> int32 with the same order: non-negative floats keep their bits; negative ones flip
    # the 31 magnitude bits so a larger magnitude gives a smaller int.
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _load_keys(row_ptr, offs, n):
    return _key(tl.load(row_ptr + offs, mask=offs < n, other=float("-inf")))


@triton.jit
def _count_ge(keys, row_ptr, n, t, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    # Number of keys >= t in the row (keys: the row tile when SINGLE, else re-read by chunks).
    if SINGLE:
        c = tl.sum((keys >= t).to(tl.int32), axis=0)
    else:
        c = tl.sum((keys >= t).to(tl.int32), axis=0)  # chunk 0 (already loaded)
        for start in range(BLOCK, n, BLOCK):
            kc = _load_keys(row_ptr, start + tl.arange(0, BLOCK), n)
            c += tl.sum((kc >= t).to(tl.int32), axis=0)
    return c


@triton.jit
def _bisect(keys, row_ptr, n, lo0, kmax, n_valid, K, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    # The threshold over the keys (the tile `keys` when SINGLE, else the row by chunks). Invariant:
    # count(>= lo) >= K > count(>= hi); int64 so hi - lo cannot overflow. Ends in mode 0: hi = lo + 1
    # (take keys > lo, then K - count(>= hi) keys == lo, lowest index first); 1: count(>= lo) == K
    # exactly; 2: n_valid <= K (take every finite key). Returns (t_gt, need): take every key > t_gt
    # and the first `need` keys == t_gt.
    lo = lo0.to(tl.int64)
    hi = kmax.to(tl.int64) + 1
    c_hi = n_valid * 0  # count(>= hi)
    mode = tl.where(n_valid <= K, 2, 0)
    while (hi - lo > 1) & (mode == 0):
        mid = lo + (hi - lo) // 2
        c = _count_ge(keys, row_ptr, n, mid.to(tl.int32), BLOCK, SINGLE)
        if c >= K:
            lo = mid
            mode = tl.where(c == K, 1, 0)
        else:
            hi = mid
            c_hi = c
    t = lo.to(tl.int32)
    t_gt = tl.where(mode == 2, -2139095041, tl.where(mode == 1, t - 1, t))  # key(-inf) when mode 2
    need = tl.where(mode == 0, K - c_hi, 0)
    return t_gt, need


@triton.jit
def _radix(keys, n_valid, K):
    # The same (t_gt, need) as `_bisect`, for a tile held in registers: a most-significant-digit
    # radix select, 4 passes of one 256-bin histogram over the keys that match the digits chosen
    # so far (order-preserving unsigned image of the keys). At each pass the digit is the largest
    # bin b with count(digit >= b) >= the number still wanted; the keys above it are taken.
    u = (keys ^ -2147483648).to(tl.uint32, bitcast=True)  # [BLOCK] unsigned, same order
    bins = tl.arange(0, 256)
    want = K + n_valid * 0  # keys still to take at or below the prefix
    prefix = tl.max(u, axis=0) * 0  # uint32 scalar: the digits chosen so far
    for i in tl.static_range(4):
        shift = 24 - 8 * i
        d = ((u >> shift) & 255).to(tl.int32)
        if i == 0:
            h = tl.histogram(d, 256)  # [256] int32
        else:
            h = tl.histogram(d, 256, mask=(u >> (shift + 8)) == (prefix >> (shift + 8)))
        ge = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # count(digit >= b)
        b = tl.max(tl.where(ge >= want, bins, -1), axis=0)
        want -= tl.sum(tl.where(bins > b, h, 0), axis=0)
        prefix = prefix | (b.to(tl.uint32) << shift)
    t = prefix.to(tl.int32, bitcast=True) ^ -2147483648  # the k-th largest key
    all_valid = n_valid <= K
    return tl.where(all_valid, -2139095041, t), tl.where(all_valid, 0, want)


@triton.jit
def _emit(keys, ids, out_row, t_gt, need, written, ties_seen):
    # Writes the selected ids of one tile in index order (a prefix sum gives each its slot);
    # returns the running (written, ties seen) for the next tile.
    gt = keys > t_gt
    tie = (keys == t_gt) & (need > 0)
    tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0) - 1
    sel = gt | (tie & (tie_rank < need))
    pos = written + tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(out_row + pos, ids, mask=sel)
    return written + tl.sum(sel.to(tl.int32), axis=0), ties_seen + tl.sum(tie.to(tl.int32), axis=0)


@triton.jit
def _select_row(keys, row_ptr, out_row, n, lo0, kmax, n_valid, K, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
                RADIX: tl.constexpr):
    # The threshold over the whole row (bisection from lo0, by chunks when not SINGLE; or the
    # radix select in registers when SINGLE and RADIX), then the ids, chunk by chunk when not SINGLE.
    if SINGLE and RADIX:
        t_gt, need = _radix(keys, n_valid, K)
    else:
        t_gt, need = _bisect(keys, row_ptr, n, lo0, kmax, n_valid, K, BLOCK, SINGLE)
    offs = tl.arange(0, BLOCK)
    written, ties_seen = _emit(keys, offs, out_row, t_gt, need, 0, 0)
    if not SINGLE:
        for start in range(BLOCK, n, BLOCK):
            idx = start + offs
            written, ties_seen = _emit(_load_keys(row_ptr, idx, n), idx, out_row, t_gt, need, written, ties_seen)


@triton.jit
def _topk_kernel(scores_ptr, out_ptr, scratch_ptr, n, stride_row, K,
                 BLOCK: tl.constexpr, SINGLE: tl.constexpr, K_PAD: tl.constexpr,
                 PRUNE: tl.constexpr, CAND: tl.constexpr, RADIX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = scores_ptr + row * stride_row
    out_row = out_ptr + row * K
    offs = tl.arange(0, BLOCK)
    keys = _load_keys(row_ptr, offs, n)  # [BLOCK] int32: the whole row when SINGLE, else chunk 0

    # 1. finite scores, the largest key and (PRUNE) the max of each of K_PAD groups (index % K_PAD)
    n_valid = tl.sum((keys > -2139095041).to(tl.int32), axis=0)  # key(-inf)
    kmax = tl.max(keys, axis=0)
    if PRUNE:
        gmax = tl.max(tl.reshape(keys, (BLOCK // K_PAD, K_PAD)), axis=0)  # [K_PAD]
    if not SINGLE:
        for start in range(BLOCK, n, BLOCK):
            kc = _load_keys(row_ptr, start + offs, n)
            n_valid += tl.sum((kc > -2139095041).to(tl.int32), axis=0)
            kmax = tl.maximum(kmax, tl.max(kc, axis=0))
            if PRUNE:
                gmax = tl.maximum(gmax, tl.max(tl.reshape(kc, (BLOCK // K_PAD, K_PAD)), axis=0))
    total = tl.minimum(n_valid, K)
    pk = tl.arange(0, K_PAD)  # -1 padding after the `total` ids
    tl.store(out_row + pk, tl.full([K_PAD], -1, tl.int32), mask=(pk >= total) & (pk < K))
    lo0 = kmax * 0 + (-2139095041 + 1)  # key(-inf) + 1: count(>= lo0) = n_valid

    if PRUNE:
        # 2. A lower bound of the threshold: when every group has a finite score, the K_PAD >= K
        # group maxima are all >= the smallest of them. Keys >= it (the candidates, in index
        # order) go to this row's scratch; if they fit CAND, the search runs on them in registers,
        # else (ties, or a row mostly -inf) on the row from that bound.
        lo0 = tl.where(n_valid > K, tl.maximum(tl.min(gmax, axis=0), lo0), lo0)
        sk = scratch_ptr + row * (2 * CAND)  # [CAND] keys, then [CAND] ids
        co = tl.arange(0, CAND)
        cand = keys >= lo0
        pos = tl.cumsum(cand.to(tl.int32), axis=0) - 1
        tl.store(sk + pos, keys, mask=cand & (pos < CAND))
        tl.store(sk + CAND + pos, offs, mask=cand & (pos < CAND))
        cnt = tl.sum(cand.to(tl.int32), axis=0)
        if not SINGLE:
            for start in range(BLOCK, n, BLOCK):
                idx = start + offs
                kc = _load_keys(row_ptr, idx, n)
                cand = kc >= lo0
                pos = cnt + tl.cumsum(cand.to(tl.int32), axis=0) - 1
                tl.store(sk + pos, kc, mask=cand & (pos < CAND))
                tl.store(sk + CAND + pos, idx, mask=cand & (pos < CAND))
                cnt += tl.sum(cand.to(tl.int32), axis=0)
        tl.debug_barrier()  # the scratch writes of every thread, visible to the loads below
        if cnt <= CAND:
            ck = tl.load(sk + co, mask=co < cnt, other=-2147483648)  # padding: below every key
            ci = tl.load(sk + CAND + co, mask=co < cnt, other=0)
            if RADIX:
                t_gt, need = _radix(ck, n_valid, K)
            else:
                t_gt, need = _bisect(ck, row_ptr, cnt, lo0, kmax, n_valid, K, CAND, True)
            _emit(ck, ci, out_row, t_gt, need, 0, 0)
        else:
            _select_row(keys, row_ptr, out_row, n, lo0, kmax, n_valid, K, BLOCK, SINGLE, RADIX)
    else:
        _select_row(keys, row_ptr, out_row, n, lo0, kmax, n_valid, K, BLOCK, SINGLE, RADIX)


def topk_ids_triton(scores: torch.Tensor, topk: int, config: TopkConfig | None = None) -> torch.Tensor:
    """scores [R, n] fp32 (last dim contiguous) -> ids [R, topk] int32 of the top-k finite scores
    of each row in ascending index order, -1 padded. config overrides the table (sweeps)."""
    if scores.dim() != 2 or scores.dtype != torch.float32 or scores.stride(-1) != 1:
        raise ValueError(f"scores: expected a 2-d fp32 tensor with a contiguous last dim, got "
                         f"{tuple(scores.shape)} {scores.dtype} strides {scores.stride()}")
    if topk <= 0:
        raise ValueError(f"topk: must be positive, got {topk}")
    R, n = scores.shape
    out = torch.empty(R, topk, dtype=torch.int32, device=scores.device)
    if R == 0:
        return out
    if n == 0:
        return out.fill_(-1)
    cfg = config if config is not None else CONFIGS[target_of(scores)]
    k_pad = triton.next_power_of_2(topk)
    block = max(cfg.block(n), k_pad)  # the group-max reshape needs K_PAD | BLOCK
    cand = max(cfg.cand_block, k_pad)
    prune = cfg.cand_block > 0 and n > cand  # by the row length (a shape), never by the data
    scratch = torch.empty(R if prune else 1, 2 * cand, dtype=torch.int32, device=scores.device)
    _topk_kernel[(R,)](scores, out, scratch, n, scores.stride(0), topk, BLOCK=block, SINGLE=n <= block,
                       K_PAD=k_pad, PRUNE=prune, CAND=cand, RADIX=cfg.radix, **cfg.options())
    return out


# Ahead-of-time variants, the indexer's k = 512: a short row in one tile (prefill), a long chunked row
# (32K .. 1M context), and the optional paths (pruning; radix select).
_SIG = {"scores_ptr": "*fp32", "out_ptr": "*i32", "scratch_ptr": "*i32", "n": "i32", "stride_row": "i32",
        "K": "i32", **{p: "constexpr" for p in ("BLOCK", "SINGLE", "K_PAD", "PRUNE", "CAND", "RADIX")}}

AOT_SPECS: tuple[AotSpec, ...] = tuple(
    AotSpec(f"topk[{form}]", _topk_kernel, _SIG,
            {t: {"BLOCK": CONFIGS[t].max_block, "SINGLE": single, "K_PAD": 512, "PRUNE": prune,
                 "CAND": max(CONFIGS[t].cand_block, 4096), "RADIX": radix} for t in TARGETS},
            {t: CONFIGS[t].options() for t in TARGETS})
    for form, single, prune, radix in (("row", True, False, CONFIGS["sm_90"].radix),
                                       ("chunked", False, False, CONFIGS["sm_90"].radix),
                                       ("chunked,pruned,radix", False, True, True))
)
