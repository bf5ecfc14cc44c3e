"""Load a DeepSeek-V4 checkpoint into a preallocated `DeepseekV4`, streaming shard by shard.

Two passes over the shards:

1. plan: read only the safetensors headers; map every name (`names.map_name`), and check it
   against the layout the checkpoint config implies (shape, dtype, FP8 weight + scale pairs,
   duplicates, anything missing). A bad checkpoint fails here, before any data is read.
2. stream: read one tensor at a time (one shard open at a time, never the whole model in host
   memory) and copy it into its parameter, or into an expert's slice of a stacked one.

Conversions: a quantized parameter keeps the FP8 / FP4 bits and the UE8M0 scale bytes (converted
to e4m3fnuz when the model uses it); a plain parameter gets the dequantized values (quant.py, the
same arithmetic as transformers, so bit-exact); plain tensors are cast to the parameter's dtype.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from flashport.config import ModelConfig
from flashport.errors import CheckpointError, FlashportError
from flashport.model.checkpoint_files import Shard, find_shards, open_shard, read_tensor, tensor_info
from flashport.model.deepseek_v4 import DeepseekV4
from flashport.model.dummy import init_dummy_weights
from flashport.model.names import Target, is_mtp, map_name
from flashport.model.quant import dequant_fp4, dequant_fp8_blocks, fp8_fn_to_fnuz

__all__ = ["LoadReport", "load_checkpoint", "load_model", "init_dummy_weights"]

# Storage kinds of checkpoint tensors, and the safetensors dtypes each accepts.
FP8, FP4, SCALE, FLOAT, INT = "fp8", "fp4", "scale", "float", "int"
_DISK_DTYPES = {
    FP8: ("F8_E4M3",),
    FP4: ("I8", "U8"),  # two E2M1 codes per byte (official: I8)
    SCALE: ("F8_E8M0", "U8"),  # UE8M0 exponent bytes
    FLOAT: ("BF16", "F16", "F32"),
    INT: ("I64", "I32"),
}
_ITEMSIZE = {"F8_E4M3": 1, "I8": 1, "U8": 1, "F8_E8M0": 1, "BF16": 2, "F16": 2, "F32": 4, "I64": 8, "I32": 4}
_EXPAND = 10  # names listed in a "missing tensors" error


@dataclass
class LoadReport:
    num_tensors: int = 0  # tensors read and copied
    bytes_read: int = 0
    seconds: float = 0.0
    skipped_mtp: int = 0  # `mtp.*` tensors (multi-token prediction, unused)
    skipped_dropped_layers: int = 0  # tensors of layers >= num_layers when loading a truncated model
    skipped_other_ranks: int = 0  # expert parallel: tensors of experts another rank holds (not read)


@dataclass(frozen=True)
class _Item:
    """One on-disk tensor, validated, with its destination."""

    shard: Path
    disk_name: str
    target: Target
    kind: str  # storage kind in the checkpoint (FP8 / FP4 / SCALE / FLOAT / INT)
    nbytes: int

    @property
    def pair_key(self) -> tuple[str, int, int]:
        # A quantized weight and its scale share this key: (module, expert, half).
        base = self.target.name.rsplit(".", 1)[0]
        t = self.target
        return base, -1 if t.expert is None else t.expert, -1 if t.half is None else t.half


def _storage_kind(name: str, p: torch.Tensor) -> str:
    if p.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        return FP8
    if p.dtype == torch.uint8:
        return SCALE if name.endswith(".scale") else FP4
    if p.dtype == torch.int64:
        return INT
    return FLOAT


def checkpoint_layout(ckpt_cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Internal name -> (shape, storage kind) of what a checkpoint with this config holds
    (a model built on the meta device: no memory, the same code as the real one)."""
    meta = DeepseekV4(ckpt_cfg, torch.bfloat16, torch.float8_e4m3fn, device="meta")
    return {n: (tuple(p.shape), _storage_kind(n, p)) for n, p in meta.named_parameters()}


