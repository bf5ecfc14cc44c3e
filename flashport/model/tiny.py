"""A tiny random DeepSeek-V4 checkpoint in the official on-disk format (spec §8.2, §10).

`write_tiny_checkpoint` is what `flashport init-tiny` writes: config.json in the official spelling,
FP8 E4M3 dense weights with UE8M0 block scales (32 x 32 blocks, so the tiny dims span several),
packed FP4 experts (int8 bytes, low nibble = even column) with 1 x 32 UE8M0 scales, BF16 / F32 /
I64 tensors as in the real checkpoint, sharded with a `model.safetensors.index.json`, plus the
tiny tokenizer. Every value transformers initialises to a constant (sinks, ape, gate bias,
tid2eid, hc scale/base) is random here, so tests exercise them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from flashport.config import CSA, HASH_MOE, HCA, SWA, TOPK_MOE, ModelConfig, YarnScaling
from flashport.model.quant import quant_fp4, quant_fp8_blocks

# Storage kinds of official tensors.
FP8, FP4, BF16, F32, I64 = "fp8", "fp4", "bf16", "f32", "i64"

DEFAULT_SHARD_BYTES = 2 * 1024 * 1024  # the tiny model (~6 MB) gets several shards


def tiny_config() -> ModelConfig:
    """The embedded demo model: every attention kind, hash and top-k MoE, YaRN, FP8 + FP4."""
    return ModelConfig(
        vocab_size=1024, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=8, head_dim=64, qk_rope_head_dim=16, q_lora_rank=64,
        o_groups=2, o_lora_rank=32, sliding_window=8,
        # Layers 0-1 hash-routed (SWA, CSA), then top-k over HCA, CSA, HCA, SWA.
        layer_types=(SWA, CSA, HCA, CSA, HCA, SWA),
        mlp_layer_types=(HASH_MOE, HASH_MOE) + (TOPK_MOE,) * 4,
        compress_rate_csa=4, compress_rate_hca=8,
        rope_scaling=YarnScaling(factor=16.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0),
        max_position_embeddings=4096,
        index_n_heads=8, index_head_dim=32, index_topk=4,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        fp8_block_size=(32, 32), expert_dtype="fp4",
    )


def official_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Official tensor name -> (logical shape, storage kind), written out from the config
    independently of the model code (so the loader's name mapping is tested against it)."""
    H, D, nh, I, E = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.moe_intermediate_size, \
        cfg.n_routed_experts
    dense = FP8 if cfg.fp8_block_size is not None else BF16
    expert = FP4 if cfg.expert_dtype == "fp4" else dense
    hc, mixes = cfg.hc_mult, (2 + cfg.hc_mult) * cfg.hc_mult
    out: dict[str, tuple[tuple[int, ...], str]] = {"embed.weight": ((cfg.vocab_size, H), BF16)}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        for sub in ("attn", "ffn"):
            out[f"{p}hc_{sub}_fn"] = ((mixes, hc * H), F32)
            out[f"{p}hc_{sub}_base"] = ((mixes,), F32)
            out[f"{p}hc_{sub}_scale"] = ((3,), F32)
        out[p + "attn_norm.weight"] = ((H,), BF16)
        out[p + "ffn_norm.weight"] = ((H,), BF16)
        a = p + "attn."
        out[a + "attn_sink"] = ((nh,), F32)
        out[a + "wq_a.weight"] = ((cfg.q_lora_rank, H), dense)
        out[a + "q_norm.weight"] = ((cfg.q_lora_rank,), BF16)
        out[a + "wq_b.weight"] = ((nh * D, cfg.q_lora_rank), dense)
        out[a + "wkv.weight"] = ((D, H), dense)
        out[a + "kv_norm.weight"] = ((D,), BF16)
        out[a + "wo_a.weight"] = ((cfg.o_groups * cfg.o_lora_rank, nh * D // cfg.o_groups), dense)
        out[a + "wo_b.weight"] = ((H, cfg.o_groups * cfg.o_lora_rank), dense)
        kind = cfg.layer_types[i]
        if kind != SWA:
            rate = cfg.compress_rate_csa if kind == CSA else cfg.compress_rate_hca
            width = 2 * D if kind == CSA else D  # CSA pools two overlapping series
            out[a + "compressor.ape"] = ((rate, width), F32)
            out[a + "compressor.wkv.weight"] = ((width, H), BF16)
            out[a + "compressor.wgate.weight"] = ((width, H), BF16)
            out[a + "compressor.norm.weight"] = ((D,), BF16)
        if kind == CSA:
            d = cfg.index_head_dim
            out[a + "indexer.compressor.ape"] = ((cfg.compress_rate_csa, 2 * d), F32)
            out[a + "indexer.compressor.wkv.weight"] = ((2 * d, H), BF16)
            out[a + "indexer.compressor.wgate.weight"] = ((2 * d, H), BF16)
            out[a + "indexer.compressor.norm.weight"] = ((d,), BF16)
            out[a + "indexer.wq_b.weight"] = ((cfg.index_n_heads * d, cfg.q_lora_rank), dense)
            out[a + "indexer.weights_proj.weight"] = ((cfg.index_n_heads, H), BF16)
        f = p + "ffn."
        out[f + "gate.weight"] = ((E, H), BF16)
        if cfg.mlp_layer_types[i] == HASH_MOE:
            out[f + "gate.tid2eid"] = ((cfg.vocab_size, cfg.num_experts_per_tok), I64)
        else:
            out[f + "gate.bias"] = ((E,), F32)
        for e in range(E):
            out[f"{f}experts.{e}.w1.weight"] = ((I, H), expert)
            out[f"{f}experts.{e}.w2.weight"] = ((H, I), expert)
            out[f"{f}experts.{e}.w3.weight"] = ((I, H), expert)
        if cfg.n_shared_experts:
            out[f + "shared_experts.w1.weight"] = ((I, H), dense)
            out[f + "shared_experts.w2.weight"] = ((H, I), dense)
            out[f + "shared_experts.w3.weight"] = ((I, H), dense)
    out["norm.weight"] = ((H,), BF16)
    out["hc_head_fn"] = ((hc, hc * H), F32)
    out["hc_head_base"] = ((hc,), F32)
    out["hc_head_scale"] = ((1,), F32)
    out["head.weight"] = ((cfg.vocab_size, H), BF16)
    return out


def _master(name: str, shape: tuple[int, ...], cfg: ModelConfig, g: torch.Generator) -> torch.Tensor:
    """fp32 values for one tensor, scaled so activations stay O(1) through the random network."""
    def randn(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std + mean

    leaf = name.rsplit(".", 1)[-1] if "." in name else name
    if name.endswith("tid2eid"):  # k distinct experts per token id
        scores = torch.rand(shape[0], cfg.n_routed_experts, generator=g)
        return scores.topk(shape[1], dim=-1).indices
    if "hc_" in name and name.endswith("_fn"):  # mixes of the rms-normalised [hc*hidden] residual
        return randn(0.5 / shape[-1] ** 0.5)
    if "hc_" in name and name.endswith("_base"):
        return randn(0.5)
    if "hc_" in name and name.endswith("_scale"):
        return torch.rand(shape, generator=g) + 0.5
    if leaf == "attn_sink":
        return randn(1.0)
    if leaf == "ape":
        return randn(0.5)
    if name.endswith("gate.bias"):
        return randn(0.3)
    if "norm" in name:  # RMSNorm weights
        return randn(0.1, mean=1.0)
    if name == "embed.weight":
        return randn(1.0)
    if name == "head.weight":
        return randn(2.0 / shape[-1] ** 0.5)
    return randn(1.0 / shape[-1] ** 0.5)  # linears: std 1/sqrt(fan_in)


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official name -> tensor in the official dtype (FP8 + F8_E8M0 scale, int8-packed FP4 + scale,
    BF16, F32, I64). Deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, (shape, kind) in official_layout(cfg).items():
        w = _master(name, shape, cfg, g)
        if kind == FP8:
            assert cfg.fp8_block_size is not None
            q, s = quant_fp8_blocks(w, cfg.fp8_block_size)
            out[name], out[name.removesuffix("weight") + "scale"] = q, s.view(torch.float8_e8m0fnu)
        elif kind == FP4:
            q, s = quant_fp4(w)
            # int8 as in the official checkpoint (transformers unpacks FP4 only from int8)
            out[name], out[name.removesuffix("weight") + "scale"] = q.view(torch.int8), s.view(torch.float8_e8m0fnu)
        elif kind == BF16:
            out[name] = w.to(torch.bfloat16)
        elif kind == F32:
            out[name] = w.float()
        else:
            out[name] = w.to(torch.int64)
    return out


def write_official_checkpoint(out_dir: str | Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                              shard_size_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Shards (in the order of `tensors`) + model.safetensors.index.json + config.json +
    generation_config.json. Returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_size_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg.to_official_dict(), indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id,
           "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids)}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """The demo model: tiny_config(), random_weights(seed), and the tiny tokenizer."""
    from flashport.tiny_tokenizer import train_tiny_tokenizer  # tokenizers is only needed here

    cfg = tiny_config()
    out = write_official_checkpoint(out_dir, cfg, random_weights(cfg, seed))
    train_tiny_tokenizer(out, vocab_size=cfg.vocab_size)
    return out
