"""Frozen, typed model configuration built once from a checkpoint's config.json.

Accepts both spellings of the V4 config: the official DeepSeek keys (`compress_ratios`,
`num_hash_layers`, `compress_rate_csa/hca`, `qk_rope_head_dim`, `rope_scaling`) and the ones
transformers writes (`layer_types`, `mlp_layer_types`, `compress_rates`, `rope_parameters`,
`partial_rotary_factor`). See spec §2.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashport.errors import ConfigError

# Attention layer kinds. Codes are the official `compress_ratios` values.
SWA, CSA, HCA = "swa", "csa", "hca"
# MoE layer kinds.
HASH_MOE, TOPK_MOE = "hash", "topk"

_CODE_TO_KIND = {0: SWA, 4: CSA, 128: HCA}
_HF_LAYER_TYPES = {
    "sliding_attention": SWA,
    "compressed_sparse_attention": CSA,
    "heavily_compressed_attention": HCA,
}
_HF_MLP_TYPES = {"hash_moe": HASH_MOE, "moe": TOPK_MOE}
KIND_TO_HF_LAYER_TYPE = {v: k for k, v in _HF_LAYER_TYPES.items()}
KIND_TO_CODE = {v: k for k, v in _CODE_TO_KIND.items()}
# V4-Flash: layers 0-1 SWA, then HCA (odd) and CSA (even); hash routing in layers 0-2.
_FLASH_LAYERS = (SWA, SWA) + tuple(CSA if i % 2 == 0 else HCA for i in range(2, 43))
_FLASH_MLP = (HASH_MOE,) * 3 + (TOPK_MOE,) * 40


@dataclass(frozen=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    layer_types: tuple[str, ...] = _FLASH_LAYERS  # per layer: SWA / CSA / HCA
    mlp_layer_types: tuple[str, ...] = _FLASH_MLP  # per layer: HASH_MOE / TOPK_MOE
    compress_rate_csa: int = 4
    compress_rate_hca: int = 128
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: YarnScaling | None = YarnScaling(16.0, 65536, 32.0, 1.0)  # compress layers only
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 0
    eos_token_ids: tuple[int, ...] = (1,)
    # Checkpoint storage formats (spec §8): dense FP8 block size, routed experts FP4 or not.
    fp8_block_size: tuple[int, int] | None = (128, 128)
    expert_dtype: str | None = "fp4"  # "fp4" or None (same format as dense weights)

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        _check(n > 0, "num_hidden_layers", n, "must be positive")
        _check(len(self.layer_types) == n, "layer_types", len(self.layer_types), f"needs {n} entries")
        _check(len(self.mlp_layer_types) == n, "mlp_layer_types", len(self.mlp_layer_types), f"needs {n} entries")
        for i, kind in enumerate(self.layer_types):
            _check(kind in (SWA, CSA, HCA), f"layer_types[{i}]", kind, "unknown attention layer kind")
        for i, kind in enumerate(self.mlp_layer_types):
            _check(kind in (HASH_MOE, TOPK_MOE), f"mlp_layer_types[{i}]", kind, "unknown MoE layer kind")
        _check(self.head_dim >= self.qk_rope_head_dim, "qk_rope_head_dim", self.qk_rope_head_dim,
               f"exceeds head_dim {self.head_dim}")
        _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim, "must be even")
        _check(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim", self.index_head_dim,
               f"must be >= qk_rope_head_dim {self.qk_rope_head_dim}")
        _check((self.num_attention_heads * self.head_dim) % self.o_groups == 0, "o_groups", self.o_groups,
               "must divide num_attention_heads * head_dim")
        _check(self.num_attention_heads % self.o_groups == 0, "o_groups", self.o_groups,
               "must divide num_attention_heads")
        _check(0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
               self.num_experts_per_tok, f"must be in [1, n_routed_experts={self.n_routed_experts}]")
        _check(self.n_shared_experts in (0, 1), "n_shared_experts", self.n_shared_experts, "only 0 or 1 supported")
        _check(self.scoring_func == "sqrtsoftplus", "scoring_func", self.scoring_func,
               "only 'sqrtsoftplus' (DeepSeek-V4) is supported")
        _check(self.sliding_window > 0, "sliding_window", self.sliding_window, "must be positive")
        _check(self.compress_rate_csa > 0 and self.compress_rate_hca > 0, "compress_rates",
               (self.compress_rate_csa, self.compress_rate_hca), "must be positive")
        _check(self.expert_dtype in (None, "fp4"), "expert_dtype", self.expert_dtype, "expected 'fp4' or absent")

    # ---- derived ----
    @property
    def num_nope_dims(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def compress_rate(self, layer: int) -> int:
        kind = self.layer_types[layer]
        return {SWA: 0, CSA: self.compress_rate_csa, HCA: self.compress_rate_hca}[kind]

    def with_num_layers(self, num_layers: int) -> ModelConfig:
        """The first `num_layers` layers of this model (benchmarks of real shapes on one GPU)."""
        _check(0 < num_layers <= self.num_hidden_layers, "num_layers", num_layers,
               f"must be in [1, {self.num_hidden_layers}]")
        return dataclasses.replace(
            self, num_hidden_layers=num_layers, layer_types=self.layer_types[:num_layers],
            mlp_layer_types=self.mlp_layer_types[:num_layers])

    # ---- construction ----
    @classmethod
    def from_hf(cls, path: str | Path | dict[str, Any]) -> ModelConfig:
        """From a checkpoint directory, a config.json path, or an already-parsed dict."""
        if isinstance(path, dict):
            raw, where = path, "config"
        else:
            p = Path(path)
            p = p / "config.json" if p.is_dir() else p
            where = str(p)
            try:
                raw = json.loads(p.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{where}: not found (a model directory needs config.json)") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: expected a JSON object, found {type(raw).__name__}")
        try:
            return cls(**_parse(raw))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_official_dict(self) -> dict[str, Any]:
        """config.json in the official DeepSeek spelling (what `init-tiny` writes)."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window,
            "compress_ratios": [KIND_TO_CODE[k] for k in self.layer_types] + [0],  # + the MTP layer
            "compress_rate_csa": self.compress_rate_csa,
            "compress_rate_hca": self.compress_rate_hca,
            "num_hash_layers": sum(k == HASH_MOE for k in self.mlp_layer_types),
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "scoring_func": self.scoring_func,
            "topk_method": "noaux_tc",
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "swiglu_limit": self.swiglu_limit,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "num_nextn_predict_layers": 0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
        if self.rope_scaling is not None:
            r = self.rope_scaling
            d["rope_scaling"] = {"type": "yarn", "factor": r.factor, "beta_fast": r.beta_fast,
                                 "beta_slow": r.beta_slow,
                                 "original_max_position_embeddings": r.original_max_position_embeddings}
        if self.fp8_block_size is not None:
            d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                        "weight_block_size": list(self.fp8_block_size),
                                        "activation_scheme": "dynamic"}
        if self.expert_dtype is not None:
            d["expert_dtype"] = self.expert_dtype
        return d


