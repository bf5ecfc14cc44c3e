"""Lightning indexer scores, decode form (spec §5.6): one query token per sequence.

I[b, w] = sum_h weight[b, h] * relu(q[b, h, :] . k_w) * Di^-0.5 over the sequence's indexer keys,
read in place from the key pool through the comp block table (row = table[b, w // P] * P + w % P,
P = block_size / rate). Causal: only entries w < (pos + 1) // rate are scored; the others, up to
`max_entries`, get -inf, so a top-k over the row (torch.topk, on the device) picks visible entries
first. A program holds the whole query tile [n_h^I, Di] (64 x 128 for V4-Flash) in registers and
walks KEYS_PER_PROG entries in BLOCK_N steps: q [H, Di] @ K^T [Di, BLOCK_N] on the tensor cores.
Dtype flow as the model's `Indexer.select`: exact products, fp32 accumulation, fp32 weights and sum.

Keys may also be FP8 (kv_cache_dtype "fp8": the bf16 values cast to float8_e4m3fn, e4m3fnuz on
gfx942, no scale): the kernel takes their raw bytes and decodes them exactly, to fp16 with bf16 q
(the dot then runs in fp16 on q rows scaled by a power of two, F16_Q), else to q's dtype; the
torch twin's `.float()` decodes them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from flashport.kernels.fp8_linear import FMT_E4M3FN, FMT_E4M3FNUZ, FMT_E4M3FNUZ_SOFT, _e4m3_to_x
from flashport.kernels.spec import TARGETS, AotSpec, target_of

# Key formats (KEY_FMT): the same dtype as q, or FP8 bytes decoded by `_e4m3_to_f32` (format - 1).
KEY_PLAIN, KEY_E4M3FN, KEY_E4M3FNUZ, KEY_E4M3FNUZ_SOFT = 0, 1 + FMT_E4M3FN, 1 + FMT_E4M3FNUZ, 1 + FMT_E4M3FNUZ_SOFT


@dataclass(frozen=True)
class IndexerConfig:
    block_n: int  # entries per dot
    keys_per_prog: int  # entries per program (the query tile is loaded once for them)
    num_warps: int
    num_stages: int
    amd: dict[str, int] = field(default_factory=dict)

    def options(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **self.amd}


# sm_90: scripts/gpu/bench_indexer.py --sweep on the H200 (2026-11-29): 128-entry dots, 1024 entries
# a program, 2 stages: 59 us at batch 64 / 32K (was 74 with 64 / 512 / 3 stages), 199 us at 128K
# (was 254). sm_100 copies it, gfx942 / gfx950 keep the first guess: not measured on those devices.
CONFIGS: dict[str, IndexerConfig] = {
    "sm_90": IndexerConfig(128, 1024, 4, 2),
    "sm_100": IndexerConfig(128, 1024, 4, 2),
    "gfx942": IndexerConfig(64, 512, 4, 2, amd={"waves_per_eu": 2, "matrix_instr_nonkdim": 16}),
    "gfx950": IndexerConfig(64, 512, 4, 2, amd={"waves_per_eu": 2, "matrix_instr_nonkdim": 16}),
    "interpret": IndexerConfig(16, 32, 4, 1),  # small: the CPU tests cross block and program boundaries
}


@triton.jit
def _indexer_scores_kernel(q_ptr, w_ptr, keys_ptr, cbt_ptr, pos_ptr, out_ptr,
                           H, rate, per_block, cbt_width, max_entries, scale,
                           DI: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                           KEYS_PER_PROG: tl.constexpr, KEY_FMT: tl.constexpr, F16_Q: tl.constexpr):
    # 1-D grid over (batch, entry chunk of KEYS_PER_PROG), 1-D as axes 1 and 2 stop at 65535 rows.
    n_chunks = tl.cdiv(max_entries, KEYS_PER_PROG)
    b = tl.program_id(0) // n_chunks
    lo = tl.program_id(0) % n_chunks * KEYS_PER_PROG
    hi = tl.minimum(lo + KEYS_PER_PROG, max_entries)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_d = tl.arange(0, DI)
    q = tl.load(q_ptr + (b * H + offs_h[:, None]) * DI + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    w = tl.load(w_ptr + b * H + offs_h, mask=h_mask, other=0.0)  # [BLOCK_H] fp32; padded heads weigh 0
    if F16_Q:
        # FP8 keys with bf16 q: E4M3 -> fp16 is one hardware convert per two values (-> bf16: three),
        # so the dot runs in fp16, each q row scaled by 2^-e into fp16's range (bf16's 8
        # significant bits fit fp16's 11 unless a value is below 2^-29 of its row max); 2^e
        # multiplies the row's dot products back, exactly.
        ex = ((tl.max(tl.abs(q.to(tl.float32)), axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.minimum(tl.maximum(ex - 14, -126), 126)
        q = (q.to(tl.float32) * ((127 - e) << 23).to(tl.float32, bitcast=True)[:, None]).to(tl.float16)
        row_back = ((127 + e) << 23).to(tl.float32, bitcast=True)  # [BLOCK_H] 2^e
    n_vis = tl.minimum((tl.load(pos_ptr + b) + 1) // rate, hi)  # closed entries of this program's range
    out_row = out_ptr + b * max_entries
    for start in range(lo, n_vis, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        ok = n < n_vis
        cb = tl.load(cbt_ptr + b * cbt_width + n // per_block, mask=ok, other=-1)
        ok = ok & (cb >= 0)
        rows = (cb * per_block + n % per_block).to(tl.int64)
        k_ptrs = keys_ptr + rows[:, None] * DI + offs_d[None, :]
        if KEY_FMT == 0:
            k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)  # [BLOCK_N, DI]
        elif F16_Q:  # FP8 bytes -> fp16 (exact)
            k = _e4m3_to_x(tl.load(k_ptrs, mask=ok[:, None], other=0), KEY_FMT - 1, tl.float16)
        else:  # FP8 bytes -> q's dtype (exact)
            k = _e4m3_to_x(tl.load(k_ptrs, mask=ok[:, None], other=0), KEY_FMT - 1, q_ptr.dtype.element_ty)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_H, BLOCK_N] fp32
        if F16_Q:
            s = s * row_back[:, None]
        s = tl.maximum(s, 0.0) * scale * w[:, None]
        score = tl.where(ok, tl.sum(s, axis=0), float("-inf"))
        tl.store(out_row + n, score, mask=n < hi)
    for start in range(tl.maximum(n_vis, lo), hi, BLOCK_N):  # not yet visible: -inf
        n = start + tl.arange(0, BLOCK_N)
        tl.store(out_row + n, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=n < hi)


def _check(name: str, t: torch.Tensor, ndim: int, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dim() != ndim or t.dtype not in dtypes or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous {ndim}-d tensor of {dtypes}, got "
                         f"{tuple(t.shape)} {t.dtype} contiguous={t.is_contiguous()}")


def _key_args(keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    # FP8 keys travel as raw bytes; the interpreter cannot load e4m3fnuz, so on the CPU those
    # bytes are decoded arithmetically.
    if keys.dtype == torch.float8_e4m3fn:
        return keys.view(torch.uint8), KEY_E4M3FN
    if keys.dtype == torch.float8_e4m3fnuz:
        return keys.view(torch.uint8), KEY_E4M3FNUZ_SOFT if keys.device.type == "cpu" else KEY_E4M3FNUZ
    return keys, KEY_PLAIN


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, comp_block_table: torch.Tensor,
                   positions: torch.Tensor, *, rate: int, block_size: int, max_entries: int | None = None,
                   config: IndexerConfig | None = None) -> torch.Tensor:
    """q [Bt, H, Di] roped indexer queries, weights [Bt, H] fp32 (already x H^-0.5), keys [rows, Di]
    (this layer's key pool; q's dtype or float8_e4m3fn / e4m3fnuz), comp_block_table [Bt, MC] int32, positions [Bt] int32 -> scores
    [Bt, max_entries] fp32, -inf where w >= (pos + 1) // rate. max_entries defaults to MC * P; the
    caller may pass a smaller bound it knows on the host (the batch's longest context). config
    overrides the config table (benchmark sweeps)."""
    _check("q", q, 3, (torch.bfloat16, torch.float16, torch.float32))
    Bt, H, Di = q.shape
    _check("weights", weights, 2, (torch.float32,))
    _check("keys", keys, 2, (q.dtype, torch.float8_e4m3fn, torch.float8_e4m3fnuz))
    _check("comp_block_table", comp_block_table, 2, (torch.int32,))
    _check("positions", positions, 1, (torch.int32,))
    if weights.shape != (Bt, H) or keys.shape[1] != Di or Di & (Di - 1):
        raise ValueError(f"weights / keys: expected [{Bt}, {H}] and [rows, {Di}] (Di a power of two), got "
                         f"{tuple(weights.shape)}, {tuple(keys.shape)}")
    if comp_block_table.shape[0] != Bt or positions.shape[0] != Bt:
        raise ValueError(f"comp_block_table / positions: expected batch {Bt}, got "
                         f"{tuple(comp_block_table.shape)}, {tuple(positions.shape)}")
    if rate <= 0 or block_size % rate:
        raise ValueError(f"rate: must divide block_size {block_size}, got {rate}")
    per_block = block_size // rate
    n = comp_block_table.shape[1] * per_block if max_entries is None else max_entries
    out = torch.empty(Bt, n, dtype=torch.float32, device=q.device)
    if n == 0 or Bt == 0:
        return out
    cfg = config if config is not None else CONFIGS[target_of(q)]
    keys_arg, key_fmt = _key_args(keys)
    _indexer_scores_kernel[(triton.cdiv(n, cfg.keys_per_prog) * Bt,)](
        q, weights, keys_arg, comp_block_table, positions, out, H, rate, per_block, comp_block_table.shape[1], n,
        Di ** -0.5, DI=Di, BLOCK_H=max(16, triton.next_power_of_2(H)), BLOCK_N=cfg.block_n,
        KEYS_PER_PROG=cfg.keys_per_prog, KEY_FMT=key_fmt, F16_Q=key_fmt != KEY_PLAIN and q.dtype == torch.bfloat16,
        **cfg.options())
    return out


# Ahead-of-time variants: V4-Flash shapes (64 indexer heads x 128 dims), bf16 model dtype, keys in
# bf16 or FP8 (e4m3fn; e4m3fnuz on gfx942, the FP8 flavour of each target).
_SIG = {"q_ptr": "*bf16", "w_ptr": "*fp32", "keys_ptr": "*bf16", "cbt_ptr": "*i32", "pos_ptr": "*i32",
        "out_ptr": "*fp32", **{p: "i32" for p in ("H", "rate", "per_block", "cbt_width", "max_entries")},
        "scale": "fp32",
        **{p: "constexpr" for p in ("DI", "BLOCK_H", "BLOCK_N", "KEYS_PER_PROG", "KEY_FMT", "F16_Q")}}
_FP8_KEY = {t: KEY_E4M3FNUZ if t == "gfx942" else KEY_E4M3FN for t in TARGETS}


def _spec(name: str, keys_type: str, key_fmt: dict[str, int]) -> AotSpec:
    return AotSpec(name, _indexer_scores_kernel, {**_SIG, "keys_ptr": keys_type},
                   {t: {"DI": 128, "BLOCK_H": 64, "BLOCK_N": CONFIGS[t].block_n,
                        "KEYS_PER_PROG": CONFIGS[t].keys_per_prog, "KEY_FMT": key_fmt[t],
                        "F16_Q": key_fmt[t] != KEY_PLAIN} for t in TARGETS},
                   {t: CONFIGS[t].options() for t in TARGETS}, uses_dot=True)


AOT_SPECS: tuple[AotSpec, ...] = (
    _spec("indexer_scores[decode]", "*bf16", {t: KEY_PLAIN for t in TARGETS}),
    _spec("indexer_scores[decode,fp8 keys]", "*u8", _FP8_KEY),
)
