"""DeepSeek-V4 in plain PyTorch: blocks with mHC, V4 attention and MoE; the final hc head.

Module and parameter names follow the official checkpoint (spec §8.2), with three differences
the loader maps: mHC parameters live in submodules (`hc_attn.fn` for `hc_attn_fn`), routed
experts are stacked per layer (`ffn.experts.w13` = [w1; w3] of every expert, `ffn.experts.w2`),
and FP8 scales are named `scale` next to their `weight` as in the checkpoint.

`forward` takes a flat batch of new tokens from any number of sequences (each with its own
`SequenceState`) and returns logits for the rows asked for, so one call can prefill several
prompts of unequal length, continue a prefill in chunks, or decode one token per sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flashport.config import ModelConfig
from flashport.model.attention import Attention, SeqSlice
from flashport.model.layers import OPS_IMPLS, REFERENCE, Linear, RMSNorm, RotaryTables
from flashport.model.mhc import HyperConnection, HyperHead, post_update
from flashport.model.moe import MoE
from flashport.model.state import DenseCache, LayerCache, ModelCache, SequenceState


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, fp8_dtype: torch.dtype,
                 device: torch.device | str | None = None, moe_hook: Any = None) -> None:
        super().__init__()
        H, hc = cfg.hidden_size, cfg.hc_mult
        self.hc_attn = HyperConnection(hc, H, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps, device)
        self.hc_ffn = HyperConnection(hc, H, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps, device)
        self.attn_norm = RMSNorm(H, cfg.rms_norm_eps, device)
        self.ffn_norm = RMSNorm(H, cfg.rms_norm_eps, device)
        self.attn = Attention(cfg, layer, dtype, fp8_dtype, device)
        self.ffn = MoE(cfg, layer, dtype, fp8_dtype, device, ep=moe_hook)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor, rope: RotaryTables,
                seqs: list[SeqSlice], cache: LayerCache, impl: str) -> torch.Tensor:
        """x [N, hc, hidden] -> [N, hc, hidden]."""
        u, post, comb = self.hc_attn.pre(x, impl)
        y = self.attn(self.attn_norm(u, impl), positions, rope, seqs, cache, impl)
        x = post_update(x, y, post, comb, impl)
        u, post, comb = self.hc_ffn.pre(x, impl)
        y = self.ffn(self.ffn_norm(u, impl), token_ids, impl)
        return post_update(x, y, post, comb, impl)


class DeepseekV4(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn, device: torch.device | str | None = None,
                 ops_impl: str = REFERENCE, moe_hook: Any = None) -> None:
        """`moe_hook`: under expert parallelism, this rank's `flashport.distributed.ExpertParallelMoE`
        (every MoE layer then holds only the rank's routed experts); None in one process."""
        super().__init__()
        if ops_impl not in OPS_IMPLS:
            raise ValueError(f"ops_impl {ops_impl!r}: expected one of {OPS_IMPLS}")
        self.cfg, self.dtype, self.ops_impl = cfg, dtype, ops_impl
        # Weights are filled by the loader: allocate without the default random init (slow for
        # V4-sized tables, and on the meta device it pulls in torch._dynamo).
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _freeze=True,
                                  _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device))
        self.layers = nn.ModuleList(Block(cfg, i, dtype, fp8_dtype, device, moe_hook)
                                    for i in range(cfg.num_hidden_layers))
        self.hc_head = HyperHead(cfg.hc_mult, cfg.hidden_size, cfg.hc_eps, cfg.rms_norm_eps, device)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, dtype, device=device)
        self.rope = RotaryTables(cfg, device)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_state(self) -> SequenceState:
        return SequenceState.new(self.cfg, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, seq_lens: list[int], states: list[SequenceState],
                logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run the new tokens of several sequences over the model's own per-sequence states.

        token_ids [N] holds each sequence's new tokens back to back (seq_lens[i] of them, N = sum);
        each continues from its state, which is updated. Returns logits [R, vocab] in the model
        dtype for the flat rows `logits_rows` (default: every row).
        """
        assert len(seq_lens) == len(states) and sum(seq_lens) == token_ids.shape[0]
        seqs, positions, start = [], [], 0
        for n, st in zip(seq_lens, states):
            seqs.append(SeqSlice(start, n))
            positions.append(torch.arange(st.num_tokens, st.num_tokens + n))
            start += n
        pos = torch.cat(positions).to(token_ids.device)
        logits = self.run(token_ids, pos, seqs, DenseCache(states, self.cfg.sliding_window), logits_rows)
        for n, st in zip(seq_lens, states):
            st.num_tokens += n
        return logits

    @torch.inference_mode()
    def run(self, token_ids: torch.Tensor, positions: torch.Tensor, seqs: list[SeqSlice], cache: ModelCache,
            logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The forward over any state store: token_ids [N] and positions [N] of the flat batch,
        `seqs` where each sequence's tokens sit, `cache` its state. -> logits [R, vocab]."""
        x = self.embed(token_ids)  # [N, hidden]
        x = x.unsqueeze(1).expand(-1, self.cfg.hc_mult, -1).contiguous()  # [N, hc, hidden]: hc equal streams
        impl = self.ops_impl
        for i, block in enumerate(self.layers):
            x = block(x, token_ids, positions, self.rope, seqs, cache.layer(i), impl)
        if logits_rows is not None:
            x = x[logits_rows]
        return self.head(self.norm(self.hc_head(x, impl), impl))