def _slot_shape(shape: tuple[int, ...], t: Target) -> tuple[int, ...]:
    if t.expert is not None:
        shape = shape[1:]
    if t.half is not None:
        shape = shape[:-2] + (shape[-2] // 2,) + shape[-1:]
    return shape


def _slot(param: torch.Tensor, t: Target, first_expert: int = 0) -> torch.Tensor:
    """The view of `param` that tensor `t` fills (`first_expert`: the global id of param's expert 0)."""
    x = param.data
    if t.expert is not None:
        x = x[t.expert - first_expert]
    if t.half is not None:
        n = x.shape[-2] // 2
        x = x.narrow(-2, t.half * n, n)
    return x


@dataclass
class _Plan:
    items: dict[Path, list[_Item]] = field(default_factory=dict)
    report: LoadReport = field(default_factory=LoadReport)
    total_bytes: int = 0


def _plan(shards: list[Shard], listing: Path, layout: dict[str, tuple[tuple[int, ...], str]],
          ckpt_layers: int, model_layers: int, num_experts: int, held: range | None = None) -> _Plan:
    """Pass 1: headers only. Raises CheckpointError on the first problem found. `held`: the
    routed experts this rank holds (expert parallel); the others' tensors are checked, not read."""
    plan = _Plan()
    filled: dict[str, dict[tuple[int | None, int | None], str]] = {}  # name -> slot -> "file:tensor"
    pairs: dict[tuple[str, int, int], dict[str, _Item]] = {}
    for shard in shards:
        items = plan.items.setdefault(shard.path, [])
        with open_shard(shard.path) as f:
            present = set(f.keys())
            names = shard.names if shard.names is not None else sorted(present)
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{listing}: lists tensor '{name}' in {shard.path.name}, "
                                          f"but {shard.path} does not contain it")
                if is_mtp(name):
                    plan.report.skipped_mtp += 1
                    continue
                where = f"{shard.path}: tensor '{name}'"
                t = map_name(name)
                if t is not None and t.layer is not None and t.layer >= ckpt_layers:
                    raise CheckpointError(f"{where}: unexpected tensor, layer {t.layer} but the config has "
                                          f"num_hidden_layers = {ckpt_layers}")
                if t is not None and t.layer is not None and t.layer >= model_layers:
                    plan.report.skipped_dropped_layers += 1
                    continue
                if t is None or t.name not in layout:
                    why = "not a DeepSeek-V4 tensor name" if t is None else \
                        f"maps to '{t.name}', which this model config does not have"
                    raise CheckpointError(f"{where}: unexpected tensor ({why})")
                shape, kind = layout[t.name]
                if t.expert is not None and not 0 <= t.expert < num_experts:
                    raise CheckpointError(f"{where}: unexpected tensor, expert {t.expert} but n_routed_experts "
                                          f"= {num_experts}")
                dtype, disk_shape = tensor_info(f, shard.path, name)
                if dtype not in _DISK_DTYPES[kind]:
                    raise CheckpointError(f"{where}: wrong dtype, expected {' or '.join(_DISK_DTYPES[kind])} "
                                          f"({kind} storage of {t.describe()}), found {dtype}")
                want = _slot_shape(shape, t)
                if disk_shape != want:
                    raise CheckpointError(f"{where}: wrong shape, expected {list(want)} for {t.describe()}, "
                                          f"found {list(disk_shape)}")
                slots = filled.setdefault(t.name, {})
                key = (t.expert, t.half)
                clash = _overlap(slots, key)
                if clash is not None:
                    raise CheckpointError(f"{where}: duplicate, {t.describe()} is also loaded from "
                                          f"{slots[clash]}")
                slots[key] = f"{shard.path.name}:{name}"
                if held is not None and t.expert is not None and t.expert not in held:
                    plan.report.skipped_other_ranks += 1
                    continue
                nbytes = _ITEMSIZE.get(dtype, 1) * _numel(disk_shape)
                item = _Item(shard.path, name, t, kind, nbytes)
                items.append(item)
                plan.total_bytes += nbytes
                if kind in (FP8, FP4, SCALE):
                    pairs.setdefault(item.pair_key, {})[SCALE if kind == SCALE else "weight"] = item
        items.sort(key=lambda it: (it.pair_key, it.kind == SCALE))  # a weight next to its scale
    for key, pair in pairs.items():
        if "weight" in pair and SCALE not in pair:
            w = pair["weight"]
            raise CheckpointError(f"{w.shard}: tensor '{w.disk_name}' is {w.kind.upper()} but its scale tensor "
                                  f"(official name ending '.scale') is missing: cannot dequantize it")
    _check_complete(filled, layout, listing, num_experts)
    return plan