def _check(ok: bool, field: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"field '{field}' = {value!r}: {why}")


def _get(raw: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    value = raw.get(key, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"field '{key}' = {value!r}: expected {kind.__name__}")
    return value


def _parse(raw: dict[str, Any]) -> dict[str, Any]:
    d = ModelConfig()  # defaults = V4-Flash
    n = _get(raw, "num_hidden_layers", d.num_hidden_layers, int)
    out: dict[str, Any] = {"num_hidden_layers": n}
    for key, kind in [("vocab_size", int), ("hidden_size", int), ("moe_intermediate_size", int),
                      ("num_attention_heads", int), ("head_dim", int), ("q_lora_rank", int), ("o_groups", int),
                      ("o_lora_rank", int), ("sliding_window", int), ("rope_theta", float),
                      ("compress_rope_theta", float), ("max_position_embeddings", int), ("index_n_heads", int),
                      ("index_head_dim", int), ("index_topk", int), ("hc_mult", int), ("hc_sinkhorn_iters", int),
                      ("hc_eps", float), ("n_routed_experts", int), ("n_shared_experts", int),
                      ("num_experts_per_tok", int), ("scoring_func", str), ("norm_topk_prob", bool),
                      ("routed_scaling_factor", float), ("swiglu_limit", float), ("rms_norm_eps", float),
                      ("bos_token_id", int)]:
        out[key] = _get(raw, key, getattr(d, key), kind)
    if "num_local_experts" in raw and "n_routed_experts" not in raw:
        out["n_routed_experts"] = _get(raw, "num_local_experts", d.n_routed_experts, int)
    if raw.get("num_key_value_heads", 1) != 1:
        raise ConfigError(f"field 'num_key_value_heads' = {raw['num_key_value_heads']!r}: V4 has one shared K=V head")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"field 'hidden_act' = {raw['hidden_act']!r}: only 'silu' is supported")

    eos = raw.get("eos_token_id", 1)
    eos_list = eos if isinstance(eos, list) else [eos]
    if not eos_list or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_list):
        raise ConfigError(f"field 'eos_token_id' = {eos!r}: expected an int or a list of ints")
    out["eos_token_ids"] = tuple(eos_list)

    # Rope dims: official `qk_rope_head_dim`, HF `partial_rotary_factor` (fraction of head_dim).
    head_dim = out["head_dim"]
    if raw.get("qk_rope_head_dim") is not None:
        out["qk_rope_head_dim"] = _get(raw, "qk_rope_head_dim", 64, int)
    elif raw.get("partial_rotary_factor") is not None:
        out["qk_rope_head_dim"] = int(head_dim * _get(raw, "partial_rotary_factor", 0.125, float))
    else:
        out["qk_rope_head_dim"] = head_dim // 8

    # Compression rates: HF `compress_rates` dict, official/legacy `compress_rate_csa/hca`.
    rates = raw.get("compress_rates") or {}
    if not isinstance(rates, dict):
        raise ConfigError(f"field 'compress_rates' = {rates!r}: expected an object")
    out["compress_rate_csa"] = _get(raw, "compress_rate_csa", rates.get("compressed_sparse_attention", 4), int)
    out["compress_rate_hca"] = _get(raw, "compress_rate_hca", rates.get("heavily_compressed_attention", 128), int)

    # Attention schedule: HF `layer_types` wins, else official `compress_ratios` codes.
    if raw.get("layer_types") is not None:
        out["layer_types"] = _schedule(raw, "layer_types", n, _HF_LAYER_TYPES, f"one of {sorted(_HF_LAYER_TYPES)}")
    elif raw.get("compress_ratios") is not None:
        out["layer_types"] = _schedule(raw, "compress_ratios", n, _CODE_TO_KIND,
                                       "layer codes are 0 (SWA), 4 (CSA), 128 (HCA)")
    else:
        raise ConfigError("neither 'compress_ratios' nor 'layer_types' is given: the attention schedule is unknown")

    # MoE schedule: HF `mlp_layer_types`, else official `num_hash_layers` (default 3).
    if raw.get("mlp_layer_types") is not None:
        out["mlp_layer_types"] = _schedule(raw, "mlp_layer_types", n, _HF_MLP_TYPES, f"one of {sorted(_HF_MLP_TYPES)}")
    else:
        n_hash = _get(raw, "num_hash_layers", 3, int)
        out["mlp_layer_types"] = tuple(HASH_MOE if i < n_hash else TOPK_MOE for i in range(n))

    out["rope_scaling"] = _parse_rope(raw, out)
    out.update(_parse_quant(raw))
    return out


