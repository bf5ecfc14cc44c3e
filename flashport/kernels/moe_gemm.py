"""Grouped expert GEMMs of the fused MoE (spec §5.8, §5.11, §8.3), FP4 or plain expert weights.

The (token, pick) pairs are sorted by expert (`moe.moe_route`): `order[p]` is the pair at sorted
position p and `offsets[e]:offsets[e + 1]` are expert e's positions. A program owns one row tile
(BLOCK_M sorted positions of ONE expert) and one column tile. The row tiles are laid out expert by
expert, each expert's rows cut into ceil(count / BLOCK_M) tiles; every program derives its
(expert, rows) from `offsets` itself, so the grid is the bound ceil(M / BLOCK_M) + min(E, M)
known from the shapes alone (no host sync) and programs past the last real tile exit at once.

- gate/up: h[p] = silu(min(g, limit)) * clamp(u, +-limit), g / u = x[token(p)] @ w13[e, j / I+j]^T
- down:    y[pair] = round(h[p] @ w2[e]^T) * weight[pair], written at the pair's own row [N * k, H]

FP4 weights (uint8, low nibble = even column) are decoded in the kernel one 1x32 scale group at a
time, with a few integer ops per value (the dequantization, not the bytes, is what limits an FP4
GEMM): the nibble goes straight into fp16 bits, the group's scale multiplies either the [M, N]
partial product (decode form: exact for every scale byte) or the decoded weights (prefill form:
exact while the weights are normal, scale byte >= 16; real checkpoints sit near 127). The even and
odd columns of a packed byte tile multiply the even and odd activation columns, so nothing is
interleaved. Products run in the activation dtype with fp32 accumulation; results are rounded
where transformers rounds (each projection output, silu, the SwiGLU product, the weighted output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashport.kernels.spec import TARGETS, AotSpec, target_of

FP4_GROUP = 32  # values per UE8M0 scale

# BLOCK_K input columns (BLOCK_K / 32 scale groups) per K step: decode reads 64 bytes per weight row
# per step. These sizes compile without spills for sm_90 (ptxas -v: 122 / 158 registers decode,
# 228 / 255 prefill) and gfx942.
_GU_DECODE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, SCALE_AFTER_DOT=True, num_warps=4, num_stages=4)
_GU_PREFILL = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SCALE_AFTER_DOT=False, num_warps=8, num_stages=3)
_DOWN_DECODE = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, SCALE_AFTER_DOT=True, num_warps=4, num_stages=4)
_DOWN_PREFILL = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SCALE_AFTER_DOT=False, num_warps=8,
                     num_stages=3)
_AMD = dict(num_stages=2, waves_per_eu=0, matrix_instr_nonkdim=16, kpack=1)


def _table(decode: dict, prefill: dict, interpret: dict) -> dict[str, dict[str, dict]]:
    nv = {"decode": decode, "prefill": prefill}
    amd = {"decode": {**decode, **_AMD}, "prefill": {**prefill, **_AMD}}
    return {"sm_90": nv, "sm_100": nv, "gfx942": amd, "gfx950": amd, "interpret": interpret}


# The interpreter runs programs one by one: few, wide tiles keep the tests fast.
_GU_INTERPRET = {"decode": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SCALE_AFTER_DOT=True, num_warps=4,
                                num_stages=1),
                 "prefill": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, SCALE_AFTER_DOT=False, num_warps=4,
                                 num_stages=1)}
_DOWN_INTERPRET = {form: {**c, "BLOCK_N": 64, "BLOCK_K": 32} for form, c in _GU_INTERPRET.items()}
# Config per target and form, one table per kernel. Decode: few rows per expert, memory-bound:
# BLOCK_M 16 and narrow column tiles, so that enough programs stream the FP4 weights. Prefill:
# compute-bound 128-row tiles; GROUP_M row tiles sweep the columns together (L2 reuse).
GATE_UP_CONFIGS: dict[str, dict[str, dict]] = _table(_GU_DECODE, _GU_PREFILL, _GU_INTERPRET)
DOWN_CONFIGS: dict[str, dict[str, dict]] = _table(_DOWN_DECODE, _DOWN_PREFILL, _DOWN_INTERPRET)
FORMS = ("decode", "prefill")
_META = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SCALE_AFTER_DOT")  # constexprs; the rest: launch options


@triton.jit
def _tile_ids(max_tiles, n_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # pid -> (row tile, column tile). GROUP_M consecutive row tiles sweep the columns together, so
    # the x tiles of the group and the weight tiles of their experts are reused from L2.
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(n_cols, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(max_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_of(offsets_ptr, num_experts, pid_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    # Row tile pid_m -> (expert, first sorted row, end of the expert's rows); expert == num_experts
    # when pid_m is past the last tile. Tile t belongs to the first expert whose cumulative tile
    # count exceeds t.
    e = tl.arange(0, BLOCK_E)
    valid = e < num_experts
    starts = tl.load(offsets_ptr + e, mask=valid, other=0)  # [BLOCK_E]
    ends = tl.load(offsets_ptr + e + 1, mask=valid, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)  # inclusive
    expert = tl.sum((valid & (tile_end <= pid_m)).to(tl.int32), 0)
    this = e == expert
    first_tile = tl.sum(tl.where(this, tile_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(this, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(this, ends, 0), 0)
    return expert, row_start, row_end


@triton.jit
def _mma(acc, a, b):
    # acc += a @ b in a's dtype. fp32 activations (the CPU interpreter, fp32 models) multiply
    # exactly, never in tf32.
    if a.dtype == tl.float32:
        return tl.dot(a, b.to(a.dtype), acc, input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def _load_a(row_ptrs, row_ok, k0, K, BLOCK_K: tl.constexpr, STEP: tl.constexpr):
    # Activation columns k0, k0 + STEP, ... (BLOCK_K of them) of the rows `row_ptrs` [BLOCK_M].
    kk = k0 + STEP * tl.arange(0, BLOCK_K)
    return tl.load(row_ptrs[:, None] + kk[None, :], mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def _load_w(w_ptr, n, n_ok, stride_wn, k0, K, BLOCK_K: tl.constexpr):
    # Plain weights: transposed tile [BLOCK_K, BLOCK_N] of output rows n at input columns k0...
    kk = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + n[None, :] * stride_wn + kk[:, None], mask=(kk < K)[:, None] & n_ok[None, :], other=0.0)


@triton.jit
def _fp4_group_mma(acc, x_rows, row_ok, w_ptr, s_ptr, n, n_ok, stride_wn, stride_sn, kg, K,
                   SCALE_AFTER_DOT: tl.constexpr):
    # acc += x[:, kg:kg+32] @ W[n, kg:kg+32]^T * 2^-14 for one 1x32 scale group (kg % 32 == 0).
    # Packed byte kg/2 + i holds input columns kg + 2i (low nibble) and kg + 2i + 1 (high nibble):
    # the even and odd activation columns multiply the two nibble planes, so nothing interleaves.
    j = kg // 2 + tl.arange(0, 16)
    b = tl.load(w_ptr + n[None, :] * stride_wn + j[:, None], mask=(j < K // 2)[:, None] & n_ok[None, :],
                other=0).to(tl.int32)  # [16, BLOCK_N]
    # E2M1 code c -> fp16 bits (c & 7) << 9 | (c & 8) << 12: exponent and mantissa land in fp16's
    # low exponent bits, so the value is e2m1(c) * 2^-14 for every code (code 1 is the subnormal
    # 2^-15) with no table and no branch. The kernels multiply the 2^14 back in their epilogue.
    v_even = (((b & 0x7) << 9) | ((b & 0x8) << 12)).to(tl.int16).to(tl.float16, bitcast=True)
    v_odd = (((b & 0x70) << 5) | ((b & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True)
    s = tl.load(s_ptr + n * stride_sn + kg // 32, mask=n_ok & (kg < K), other=127).to(tl.int32)  # [BLOCK_N]
    # UE8M0 -> 2^(s - 127) from the fp32 bits, exact over the whole range (s = 0: the subnormal 2^-127).
    scale = tl.where(s == 0, 0x400000, s << 23).to(tl.float32, bitcast=True)
    a_even = _load_a(x_rows, row_ok, kg, K, 16, 2)  # [BLOCK_M, 16]
    a_odd = _load_a(x_rows + 1, row_ok, kg, K, 16, 2)
    if SCALE_AFTER_DOT:
        # Few rows (decode): scaling the [BLOCK_M, BLOCK_N] partial is cheaper than the weights,
        # and exact for every scale.
        part = _mma(tl.zeros(acc.shape, dtype=tl.float32), a_even, v_even)
        return acc + _mma(part, a_odd, v_odd) * scale[None, :]
    else:
        # Many rows (prefill): scale the weights; exact while weights stay normal (s >= 16).
        acc = _mma(acc, a_even, v_even.to(tl.float32) * scale[None, :])
        return _mma(acc, a_odd, v_odd.to(tl.float32) * scale[None, :])


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,  # [N, H] activations
    order_ptr,  # [M] int64: pair (token * k + pick) at each sorted position
    offsets_ptr,  # [E + 1] int32: first sorted position of each expert
    w_ptr,  # FP4: uint8 [E, 2I, H/2]; plain: [E, 2I, H]
    s_ptr,  # FP4: uint8 [E, 2I, H/32]; plain: unused
    h_ptr,  # [M, I] out, sorted order, activation dtype
    num_experts, H, I, top_k, max_tiles, limit,
    stride_we, stride_wn, stride_se, stride_sn,
    W_FP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 32 == 0)  # whole 1x32 scale groups per K step
    pid_m, pid_n = _tile_ids(max_tiles, I, BLOCK_N, GROUP_M)
    expert, row_start, row_end = _tile_of(offsets_ptr, num_experts, pid_m, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)  # [BLOCK_M] sorted positions
    row_ok = rows < row_end
    tokens = tl.load(order_ptr + rows, mask=row_ok, other=0) // top_k
    x_rows = x_ptr + tokens * H  # int64 offsets (order is int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns j: gate row j, up row I + j
    col_ok = cols < I
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    s_e = s_ptr + expert.to(tl.int64) * stride_se
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W_FP4:
        for k0 in range(0, H, BLOCK_K):
            for g in tl.static_range(BLOCK_K // 32):
                kg = k0 + 32 * g
                acc_g = _fp4_group_mma(acc_g, x_rows, row_ok, w_e, s_e, cols, col_ok, stride_wn, stride_sn, kg, H,
                                       SCALE_AFTER_DOT)
                acc_u = _fp4_group_mma(acc_u, x_rows, row_ok, w_e, s_e, cols + I, col_ok, stride_wn, stride_sn,
                                       kg, H, SCALE_AFTER_DOT)
        acc_g = acc_g * 16384.0  # the 2^14 of the fp16 decode (exact)
        acc_u = acc_u * 16384.0
    else:
        for k0 in range(0, H, BLOCK_K):
            a = _load_a(x_rows, row_ok, k0, H, BLOCK_K, 1)
            acc_g = _mma(acc_g, a, _load_w(w_e, cols, col_ok, stride_wn, k0, H, BLOCK_K))
            acc_u = _mma(acc_u, a, _load_w(w_e, cols + I, col_ok, stride_wn, k0, H, BLOCK_K))
    # Clamped SwiGLU, rounded as transformers rounds: projections, silu, product.
    dt = h_ptr.dtype.element_ty
    g = tl.minimum(acc_g.to(dt).to(tl.float32), limit)
    u = acc_u.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    h = act * tl.minimum(tl.maximum(u, -limit), limit)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * I + cols[None, :]
    tl.store(h_ptrs, h.to(dt), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr,  # [M, I] sorted order
    order_ptr,  # [M] int64
    offsets_ptr,  # [E + 1] int32
    weights_ptr,  # [M] routing weight of each pair (pair order), activation dtype
    w_ptr,  # FP4: uint8 [E, H, I/2]; plain: [E, H, I]
    s_ptr,  # FP4: uint8 [E, H, I/32]; plain: unused
    out_ptr,  # [M, H] out, pair order: the weighted output of each (token, pick)
    num_experts, H, I, max_tiles,
    stride_we, stride_wn, stride_se, stride_sn,
    W_FP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 32 == 0)
    pid_m, pid_n = _tile_ids(max_tiles, H, BLOCK_N, GROUP_M)
    expert, row_start, row_end = _tile_of(offsets_ptr, num_experts, pid_m, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    pairs = tl.load(order_ptr + rows, mask=row_ok, other=0)  # [BLOCK_M] int64
    h_rows = h_ptr + rows.to(tl.int64) * I
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    w_e = w_ptr + expert.to(tl.int64) * stride_we
    s_e = s_ptr + expert.to(tl.int64) * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W_FP4:
        for k0 in range(0, I, BLOCK_K):
            for g in tl.static_range(BLOCK_K // 32):
                acc = _fp4_group_mma(acc, h_rows, row_ok, w_e, s_e, cols, col_ok, stride_wn, stride_sn,
                                     k0 + 32 * g, I, SCALE_AFTER_DOT)
        acc = acc * 16384.0  # the 2^14 of the fp16 decode (exact)
    else:
        for k0 in range(0, I, BLOCK_K):
            acc = _mma(acc, _load_a(h_rows, row_ok, k0, I, BLOCK_K, 1), _load_w(w_e, cols, col_ok, stride_wn, k0, I,
                                                                                 BLOCK_K))
    dt = out_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)  # [BLOCK_M]
    y = acc.to(dt).to(tl.float32) * weight[:, None]  # rounded projection x weight, rounded on store
    tl.store(out_ptr + pairs[:, None] * H + cols[None, :], y.to(dt), mask=row_ok[:, None] & col_ok[None, :])


def max_row_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    # sum_e ceil(c_e / B) <= M / B + (experts with rows), and at most min(E, M) experts have rows.
    return triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


def config(t: torch.Tensor, table: dict[str, dict[str, dict]], form: str) -> dict:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return table[target_of(t)][form]


def _check_weight(name: str, w: torch.Tensor, scale: torch.Tensor | None, E: int, rows: int, cols: int) -> bool:
    # -> whether the weight is FP4. Raises ValueError naming the tensor on any mismatch.
    if scale is None:
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16) or tuple(w.shape) != (E, rows, cols):
            raise ValueError(f"{name}: plain expert weights must be float [{E}, {rows}, {cols}], "
                             f"got {w.dtype} {tuple(w.shape)}")
        if not w.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        return False
    if cols % FP4_GROUP:
        raise ValueError(f"{name}: FP4 input dim must be a multiple of {FP4_GROUP}, got {cols}")
    if w.dtype != torch.uint8 or tuple(w.shape) != (E, rows, cols // 2):
        raise ValueError(f"{name}: FP4 weights must be uint8 [{E}, {rows}, {cols // 2}], "
                         f"got {w.dtype} {tuple(w.shape)}")
    if scale.dtype != torch.uint8 or tuple(scale.shape) != (E, rows, cols // FP4_GROUP):
        raise ValueError(f"{name}_scale must be uint8 [{E}, {rows}, {cols // FP4_GROUP}], "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if not (w.is_contiguous() and scale.is_contiguous()):
        raise ValueError(f"{name} and {name}_scale must be contiguous")
    return True


def _check_route(order: torch.Tensor, offsets: torch.Tensor, M: int, E: int) -> None:
    if order.dtype != torch.int64 or order.shape != (M,) or not order.is_contiguous():
        raise ValueError(f"order must be contiguous int64 [{M}], got {order.dtype} {tuple(order.shape)}")
    if offsets.dtype != torch.int32 or offsets.shape != (E + 1,) or not offsets.is_contiguous():
        raise ValueError(f"offsets must be contiguous int32 [{E + 1}], got {offsets.dtype} {tuple(offsets.shape)}")


def _launch_options(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in _META}


def moe_gate_up(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, top_k: int, w13: torch.Tensor,
                w13_scale: torch.Tensor | None, limit: float, form: str, cfg: dict | None = None) -> torch.Tensor:
    """x [N, H], order [N*k] int64, offsets [E+1] int32 -> h [N*k, I] in sorted order (clamped SwiGLU applied)."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float [N, H], got {x.dtype} {tuple(x.shape)}")
    N, H = x.shape
    E, two_i = w13.shape[0], w13.shape[1]
    I = two_i // 2
    fp4 = _check_weight("w13", w13, w13_scale, E, 2 * I, H)
    M = N * top_k
    _check_route(order, offsets, M, E)
    cfg = cfg or config(x, GATE_UP_CONFIGS, form)
    h = torch.empty(M, I, dtype=x.dtype, device=x.device)
    tiles = max_row_tiles(M, E, cfg["BLOCK_M"])
    scale = w13_scale if fp4 else w13
    grid = (tiles * triton.cdiv(I, cfg["BLOCK_N"]),)
    _moe_gate_up_kernel[grid](
        x, order, offsets, w13, scale, h, E, H, I, top_k, tiles, float(limit),
        w13.stride(0), w13.stride(1), scale.stride(0), scale.stride(1),
        W_FP4=fp4, BLOCK_E=triton.next_power_of_2(E), **{k: cfg[k] for k in _META}, **_launch_options(cfg))
    return h


