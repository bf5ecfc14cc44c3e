"""Checkpoint loading: quant formats, name schemes, bit-exact parity with transformers, bad checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from flashport.config import ModelConfig
from flashport.errors import CheckpointError, ConfigError
from flashport.model import loader
from flashport.model.loader import load_checkpoint, load_model
from flashport.model.names import Target, map_name
from flashport.model.quant import (dequant_fp4, dequant_fp8_blocks, e8m0_to_float, fp8_fn_to_fnuz, quant_fp4,
                                   quant_fp8_blocks)
from flashport.model.tiny import official_layout, random_weights, tiny_config, write_official_checkpoint

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------ helpers
def _bits(t: torch.Tensor) -> torch.Tensor:
    """Same-size integer view, so comparisons are bit for bit (-0 != +0, NaN == NaN)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().contiguous().view(ints[t.element_size()])


def _slot(model: torch.nn.Module, t: Target) -> torch.Tensor:
    return loader._slot(dict(model.named_parameters())[t.name], t)


def _dense(model: torch.nn.Module, t: Target, dtype: torch.dtype) -> torch.Tensor:
    """A parameter of a quantized in-memory model, dequantized (whole tensor targets only)."""
    params = dict(model.named_parameters())
    w = params[t.name]
    scale = params.get(t.name.removesuffix("weight") + "scale")
    if scale is None:
        return w.data
    if w.dtype == torch.uint8:
        return dequant_fp4(w.data, scale.data, dtype)
    return dequant_fp8_blocks(w.data, scale.data, dtype)


def _assert_matches_hf(model: torch.nn.Module, hf_state: dict[str, torch.Tensor], exact_bits: bool = True,
                       dequant: torch.dtype | None = None) -> None:
    seen: set[str] = set()
    for name, ref in hf_state.items():
        t = map_name(name)
        assert t is not None and t.expert is None and t.half is None, name
        ours = _dense(model, t, dequant) if dequant is not None else _slot(model, t)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, (name, ours.dtype, ref.dtype, ours.shape)
        same = torch.equal(_bits(ours), _bits(ref)) if exact_bits else torch.equal(ours, ref)
        assert same, f"{name} differs"
        seen.add(t.name)
    unfilled = {n for n, p in model.named_parameters() if p.dtype != torch.uint8 or not n.endswith(".scale")}
    assert unfilled - seen == set()


def _hf_tiny_config(vocab: int = 512):
    return transformers.DeepseekV4Config(
        vocab_size=vocab, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=1, head_dim=64, q_lora_rank=64, qk_rope_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, compress_ratios=[0, 0, 4, 128, 4, 0],
        compress_rate_hca=8, num_hash_layers=2, sliding_window=8, o_groups=2, o_lora_rank=32,
        index_n_heads=8, index_head_dim=32, index_topk=4,
        rope_scaling={"type": "yarn", "factor": 16, "beta_fast": 32, "beta_slow": 1,
                      "original_max_position_embeddings": 64},
        max_position_embeddings=1024)


# ------------------------------------------------------------------ quant formats
def test_fp8_block_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 160, generator=g) * torch.logspace(-3, 1, 160)  # blocks of very different scale
    q, s = quant_fp8_blocks(x, (32, 32))
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.uint8 and s.shape == (3, 5)
    back = dequant_fp8_blocks(q, s, torch.float32)
    block_max = x.abs().unflatten(0, (3, 32)).unflatten(-1, (5, 32)).amax(dim=(1, 3))
    tol = block_max.repeat_interleave(32, 0).repeat_interleave(32, 1) / 16  # 3 mantissa bits
    assert ((back - x).abs() <= tol).all()


def test_fp8_blocks_on_dims_that_are_not_multiples_of_the_block():
    # 160 rows with 128-row blocks: the grid has 2 rows of scales, read back as 80-row blocks
    # (how transformers derives the block size); quantization must use the same grid.
    x = torch.randn(160, 96, generator=torch.Generator().manual_seed(3))
    x[80:128] *= 100
    q, s = quant_fp8_blocks(x, (128, 128))
    assert s.shape == (2, 1)
    back = dequant_fp8_blocks(q, s, torch.float32)
    assert ((back - x).abs() <= x.abs().unflatten(0, (2, 80)).amax(dim=(1, 2)).repeat_interleave(80)[:, None] / 16).all()


