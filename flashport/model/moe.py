"""The MoE feed-forward (spec §5.8): hash or top-k router, routed experts, shared expert.

Routed expert weights are stacked per layer: w13 [E, 2I, H] (gate rows then up rows, as
transformers' gate_up_proj) and w2 [E, H, I], each stored in the model dtype, as FP4 E2M1 packed
two per byte with UE8M0 1x32 scales, or as FP8 with block scales.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flashport.config import HASH_MOE, ModelConfig
from flashport.model.layers import REFERENCE, Linear
from flashport.model.quant import FP4_GROUP, dequant_fp8_blocks


class ExpertWeight(nn.Module):
    """One stacked expert matrix [E, out, in] in one of three storage formats."""

    def __init__(self, num_experts: int, out_features: int, in_features: int, dtype: torch.dtype,
                 fmt: str | None, fp8_block: tuple[int, int] | None, fp8_dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.fmt = fmt
        self.tiled = False  # FP4 bytes in the kernels' tiled layout (flashport.ops.moe.FP4_TILE)
        E = num_experts

        def param(*shape: int, dt: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=dt, device=device), requires_grad=False)

        if fmt is None:
            self.weight, self.scale = param(E, out_features, in_features, dt=dtype), None
        elif fmt == "fp4":
            self.weight = param(E, out_features, in_features // 2, dt=torch.uint8)
            self.scale = param(E, out_features, in_features // FP4_GROUP, dt=torch.uint8)
        elif fmt == "fp8":
            assert fp8_block is not None
            bo, bi = fp8_block
            self.weight = param(E, out_features, in_features, dt=fp8_dtype)
            self.scale = param(E, -(-out_features // bo), -(-in_features // bi), dt=torch.uint8)
        else:
            raise ValueError(f"unknown expert weight format {fmt!r}")

    def dense(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """[out, in] weight of one expert in `dtype`."""
        w = self.weight[expert]
        if self.fmt is None:
            return w if w.dtype == dtype else w.to(dtype)
        if self.fmt == "fp4":
            from flashport.ops.moe import expert_dense  # the twin's reader: row or tiled layout

            return expert_dense(self.weight, self.scale, expert, dtype, self.tiled)
        return dequant_fp8_blocks(w, self.scale[expert], dtype)

    def tile_for_kernels(self) -> bool:
        """FP4 weights -> the kernels' tiled layout, in place (after loading; once). -> whether tiled
        (FP4 with whole 64 x 64 chunks: every V4-Flash expert matrix)."""
        from flashport.ops.moe import fp4_tileable, tile_fp4_

        if self.fmt != "fp4" or self.tiled or not fp4_tileable(self.weight):
            return self.tiled
        with torch.no_grad():
            tile_fp4_(self.weight, self.scale)
        self.tiled = True
        return True


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, fp8_dtype: torch.dtype,
                 device: torch.device | str | None = None, ep: Any = None) -> None:
        super().__init__()
        H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
        self.is_hash = cfg.mlp_layer_types[layer] == HASH_MOE
        self.top_k, self.limit, self.scaling = cfg.num_experts_per_tok, cfg.swiglu_limit, cfg.routed_scaling_factor
        self.num_experts = E
        self.gate = Router(cfg, self.is_hash, dtype, device)
        block = cfg.fp8_block_size
        expert_fmt = cfg.expert_dtype if cfg.expert_dtype is not None else ("fp8" if block is not None else None)
        # Expert parallelism (flashport.distributed): `ep` is this rank's `ExpertParallelMoE`; the
        # layer then stores only that rank's experts and computes its routed part through it
        # (routing stays replicated: `experts` ids are global).
        self.ep = ep
        E_held = E if self.ep is None else self.ep.num_local  # this rank's experts only, under EP
        self.experts = nn.Module()
        self.experts.w13 = ExpertWeight(E_held, 2 * I, H, dtype, expert_fmt, block, fp8_dtype, device)
        self.experts.w2 = ExpertWeight(E_held, H, I, dtype, expert_fmt, block, fp8_dtype, device)
        self.shared_experts = nn.Module() if cfg.n_shared_experts else None
        if self.shared_experts is not None:
            self.shared_experts.w1 = Linear(H, I, dtype, block, fp8_dtype, device)
            self.shared_experts.w2 = Linear(I, H, dtype, block, fp8_dtype, device)
            self.shared_experts.w3 = Linear(H, I, dtype, block, fp8_dtype, device)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, impl: str = REFERENCE) -> torch.Tensor:
        """x [N, H], token_ids [N] (hash routing) -> [N, H]."""
        weights, experts = self.gate(x, token_ids)  # [N, k] each
        w13, w2 = self.experts.w13, self.experts.w2
        if self.ep is not None:  # expert parallel: this rank's picks, combined over the group
            routed = self.ep.routed(x, weights, experts, w13, w2, self.limit, impl)
        elif impl != REFERENCE and w13.fmt in (None, "fp4"):
            from flashport.ops.moe import fused_moe

            routed = fused_moe(x, weights, experts, w13.weight, w13.scale, w2.weight, w2.scale, self.limit, impl=impl,
                               tiled=w13.tiled)
        else:
            routed = self._routed(x, weights, experts)
        if self.shared_experts is None:
            return routed
        s = self.shared_experts
        return routed + s.w2(clamped_swiglu(s.w1(x, impl), s.w3(x, impl), self.limit), impl)

    def _routed(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        # Torch reference: group the (token, pick) pairs by expert and run each expert on its rows.
        # One host sync per layer for the per-expert counts (the fused MoE kernel has none).
        # Each pair's output is weighted in the model dtype, then the k picks of a token are summed
        # in fp32 (transformers' grouped_mm path).
        N, k = experts.shape
        flat_experts = experts.flatten()
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        rows = order // k  # token of each sorted pair
        xs = x[rows]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sl = slice(start, start + n)
            gate_up = F.linear(xs[sl], self.experts.w13.dense(e, x.dtype))
            gate, up = gate_up.chunk(2, dim=-1)
            out[sl] = F.linear(clamped_swiglu(gate, up, self.limit), self.experts.w2.dense(e, x.dtype))
            start += n
        out = out * weights.flatten()[order].unsqueeze(-1)
        pair_out = torch.empty_like(out)
        pair_out[order] = out
        return pair_out.view(N, k, -1).float().sum(dim=1).to(x.dtype)


class Router(nn.Module):
    """Scores sqrt(softplus(x W^T)); hash layers pick experts by token id, others by top-k of
    score + bias. Weights are renormalised over the picks and scaled (spec §5.8)."""

    def __init__(self, cfg: ModelConfig, is_hash: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        E, H = cfg.n_routed_experts, cfg.hidden_size
        self.is_hash, self.top_k, self.scaling = is_hash, cfg.num_experts_per_tok, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(E, H, dtype=dtype, device=device), requires_grad=False)
        if is_hash:
            self.tid2eid = nn.Parameter(torch.empty(cfg.vocab_size, self.top_k, dtype=torch.int64, device=device),
                                        requires_grad=False)
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.empty(E, dtype=torch.float32, device=device), requires_grad=False)
            self.tid2eid = None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.softplus(F.linear(x, self.weight)).sqrt()  # [N, E] in the model dtype
        if self.is_hash:
            experts = self.tid2eid[token_ids]
        else:
            experts = torch.topk(scores + self.bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, experts)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts
