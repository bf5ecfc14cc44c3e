"""Compressor decode step over pools (flashport/ops/compressor.py): token by token against the
model's own `Compressor.update` on dense states, for the torch twin and the Triton kernel
(interpreter on the CPU), CSA and HCA, rates 4 and 8; ahead-of-time compile for all targets."""

from dataclasses import dataclass

import pytest
import torch

from flashport.kernels import compressor as kernel_mod
from flashport.kernels.spec import INTERPRET
from flashport.model.compressor import Compressor
from flashport.model.layers import RotaryTables
from flashport.model.quant import to_fp8_storage
from flashport.model.state import CompressorState
from flashport.model.tiny import tiny_config
from flashport.ops.compressor import compressor_decode

D, EPS = 64, 1e-6  # tiny_config: head_dim 64, rope 16
ROPE = RotaryTables(tiny_config())


@dataclass
class Pools:
    pend_kv: torch.Tensor  # [S, m-1, width]
    pend_gate: torch.Tensor
    entries: torch.Tensor  # [R, d]
    overlap: tuple[torch.Tensor, ...] | None  # ov_kv, ov_gate [S, m, d]; bnd_kv, bnd_gate [NC, m, d]


class Case:
    """B sequences at staggered positions, each with a dense reference state and the same state
    in pools: a permuted state slot, and a comp block table of blocks of 2m tokens (2 entries each)."""

    def __init__(self, m: int, csa: bool, dtype: torch.dtype, starts: list[int], seed: int) -> None:
        self.m, self.csa, self.dtype, self.starts = m, csa, dtype, starts
        self.g = torch.Generator().manual_seed(seed)
        self.width = 2 * D if csa else D
        self.block = 2 * m
        B, S, NC = len(starts), len(starts) + 2, 8 * len(starts)
        self.comp = Compressor(8, D, m, csa, dtype, EPS)
        self.comp.ape.copy_(torch.randn(m, self.width, generator=self.g))
        self.comp.norm.weight.copy_(torch.rand(D, generator=self.g) + 0.5)
        self.slots = torch.randperm(S, generator=self.g)[:B]
        self.tables = torch.randperm(NC, generator=self.g).view(B, -1)  # [B, 8] comp blocks per sequence

        def junk(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:  # stale pool contents
            return torch.randn(*shape, generator=self.g).to(dt)

        R = NC * (self.block // m)
        ov = (junk(S, m, D), junk(S, m, D, dt=torch.float32), junk(NC, m, D), junk(NC, m, D, dt=torch.float32))
        self.pools = Pools(junk(S, m - 1, self.width), junk(S, m - 1, self.width), junk(R, D), ov if csa else None)
        self.states = [CompressorState(torch.empty(0, self.width, dtype=dtype), torch.empty(0, self.width, dtype=dtype),
                                       torch.empty(0, D, dtype=dtype)) for _ in starts]
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # boundary records the steps wrote
        self.pos = list(starts)
        for b, p in enumerate(starts):  # prefill the reference, then copy its state into the pools
            if p:
                kv, gate = self.rows(p)
                self.comp.update(self.states[b], kv, gate, ROPE)
            self.load(b)

    def rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = torch.randn(n, self.width, generator=self.g).to(self.dtype)
        gate = (torch.randn(n, self.width, generator=self.g) * 2).to(self.dtype)
        return kv, gate

    def entry_row(self, b: int, w: int) -> int:
        per = self.block // self.m
        return int(self.tables[b, w // per]) * per + w % per

    def load(self, b: int) -> None:
        st, s, P = self.states[b], self.slots[b], self.pools
        n = st.pending_kv.shape[0]
        P.pend_kv[s, :n], P.pend_gate[s, :n] = st.pending_kv, st.pending_gate
        for w in range(st.num_entries):
            P.entries[self.entry_row(b, w)] = st.entries[w]
        if st.overlap_kv is not None:
            P.overlap[0][s], P.overlap[1][s] = st.overlap_kv, st.overlap_gate

    def step(self, impl: str) -> None:
        """One new token for every sequence: the reference, then the op on the pools."""
        m, B = self.m, len(self.starts)
        kv, gate = self.rows(B)
        pos = torch.tensor(self.pos)
        closes = (pos % m) == m - 1
        close_rows = torch.tensor([self.entry_row(b, p // m) if p % m == m - 1 else -1 for b, p in enumerate(self.pos)])
        at_boundary = closes & ((pos + 1) % self.block == 0)
        bnd = torch.where(at_boundary, self.tables[torch.arange(B), ((pos + 1) // self.block - 1).clamp(min=0)], -1)
        for b in range(B):
            self.comp.update(self.states[b], kv[b:b + 1], gate[b:b + 1], ROPE)
            if self.csa and bnd[b] >= 0:
                self.records[int(bnd[b])] = (self.states[b].overlap_kv.clone(), self.states[b].overlap_gate.clone())
        cos, sin = ROPE.cos_sin(pos + 1 - m, compress=True, dtype=self.dtype)
        P = self.pools
        compressor_decode(kv, gate, self.slots, pos, close_rows, bnd, P.pend_kv, P.pend_gate, P.entries,
                          self.comp.ape, self.comp.norm.weight, EPS, cos, sin, P.overlap, impl=impl)
        self.pos = [p + 1 for p in self.pos]

    def check(self, exact: bool) -> None:
        P = self.pools

        def same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
            if exact:
                assert torch.equal(got, want), what
            elif self.dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6, msg=what)
            else:  # bf16 / fp16: one ulp in rare elements (fp32 summation order)
                ulp = torch.finfo(self.dtype).eps
                torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=2 * ulp, msg=what)
                assert got.numel() == 0 or (got != want).float().mean() < 0.02, what

        for b, st in enumerate(self.states):
            s, n = self.slots[b], st.pending_kv.shape[0]
            assert n == self.pos[b] % self.m
            assert torch.equal(P.pend_kv[s, :n], st.pending_kv) and torch.equal(P.pend_gate[s, :n], st.pending_gate)
            rows = [self.entry_row(b, w) for w in range(st.num_entries)]
            same(P.entries[rows], st.entries, f"entries of sequence {b}")
            if self.csa:
                assert (st.overlap_kv is not None) == (self.pos[b] >= self.m)
                if st.overlap_kv is not None:  # copies of raw rows and fp32 sums: exact
                    assert torch.equal(P.overlap[0][s], st.overlap_kv) and torch.equal(P.overlap[1][s], st.overlap_gate)
        for blk, (okv, ogate) in self.records.items():
            assert torch.equal(P.overlap[2][blk], okv) and torch.equal(P.overlap[3][blk], ogate)


# Start positions: fresh, inside the first block, closing the first block next (p = m-1), past it,
# about to cross a comp block boundary (p = 2m-1), deeper in.
def _starts(m: int) -> list[int]:
    return [0, 1, m - 1, m + 2, 2 * m - 1, 3 * m + 1]


@pytest.mark.parametrize("csa", [True, False], ids=["csa", "hca"])
@pytest.mark.parametrize("m,tile", [(4, 1024), (8, 256)], ids=["m4-one-tile", "m8-chunked"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_decode_matches_compressor_update(impl, m, tile, csa, monkeypatch):
    # tile: the interpreter's slot tile; 1024 / 64 = 16 slots hold a whole block, 256 / 64 = 4
    # slots walk it in chunks (the two-pass softmax).
    monkeypatch.setitem(kernel_mod.CONFIGS, INTERPRET, {**kernel_mod.CONFIGS[INTERPRET], "tile_elems": tile})
    case = Case(m, csa, torch.float32, _starts(m)[: 5 if m == 8 else 6], seed=10 * m + csa)
    for _ in range(2 * m + 1):
        case.step(impl)
        case.check(exact=impl == "torch")
    assert all(p >= 2 * m for p in case.pos)  # every sequence closed at least two blocks
    if csa:
        assert case.records  # and some wrote boundary records


@pytest.mark.parametrize("csa", [True, False], ids=["csa", "hca"])
def test_bf16(csa):
    # The twin is bit-identical to Compressor.update in bf16; the kernel (fp32 math, round on
    # store) is within one bf16 ulp of it.
    for impl in ("torch", "triton"):
        case = Case(4, csa, torch.bfloat16, _starts(4), seed=5 + csa)
        for _ in range(6):
            case.step(impl)
            case.check(exact=impl == "torch")


def test_checks_name_the_tensor():
    case = Case(4, True, torch.float32, [0, 3], seed=0)
    P = case.pools
    kv, gate = case.rows(2)
    cos, sin = ROPE.cos_sin(torch.tensor([0, 0]), compress=True, dtype=torch.float32)
    args = [kv, gate, case.slots, torch.tensor([0, 3]), torch.tensor([-1, 0]), torch.tensor([-1, -1]), P.pend_kv,
            P.pend_gate, P.entries, case.comp.ape, case.comp.norm.weight, EPS, cos, sin, P.overlap]
    bad = list(args)
    bad[3] = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="positions"):
        compressor_decode(*bad, impl="triton")
    bad = list(args)
    bad[14] = (P.overlap[0], P.overlap[1].to(torch.float16), P.overlap[2], P.overlap[3])
    with pytest.raises(ValueError, match="ov_gate"):
        compressor_decode(*bad, impl="triton")
    bad = list(args)
    bad[14] = None
    with pytest.raises(ValueError, match="width"):
        compressor_decode(*bad, impl="triton")




@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz], ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("csa", [True, False], ids=["csa", "hca"])
def test_fp8_pool_kernel_equals_twin(csa, fp8):
    # kv_cache_dtype="fp8": the entries pool holds E4M3; kernel and twin store the same codes, and
    # they are the reference's entries cast with saturation.
    pools = {}
    for impl in ("torch", "triton"):
        case = Case(4, csa, torch.float32, _starts(4), seed=21 + csa)
        P = case.pools
        P.entries = to_fp8_storage(P.entries, fp8)
        for _ in range(9):
            case.step(impl)
        pools[impl] = P.entries
        if impl == "torch":  # the twin's entries are the reference's, cast
            for b, st in enumerate(case.states):
                rows = [case.entry_row(b, w) for w in range(st.num_entries)]
                assert torch.equal(P.entries[rows].view(torch.uint8), to_fp8_storage(st.entries, fp8).view(torch.uint8))
    assert torch.equal(pools["torch"].view(torch.uint8), pools["triton"].view(torch.uint8))