def test_fp4_round_trip_and_nibble_order():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, generator=g)
    packed, s = quant_fp4(x)
    assert packed.shape == (8, 32) and s.shape == (8, 2)
    back = dequant_fp4(packed, s, torch.float32)
    step = e8m0_to_float(s).repeat_interleave(32, dim=-1)  # largest E2M1 gap (4 -> 6) is 2: error <= 1 step
    assert ((back - x).abs() <= step).all()
    # Hand-made bytes: low nibble = even column. 0x21 -> (0.5, 1.0); 0x9A -> (-1.0, -0.5); 0x7F -> (-6, 6).
    row = torch.zeros(1, 16, dtype=torch.uint8)
    row[0, :3] = torch.tensor([0x21, 0x9A, 0x7F], dtype=torch.uint8)
    vals = dequant_fp4(row, torch.tensor([[127]], dtype=torch.uint8), torch.float32)
    assert vals[0, :6].tolist() == [0.5, 1.0, -1.0, -0.5, -6.0, 6.0]
    vals = dequant_fp4(row.view(torch.int8), torch.tensor([[128]], dtype=torch.uint8), torch.float32)
    assert vals[0, :2].tolist() == [1.0, 2.0]  # int8 storage, scale 2^1


def test_e8m0_extreme_exponents():
    raw = torch.tensor([0, 1, 127, 200, 254], dtype=torch.uint8)
    want = torch.tensor([math.ldexp(1.0, int(b) - 127) for b in raw], dtype=torch.float32)
    assert torch.equal(e8m0_to_float(raw), want)
    assert torch.equal(e8m0_to_float(raw.view(torch.float8_e8m0fnu)), want)
    assert want[1] == 2.0 ** -126 and want[3] == 2.0 ** 73 and want[4] == 2.0 ** 127


def test_fp8_fn_to_fnuz_same_values():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 64, generator=g)
    x[0, 0] = -1e-12  # rounds to -0 (0x80), which is NaN in fnuz and must become +0
    q, s = quant_fp8_blocks(x, (32, 32))
    qz, sz = fp8_fn_to_fnuz(q, s)
    assert qz.dtype == torch.float8_e4m3fnuz and torch.equal(sz, s + 1)
    assert torch.equal(dequant_fp8_blocks(qz, sz, torch.float32), dequant_fp8_blocks(q, s, torch.float32))


