"""Graphs of the decode step: the launch overhead of a decode forward recorded once, replayed.

A decode step (every scheduled sequence has exactly one new token, no prompt logprobs) is a
fixed sequence of launches once its shapes are fixed. So the step is padded:

- the rows to the next batch-size bucket (`batch_buckets`: 1, 2, 4, 8, 16, 24, 32, 48, 64, 96,
  128, 192, 256, ... up to max_num_seqs), the padding rows being fresh one-token sequences on the
  pools' scratch window block and scratch state slot (`PaddedShape`, engine/paged_rows.py), so
  they touch no real state;
- the block tables to the next width bucket (`width_buckets`: powers of two from 16 blocks up to
  the blocks of a max_model_len sequence), which bounds the indexer's score row at the step's
  longest sequence instead of max_model_len.

Each (rows, width) bucket owns a device int64 input buffer and a pinned host copy of it, filled
in place each step (one host-to-device copy; the block-table rows are rewritten only when a
sequence's block tuple changed, so the host's input build stays small next to the step); the forward reads its inputs from that buffer only,
so a captured graph (torch.cuda.CUDAGraph: CUDA graphs, or HIP graphs on ROCm) replays it. The
logits of all buckets land in one fp32 buffer; sampling stays outside the graph (runner.py).

Graphs are captured lazily, the first time a bucket is met, after one eager warm-up run of that
bucket (Triton compiles its kernels then, not during capture). All graphs share one memory pool:
they never run at once and keep no output in the pool, so a capture reuses what earlier captures
freed; `profile_decode_bytes` measures what the largest bucket needs, for the memory plan.
With `capture=False` the padded step runs eagerly (the CPU tests of this path).
Not used: on a CPU, with ops_impl "reference" or "torch" (their twins sync the host), with
enforce_eager, and for every step that is not a decode step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from flashport.engine.config import CacheConfig
from flashport.engine.paged_rows import PaddedShape, PagedRowsCache
from flashport.engine.plan import SchedulerOutput
from flashport.engine.pools import StatePools
from flashport.model.attention import SeqSlice
from flashport.model.deepseek_v4 import DeepseekV4

_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
_PAD = object()  # the source of a padding row's block tables (DecodeGraphs._fill_tables)
MIN_WIDTH = 16  # blocks: the narrowest block-table bucket (2K tokens at B = 128)


def batch_buckets(max_num_seqs: int, sizes: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The padded batch sizes, ascending, the last = max_num_seqs: `sizes` or the default ladder
    (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, then 1.5x / 2x steps: 192, 256, 384, 512, ...)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs = {max_num_seqs}: must be >= 1")
    if sizes is None:
        ladder = list(_LADDER)
        while ladder[-1] < max_num_seqs:
            ladder.append(ladder[-2] * 2)
    else:
        if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
            raise ValueError(f"batch sizes {sizes!r}: expected positive ints")
        ladder = sorted(set(sizes))
    out = [b for b in ladder if b < max_num_seqs]
    return (*out, max_num_seqs)


def width_buckets(max_blocks: int) -> tuple[int, ...]:
    """Block-table widths, ascending: powers of two from MIN_WIDTH below max_blocks, then max_blocks."""
    if max_blocks < 1:
        raise ValueError(f"max_blocks = {max_blocks}: must be >= 1")
    out, w = [], MIN_WIDTH
    while w < max_blocks:
        out.append(w)
        w *= 2
    return (*out, max_blocks)


def pick(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= n (None when n exceeds every bucket)."""
    return next((b for b in buckets if b >= n), None)


def is_decode_step(plan: SchedulerOutput) -> bool:
    """Every sequence runs one token and samples from it; none wants prompt logprobs."""
    return bool(plan.seqs) and all(len(s.token_ids) == 1 and s.sample and not s.want_prompt_logprobs
                                   for s in plan.seqs)


def graphs_supported(model: DeepseekV4) -> bool:
    """Graph capture needs a GPU and the op path's kernels end to end (no host sync in the forward):
    ops_impl auto / triton, and routed experts the fused MoE runs (plain or FP4; FP8 experts take
    the torch path, which reads expert counts back)."""
    if model.device.type != "cuda" or model.ops_impl not in ("auto", "triton"):
        return False
    return all(getattr(layer.ffn, "ep", None) is None and layer.ffn.experts.w13.fmt in (None, "fp4")
               for layer in model.layers)


@dataclass
class _Bucket:
    """One padded shape: its inputs (device buffer + pinned host twin) and its graph."""

    shape: PaddedShape
    sizes: list[int]  # pieces of the buffer: token ids, positions, then PagedRowsCache.index_lists
    dev: torch.Tensor  # [sum(sizes)] int64
    host: torch.Tensor  # same, pinned on a GPU
    copied: torch.cuda.Event | None = None  # the last upload from `host` (reuse waits for it)
    graph: torch.cuda.CUDAGraph | None = None
    # The block tables' rows in `host` ([rows, width] views) and the tuple each row was last
    # written from: a sequence's block tuples are replaced, never mutated, when they change (about
    # once per block_size tokens), so a row is rewritten only when its tuple is a new object.
    tables: tuple[np.ndarray, np.ndarray] | None = None  # window, compressed
    row_src: list[list[object]] = field(default_factory=list)  # [window sources, compressed sources]


