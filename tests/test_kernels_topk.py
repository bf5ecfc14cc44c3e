"""Row-wise top-k ids (Triton, interpreter on CPU) against the torch twin `topk_ids` (torch.topk),
the tie rule (lowest index first), -1 padding, the chunked path for rows longer than a tile, and
input checks. The interpreter config's tile is 64 entries, so rows above 64 take the chunked path."""

from __future__ import annotations

import pytest
import torch

from flashport.kernels.topk import CONFIGS, TopkConfig, topk_ids_triton
from flashport.ops.indexer import topk_ids

NEG = float("-inf")


def _reference(scores: torch.Tensor, k: int) -> list[list[int]]:
    """The tie rule spelled out: the k largest finite scores, ties broken by lower index, -1 padded,
    ascending index order (the kernel's output order)."""
    out = []
    for row in scores.tolist():
        order = sorted((i for i, v in enumerate(row) if v > NEG), key=lambda i: (-row[i], i))[:k]
        out.append(sorted(order) + [-1] * (k - len(order)))
    return out


def _assert_same_set_as_twin(got: torch.Tensor, scores: torch.Tensor, k: int) -> None:
    want = topk_ids(scores, k)
    assert got.shape == want.shape and got.dtype == torch.int32
    for g, w in zip(got.tolist(), want.tolist()):
        assert sorted(g) == sorted(w)


@pytest.mark.parametrize("n,k", [(40, 8), (64, 16), (65, 16), (300, 32), (1000, 512)])
def test_matches_twin_on_random_rows(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 7 + k)
    scores = torch.randn(4, n, generator=g) * torch.tensor([1.0, 1e-3, 1e3, 1.0])[:, None]
    scores[3, n // 3:] = NEG  # the indexer's layout: visible entries first, then -inf
    scores[1] -= 2.0  # all negative
    got = topk_ids_triton(scores, k)
    _assert_same_set_as_twin(got, scores, k)
    assert got.tolist() == _reference(scores, k)  # ascending index order


def test_ties_take_lowest_index_first() -> None:
    g = torch.Generator().manual_seed(3)
    k = 10
    scores = torch.randint(0, 4, (5, 150), generator=g).float()  # many ties at every value
    scores[1] = 1.0  # one value everywhere
    scores[2, ::2] = NEG
    scores[3] = torch.where(scores[3] > 1, -0.5, 2.5)
    scores[4, :5] = 7.0  # fewer than k above the tie value
    got = topk_ids_triton(scores, k)
    assert got.tolist() == _reference(scores, k)
    assert got[1].tolist() == list(range(k))


def test_padding_and_non_finite() -> None:
    scores = torch.tensor([[0.5, NEG, 2.0, float("inf")],
                           [NEG] * 4,
                           [-1.0, -3.0, NEG, -2.0],
                           [0.0, -0.0, 1e-40, -1e-40]])  # zeros and subnormals are ordered too
    got = topk_ids_triton(scores, 3)
    assert got.tolist() == [[0, 2, 3], [-1, -1, -1], [0, 1, 3], [0, 1, 2]]
    assert topk_ids_triton(scores, 6).tolist()[0] == [0, 2, 3, -1, -1, -1]
    assert topk_ids_triton(scores[:, :0], 2).tolist() == [[-1, -1]] * 4
    assert topk_ids_triton(scores[:0], 2).shape == (0, 2)


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("cand", [0, 32, 64])
@pytest.mark.parametrize("radix", [False, True])
def test_tiles_and_pruning_agree(block: int, cand: int, radix: bool) -> None:
    """The same selection whether the row sits in one tile or is read back chunk by chunk, with or
    without candidate pruning (cand 32: often more candidates than fit, the fallback path), by
    bisection or radix select."""
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(4, 200, generator=g)
    scores[2, 150:] = NEG
    scores[3, 40:] = NEG  # groups without a finite score: no lower bound
    cfg = TopkConfig(max_block=block, num_warps=4, cand_block=cand, radix=radix, min_block=16)
    plain = TopkConfig(max_block=256, num_warps=4, cand_block=0, min_block=16)
    assert topk_ids_triton(scores, 24, plain).tolist() == _reference(scores, 24)
    assert torch.equal(topk_ids_triton(scores, 24, cfg), topk_ids_triton(scores, 24, plain))


def test_strided_rows_and_bad_inputs() -> None:
    g = torch.Generator().manual_seed(6)
    wide = torch.randn(3, 90, generator=g)
    view = wide[:, 5:75]  # row stride 90, last dim contiguous
    _assert_same_set_as_twin(topk_ids_triton(view, 9), view, 9)
    with pytest.raises(ValueError, match="scores"):
        topk_ids_triton(wide.half(), 4)
    with pytest.raises(ValueError, match="scores"):
        topk_ids_triton(wide.t(), 4)
    with pytest.raises(ValueError, match="topk"):
        topk_ids_triton(wide, 0)


def test_config_block_choice() -> None:
    cfg = CONFIGS["sm_90"]
    assert cfg.block(1) == cfg.min_block and cfg.block(10**6) == cfg.max_block
    assert cfg.block(5000) == 8192 or cfg.max_block < 8192
    assert CONFIGS["interpret"].radix and CONFIGS["interpret"].cand_block  # the tests' default crosses both