def moe_down(h: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, pair_weights: torch.Tensor,
             w2: torch.Tensor, w2_scale: torch.Tensor | None, form: str, cfg: dict | None = None) -> torch.Tensor:
    """h [M, I] sorted, pair_weights [M] pair order -> weighted pair outputs [M, H] in pair order."""
    M, I = h.shape
    E, H = w2.shape[0], w2.shape[1]
    fp4 = _check_weight("w2", w2, w2_scale, E, H, I)
    _check_route(order, offsets, M, E)
    if pair_weights.shape != (M,) or pair_weights.dtype != h.dtype or not h.is_contiguous():
        raise ValueError(f"pair_weights must be {h.dtype} [{M}] and h contiguous, "
                         f"got {pair_weights.dtype} {tuple(pair_weights.shape)}")
    cfg = cfg or config(h, DOWN_CONFIGS, form)
    out = torch.empty(M, H, dtype=h.dtype, device=h.device)
    tiles = max_row_tiles(M, E, cfg["BLOCK_M"])
    scale = w2_scale if fp4 else w2
    grid = (tiles * triton.cdiv(H, cfg["BLOCK_N"]),)
    _moe_down_kernel[grid](
        h, order, offsets, pair_weights, w2, scale, out, E, H, I, tiles,
        w2.stride(0), w2.stride(1), scale.stride(0), scale.stride(1),
        W_FP4=fp4, BLOCK_E=triton.next_power_of_2(E), **{k: cfg[k] for k in _META}, **_launch_options(cfg))
    return out


