"""Sparse decode attention: the Triton kernel (interpreter on CPU) against its torch twin, the twin
against the model's `Attention._core`, and the ahead-of-time compile of every variant."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flashport.model.attention import Attention
from flashport.model.layers import apply_rope
from flashport.ops.attention import sparse_decode_attention, sparse_decode_attention_torch

BS, W, D, H, R = 8, 8, 64, 8, 16  # block size, window, head dim, heads, rope dims
RATE_CSA, RATE_HCA, TOPK = 4, 8, 6
POSITIONS = [0, 3, 7, 8, 21, 50]  # one token only, partial window, exact window, block edges, long


def _case(seed: int, positions: list[int], mode: str, dtype: torch.dtype = torch.float32, heads: int = H,
          seq_of: list[int] | None = None, entry_dtype: torch.dtype | None = None) -> tuple[tuple, dict]:
    """Random pools and block tables (scattered blocks, released window blocks -> -1) for a batch of
    query rows. seq_of[i]: the sequence of row i (default: one sequence per row); rows of one sequence
    (a prefill chunk) share its block tables, sized for its last row."""
    gen = torch.Generator().manual_seed(seed)
    Bt = len(positions)
    seq_of = list(range(Bt)) if seq_of is None else seq_of
    last = {s: max(p for p, t in zip(positions, seq_of) if t == s) for s in seq_of}
    width = max(p // BS for p in positions) + 2  # one spare column, never read
    n_pool = len(last) * width + 3
    wperm, cperm = torch.randperm(n_pool, generator=gen), torch.randperm(n_pool, generator=gen)
    wbt = torch.full((Bt, width), -1, dtype=torch.int32)
    cbt = torch.full((Bt, width), -1, dtype=torch.int32)
    k = 0
    for s, p in last.items():
        rows = [i for i, t in enumerate(seq_of) if t == s]
        first = min(positions[i] for i in rows)
        for lb in range(p // BS + 1):
            cbt[rows, lb] = int(cperm[k])
            if (lb + 1) * BS - 1 > first - W:  # the block still holds a window token of the first row
                wbt[rows, lb] = int(wperm[k])
            k += 1

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    q = rnd(Bt, heads, D)
    window = rnd(n_pool * BS, D)
    sinks = torch.randn(heads, generator=gen)
    angles = torch.tensor(positions, dtype=torch.float32)[:, None] * torch.rand(R // 2, generator=gen)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    pos = torch.tensor(positions, dtype=torch.int32)
    kw: dict = dict(window_size=W, block_size=BS)
    if mode == "csa":
        ids = torch.full((Bt, TOPK), -1, dtype=torch.int32)
        for i, p in enumerate(positions):  # distinct closed entries, fewer than TOPK for short sequences
            n = (p + 1) // RATE_CSA
            pick = torch.randperm(n, generator=gen)[:TOPK].int()
            slots = torch.randperm(TOPK, generator=gen)[: pick.numel()]
            ids[i, slots] = pick
        kw.update(entries=rnd(n_pool * (BS // RATE_CSA), D), comp_block_table=cbt, entry_ids=ids, rate=RATE_CSA)
    elif mode == "hca":
        counts = torch.tensor([(p + 1) // RATE_HCA for p in positions], dtype=torch.int32)  # 0 for short ones
        kw.update(entries=rnd(n_pool * (BS // RATE_HCA), D), comp_block_table=cbt, num_entries=counts,
                  rate=RATE_HCA)
    if entry_dtype is not None and "entries" in kw:  # fp8 pool: bf16-like values cast down, no scale
        kw["entries"] = (kw["entries"] * 4).to(entry_dtype)
    return (q, window, wbt, pos, sinks, cos, sin), kw


@pytest.mark.parametrize("mode", ["swa", "csa", "hca"])
@pytest.mark.parametrize("splits", [None, 3])
def test_kernel_matches_twin(mode: str, splits: int | None) -> None:
    from flashport.kernels.attention_decode import sparse_decode_attention as kernel

    args, kw = _case(10 + (splits or 0), POSITIONS, mode)
    got = kernel(*args, **kw, num_splits=splits)
    want = sparse_decode_attention_torch(*args, **kw)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("entry_dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
@pytest.mark.parametrize("mode", ["csa", "hca"])
def test_kernel_fp8_entries(mode: str, entry_dtype: torch.dtype) -> None:
    # kv_cache_dtype="fp8": the entry pool in fp8 (e4m3fnuz decoded in software on the CPU), the
    # window pool and the queries in the model dtype; the twin casts the gathered rows.
    from flashport.kernels.attention_decode import sparse_decode_attention as kernel

    args, kw = _case(21, [5, 23, 50], mode, entry_dtype=entry_dtype)
    got = kernel(*args, **kw)
    torch.testing.assert_close(got, sparse_decode_attention_torch(*args, **kw), rtol=2e-5, atol=2e-5)


def test_kernel_mixed_decode_and_prefill_rows() -> None:
    # Rows 0-4: a prefill chunk of one sequence (positions 10..14, shared tables, windows that move
    # with the row); rows 5-6: decode tokens of two other sequences. 7 rows take the interpreter
    # table's prefill form (full-D output tile, BLOCK_N 32); forced splits on top of it.
    from dataclasses import replace

    from flashport.kernels.attention_decode import CONFIGS
    from flashport.kernels.attention_decode import sparse_decode_attention as kernel

    assert CONFIGS["interpret"].pick(7).block_dv == D
    args, kw = _case(31, [10, 11, 12, 13, 14, 33, 2], "csa", seq_of=[0, 0, 0, 0, 0, 1, 2])
    want = sparse_decode_attention_torch(*args, **kw)
    for splits in (None, 2):
        torch.testing.assert_close(kernel(*args, **kw, num_splits=splits), want, rtol=2e-5, atol=2e-5)
    # The entry loop without the row pass (ids and block table read inside the key loop), Q in registers.
    no_pass = replace(CONFIGS["interpret"].pick(7), row_pass=False, q_regs=True)
    torch.testing.assert_close(kernel(*args, **kw, config=no_pass), want, rtol=2e-5, atol=2e-5)


def test_kernel_small_batch_auto_split_fp16() -> None:
    # Batch 2 takes the split path from the interpreter's config table; fp16 pools and queries.
    args, kw = _case(3, [13, 45], "csa", torch.float16)
    got = sparse_decode_attention(*args, **kw, impl="triton")
    want = sparse_decode_attention(*args, **kw, impl="torch")
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)


def test_kernel_several_head_blocks() -> None:
    # 24 heads: two head blocks of the interpreter's 16, the second one partial.
    args, kw = _case(5, [2, 30, 17], "hca", heads=24)
    got = sparse_decode_attention(*args, **kw, impl="triton")
    torch.testing.assert_close(got, sparse_decode_attention_torch(*args, **kw), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["csa", "hca"])
def test_twin_matches_model_core(mode: str) -> None:
    """Gather each sequence's keys by hand and run the model's own `_core` + inverse rope on them."""
    (q, window, wbt, pos, sinks, cos, sin), kw = _case(7, POSITIONS, mode)
    rate = kw["rate"]
    per_block = BS // rate
    core_self = SimpleNamespace(head_dim=D, attn_sink=sinks)
    for i, p in enumerate(POSITIONS):
        win = [int(wbt[i, t // BS]) * BS + t % BS for t in range(max(0, p - W + 1), p + 1)]
        if mode == "csa":
            ids = sorted(int(e) for e in kw["entry_ids"][i] if e >= 0)
        else:
            ids = list(range(int(kw["num_entries"][i])))
        ent = [int(kw["comp_block_table"][i, e // per_block]) * per_block + e % per_block for e in ids]
        keys = torch.cat([window[win], kw["entries"][ent]])
        allowed = torch.ones(1, keys.shape[0], dtype=torch.bool)
        out = Attention._core(core_self, q[i: i + 1], keys, allowed)  # [1, H, D]
        want = apply_rope(out, cos[i: i + 1], -sin[i: i + 1])[0]
        got = sparse_decode_attention_torch(q, window, wbt, pos, sinks, cos, sin, **kw)[i]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_launcher_rejects_bad_inputs() -> None:
    from flashport.kernels.attention_decode import sparse_decode_attention as kernel

    (q, window, wbt, pos, sinks, cos, sin), kw = _case(1, [5, 9], "hca")
    with pytest.raises(ValueError, match="window_block_table"):
        kernel(q, window, wbt.long(), pos, sinks, cos, sin, **kw)
    with pytest.raises(ValueError, match="entry_ids .CSA. or num_entries"):
        kernel(q, window, wbt, pos, sinks, cos, sin, **{**kw, "num_entries": None})
    with pytest.raises(ValueError, match="entries"):
        kernel(q, window, wbt, pos, sinks, cos, sin, **{**kw, "entries": kw["entries"].to(torch.float16)})
    with pytest.raises(ValueError, match="window"):  # fp8 is for the entry pool only
        kernel(q, window.to(torch.float8_e4m3fn), wbt, pos, sinks, cos, sin, **kw)
    with pytest.raises(ValueError, match="impl"):
        sparse_decode_attention(q, window, wbt, pos, sinks, cos, sin, **kw, impl="cuda")