def _overlap(slots: dict[tuple[int | None, int | None], str], key: tuple[int | None, int | None]
             ) -> tuple[int | None, int | None] | None:
    """An already-filled slot that overlaps `key` (expert, half); None = whole tensor / all rows."""
    if not slots:
        return None
    e, h = key
    if e is None:  # the whole parameter overlaps everything
        return next(iter(slots))
    candidates = [(None, None), (e, None), (e, h)] + ([(e, 0), (e, 1)] if h is None else [])
    return next((k for k in candidates if k in slots), None)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_complete(filled: dict[str, dict[tuple[int | None, int | None], str]],
                    layout: dict[str, tuple[tuple[int, ...], str]], listing: Path, num_experts: int) -> None:
    missing: list[str] = []
    for name in layout:
        slots = filled.get(name, {})
        if (None, None) in slots:
            continue
        if not slots:
            missing.append(name)
            continue
        # A stacked expert parameter filled per expert: w13 needs both halves (w1 and w3) of each.
        halves = (0, 1) if any(h is not None for _, h in slots) else (None,)
        for e in range(num_experts):
            for h in halves:
                if (e, h) not in slots:
                    missing.append(Target(name, None, e, h).describe())
    if missing:
        shown = ", ".join(missing[:_EXPAND]) + (", ..." if len(missing) > _EXPAND else "")
        raise CheckpointError(f"{listing}: {len(missing)} tensor(s) missing from the checkpoint: {shown}")


