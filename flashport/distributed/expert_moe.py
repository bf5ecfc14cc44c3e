"""The expert-parallel routed MoE of one rank: compute the (token, pick) pairs of this rank's
experts, then combine over the group.

Two ways tokens reach their experts:

- replicated (`routed`): every rank holds the same batch and computes the same routing (attention,
  router and shared expert are replicated), so nothing is dispatched: a rank computes the pairs
  whose expert it holds and the combine all-reduces.
- all-to-all (`routed_all_to_all`): every rank holds its own tokens (data-parallel attention);
  each pair is sent to its expert's rank, computed there and sent back.

Numerics. The single-process MoE (transformers' grouped_mm path) rounds each pair's output to the
model dtype (times its routing weight, rounded) and sums a token's k picks in fp32 in pick order.
Combines:

- "pairs" (default): the [N*k, H] pair outputs are all-reduced as integers (the bits viewed as
  int32). Every row is non-zero on exactly one rank and +0.0 (all bits 0) on the others, so the
  integer sum is the owner's row bit for bit, in any dtype; every rank then sums the k picks in
  fp32 exactly as one process does. Bit-identical to one process in fp32 and bf16.
  Volume: N*k*H*itemsize (bf16: 12 bytes per token and hidden unit at k = 6).
- "sum": each rank sums its own picks in fp32, the [N, H] fp32 partials are all-reduced (float
  sum), then rounded: 4 bytes per token and hidden unit, but the fp32 additions happen in another
  order, so the result may differ from one process in the last fp32 bit, which after rounding to
  bf16 is occasionally one bf16 ulp.

The all-to-all path sends every pair's activation row to its owner and the weighted output row back;
an expert's rows arrive in (rank, token, pick) order, the order one process would use for the
concatenated batch, and the k-sum happens on the token's own rank: bit-identical to one process
running the ranks' batches back to back.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flashport.distributed.shard import ExpertShard
from flashport.model.layers import REFERENCE
from flashport.ops import use_triton

COMBINES = ("pairs", "sum")


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def local_pairs_torch(x: torch.Tensor, weights: torch.Tensor, local_ids: torch.Tensor, held: torch.Tensor,
                      w13, w2, limit: float) -> torch.Tensor:
    """The torch twin. x [N, H], weights / local_ids / held [N, k] -> pairs [N*k, H] in x's dtype:
    weight * expert(x) for the held pairs, +0.0 rows for the others. One host sync (the counts).

    w13 / w2 are `ExpertWeight`s of this rank's experts (local id = index)."""
    N, k = local_ids.shape
    flat = local_ids.reshape(-1)
    sel = held.reshape(-1).nonzero().squeeze(1)  # held pair indices, ascending
    ids = flat[sel]
    order = sel[torch.argsort(ids, stable=True)]  # by expert, pair order within one: as one process
    counts = torch.bincount(ids, minlength=w13.weight.shape[0]).tolist()
    xs = x[order // k]
    out = torch.empty(order.numel(), w2.weight.shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sl = slice(start, start + n)
        gate, up = F.linear(xs[sl], w13.dense(e, x.dtype)).chunk(2, dim=-1)
        out[sl] = F.linear(clamped_swiglu(gate, up, limit), w2.dense(e, x.dtype))
        start += n
    out = out * weights.reshape(-1)[order].unsqueeze(-1)
    pairs = torch.zeros(N * k, out.shape[1], dtype=x.dtype, device=x.device)
    pairs[order] = out
    return pairs


def local_pairs_triton(x: torch.Tensor, weights: torch.Tensor, local_ids: torch.Tensor, held: torch.Tensor,
                       w13, w2, limit: float) -> torch.Tensor:
    """The fused kernels (no host sync): pairs not held get the out-of-range id E_local, which the
    route sorts last and the GEMMs skip; their rows are then zeroed."""
    from flashport.kernels.moe import moe_form, moe_route
    from flashport.kernels.moe_gemm import moe_down, moe_gate_up

    E_local = w13.weight.shape[0]
    ids = torch.where(held, local_ids, E_local)
    order, offsets = moe_route(ids, E_local)
    form = moe_form(x)
    h = moe_gate_up(x.contiguous(), order, offsets, ids.shape[1], w13.weight, w13.scale, limit, form,
                    tiled=w13.tiled)
    pairs = moe_down(h, order, offsets, weights.reshape(-1).contiguous(), w2.weight, w2.scale, form,
                     tiled=w2.tiled)
    return pairs.masked_fill_(~held.reshape(-1, 1), 0)


def sum_picks(pairs: torch.Tensor, top_k: int, fused: bool) -> torch.Tensor:
    """pairs [N*k, H] -> [N, H]: fp32 sum of each token's k picks in pick order, rounded."""
    if fused:
        from flashport.kernels.moe import moe_sum

        return moe_sum(pairs, top_k)
    return pairs.view(-1, top_k, pairs.shape[1]).float().sum(dim=1).to(pairs.dtype)


def as_int_bits(t: torch.Tensor) -> torch.Tensor:
    """The bits of a contiguous float tensor as int32 (16-bit dtypes: two per int32 along the last dim)."""
    if t.element_size() == 4:
        return t.view(torch.int32)
    if t.element_size() == 2 and t.shape[-1] % 2 == 0:
        return t.view(torch.int32)
    raise ValueError(f"cannot view {t.dtype} {tuple(t.shape)} as int32 bits")


class ExpertParallelMoE:
    """The MoE hook of one rank (given to every MoE layer through DeepseekV4(moe_hook=...))."""

    def __init__(self, shard: ExpertShard, group: dist.ProcessGroup | None = None, combine: str = "pairs",
                 check_routing: bool | None = None, all_to_all: bool = False) -> None:
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        self.shard, self.group, self.combine = shard, group, combine
        self.all_to_all = all_to_all  # each rank its own tokens (data-parallel attention)
        self.num_local = shard.num_local
        self.first = shard.local.start
        # Debug: check on every layer that all ranks routed the same (one host sync per layer).
        self.check_routing = os.environ.get("FLASHPORT_EP_CHECK") == "1" if check_routing is None else check_routing
        self.comm_bytes = 0  # bytes this rank handed to collectives (a counter for benchmarks)

    def _local(self, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local_ids = experts - self.first
        return local_ids, (local_ids >= 0) & (local_ids < self.num_local)

    @staticmethod
    def _fused(x: torch.Tensor, w13, impl: str) -> bool:
        return impl != REFERENCE and w13.fmt in (None, "fp4") and use_triton(x, impl)

    def _pairs(self, x, weights, local_ids, held, w13, w2, limit, impl) -> torch.Tensor:
        fn = local_pairs_triton if self._fused(x, w13, impl) else local_pairs_torch
        return fn(x, weights, local_ids, held, w13, w2, limit)

    # ------------------------------------------------------------------ replicated batch
    def routed(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13, w2, limit: float,
               impl: str) -> torch.Tensor:
        """The same x [N, H] and routing [N, k] on every rank -> the routed output [N, H] on every rank.
        (With `all_to_all` set, each rank's own tokens instead: `routed_all_to_all`.)"""
        if self.all_to_all:
            return self.routed_all_to_all(x, weights, experts, w13, w2, limit, impl)
        N, k = experts.shape
        if N == 0:  # the same N on every rank: all skip the collective together
            return x.new_empty((0, x.shape[1]))
        if self.check_routing:
            self._check_same(experts)
        local_ids, held = self._local(experts)
        pairs = self._pairs(x, weights, local_ids, held, w13, w2, limit, impl)
        fused = self._fused(x, w13, impl)
        if self.combine == "pairs":
            bits = as_int_bits(pairs)
            self.comm_bytes += bits.numel() * 4
            dist.all_reduce(bits, group=self.group)  # one non-zero row per pair: exact
            return sum_picks(pairs, k, fused)
        partial = pairs.view(N, k, -1).float().sum(dim=1)  # [N, H] fp32
        self.comm_bytes += partial.numel() * 4
        dist.all_reduce(partial, group=self.group)
        return partial.to(x.dtype)

    def _check_same(self, experts: torch.Tensor) -> None:
        sig = torch.stack([experts.sum(), (experts * torch.arange(1, experts.numel() + 1, device=experts.device)
                                           .view_as(experts)).sum()]).to(torch.int64)
        lo, hi = sig.clone(), sig.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(lo, hi):  # debug only: the host sync is fine here
            raise RuntimeError(f"expert parallel rank {self.shard.rank}: ranks routed the replicated batch "
                               "differently (the replicated computation is not bit-identical across ranks)")

    # ------------------------------------------------------------------ own batches (all-to-all)
    def routed_all_to_all(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13, w2,
                          limit: float, impl: str) -> torch.Tensor:
        """Each rank's own x [N_r, H] and routing [N_r, k] (N_r may be 0) -> its routed output [N_r, H].

        Three all-to-alls: the pair counts, the pairs' rows (activation, weight, expert id), and the
        results back. Reads the counts on the host (one sync)."""
        N, k = experts.shape
        W = self.shard.world_size
        H = x.shape[1]
        flat = experts.reshape(-1)
        owner = self._owner(flat)  # [N*k]
        order = torch.argsort(owner, stable=True)  # pairs grouped by destination, pair order within
        send_counts = torch.bincount(owner, minlength=W)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()  # the host sync
        M = sum(recv)
        rows = x[order // k] if N else x.new_empty((0, H))
        x_in = x.new_empty((M, H))
        dist.all_to_all_single(x_in, rows.contiguous(), recv, send, group=self.group)
        meta = torch.stack([flat[order], weights.reshape(-1)[order].view(torch.int16).to(torch.int64)
                            if weights.element_size() == 2 else weights.reshape(-1)[order].view(torch.int32)
                            .to(torch.int64)], dim=1)  # [P, 2]: expert id, weight bits
        meta_in = meta.new_empty((M, 2))
        dist.all_to_all_single(meta_in, meta.contiguous(), recv, send, group=self.group)
        ids_in = meta_in[:, 0] - self.first
        bits = meta_in[:, 1]
        w_in = (bits.to(torch.int16) if weights.element_size() == 2 else bits.to(torch.int32)).view(weights.dtype)
        out_in = self._pairs(x_in, w_in.view(M, 1), ids_in.view(M, 1), torch.ones(M, 1, dtype=torch.bool,
                             device=x.device), w13, w2, limit, impl) if M else x.new_empty((0, H))
        back = x.new_empty((N * k, H))
        dist.all_to_all_single(back, out_in.contiguous(), send, recv, group=self.group)
        self.comm_bytes += 2 * (rows.numel() * rows.element_size()) + meta.numel() * 8
        pairs = torch.empty_like(back)
        pairs[order] = back
        return sum_picks(pairs, k, self._fused(x, w13, impl)) if N else x.new_empty((0, H))

    def _owner(self, ids: torch.Tensor) -> torch.Tensor:
        base, extra = divmod(self.shard.num_experts, self.shard.world_size)
        cut = extra * (base + 1)
        return torch.where(ids < cut, ids // (base + 1), extra + (ids - cut) // max(base, 1))
