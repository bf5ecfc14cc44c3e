"""Roofline of a DeepSeek-V4 step (any config): bytes and FLOPs of every op, and the step's floor.

A step runs `new_tokens` tokens of each of several sequences (a decode step: 1 token each; a
prefill chunk: many), each sequence ending the step at `context` tokens. For every op of every
layer we count:

- weight bytes read, in the weights' format (`native`: FP8 dense with 1 byte + a UE8M0 scale per
  128x128 block, FP4 routed experts with 0.5 byte + a scale per 32 values, bf16 / fp32 for the rest
  as in the checkpoint; or `bf16`: everything dequantized to 2 bytes, fp32 parameters stay fp32);
  routed experts count only the distinct experts the step's tokens touch: with top-k of E experts
  and N tokens routed independently, E * (1 - (1 - k/E)^N) of them (expected value);
- other bytes: the state the attention reads (window rows, selected CSA entries, indexer keys, HCA
  entries) and writes (new rows), and the residual streams each layer reads and writes;
- FLOPs: 2 x tokens x parameters for every matmul; attention 4 x heads x head_dim per attended key
  (QK and PV); the CSA indexer 2 x index_heads x index_head_dim per compressed entry.

Keys a query at position p attends (spec §11): SWA min(p, W); CSA min(p, W) + min(top-k, p/4);
HCA min(p, W) + p/128. A prefill chunk counts its queries at the chunk's middle position.

floor = max(bytes / bandwidth, FLOPs / matmul rate) over the whole step (the ideal overlap of a
perfectly fused step). On G GPUs (tensor-parallel dense layers + expert-parallel experts, the ideal
split) bytes and FLOPs divide by G and each layer adds two collectives over the GPU link (the
attention output and the MoE combine: each moves about 2 x tokens x hidden x 2 bytes per GPU, plus a
fixed latency each). At batch 1 and 4K context this gives the hand counts of spec §11: 26.5 GFLOP
of weight matmuls and 11.2 GB of weights per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flashport.config import CSA, HCA, ModelConfig

WEIGHT_FORMATS = ("native", "bf16")


@dataclass(frozen=True)
class SeqWork:
    """One sequence in a step: `new_tokens` computed this step, `context` tokens after it."""

    new_tokens: int
    context: int

    def __post_init__(self) -> None:
        if self.new_tokens < 1 or self.context < self.new_tokens:
            raise ValueError(f"SeqWork needs 1 <= new_tokens <= context, got {self.new_tokens}, {self.context}")


@dataclass(frozen=True)
class Op:
    name: str  # e.g. "attn_proj", "experts", "attention"
    category: str  # "weights" (a matmul over weights) or "state" (attention / indexer over the cache)
    layers: int  # how many layers have it (1 for the head / embedding)
    weight_bytes: float
    other_bytes: float
    flops: float
    fp8_flops: float = 0.0  # of `flops`: matmuls whose weights are FP8 / FP4 (could run on FP8 cores)

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.other_bytes


@dataclass(frozen=True)
class StepFloor:
    bytes: float
    flops: float
    mem_s: float
    compute_s: float
    comm_s: float
    floor_s: float
    bound: str  # "memory", "compute" or "comm"

    def as_dict(self) -> dict:
        return {"bytes": self.bytes, "flops": self.flops, "mem_ms": self.mem_s * 1e3,
                "compute_ms": self.compute_s * 1e3, "comm_ms": self.comm_s * 1e3, "floor_ms": self.floor_s * 1e3,
                "bound": self.bound}


def _matrix_bytes(rows: int, cols: int, fmt: str, block: tuple[int, int] | None) -> float:
    n = rows * cols
    if fmt == "fp8":
        bo, bi = block or (128, 128)
        return n + math.ceil(rows / bo) * math.ceil(cols / bi)
    if fmt == "fp4":
        return n / 2 + n / 32
    if fmt == "fp32":
        return 4 * n
    return 2 * n


def expected_distinct_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Expected distinct experts hit when each of `num_tokens` tokens picks `top_k` of `num_experts`."""
    if num_tokens <= 0:
        return 0.0
    return num_experts * (1 - (1 - top_k / num_experts) ** num_tokens)


def attended_keys(cfg: ModelConfig, layer: int, position: float) -> float:
    """Keys a query at `position` (tokens in context including itself) attends in `layer`."""
    kind = cfg.layer_types[layer]
    keys = min(position, cfg.sliding_window)
    if kind == CSA:
        keys += min(cfg.index_topk, position / cfg.compress_rate_csa)
    elif kind == HCA:
        keys += position / cfg.compress_rate_hca
    return keys