class _Streamer:
    """Pass 2: copies tensors into the model's parameters."""

    def __init__(self, model: DeepseekV4, report: LoadReport, bar: Any, first_expert: int = 0) -> None:
        self.params = dict(model.named_parameters())
        self.first_expert = first_expert
        self.num_experts = model.cfg.n_routed_experts
        self.report, self.bar = report, bar
        self.pending: dict[tuple[str, int, int], dict[str, tuple[_Item, torch.Tensor]]] = {}

    def add(self, item: _Item, t: torch.Tensor) -> None:
        self.report.num_tensors += 1
        self.report.bytes_read += item.nbytes
        self.bar.update(item.nbytes)
        if item.kind in (FLOAT, INT):
            self._store_plain(item, t)
            return
        part = self.pending.setdefault(item.pair_key, {})
        part[SCALE if item.kind == SCALE else "weight"] = (item, t)
        if len(part) == 2:  # weight and scale both read (usually adjacent; else across shards)
            del self.pending[item.pair_key]
            self._store_quantized(part["weight"], part[SCALE])

    def _store_plain(self, item: _Item, t: torch.Tensor) -> None:
        param = self.params[item.target.name]
        if item.kind == INT and item.target.name.endswith("tid2eid"):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.num_experts:
                raise CheckpointError(f"{item.shard}: tensor '{item.disk_name}': hash-router expert ids must be "
                                      f"in [0, {self.num_experts}), found values in [{lo}, {hi}]")
        if _storage_kind(item.target.name, param) != item.kind:
            raise CheckpointError(f"{item.shard}: tensor '{item.disk_name}' is plain ({item.kind}) but the "
                                  f"model stores {item.target.name} as {param.dtype}")
        dst = _slot(param, item.target, self.first_expert)
        dst.copy_(t.to(device=dst.device, dtype=dst.dtype))

    def _store_quantized(self, w_entry: tuple[_Item, torch.Tensor], s_entry: tuple[_Item, torch.Tensor]) -> None:
        item, w = w_entry
        s_item, s = s_entry
        where = f"{item.shard}: tensor '{item.disk_name}'"
        param = self.params[item.target.name]
        dst = _slot(param, item.target, self.first_expert)
        s = s.view(torch.uint8).to(dst.device)
        w = w.to(dst.device)
        if bool((s == 255).any()):  # 0xFF is NaN in UE8M0
            raise CheckpointError(f"{s_item.shard}: tensor '{s_item.disk_name}': scale byte 0xFF (NaN)")
        if param.dtype.is_floating_point and param.dtype.itemsize > 1:  # plain parameter: dequantize on load
            if item.kind == FP8:
                dst.copy_(dequant_fp8_blocks(w.view(torch.float8_e4m3fn), s, dst.dtype))
            else:
                dst.copy_(dequant_fp4(w.view(torch.uint8), s, dst.dtype))
            return
        scale_dst = _slot(self.params[s_item.target.name], s_item.target, self.first_expert)
        model_kind = _storage_kind(item.target.name, param)
        if model_kind != item.kind:
            raise CheckpointError(f"{where}: the checkpoint stores {item.target.describe()} as {item.kind.upper()} "
                                  f"but the model expects {model_kind.upper()} ({param.dtype})")
        if param.dtype == torch.float8_e4m3fnuz:  # same bits, half the value: scale exponent + 1
            try:
                w, s = fp8_fn_to_fnuz(w.view(torch.float8_e4m3fn), s)
            except ValueError as e:
                raise CheckpointError(f"{s_item.shard}: tensor '{s_item.disk_name}': {e}") from None
        dst.view(torch.uint8).copy_(w.view(torch.uint8))
        scale_dst.copy_(s)


def load_checkpoint(model: DeepseekV4, model_dir: str | Path, ckpt_cfg: ModelConfig, *,
                    fp8_dtype: torch.dtype = torch.float8_e4m3fn, progress: bool = True,
                    expert_range: range | None = None) -> LoadReport:
    """Fill every parameter of `model` from the safetensors checkpoint in `model_dir`.

    `ckpt_cfg` describes the checkpoint (its config.json); `model` may have fewer layers (tensors
    of the dropped layers are skipped) and plain weights where the checkpoint is quantized
    (dequantized on load). `fp8_dtype` must be the model's FP8 dtype (e4m3fnuz: converted on load).
    `expert_range`: the routed experts `model` holds (expert parallel; default all): only their
    tensors are read.
    """
    start = time.perf_counter()
    n_model = model.cfg.num_hidden_layers
    if n_model > ckpt_cfg.num_hidden_layers:
        raise CheckpointError(f"the model has {n_model} layers but the checkpoint config only "
                              f"{ckpt_cfg.num_hidden_layers}")
    model_fp8 = {p.dtype for p in model.parameters() if _storage_kind("", p) == FP8}
    if model_fp8 and model_fp8 != {fp8_dtype}:
        raise ValueError(f"fp8_dtype={fp8_dtype} but the model's FP8 weights are {sorted(map(str, model_fp8))}")
    layout = checkpoint_layout(ckpt_cfg.with_num_layers(n_model))
    for name, p in model.named_parameters():
        shape, kind = layout.get(name, (None, None))
        if shape is not None and kind == FP4 and _storage_kind(name, p) == FLOAT:
            shape = shape[:-1] + (2 * shape[-1],)  # dequantized on load: two values per packed byte
        if shape is not None and expert_range is not None and ".ffn.experts." in name:
            shape = (len(expert_range),) + shape[1:]  # expert parallel: this rank's experts
        if tuple(p.shape) != shape:
            raise CheckpointError(f"{model_dir}: model parameter {name} {list(p.shape)} does not match the "
                                  f"checkpoint config ({shape})")
    shards, listing = find_shards(model_dir)
    plan = _plan(shards, listing, layout, ckpt_cfg.num_hidden_layers, n_model, ckpt_cfg.n_routed_experts,
                 expert_range)
    report = plan.report
    with torch.no_grad(), tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="loading weights",
                               disable=not progress) as bar:
        streamer = _Streamer(model, report, bar, 0 if expert_range is None else expert_range.start)
        for path, items in plan.items.items():
            if not items:
                continue
            with open_shard(path) as f:
                for item in items:
                    streamer.add(item, read_tensor(f, path, item.disk_name))
    assert not streamer.pending, "plan checked that every quantized weight has its scale"
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    report.seconds = time.perf_counter() - start
    return report