# ------------------------------------------------------------------ official format vs transformers
@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The tiny demo model in the official format, small shards (pairs straddle files), plus one mtp tensor."""
    cfg = tiny_config()
    tensors = random_weights(cfg, seed=0)
    tensors["mtp.0.enorm.weight"] = torch.ones(cfg.hidden_size, dtype=torch.bfloat16)
    out = write_official_checkpoint(tmp_path_factory.mktemp("official"), cfg, tensors, shard_size_bytes=700_000)
    assert len(list(out.glob("*.safetensors"))) >= 5
    return out


@pytest.fixture(scope="module")
def hf_official_state(official):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        official, dtype=torch.bfloat16, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_dequantize_on_load_is_bit_exact_with_transformers(official, hf_official_state):
    model, cfg = load_model(official, device="cpu", dtype=torch.bfloat16, dequantize=True, progress=False)
    assert cfg.fp8_block_size == (32, 32) and cfg.expert_dtype == "fp4"  # the checkpoint's config
    assert model.cfg.fp8_block_size is None and model.cfg.expert_dtype is None
    _assert_matches_hf(model, hf_official_state)


def test_quantized_load_dequantizes_to_transformers(official, hf_official_state):
    model, _ = load_model(official, device="cpu", dtype=torch.bfloat16, fp8_dtype=torch.float8_e4m3fn,
                          progress=False)
    assert model.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fn
    assert model.layers[0].ffn.experts.w13.weight.dtype == torch.uint8
    _assert_matches_hf(model, hf_official_state, dequant=torch.bfloat16)


def test_fnuz_load_gives_the_same_values(official, hf_official_state):
    model, _ = load_model(official, device="cpu", dtype=torch.bfloat16, fp8_dtype=torch.float8_e4m3fnuz,
                          progress=False)
    assert model.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fnuz
    _assert_matches_hf(model, hf_official_state, exact_bits=False, dequant=torch.bfloat16)  # -0 became +0


def test_report_and_num_layers(official):
    ckpt_cfg = ModelConfig.from_hf(official)
    from flashport.model.deepseek_v4 import DeepseekV4

    full = DeepseekV4(ckpt_cfg, torch.float32, device="cpu")
    report = load_checkpoint(full, official, ckpt_cfg, progress=False)
    assert report.skipped_mtp == 1 and report.skipped_dropped_layers == 0
    assert report.num_tensors == len(random_weights(ckpt_cfg)) and report.bytes_read > 0
    short, cfg = load_model(official, device="cpu", dtype=torch.float32, num_layers=3, progress=False)
    assert len(short.layers) == 3 and cfg.num_hidden_layers == 6
    full_params = dict(full.named_parameters())
    for name, p in short.named_parameters():
        assert torch.equal(_bits(p), _bits(full_params[name])), name


# ------------------------------------------------------------------ transformers' save_pretrained names
@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    torch.manual_seed(0)
    hf_cfg = _hf_tiny_config()
    model = transformers.DeepseekV4ForCausalLM(hf_cfg)
    with torch.no_grad():  # randomise everything, including what HF initialises to constants
        for name, t in model.state_dict().items():
            if t.dtype == torch.int64:
                t.copy_(torch.randint(0, hf_cfg.n_routed_experts, t.shape))
            else:
                t.copy_(torch.randn(t.shape) * 0.1)
    root = tmp_path_factory.mktemp("hf_saved")
    model.save_pretrained(root / "mixed")
    model.save_pretrained(root / "hf_names", save_original_format=False)
    return root, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("scheme", ["mixed", "hf_names"])
def test_transformers_save_pretrained_names(hf_saved, scheme):
    root, state = hf_saved
    if scheme == "mixed":  # the kv norm is written `attn.norm.weight`, experts per expert, head at top level
        from safetensors import safe_open

        with safe_open(str(root / scheme / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert {"model.layers.0.attn.norm.weight", "head.weight", "model.hc_head.hc_fn"} <= keys
        assert "model.layers.0.ffn.experts.3.w1.weight" in keys
    model, _ = load_model(root / scheme, device="cpu", dtype=torch.float32, progress=False)
    _assert_matches_hf(model, state)


# ------------------------------------------------------------------ dummy weights
def test_dummy_weights_give_finite_logits(official):
    model, _ = load_model(official, device="cpu", dtype=torch.float32, load_format="dummy", num_layers=4, seed=3)
    assert len(model.layers) == 4
    tid2eid = model.layers[0].ffn.gate.tid2eid
    assert 0 <= int(tid2eid.min()) and int(tid2eid.max()) < model.cfg.n_routed_experts
    logits = model(torch.tensor([1, 2, 3]), [3], [model.new_state()])
    assert logits.shape == (3, model.cfg.vocab_size) and torch.isfinite(logits).all()
    ids = torch.arange(40) % model.cfg.vocab_size  # long enough for compressed entries and top-k
    logits = model(ids, [40], [model.new_state()])
    assert torch.isfinite(logits).all() and logits.std() > 0.1
    plain, _ = load_model(official, device="cpu", dtype=torch.float32, load_format="dummy", dequantize=True)
    assert torch.isfinite(plain(torch.tensor([1, 2, 3]), [3], [plain.new_state()])).all()


# ------------------------------------------------------------------ bad checkpoints
@pytest.fixture(scope="module")
def small():
    cfg = tiny_config().with_num_layers(3)  # SWA+hash, CSA+hash, HCA+top-k
    return cfg, random_weights(cfg, seed=1)


def _write(tmp_path: Path, small, edit=None, shard_size: int = 400_000) -> Path:
    cfg, tensors = small
    tensors = dict(tensors)
    if edit is not None:
        edit(tensors)
    return write_official_checkpoint(tmp_path / "ckpt", cfg, tensors, shard_size_bytes=shard_size)


def _load_error(path: Path, err=CheckpointError) -> str:
    with pytest.raises(err) as e:
        load_model(path, device="cpu", dtype=torch.float32, progress=False)
    return str(e.value)


def test_small_checkpoint_loads(tmp_path, small):
    model, _ = load_model(_write(tmp_path, small), device="cpu", dtype=torch.float32, progress=False)
    assert len(model.layers) == 3


def test_missing_tensor(tmp_path, small):
    def edit(t):
        del t["layers.1.attn.q_norm.weight"]
        del t["layers.2.ffn.experts.5.w3.weight"], t["layers.2.ffn.experts.5.w3.scale"]
    msg = _load_error(_write(tmp_path, small, edit))
    assert "model.safetensors.index.json" in msg and "3 tensor(s) missing" in msg
    assert "layers.1.attn.q_norm.weight" in msg and "layers.2.ffn.experts.w13.weight[expert 5] rows of w3" in msg


def test_unexpected_tensor(tmp_path, small):
    msg = _load_error(_write(tmp_path, small, lambda t: t.update({"layers.0.attn.foo.weight": torch.ones(2)})))
    assert "unexpected" in msg and "layers.0.attn.foo.weight" in msg and ".safetensors" in msg
    # A real V4 name that this layer does not have: a gate bias in a hash-routed layer.
    msg = _load_error(_write(tmp_path, small, lambda t: t.update({"layers.0.ffn.gate.bias": torch.ones(8)})))
    assert "unexpected" in msg and "layers.0.ffn.gate.bias" in msg


def test_duplicate_tensor(tmp_path, small):
    msg = _load_error(_write(tmp_path, small, lambda t: t.update(
        {"model.layers.0.self_attn.sinks": t["layers.0.attn.attn_sink"].clone()})))
    assert "duplicate" in msg and "layers.0.attn.attn_sink" in msg
    # Fused transformers-style experts on top of the official per-expert tensors.
    msg = _load_error(_write(tmp_path, small, lambda t: t.update({
        "model.layers.2.mlp.experts.down_proj": torch.stack([t[f"layers.2.ffn.experts.{e}.w2.weight"]
                                                             for e in range(8)])})))
    assert "duplicate" in msg and "layers.2.ffn.experts.w2.weight" in msg


def test_wrong_shape(tmp_path, small):
    def edit(t):
        t["layers.0.attn.wkv.weight"] = t["layers.0.attn.wkv.weight"][:32].clone()
    msg = _load_error(_write(tmp_path, small, edit))
    assert "wrong shape" in msg and "layers.0.attn.wkv.weight" in msg and "[64, 256]" in msg and "[32, 256]" in msg


def test_wrong_dtype(tmp_path, small):
    def edit(t):
        t["layers.0.attn.wq_b.weight"] = t["layers.0.attn.wq_b.weight"].to(torch.bfloat16)
    msg = _load_error(_write(tmp_path, small, edit))
    assert "wrong dtype" in msg and "layers.0.attn.wq_b.weight" in msg and "F8_E4M3" in msg and "BF16" in msg


def test_missing_scale(tmp_path, small):
    msg = _load_error(_write(tmp_path, small, lambda t: t.pop("layers.1.attn.wq_b.scale")))
    assert "layers.1.attn.wq_b.weight" in msg and "scale" in msg and ".safetensors" in msg


def test_tid2eid_out_of_range(tmp_path, small):
    def edit(t):
        t["layers.0.ffn.gate.tid2eid"] = t["layers.0.ffn.gate.tid2eid"].clone()
        t["layers.0.ffn.gate.tid2eid"][5, 1] = 8
    msg = _load_error(_write(tmp_path, small, edit))
    assert "layers.0.ffn.gate.tid2eid" in msg and "[0, 8)" in msg


def test_truncated_shard(tmp_path, small):
    path = _write(tmp_path, small)
    shard = sorted(path.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    msg = _load_error(path)
    assert str(shard) in msg and "truncated" in msg


def test_index_points_at_missing_shard(tmp_path, small):
    path = _write(tmp_path, small)
    index = path / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"]["layers.0.attn.attn_sink"] = "model-00099-of-00099.safetensors"
    index.write_text(json.dumps(raw))
    msg = _load_error(path)
    assert "model.safetensors.index.json" in msg and "model-00099-of-00099.safetensors" in msg
    assert "layers.0.attn.attn_sink" in msg


def test_only_pickle_files(tmp_path, small):
    cfg, _ = small
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_official_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    msg = _load_error(tmp_path)
    assert "pytorch_model.bin" in msg and "safetensors" in msg


def test_config_missing_or_bad(tmp_path, small):
    path = _write(tmp_path, small)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "hidden_size": "big"}))
    msg = _load_error(path, ConfigError)
    assert "config.json" in msg and "hidden_size" in msg
    (path / "config.json").unlink()
    msg = _load_error(path, ConfigError)
    assert "config.json" in msg


def test_unknown_load_format(tmp_path, small):
    from flashport.errors import FlashportError

    with pytest.raises(FlashportError, match="load_format"):
        load_model(_write(tmp_path, small), device="cpu", dtype=torch.float32, load_format="pt")


def test_dequantize_flag_keeps_checkpoint_config(tmp_path, small):
    cfg, _ = small
    model, ckpt = load_model(_write(tmp_path, small), device="cpu", dtype=torch.float32, dequantize=True,
                             progress=False)
    assert ckpt == cfg and model.cfg == dataclasses.replace(cfg, fp8_block_size=None, expert_dtype=None)


def test_official_name_round_trip():
    from flashport.model.deepseek_v4 import DeepseekV4
    from flashport.model.names import official_name

    model = DeepseekV4(tiny_config(), torch.bfloat16, device="meta")
    official = set(official_layout(tiny_config()))
    for name, _ in model.named_parameters():
        disk = official_name(name)
        if ".experts." in name and ".shared_experts." not in name:
            assert disk == name  # stacked: no single official tensor
            continue
        assert disk in official or disk.removesuffix("scale") + "weight" in official, (name, disk)
        assert map_name(disk) == Target(name, map_name(disk).layer), (name, disk)