class DecodeGraphs:
    """Runs decode steps at padded fixed shapes, through captured graphs (`capture=True`, a GPU) or
    eagerly (`capture=False`: the same padded forward, for tests and for comparison)."""

    def __init__(self, model: DeepseekV4, pools: StatePools, *, max_num_seqs: int, max_model_len: int,
                 batch_sizes: tuple[int, ...] | None = None, capture: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        if capture and not graphs_supported(model):
            raise ValueError(f"graph capture needs a CUDA/ROCm device and ops_impl auto/triton; the model is on "
                             f"{model.device.type} with ops_impl {model.ops_impl!r}")
        self.model, self.pools, self.capture, self.log = model, pools, capture, log
        self.block_size = pools.cache_cfg.block_size
        self.batch_buckets = batch_buckets(max_num_seqs, batch_sizes)
        self.width_buckets = width_buckets(math.ceil(max_model_len / self.block_size))
        self.device = model.device
        # The logits of every bucket's rows: [max rows, vocab] fp32, outside the graph pool.
        self.logits = torch.empty(self.batch_buckets[-1], model.cfg.vocab_size, dtype=torch.float32,
                                  device=self.device)
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.captured_bytes = 0  # device memory the captures took (measured)
        self.failed: str | None = None  # why a capture failed: later buckets then run eagerly

    # ------------------------------------------------------------------ host side
    def shape_for(self, plan: SchedulerOutput) -> PaddedShape | None:
        """The padded shape of a decode step, or None when the step must run eagerly."""
        if not is_decode_step(plan):
            return None
        rows = pick(len(plan.seqs), self.batch_buckets)
        width = pick(max(len(s.comp_blocks) for s in plan.seqs), self.width_buckets)
        if rows is None or width is None:
            return None
        return PaddedShape(rows, width)

    def execute(self, plan: SchedulerOutput, shape: PaddedShape) -> torch.Tensor:
        """Run the plan's decode step at `shape` -> logits [len(plan.seqs), vocab] fp32 (a view of a
        buffer the next step overwrites). State slots must be ready (runner: load_boundary)."""
        b = self._bucket(shape)
        n = len(plan.seqs)
        pad = shape.rows - n
        cache = PagedRowsCache(self.pools, list(plan.seqs), self.pools.cache_cfg.enable_prefix_caching, shape,
                               tables=False)
        tokens = [s.token_ids[0] for s in plan.seqs] + [0] * pad
        positions = [s.start_pos for s in plan.seqs] + [0] * pad
        self._upload(b, [tokens, positions, *cache.index_lists], plan.seqs)
        self._run(b)
        return self.logits[:n]

    def _run(self, b: _Bucket) -> None:
        if b.graph is not None:
            b.graph.replay()
        else:
            self._forward(b)

    def _upload(self, b: _Bucket, lists: list[list[int] | None], seqs=None) -> None:
        """Fill b.host with the step's inputs and copy it to b.dev. Pieces left None (the block
        tables, PagedRowsCache(tables=False)) are written from `seqs` row by row, only where a row's
        source tuple changed since the bucket's last step."""
        if b.copied is not None:
            b.copied.synchronize()  # the previous step's copy out of `host` is done
        sizes = [b.sizes[i] if x is None else len(x) for i, x in enumerate(lists)]
        if sizes != b.sizes:
            raise AssertionError(f"padded inputs: pieces of {sizes} values for a buffer of {b.sizes}")
        host, at = b.host.numpy(), 0
        for x, n in zip(lists, sizes):  # piece by piece: numpy converts each list in C
            if x is not None:
                host[at:at + n] = x
            at += n
        if lists[4] is None:
            self._fill_tables(b, seqs)
        else:  # whole tables written: no row is known any more
            b.row_src = []
        b.dev.copy_(b.host, non_blocking=True)
        if b.dev.is_cuda:
            if b.copied is None:
                b.copied = torch.cuda.Event()
            b.copied.record()

    def _fill_tables(self, b: _Bucket, seqs) -> None:
        rows, width = b.shape.rows, b.shape.width
        if b.tables is None:
            host, off = b.host.numpy(), sum(b.sizes[:4])  # pieces: ids, positions, row_seq, window_write, ...
            b.tables = (host[off:off + rows * width].reshape(rows, width),
                        host[off + rows * width:off + 2 * rows * width].reshape(rows, width))
        if not b.row_src:
            b.row_src = [[None] * rows, [None] * rows]
        scratch = self.pools.scratch_window_block
        for t, (table, src) in enumerate(zip(b.tables, b.row_src)):
            for i in range(rows):
                blocks = (seqs[i].window_blocks if t == 0 else seqs[i].comp_blocks) if i < len(seqs) else _PAD
                if src[i] is blocks:
                    continue
                if blocks is _PAD:  # a padding row: the scratch window block, no compressed blocks
                    table[i] = -1
                    if t == 0:
                        table[i, 0] = scratch
                else:
                    table[i, :len(blocks)] = blocks
                    table[i, len(blocks):] = -1
                src[i] = blocks

    # ------------------------------------------------------------------ device side
    def _bucket(self, shape: PaddedShape) -> _Bucket:
        key = (shape.rows, shape.width)
        b = self._buckets.get(key)
        if b is None:
            b = self._new_bucket(shape)
            self._buckets[key] = b
            if self.capture and self.failed is None:
                self._capture(b)
        return b

    def _new_bucket(self, shape: PaddedShape) -> _Bucket:
        empty = PagedRowsCache(self.pools, [], self.pools.cache_cfg.enable_prefix_caching, shape)
        sizes = [shape.rows, shape.rows] + [len(x) for x in empty.index_lists]
        total = sum(sizes)
        host = torch.zeros(total, dtype=torch.long)
        if self.device.type == "cuda":
            host = host.pin_memory()
        b = _Bucket(shape, sizes, torch.zeros(total, dtype=torch.long, device=self.device), host)
        # All rows padding: a valid input that touches scratch state only (warm-up and capture).
        self._upload(b, [[0] * shape.rows, [0] * shape.rows, *empty.index_lists])
        return b

    def _forward(self, b: _Bucket) -> None:
        """The padded forward, reading its inputs from b.dev only (this is what a graph records)."""
        rows = b.shape.rows
        ids, pos, *pieces = torch.split(b.dev, b.sizes)
        cache = PagedRowsCache(self.pools, [], self.pools.cache_cfg.enable_prefix_caching, b.shape)
        cache.bind(list(pieces))
        logits = self.model.run(ids, pos, [SeqSlice(i, 1) for i in range(rows)], cache, None)  # [rows, vocab]
        self.logits[:rows].copy_(logits)

    def _capture(self, b: _Bucket) -> None:
        self._forward(b)  # warm-up: Triton compiles this shape's kernels outside the capture
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # (capture does it too) so that the growth below is the graph pool's
        before = torch.cuda.memory_reserved()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, pool=self._pool):
                self._forward(b)
            torch.cuda.synchronize()
        except RuntimeError as e:  # e.g. a host sync in some op: run every decode step eagerly
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
            if self.log is not None:
                self.log(f"decode graph capture failed, decode steps run eagerly: {self.failed}")
            return
        b.graph = g
        self.captured_bytes += max(0, torch.cuda.memory_reserved() - before)
        if self.log is not None:
            n = sum(x.graph is not None for x in self._buckets.values())
            self.log(f"captured the decode graph for {b.shape.rows} rows x {b.shape.width} blocks "
                     f"({n} graphs, {self.captured_bytes / 2**20:.0f} MiB reserved by captures)")

    def execute_padding(self, shape: PaddedShape) -> None:
        """Run a step of padding rows only at `shape` (profiling, benchmarks)."""
        b = self._bucket(shape)
        empty = PagedRowsCache(self.pools, [], self.pools.cache_cfg.enable_prefix_caching, shape)
        self._upload(b, [[0] * shape.rows, [0] * shape.rows, *empty.index_lists])
        self._run(b)

    def capture_all(self) -> None:
        """Capture every (rows, width) bucket now, largest first (later captures reuse its pool)."""
        for rows in reversed(self.batch_buckets):
            for width in reversed(self.width_buckets):
                self._bucket(PaddedShape(rows, width))


def profile_decode_bytes(model: DeepseekV4, block_size: int, max_num_seqs: int, max_model_len: int,
                         enable_prefix_caching: bool = True, entry_dtype: torch.dtype | None = None) -> int:
    """Device bytes the graphs need: the activations of the largest decode bucket (what the shared
    pool grows to) plus the shared logits buffer, measured by running that padded step eagerly
    over throwaway one-block pools (all rows are padding). Also compiles its kernels. 0 off a GPU
    (where the step still runs: the CPU tests run this code)."""
    cuda = model.device.type == "cuda"
    tmp = CacheConfig(block_size=block_size, num_comp_blocks=1, num_window_blocks=1, num_state_slots=1,
                      sliding_window=model.cfg.sliding_window, enable_prefix_caching=enable_prefix_caching)
    pools = StatePools(model.cfg, tmp, model.dtype, model.device, entry_dtype)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    g = DecodeGraphs(model, pools, max_num_seqs=max_num_seqs, max_model_len=max_model_len, capture=False)
    g.execute_padding(PaddedShape(g.batch_buckets[-1], g.width_buckets[-1]))
    peak = 0
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    del g, pools
    if cuda:
        torch.cuda.empty_cache()
    return peak
