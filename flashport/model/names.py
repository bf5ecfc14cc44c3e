"""Checkpoint tensor names -> flashport's internal parameter names (spec §8.2, §8.5).

Three on-disk spellings are accepted, in any mix:

- official DeepSeek (`embed.weight`, `layers.3.attn.wq_a.weight` + `.scale`, `layers.3.hc_attn_fn`,
  `layers.3.ffn.experts.7.w1.weight`, `mtp.0.*`);
- transformers' default `save_pretrained` output: the official names inside the layers under a
  `model.` prefix, but `model.embed_tokens.weight`, `model.norm.weight`, `model.hc_head.hc_fn`,
  top-level `head.weight`, and the attention kv norm written as `attn.norm.weight`;
- transformers' own names (`save_original_format=False`): `model.layers.3.self_attn.q_a_proj.weight`,
  `.weight_scale_inv` for scales, fused experts `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj`.

Internal names are the official ones except: mHC parameters live in submodules (`hc_attn.fn`),
routed experts are stacked per layer (`ffn.experts.w13` = [w1; w3] rows, `ffn.experts.w2`).
A mapped tensor lands in a `Target`: a whole parameter, expert e's slice of a stacked one, or one
half of expert e's w13 rows (w1 -> rows [0, I), w3 -> rows [I, 2I); the same for its scale rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str  # internal parameter name, e.g. "layers.3.ffn.experts.w13.weight"
    layer: int | None  # decoder layer index; None for top-level tensors
    expert: int | None = None  # index into dim 0 of a stacked expert parameter; None: the whole parameter
    half: int | None = None  # 0: first half of dim -2 (w1), 1: second half (w3); None: all rows

    def describe(self) -> str:
        where = self.name
        if self.expert is not None:
            where += f"[expert {self.expert}]"
        if self.half is not None:
            where += " rows of " + ("w1" if self.half == 0 else "w3")
        return where


# Linear layers inside `layers.N.`: internal module path -> on-disk module paths (official first,
# then transformers'). Each takes `.weight`, and `.scale` / `.weight_scale_inv` when FP8.
_LAYER_LINEARS: dict[str, tuple[str, ...]] = {
    "attn.wq_a": ("attn.wq_a", "self_attn.q_a_proj"),
    "attn.wq_b": ("attn.wq_b", "self_attn.q_b_proj"),
    "attn.wkv": ("attn.wkv", "self_attn.kv_proj"),
    "attn.wo_a": ("attn.wo_a", "self_attn.o_a_proj"),
    "attn.wo_b": ("attn.wo_b", "self_attn.o_b_proj"),
    "attn.compressor.wkv": ("attn.compressor.wkv", "self_attn.compressor.kv_proj"),
    "attn.compressor.wgate": ("attn.compressor.wgate", "self_attn.compressor.gate_proj"),
    "attn.indexer.compressor.wkv": ("attn.indexer.compressor.wkv", "self_attn.compressor.indexer.kv_proj"),
    "attn.indexer.compressor.wgate": ("attn.indexer.compressor.wgate", "self_attn.compressor.indexer.gate_proj"),
    "attn.indexer.wq_b": ("attn.indexer.wq_b", "self_attn.compressor.indexer.q_b_proj"),
    "attn.indexer.weights_proj": ("attn.indexer.weights_proj", "self_attn.compressor.indexer.scorer.weights_proj"),
    "ffn.gate": ("ffn.gate", "mlp.gate"),  # router weight (never quantized)
    "ffn.shared_experts.w1": ("ffn.shared_experts.w1", "mlp.shared_experts.gate_proj"),
    "ffn.shared_experts.w2": ("ffn.shared_experts.w2", "mlp.shared_experts.down_proj"),
    "ffn.shared_experts.w3": ("ffn.shared_experts.w3", "mlp.shared_experts.up_proj"),
}

# Other tensors inside `layers.N.`: internal name -> on-disk names.
_LAYER_TENSORS: dict[str, tuple[str, ...]] = {
    "hc_attn.fn": ("hc_attn_fn", "attn_hc.fn"),
    "hc_attn.base": ("hc_attn_base", "attn_hc.base"),
    "hc_attn.scale": ("hc_attn_scale", "attn_hc.scale"),
    "hc_ffn.fn": ("hc_ffn_fn", "ffn_hc.fn"),
    "hc_ffn.base": ("hc_ffn_base", "ffn_hc.base"),
    "hc_ffn.scale": ("hc_ffn_scale", "ffn_hc.scale"),
    "attn_norm.weight": ("attn_norm.weight", "input_layernorm.weight"),
    "ffn_norm.weight": ("ffn_norm.weight", "post_attention_layernorm.weight"),
    "attn.attn_sink": ("attn.attn_sink", "self_attn.sinks"),
    "attn.q_norm.weight": ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    # `attn.norm.weight`: what transformers' save_pretrained writes (its kv_norm -> norm reverse rename).
    "attn.kv_norm.weight": ("attn.kv_norm.weight", "attn.norm.weight", "self_attn.kv_norm.weight"),
    "attn.compressor.ape": ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    "attn.compressor.norm.weight": ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    "attn.indexer.compressor.ape": ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    "attn.indexer.compressor.norm.weight": ("attn.indexer.compressor.norm.weight",
                                            "self_attn.compressor.indexer.kv_norm.weight"),
    "ffn.gate.bias": ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    "ffn.gate.tid2eid": ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    # transformers' fused routed experts [E, 2I, H] / [E, H, I] (+ their FP8/FP4 scales).
    "ffn.experts.w13.weight": ("mlp.experts.gate_up_proj",),
    "ffn.experts.w13.scale": ("mlp.experts.gate_up_proj_scale_inv",),
    "ffn.experts.w2.weight": ("mlp.experts.down_proj",),
    "ffn.experts.w2.scale": ("mlp.experts.down_proj_scale_inv",),
}

# Top-level tensors (after an optional `model.` prefix): internal name -> on-disk names.
_TOP_TENSORS: dict[str, tuple[str, ...]] = {
    "embed.weight": ("embed.weight", "embed_tokens.weight"),
    "head.weight": ("head.weight", "lm_head.weight"),
    "norm.weight": ("norm.weight",),
    "hc_head.fn": ("hc_head_fn", "hc_head.hc_fn"),
    "hc_head.base": ("hc_head_base", "hc_head.hc_base"),
    "hc_head.scale": ("hc_head_scale", "hc_head.hc_scale"),
}

# Official per-expert tensors: `ffn.experts.{e}.{w1|w2|w3}.{weight|scale}` (also `weight_scale_inv`).
_EXPERT_RE = re.compile(r"ffn\.experts\.(\d+)\.(w1|w2|w3)\.(weight|scale|weight_scale_inv)")
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
_MTP_RE = re.compile(r"(model\.)?mtp\.")
# Expert projection -> (stacked internal module, half of its rows).
_EXPERT_SLOT = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", None)}


def _invert(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for internal, spellings in table.items():
        for disk in spellings:
            assert out.get(disk, internal) == internal, f"name table: {disk!r} maps to two parameters"
            out[disk] = internal
    return out


def _layer_aliases() -> dict[str, str]:
    table = dict(_LAYER_TENSORS)
    for internal, modules in _LAYER_LINEARS.items():
        table[internal + ".weight"] = tuple(m + ".weight" for m in modules)
        table[internal + ".scale"] = tuple(m + s for m in modules for s in (".scale", ".weight_scale_inv"))
    return _invert(table)


_LAYER_ALIASES = _layer_aliases()  # on-disk leaf inside a layer -> internal leaf
_TOP_ALIASES = _invert(_TOP_TENSORS)


def is_mtp(name: str) -> bool:
    """The multi-token-prediction block (`mtp.*`): not used by this engine, skipped on load."""
    return _MTP_RE.match(name) is not None


def map_name(name: str) -> Target | None:
    """Where a checkpoint tensor goes, or None when the name is not a V4 tensor in any scheme."""
    key = name.removeprefix("model.")
    m = _LAYER_RE.fullmatch(key)
    if m is None:
        internal = _TOP_ALIASES.get(key)
        return None if internal is None else Target(internal, None)
    layer, leaf = int(m.group(1)), m.group(2)
    prefix = f"layers.{layer}."
    internal = _LAYER_ALIASES.get(leaf)
    if internal is not None:
        return Target(prefix + internal, layer)
    e = _EXPERT_RE.fullmatch(leaf)
    if e is not None:
        stacked, half = _EXPERT_SLOT[e.group(2)]
        kind = "weight" if e.group(3) == "weight" else "scale"
        return Target(f"{prefix}ffn.experts.{stacked}.{kind}", layer, expert=int(e.group(1)), half=half)
    return None


def official_name(internal: str) -> str:
    """The official spelling of an internal parameter name (stacked experts keep the internal name)."""
    m = _LAYER_RE.fullmatch(internal)
    if m is None:
        return _TOP_TENSORS.get(internal, (internal,))[0]
    leaf = m.group(2)
    spellings = _LAYER_TENSORS.get(leaf)
    if spellings is not None and not leaf.startswith("ffn.experts."):
        return f"layers.{m.group(1)}.{spellings[0]}"
    return internal