def step_ops(cfg: ModelConfig, seqs: list[SeqWork], weights: str = "native", kv_bytes: int = 2,
             act_bytes: int = 2) -> list[Op]:
    """Bytes and FLOPs of every op of one step over `seqs`, summed per op kind over the layers."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights = {weights!r}: expected one of {WEIGHT_FORMATS}")
    if not seqs:
        raise ValueError("a step needs at least one sequence")
    native = weights == "native"
    block = cfg.fp8_block_size
    dense = "fp8" if native and block is not None else "bf16"
    expert = ("fp4" if cfg.expert_dtype == "fp4" else dense) if native else "bf16"
    H, I, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    nh, D, W = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    ih, idim = cfg.index_n_heads, cfg.index_head_dim
    hc = cfg.hc_mult
    N = sum(s.new_tokens for s in seqs)
    B = len(seqs)

    acc: dict[str, list[float]] = {}  # name -> [layers, weight_bytes, other_bytes, flops, fp8_flops]
    category = {}

    def add(name: str, cat: str, wbytes: float = 0.0, obytes: float = 0.0, flops: float = 0.0,
            fp8: bool = False, layers: int = 1) -> None:
        a = acc.setdefault(name, [0, 0.0, 0.0, 0.0, 0.0])
        category[name] = cat
        a[0] += layers
        a[1] += wbytes
        a[2] += obytes
        a[3] += flops
        a[4] += flops if fp8 else 0.0

    def matmul(name: str, shapes: list[tuple[int, int]], fmt: str, tokens: int = N) -> None:
        params = sum(r * c for r, c in shapes)
        add(name, "weights", sum(_matrix_bytes(r, c, fmt, block) for r, c in shapes), 0.0, 2.0 * tokens * params,
            fp8=fmt in ("fp8", "fp4"))

    mixes = (2 + hc) * hc
    for layer in range(cfg.num_hidden_layers):
        kind = cfg.layer_types[layer]
        og, olr = cfg.o_groups, cfg.o_lora_rank
        matmul("attn_proj", [(cfg.q_lora_rank, H), (nh * D, cfg.q_lora_rank), (D, H),
                             (og * olr, nh * D // og), (H, og * olr)], dense)
        if kind in (CSA, HCA):
            width = 2 * D if kind == CSA else D
            rate = cfg.compress_rate_csa if kind == CSA else cfg.compress_rate_hca
            matmul("compressor", [(width, H), (width, H)], "bf16")
            add("compressor", "weights", 4.0 * rate * width)  # position bias (fp32)
        if kind == CSA:
            matmul("indexer_proj", [(ih * idim, cfg.q_lora_rank)], dense)
            matmul("indexer_proj", [(ih, H), (2 * idim, H), (2 * idim, H)], "bf16")
        matmul("router", [(E, H)], "bf16")
        distinct = expected_distinct_experts(E, k, N)
        per_expert = 2 * _matrix_bytes(I, H, expert, block) + _matrix_bytes(H, I, expert, block)
        add("experts", "weights", distinct * per_expert, 0.0, 2.0 * N * k * 3 * H * I, fp8=expert != "bf16")
        if cfg.n_shared_experts:
            matmul("shared_expert", [(I, H), (I, H), (H, I)], dense)
        matmul("mhc", [(mixes, hc * H), (mixes, hc * H)], "fp32")
        # residual streams: read and written by each of the two sub-blocks
        add("mhc", "weights", 0.0, 2 * 2 * N * hc * H * act_bytes)

        # attention core and indexer, per sequence (they read each sequence's own state)
        att_flops = att_bytes = idx_flops = idx_bytes = 0.0
        for s in seqs:
            T, L = s.new_tokens, s.context
            mid = L - (T - 1) / 2  # the chunk's middle query position
            att_flops += T * attended_keys(cfg, layer, mid) * 4 * nh * D
            rows = min(L, W + T - 1)  # window rows (and the chunk's own rows)
            if kind == CSA:
                rows += min(L / cfg.compress_rate_csa, cfg.index_topk * T)
            elif kind == HCA:
                rows += L / cfg.compress_rate_hca
            att_bytes += rows * D * kv_bytes + T * D * kv_bytes  # read + the new window rows written
            if kind == CSA:
                entries = L / cfg.compress_rate_csa
                idx_flops += T * 2 * ih * idim * (entries if T == 1 else (mid / cfg.compress_rate_csa))
                idx_bytes += entries * idim * kv_bytes
        add("attention", "state", 0.0, att_bytes, att_flops)
        if kind == CSA:
            add("indexer", "state", 0.0, idx_bytes, idx_flops)
    # the bookkeeping of layers per op: count layers, not calls
    for name in acc:
        acc[name][0] = sum(1 for i in range(cfg.num_hidden_layers) if _has(cfg, i, name))

    # outside the layers: embedding rows, the hc head, the final norm and the vocabulary head
    add("embed", "weights", N * H * 2)
    matmul("head", [(hc, hc * H)], "fp32", tokens=B)
    matmul("head", [(cfg.vocab_size, H)], "bf16", tokens=B)  # one logits row per sequence
    acc["embed"][0] = acc["head"][0] = 1
    return [Op(name, category[name], int(a[0]), a[1], a[2], a[3], a[4]) for name, a in acc.items()]


def _has(cfg: ModelConfig, layer: int, name: str) -> bool:
    kind = cfg.layer_types[layer]
    if name in ("compressor",):
        return kind in (CSA, HCA)
    if name in ("indexer_proj", "indexer"):
        return kind == CSA
    if name == "shared_expert":
        return bool(cfg.n_shared_experts)
    return name not in ("embed", "head")


def decode_ops(cfg: ModelConfig, batch: int, context: int, **kw) -> list[Op]:
    return step_ops(cfg, [SeqWork(1, context)] * batch, **kw)


def prefill_ops(cfg: ModelConfig, batch: int, prompt: int, **kw) -> list[Op]:
    """A whole prompt of `prompt` tokens for each of `batch` sequences, in one step."""
    return step_ops(cfg, [SeqWork(prompt, prompt)] * batch, **kw)


def totals(ops: list[Op]) -> dict[str, float]:
    return {
        "weight_bytes": sum(o.weight_bytes for o in ops),
        "other_bytes": sum(o.other_bytes for o in ops),
        "bytes": sum(o.bytes for o in ops),
        "weight_flops": sum(o.flops for o in ops if o.category == "weights"),
        "state_flops": sum(o.flops for o in ops if o.category == "state"),
        "flops": sum(o.flops for o in ops),
        "fp8_flops": sum(o.fp8_flops for o in ops),
    }


def floor(ops: list[Op], tb_s: float, tflops: float, *, num_gpus: int = 1, fp8_tflops: float | None = None,
          link_gb_s: float | None = None, num_tokens: int = 0, hidden: int = 0, num_layers: int = 0,
          collective_latency_us: float = 10.0) -> StepFloor:
    """The time floor of a step: max(bytes / bandwidth, FLOPs / rate) per GPU, plus collectives.

    `fp8_tflops` given: FLOPs of FP8/FP4-weight matmuls run at that rate (FP8 cores), the rest at
    `tflops`; else all at `tflops` (weight-only dequantization into bf16 MMA, what our kernels do).
    On `num_gpus` > 1 the split is ideal and each layer adds two collectives of ~2 x tokens x
    hidden x 2 bytes over `link_gb_s`, each with `collective_latency_us` of latency.
    """
    if tb_s <= 0 or tflops <= 0 or num_gpus < 1:
        raise ValueError("floor needs positive bandwidth, rate and GPU count")
    t = totals(ops)
    g = num_gpus
    mem = t["bytes"] / g / (tb_s * 1e12)
    if fp8_tflops:
        comp = ((t["flops"] - t["fp8_flops"]) / (tflops * 1e12) + t["fp8_flops"] / (fp8_tflops * 1e12)) / g
    else:
        comp = t["flops"] / g / (tflops * 1e12)
    comm = 0.0
    if g > 1:
        if not link_gb_s:
            raise ValueError("a multi-GPU floor needs link_gb_s")
        per = 2 * num_tokens * hidden * 2 * (g - 1) / g
        comm = num_layers * 2 * (per / (link_gb_s * 1e9) + collective_latency_us * 1e-6)
    body = max(mem, comp)
    bound = "memory" if mem >= comp else "compute"
    if comm > body:
        bound = "comm"
    # collectives overlap nothing in this model: they add to the step
    return StepFloor(t["bytes"] / g, t["flops"] / g, mem, comp, comm, body + comm, bound)


def step_floor(cfg: ModelConfig, seqs: list[SeqWork], tb_s: float, tflops: float, *, num_gpus: int = 1,
               link_gb_s: float | None = None, weights: str = "native", fp8_tflops: float | None = None,
               kv_bytes: int = 2) -> StepFloor:
    ops = step_ops(cfg, seqs, weights=weights, kv_bytes=kv_bytes)
    return floor(ops, tb_s, tflops, num_gpus=num_gpus, fp8_tflops=fp8_tflops, link_gb_s=link_gb_s,
                 num_tokens=sum(s.new_tokens for s in seqs), hidden=cfg.hidden_size,
                 num_layers=cfg.num_hidden_layers)


def ops_table(ops: list[Op]) -> list[dict]:
    """Rows for printing / JSON: per op, GB and GFLOP."""
    return [{"op": o.name, "category": o.category, "layers": o.layers, "weight_gb": o.weight_bytes / 1e9,
             "other_gb": o.other_bytes / 1e9, "gflop": o.flops / 1e9} for o in ops]
