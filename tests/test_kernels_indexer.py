"""Lightning indexer, decode form: the Triton score kernel (interpreter on CPU) against its torch twin,
the twin's selection against the model's `Indexer.select`, and the ahead-of-time compile."""

from __future__ import annotations


import pytest
import torch

from flashport.model.compressor import Indexer
from flashport.ops.indexer import indexer_scores_torch, indexer_topk, topk_ids

BS, RATE, HI, DI, TOPK = 8, 4, 8, 32, 5  # block size, compress rate, indexer heads, head dim, top-k
PER_BLOCK = BS // RATE
POSITIONS = [0, 3, 10, 33, 61]  # no entry, one entry, fewer than TOPK, more, many (crosses programs)


def _case(seed: int, positions: list[int], dtype: torch.dtype = torch.float32) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(seed)
    Bt = len(positions)
    width = max(p // BS for p in positions) + 2  # one spare column of -1
    n_pool = Bt * width + 2
    perm = torch.randperm(n_pool, generator=gen)
    cbt = torch.full((Bt, width), -1, dtype=torch.int32)
    k = 0
    for i, p in enumerate(positions):
        for lb in range(p // BS + 1):
            cbt[i, lb] = perm[k]
            k += 1
    q = torch.randn(Bt, HI, DI, generator=gen).to(dtype)
    weights = torch.randn(Bt, HI, generator=gen) * HI ** -0.5
    keys = torch.randn(n_pool * PER_BLOCK, DI, generator=gen).to(dtype)
    pos = torch.tensor(positions, dtype=torch.int32)
    return (q, weights, keys, cbt, pos), dict(rate=RATE, block_size=BS)


def _same_selection(got: torch.Tensor, want: torch.Tensor, scores: torch.Tensor, topk: int) -> None:
    """Equal id sets per row, unless the row has a near-tie at the k-th place (then either is right)."""
    for g, w, s in zip(got.tolist(), want.tolist(), scores):
        finite = s[s > float("-inf")].sort(descending=True).values
        if topk < finite.numel() and finite[topk - 1] - finite[topk] < 1e-4:
            continue
        assert sorted(g) == sorted(w)


@pytest.mark.parametrize("max_entries", [None, 12])
def test_scores_kernel_matches_twin(max_entries: int | None) -> None:
    from flashport.kernels.indexer import indexer_scores

    args, kw = _case(20, POSITIONS)
    got = indexer_scores(*args, **kw, max_entries=max_entries)
    want = indexer_scores_torch(*args, **kw, max_entries=max_entries)
    assert got.shape == want.shape
    assert torch.equal(got == float("-inf"), want == float("-inf"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    visible = torch.tensor([(p + 1) // RATE for p in POSITIONS])
    assert torch.equal((got > float("-inf")).sum(1), visible.clamp(max=got.shape[1]))


@pytest.mark.parametrize("key_dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_scores_kernel_fp8_keys(key_dtype: torch.dtype) -> None:
    """kv_cache_dtype "fp8": keys stored as the bf16 values cast to FP8, no scale."""
    from flashport.kernels.indexer import indexer_scores

    (q, weights, keys, cbt, pos), kw = _case(23, POSITIONS)
    keys8 = keys.to(torch.bfloat16).to(key_dtype)
    got = indexer_scores(q, weights, keys8, cbt, pos, **kw)
    want = indexer_scores_torch(q, weights, keys8, cbt, pos, **kw)
    assert torch.equal(got == float("-inf"), want == float("-inf"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the twin decodes exactly: the same as scoring the decoded keys in fp32
    torch.testing.assert_close(want, indexer_scores_torch(q, weights, keys8.float(), cbt, pos, **kw))
    ids = indexer_topk(q, weights, keys8, cbt, pos, **kw, topk=TOPK, impl="triton")
    _same_selection(ids, indexer_topk(q, weights, keys8, cbt, pos, **kw, topk=TOPK, impl="torch"), want, TOPK)


def test_scores_kernel_fp8_keys_bf16_queries() -> None:
    """bf16 q with FP8 keys: the dot runs in fp16 on q rows scaled by powers of two (F16_Q), here
    with rows from 1e-20 to 1e5 (beyond fp16's range unscaled). Within fp32 summation error of
    the twin. (The interpreter's bf16 arithmetic is wrong; this path only converts bf16.)"""
    from flashport.kernels.indexer import indexer_scores

    (q, weights, keys, cbt, pos), kw = _case(24, POSITIONS)
    q = (q * torch.tensor([1.0, 1e-20, 1e5, 3e-3] * 2)[None, :, None]).to(torch.bfloat16)
    keys8 = keys.to(torch.float8_e4m3fn)
    got = indexer_scores(q, weights, keys8, cbt, pos, **kw)
    want = indexer_scores_torch(q, weights, keys8, cbt, pos, **kw)
    assert torch.equal(got == float("-inf"), want == float("-inf"))
    fin = want > float("-inf")
    bound = indexer_scores_torch(q.abs(), weights.abs(), keys8.float().abs(), cbt, pos, **kw)[fin]
    assert torch.all((got[fin] - want[fin]).abs() <= 1e-5 * bound + 1e-30)


def test_topk_kernel_matches_twin_fp16() -> None:
    args, kw = _case(21, POSITIONS, torch.float16)
    got = indexer_topk(*args, **kw, topk=TOPK, impl="triton")
    want = indexer_topk(*args, **kw, topk=TOPK, impl="torch")
    assert got.shape == (len(POSITIONS), TOPK) and got.dtype == torch.int32
    _same_selection(got, want, indexer_scores_torch(*args, **kw), TOPK)
    for row, p in zip(got, POSITIONS):  # -1 exactly where fewer than TOPK entries are closed
        assert int((row >= 0).sum()) == min(TOPK, (p + 1) // RATE)
        assert int(row.max()) < (p + 1) // RATE


def test_twin_matches_model_select() -> None:
    """Per sequence, the model's own `Indexer.select` on its dense keys picks the same entries."""
    (q, weights, keys, cbt, pos), kw = _case(22, POSITIONS)
    model = Indexer(hidden=8, q_lora_rank=8, n_heads=HI, head_dim=DI, rate=RATE, topk=TOPK, dtype=torch.float32,
                    norm_eps=1e-6, fp8_block=None, fp8_dtype=torch.float8_e4m3fn)
    ids = indexer_topk(q, weights, keys, cbt, pos, **kw, topk=TOPK, impl="torch")
    scores = indexer_scores_torch(q, weights, keys, cbt, pos, **kw)
    for i, p in enumerate(POSITIONS):
        n = (p + 1) // RATE
        rows = [int(cbt[i, e // PER_BLOCK]) * PER_BLOCK + e % PER_BLOCK for e in range(n)]
        mask = model.select(q[i: i + 1], weights[i: i + 1], keys[rows], pos[i: i + 1].long())  # [1, n]
        want = mask[0].nonzero().flatten().unsqueeze(0)
        got = ids[i: i + 1]
        _same_selection(got[:, got[0] >= 0], want, scores[i: i + 1], TOPK)


def test_topk_ids_pads_and_masks() -> None:
    scores = torch.tensor([[0.5, float("-inf"), 2.0], [float("-inf")] * 3])
    assert topk_ids(scores, 4).tolist() == [[2, 0, -1, -1], [-1, -1, -1, -1]]
    assert topk_ids(scores[:, :0], 2).tolist() == [[-1, -1], [-1, -1]]


def test_launcher_rejects_bad_inputs() -> None:
    from flashport.kernels.indexer import indexer_scores

    (q, weights, keys, cbt, pos), kw = _case(1, [9])
    with pytest.raises(ValueError, match="weights"):
        indexer_scores(q, weights.half(), keys, cbt, pos, **kw)
    with pytest.raises(ValueError, match="rate"):
        indexer_scores(q, weights, keys, cbt, pos, rate=3, block_size=BS)
    with pytest.raises(ValueError, match="keys"):
        indexer_scores(q, weights, keys.half(), cbt, pos, **kw)