def _default_fp8_dtype(device: torch.device | str) -> torch.dtype:
    try:
        from flashport.platform import detect_platform
    except ImportError:  # platform detection not available: the OCP format
        return torch.float8_e4m3fn
    return detect_platform(device).fp8_dtype


def load_model(model_dir: str | Path, *, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
               load_format: str = "auto", num_layers: int | None = None, dequantize: bool = False,
               fp8_dtype: torch.dtype | None = None, seed: int = 0, progress: bool = True,
               ops_impl: str = "reference", expert_parallel: Any = None) -> tuple[DeepseekV4, ModelConfig]:
    """Build a `DeepseekV4` on `device` from `model_dir`'s config.json and fill it.

    load_format: "safetensors" (or "auto") reads the checkpoint; "dummy" makes random weights of
    the real shapes and dtypes (benchmarks without a download). `num_layers` keeps only the first
    layers. `dequantize=True` holds every weight plain in `dtype` (FP8/FP4 dequantized on load).
    `ops_impl`: "reference" (plain torch) or an op implementation ("auto", "torch", "triton").
    `expert_parallel`: this rank's `flashport.distributed.ExpertParallel` (None: one process): the
    model holds and reads only the rank's routed experts.
    Returns the model and the checkpoint's config (the model's own is `model.cfg`).
    """
    if load_format not in ("auto", "safetensors", "dummy"):
        raise FlashportError(f"load_format {load_format!r}: expected auto, safetensors or dummy")
    ckpt_cfg = ModelConfig.from_hf(model_dir)
    cfg = ckpt_cfg.with_num_layers(num_layers) if num_layers is not None else ckpt_cfg
    if dequantize:
        cfg = dataclasses.replace(cfg, fp8_block_size=None, expert_dtype=None)
    if load_format != "dummy":
        find_shards(model_dir)  # fail before allocating the model
    if fp8_dtype is None:
        fp8_dtype = _default_fp8_dtype(device)
    hook = None if expert_parallel is None else expert_parallel.moe_hook(cfg.n_routed_experts)
    model = DeepseekV4(cfg, dtype, fp8_dtype, device, ops_impl=ops_impl, moe_hook=hook)
    model.eval()
    if load_format == "dummy":
        init_dummy_weights(model, seed)
        if expert_parallel is not None:  # the replicated weights must be equal on every rank
            expert_parallel.sync_replicated(model)
    else:
        load_checkpoint(model, model_dir, ckpt_cfg, fp8_dtype=fp8_dtype, progress=progress,
                        expert_range=None if hook is None else hook.shard.local)
    if ops_impl == "triton" or (ops_impl == "auto" and torch.device(device).type != "cpu"):
        # The fused MoE kernels will run: FP4 experts to their tiled layout (flashport/ops/moe.py).
        for layer in model.layers:
            for w in (layer.ffn.experts.w13, layer.ffn.experts.w2):
                w.tile_for_kernels()
    return model, ckpt_cfg
