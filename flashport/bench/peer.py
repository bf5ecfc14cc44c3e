"""The peer baseline: the same workloads through transformers' `DeepseekV4ForCausalLM.generate`.

transformers has no FP8/FP4 kernels for V4's experts, so the peer holds every weight dequantized in
bf16: about 13.2 GB per V4-Flash layer, against 3.4 GB in our native format. The model is built
with random weights from the same config cut to `num_layers` (chosen to fit: see `layers_that_fit`),
the hash-routing table randomised (transformers initialises it to zeros, which would send every
token to the same experts and flatter the peer), on the GPU the engine has just released.

Measured, as for our engine: a single request at ISL (TTFT = a generate of 1 new token; TPOT =
(time of `osl` tokens - time of 1) / (osl - 1)), and a batch of `batch` requests decoding (step
time likewise from two generates). Every figure names its layer count; the report compares per
layer (time x ours' layers / peer's layers), which is exact for the layers and approximate for
the head (the head is counted once in each, unscaled: it favours neither much at 20 layers).
"""

from __future__ import annotations

import gc
import time

from flashport.config import ModelConfig

GiB = 2**30


def layer_bytes_bf16(cfg: ModelConfig) -> float:
    """bf16 bytes of one average layer of `cfg` and of everything outside the layers."""
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    nh, D = cfg.num_attention_heads, cfg.head_dim
    attn = (H * cfg.q_lora_rank + cfg.q_lora_rank * nh * D + H * D + nh * D * cfg.o_lora_rank
            + cfg.o_groups * cfg.o_lora_rank * H)
    experts = (E + cfg.n_shared_experts) * 3 * H * I + E * H
    comp = 2 * 2 * D * H + cfg.index_n_heads * cfg.index_head_dim * cfg.q_lora_rank  # CSA upper bound
    return 2.0 * (attn + experts + comp)


def layers_that_fit(cfg: ModelConfig, free_bytes: float, reserve_bytes: float, cap: int) -> int:
    outside = 2.0 * 2 * cfg.vocab_size * cfg.hidden_size
    n = int((free_bytes - reserve_bytes - outside) // layer_bytes_bf16(cfg))
    return max(0, min(n, cap, cfg.num_hidden_layers))


def _build(cfg: ModelConfig, device, dtype):
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    raw = cfg.to_official_dict()
    raw["compress_ratios"] = raw["compress_ratios"][: cfg.num_hidden_layers]
    hf_cfg = DeepseekV4Config(**raw)
    with torch.device(device):
        model = DeepseekV4ForCausalLM._from_config(hf_cfg, dtype=dtype).eval()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                V, k = buf.shape
                buf.copy_(torch.rand(V, cfg.n_routed_experts, generator=g, device=device).argsort(dim=1)[:, :k])
    return model


def _timed_generate(model, ids, new_tokens: int, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def run_peer(cfg: ModelConfig, *, device, num_layers: int | None = None, isl: int = 4096, osl: int = 16,
             batch: int = 64, batch_isl: int = 512, max_layers: int = 8, reserve_gib: float = 24.0,
             deadline: float | None = None, log=print) -> dict:
    """Time transformers on (1 request, `isl`) and (`batch` requests, `batch_isl`); see module doc.
    `deadline` (time.perf_counter() value): the batch run is skipped when it would end after it."""
    import torch
    import transformers

    device = torch.device(device)
    res: dict = {"transformers": transformers.__version__, "dtype": "bfloat16 (all weights dequantized)",
                 "isl": isl, "osl": osl, "batch": batch, "batch_isl": batch_isl}
    if num_layers is None:
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info()
            num_layers = layers_that_fit(cfg, free, reserve_gib * GiB, max_layers)
            res["fit"] = (f"{free / GiB:.1f} GiB free, {layer_bytes_bf16(cfg) / GiB:.1f} GiB per bf16 layer, "
                          f"{reserve_gib:.0f} GiB kept for activations and cache: {num_layers} layers (cap {max_layers})")
        else:
            num_layers = min(cfg.num_hidden_layers, max_layers)
    if num_layers < 1:
        res["skipped"] = "no layer fits in the free memory"
        return res
    sub = cfg.with_num_layers(num_layers)
    res["num_layers"] = num_layers
    t0 = time.perf_counter()
    model = _build(sub, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    res["load_s"] = time.perf_counter() - t0
    log(f"peer: transformers {transformers.__version__}, {num_layers} layers bf16, built in {res['load_s']:.1f} s")
    g = torch.Generator().manual_seed(1)
    try:
        ids = torch.randint(2, sub.vocab_size, (1, isl), generator=g).to(device)
        _timed_generate(model, ids[:, :16], 2, device)  # warm-up
        t1 = _timed_generate(model, ids, 1, device)
        tn = _timed_generate(model, ids, osl, device)
        res["single"] = {"ttft_ms": t1 * 1e3, "tpot_ms": (tn - t1) / (osl - 1) * 1e3, "e2el_ms": tn * 1e3}
        log(f"peer: c1 ISL {isl}: TTFT {t1 * 1e3:.0f} ms, TPOT {res['single']['tpot_ms']:.1f} ms")
        # the batch run costs about two prefills of batch x batch_isl tokens plus the decode steps
        need = 2 * (t1 * batch * batch_isl / isl) + osl * (tn - t1) / max(1, osl - 1) * 4
        if deadline is not None and time.perf_counter() + need > deadline:
            res["batch_skipped"] = f"time budget (needs ~{need:.0f} s)"
            return res
        ids = torch.randint(2, sub.vocab_size, (batch, batch_isl), generator=g).to(device)
        b1 = _timed_generate(model, ids, 1, device)
        bn = _timed_generate(model, ids, osl, device)
        step = (bn - b1) / (osl - 1)
        res["batch_run"] = {"prefill_s": b1, "prompt_tok_s": batch * batch_isl / b1, "step_ms": step * 1e3,
                            "decode_tok_s": batch / step}
        log(f"peer: batch {batch} ISL {batch_isl}: prefill {b1:.2f} s, decode step {step * 1e3:.0f} ms")
    except torch.OutOfMemoryError as e:  # report what was measured
        res["error"] = f"out of memory: {str(e).splitlines()[0]}"
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res