def _schedule(raw: dict[str, Any], key: str, n: int, table: dict, expected: str) -> tuple[str, ...]:
    """A per-layer list (at least n entries; extra ones, such as the MTP layer's, are ignored)."""
    values = raw[key]
    if not isinstance(values, list) or len(values) < n:
        raise ConfigError(f"field '{key}' = {values!r}: expected a list of at least {n} entries")
    kinds = []
    for i, v in enumerate(values[:n]):
        if isinstance(v, bool) or not isinstance(v, (int, str)) or v not in table:
            raise ConfigError(f"field '{key}[{i}]' = {v!r}: {expected}")
        kinds.append(table[v])
    return tuple(kinds)


def _parse_rope(raw: dict[str, Any], out: dict[str, Any]) -> YarnScaling | None:
    # HF nests {"main": {...}, "compress": {...}}; the official file has a flat `rope_scaling`.
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("compress"), dict):
        main, comp = params.get("main") or {}, params["compress"]
        if "rope_theta" in main:
            out["rope_theta"] = float(main["rope_theta"])
        if "rope_theta" in comp:
            out["compress_rope_theta"] = float(comp["rope_theta"])
        scaling = comp
    else:
        scaling = raw.get("rope_scaling") or (params if isinstance(params, dict) else None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"field 'rope_scaling.type' = {kind!r}: only 'yarn' is supported")
    attention_factor = scaling.get("attention_factor", 1.0)
    if attention_factor not in (None, 1.0) or scaling.get("mscale") not in (None, 0, 1, 1.0):
        raise ConfigError(f"field 'rope_scaling' = {scaling!r}: V4 uses YaRN without mscale/attention_factor")
    try:
        factor = float(scaling["factor"])
        orig = int(scaling["original_max_position_embeddings"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"field 'rope_scaling' = {scaling!r}: needs 'factor' and "
                          "'original_max_position_embeddings'") from None
    if not (factor > 0 and math.isfinite(factor) and orig > 0):
        raise ConfigError(f"field 'rope_scaling' = {scaling!r}: factor and original length must be positive")
    return YarnScaling(factor=factor, original_max_position_embeddings=orig,
                       beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1))


def _parse_quant(raw: dict[str, Any]) -> dict[str, Any]:
    q = raw.get("quantization_config")
    if q is None:
        return {"fp8_block_size": None, "expert_dtype": raw.get("expert_dtype")}
    if not isinstance(q, dict):
        raise ConfigError(f"field 'quantization_config' = {q!r}: expected an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"field 'quantization_config.quant_method' = {method!r}: only 'fp8' is supported")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"field 'quantization_config.weight_block_size' = {block!r}: expected [rows, cols]")
    return {"fp8_block_size": (block[0], block[1]),
            "expert_dtype": raw.get("expert_dtype", q.get("expert_dtype"))}
