"""One rank's view of an expert-parallel group: the process groups, the MoE hook, the control plane.

Two process groups:

- the data plane (the default group: NCCL on NVIDIA, RCCL on ROCm, gloo on a CPU) carries the MoE
  collectives, with a finite timeout (FLASHPORT_EP_TIMEOUT_S, default 600 s): a rank that stops
  answering turns into an error, never a hang;
- the control plane (a gloo group, CPU tensors) carries what rank 0 decides: each step's scheduler
  plan, the agreed pool sizes, the stop message. Workers wait on it while the server is idle, so
  its timeout is long (30 days); a dead rank 0 breaks its TCP connections, which ends the wait.

Two ways to serve (FLASHPORT_EP_ATTENTION):
- "replicated" (default): rank 0 owns the scheduler and sends each step's `SchedulerOutput`; every
  rank runs the same forward over its own (identical) state pools, so the attention, router and
  shared expert are replicated and only the routed experts are split;
- "data": each rank runs its own requests (data_parallel.py); the MoE dispatches by all-to-all.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from flashport.distributed.data_parallel import DataParallelFront, front_step
from flashport.distributed.expert_moe import COMBINES, ExpertParallelMoE
from flashport.distributed.shard import ExpertShard
from flashport.errors import FlashportError

CONTROL_TIMEOUT = timedelta(days=30)
ATTENTIONS = ("replicated", "data")
STOP = "stop"


def data_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("FLASHPORT_EP_TIMEOUT_S", "600")))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"  # ROCm builds map "nccl" to RCCL


class ExpertParallelError(FlashportError):
    """A rank failed or stopped answering: the group cannot continue."""


class ExpertParallel:
    """This process's membership of the group (rank 0 drives, ranks > 0 follow)."""

    def __init__(self, rank: int, world_size: int, device: torch.device, combine: str | None = None,
                 attention: str | None = None) -> None:
        # combine: "pairs" (bit-exact, default) or "sum" (a third of the bytes); FLASHPORT_EP_COMBINE sets it
        combine = combine or os.environ.get("FLASHPORT_EP_COMBINE", "pairs")
        # attention: "replicated" (every rank the same batch, default) or "data" (each rank its own requests)
        attention = attention or os.environ.get("FLASHPORT_EP_ATTENTION", "replicated")
        if not dist.is_initialized():
            raise FlashportError("expert parallel: torch.distributed is not initialized (use "
                                 "flashport.distributed.launch to start the ranks)")
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise FlashportError(f"expert parallel: the process group has rank {dist.get_rank()} of "
                                 f"{dist.get_world_size()}, expected {rank} of {world_size}")
        self.rank, self.world_size, self.device, self.combine = rank, world_size, device, combine
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        if combine not in COMBINES:
            raise FlashportError(f"FLASHPORT_EP_COMBINE={combine!r}: expected one of {', '.join(COMBINES)}")
        if attention not in ATTENTIONS:
            raise FlashportError(f"FLASHPORT_EP_ATTENTION={attention!r}: expected one of {', '.join(ATTENTIONS)}")
        code = COMBINES.index(combine) + 2 * ATTENTIONS.index(attention)
        mode = torch.tensor([code, -code])
        dist.all_reduce(mode, op=dist.ReduceOp.MAX, group=self.control)
        if mode[0] != -mode[1]:
            raise FlashportError("expert parallel: the ranks were started with different FLASHPORT_EP_COMBINE "
                                 "or FLASHPORT_EP_ATTENTION")
        self.data_parallel = attention == "data"
        self.front = DataParallelFront(world_size) if self.data_parallel and rank == 0 else None
        self.shard: ExpertShard | None = None
        self.moe: ExpertParallelMoE | None = None
        self.on_fatal: Callable[[str], None] | None = None  # set by the launcher of rank 0
        self.workers: list = []  # rank 0 on one host: the spawned workers' Popen handles
        self.closed = False
        self.failed: str | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ model
    def moe_hook(self, num_experts: int) -> ExpertParallelMoE:
        """The MoE hook for a model with `num_experts` routed experts (built once)."""
        if self.moe is None:
            self.shard = ExpertShard(self.rank, self.world_size, num_experts)
            self.moe = ExpertParallelMoE(self.shard, None, self.combine, all_to_all=self.data_parallel)
        elif self.shard.num_experts != num_experts:
            raise FlashportError(f"expert parallel: built for {self.shard.num_experts} experts, "
                                 f"asked for {num_experts}")
        return self.moe

    @torch.no_grad()
    def sync_replicated(self, model: torch.nn.Module) -> None:
        """Rank 0's values for every parameter that is not a routed expert (dummy weights: each rank
        drew its own, and uneven expert shards shift the random stream)."""
        for name, p in model.named_parameters():
            if ".ffn.experts." in name:
                continue
            data = p.data
            if data.dtype.itemsize == 1 and data.dtype != torch.uint8:
                data = data.view(torch.uint8)  # FP8 bits (some backends lack the dtype)
            dist.broadcast(data, src=0)

    def agree_cache_config(self, cache: Any) -> Any:
        """The pools every rank can hold: the smallest of each size (free memory differs per GPU)."""
        sizes = torch.tensor([cache.num_comp_blocks, cache.num_window_blocks, cache.num_state_slots])
        dist.all_reduce(sizes, op=dist.ReduceOp.MIN, group=self.control)
        comp, window, slots = sizes.tolist()
        return dataclasses.replace(cache, num_comp_blocks=comp, num_window_blocks=window, num_state_slots=slots)

    # ------------------------------------------------------------------ control plane
    def send_plan(self, plan: Any) -> None:
        assert self.rank == 0
        dist.broadcast_object_list([plan], src=0, group=self.control)

    def recv_plan(self) -> Any:
        """The next plan from rank 0 (blocks while rank 0 is idle); None = stop."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return None if box[0] == STOP else box[0]

    def execute(self, runner: Any, plan: Any, sampling: dict) -> Any:
        """Rank 0's step: send the plan, run the forward with the group. Any failure here leaves the
        ranks out of step, so it is fatal: the process is taken down with a clear message."""
        def step() -> Any:
            self.send_plan(plan)
            return runner.execute(plan, sampling)

        return self._guarded(step)

    def _guarded(self, step: Callable[[], Any]) -> Any:
        if self.failed is not None:
            raise ExpertParallelError(self.failed)
        try:
            return step()
        except Exception as exc:
            msg = (f"expert parallel: a step failed on rank 0 ({type(exc).__name__}: {exc}); the ranks are out of "
                   "step, stopping")
            self.fail(msg, traceback.format_exc())
            raise ExpertParallelError(msg) from exc

    # ------------------------------------------------------------------ data-parallel attention (rank 0)
    def has_remote_requests(self) -> bool:
        return self.front is not None and bool(self.front.owner)

    def place_request(self, engine: Any, request_id: str, prompt: Any, params: Any) -> bool:
        """True when the request was placed on another rank (data-parallel attention, rank 0)."""
        return self.front is not None and self.front.place(engine, request_id, prompt, params)

    def abort_remote(self, request_id: str) -> bool:
        return self.front is not None and self.front.abort(request_id)

    def data_parallel_step(self, engine: Any) -> list:
        """Rank 0's step under data-parallel attention (fatal on failure, as `execute`)."""
        return self._guarded(lambda: front_step(self, engine))

    def fail(self, message: str, details: str = "") -> None:
        with self._lock:
            if self.failed is not None:
                return
            self.failed = message
        if details:
            print(details, file=sys.stderr, flush=True)
        print(f"flashport: error: {message}", file=sys.stderr, flush=True)
        if self.on_fatal is not None:
            self.on_fatal(message)

    def close(self) -> None:
        """Rank 0: tell the workers to exit (best effort; idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.rank == 0 and self.failed is None:
            try:
                dist.broadcast_object_list([STOP], src=0, group=self.control)
            except Exception:  # a worker is gone already
                pass
