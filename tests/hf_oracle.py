"""Tiny random transformers `DeepseekV4ForCausalLM` models: the numerical oracle for parity tests.

transformers initialises several parameters to constants (sinks, position biases, the selection
bias, tid2eid, hc scale/base); they are randomised here so the tests exercise them.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Three configs that together cover every layer type, hash and top-k routing, YaRN and plain
# rope, several head/group shapes. Windows and rates are small so short prompts close many HCA
# blocks and give CSA more entries than its top-k keeps. Indexer heads >= 8 (spec §5.6 on ties).
CONFIGS: dict[str, dict] = {
    "swa-csa-hca": dict(
        vocab_size=512, hidden_size=256, moe_intermediate_size=128, num_attention_heads=8, head_dim=64,
        q_lora_rank=64, qk_rope_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
        compress_ratios=[0, 0, 4, 128, 4, 0], compress_rate_hca=8, num_hash_layers=2, sliding_window=8,
        o_groups=2, o_lora_rank=32, index_n_heads=8, index_head_dim=32, index_topk=4,
        rope_scaling={"type": "yarn", "factor": 16, "beta_fast": 32, "beta_slow": 1,
                      "original_max_position_embeddings": 64}),
    "csa-heavy": dict(
        vocab_size=384, hidden_size=128, moe_intermediate_size=64, num_attention_heads=16, head_dim=32,
        q_lora_rank=48, qk_rope_head_dim=8, n_routed_experts=16, num_experts_per_tok=4,
        compress_ratios=[4, 128, 4, 4], compress_rate_hca=12, num_hash_layers=1, sliding_window=16,
        o_groups=4, o_lora_rank=16, index_n_heads=8, index_head_dim=16, index_topk=6),
    "hca-topk": dict(
        vocab_size=256, hidden_size=192, moe_intermediate_size=96, num_attention_heads=4, head_dim=48,
        q_lora_rank=32, qk_rope_head_dim=16, n_routed_experts=6, num_experts_per_tok=3,
        compress_ratios=[128, 0, 128, 4, 128], compress_rate_hca=4, compress_rate_csa=4, num_hash_layers=0,
        sliding_window=4, o_groups=1, o_lora_rank=24, index_n_heads=8, index_head_dim=24, index_topk=3,
        rope_scaling={"type": "yarn", "factor": 8, "beta_fast": 32, "beta_slow": 1,
                      "original_max_position_embeddings": 128}),
}


def make_hf_model(name: str, seed: int = 0):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    kw = dict(CONFIGS[name])
    kw.update(num_hidden_layers=len(kw["compress_ratios"]), num_key_value_heads=1, n_shared_experts=1,
              max_position_embeddings=1024)
    cfg = DeepseekV4Config(**kw)
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(shape, std=1.0):
        return torch.randn(shape, generator=g) * std

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("sinks"):
                p.copy_(rnd(p.shape))
            elif "position_bias" in n:
                p.copy_(rnd(p.shape, 0.5))
            elif n.endswith(("hc.scale", "hc_scale")):
                p.copy_(torch.rand(p.shape, generator=g) * 2 + 0.5)
            elif n.endswith(("hc.base", "hc_base")):
                p.copy_(rnd(p.shape, 0.3))
            elif "norm" in n:
                p.copy_(1 + rnd(p.shape, 0.1))
            elif p.dim() >= 2:
                p.copy_(rnd(p.shape, 0.05))
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(rnd(b.shape, 0.1))
            elif n.endswith("tid2eid"):
                b.copy_(torch.randint(0, cfg.n_routed_experts, b.shape, generator=g))
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def save_hf_model(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path