def _aot_specs() -> tuple[AotSpec, ...]:
    # V4-Flash: 256 experts, bf16 activations; FP4 weights (the checkpoint) and plain bf16 weights
    # (a dequantized load), both forms.
    specs = []
    common = {"num_experts": "i32", "H": "i32", "I": "i32"}
    strides = {"stride_we": "i32", "stride_wn": "i32", "stride_se": "i32", "stride_sn": "i32"}
    for fp4 in (True, False):
        w = "*u8" if fp4 else "*bf16"
        gate_up = {"x_ptr": "*bf16", "order_ptr": "*i64", "offsets_ptr": "*i32", "w_ptr": w, "s_ptr": w,
                   "h_ptr": "*bf16", **common, "top_k": "i32", "max_tiles": "i32", "limit": "fp32", **strides}
        down = {"h_ptr": "*bf16", "order_ptr": "*i64", "offsets_ptr": "*i32", "weights_ptr": "*bf16", "w_ptr": w,
                "s_ptr": w, "out_ptr": "*bf16", **common, "max_tiles": "i32", **strides}
        for name, fn, sig, table in (("moe_gate_up", _moe_gate_up_kernel, gate_up, GATE_UP_CONFIGS),
                                     ("moe_down", _moe_down_kernel, down, DOWN_CONFIGS)):
            for form in FORMS:
                consts = {t: {"W_FP4": fp4, "BLOCK_E": 256, **{k: table[t][form][k] for k in _META}} for t in TARGETS}
                opts = {t: _launch_options(table[t][form]) for t in TARGETS}
                sig_full = {**sig, **{k: "constexpr" for k in ("W_FP4", *_META, "BLOCK_E")}}
                specs.append(AotSpec(f"{name}[{form},{'fp4' if fp4 else 'bf16'}]", fn, sig_full, consts, opts,
                                     uses_dot=True))
    return tuple(specs)


AOT_SPECS: tuple[AotSpec, ...] = _aot_specs()
