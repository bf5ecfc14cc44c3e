"""Data-parallel attention over an expert-parallel group: each rank runs its own requests.

Every rank has a whole `Engine` (scheduler, pools, runner, detokenizer). Rank 0 is the front: it
places each new request on the rank with the fewest unfinished requests (itself included) and,
once per step, broadcasts the adds and aborts of every rank. Then all ranks step in lockstep:

    all ranks: apply their commands; plan = own scheduler.schedule()
               all-gather the plans' token counts (control plane); all zero -> no step
               plan empty -> `idle_pass`: join every MoE layer's all-to-alls with zero tokens
               else       -> runner.execute (each MoE layer: all-to-all dispatch, see expert_moe.py)
               detokenize / stop checks on the rank that owns the request
    rank 0:    gather the ranks' RequestOutputs and return them with its own

Numerics: a request's tokens are those of one process running that rank's batch, except that an
expert's GEMM sees the rows of every rank's batch (the same rows as one process running the
ranks' batches back to back; a GEMM's rounding may depend on how many rows it has).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

ADD, ABORT = "add", "abort"


class DataParallelFront:
    """Rank 0's book of the requests it placed on other ranks."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.owner: dict[str, int] = {}  # request id -> rank, for live requests on ranks > 0
        self.commands: list[list[tuple]] = [[] for _ in range(world_size)]
        self.placed = [0] * world_size  # requests placed per rank so far

    def place(self, engine: Any, request_id: str, prompt: Any, params: Any) -> bool:
        """Check the request (RequestError as a local add would raise); True if it went to another rank."""
        if request_id in self.owner:
            from flashport.errors import RequestError

            raise RequestError(f"request id {request_id!r} is already in use")
        engine._check_request(request_id, prompt, params)
        loads = [len(engine._groups)] + [0] * (self.world_size - 1)
        for r in self.owner.values():
            loads[r] += 1
        rank = min(range(self.world_size), key=lambda r: (loads[r], r))
        self.placed[rank] += 1
        if rank == 0:
            return False
        self.owner[request_id] = rank
        self.commands[rank].append((ADD, request_id, prompt, params))
        return True

    def abort(self, request_id: str) -> bool:
        rank = self.owner.pop(request_id, None)
        if rank is None:
            return False
        self.commands[rank].append((ABORT, request_id))
        return True

    def take_commands(self) -> list[list[tuple]]:
        cmds, self.commands = self.commands, [[] for _ in range(self.world_size)]
        return cmds


def apply_commands(engine: Any, commands: list[tuple]) -> None:
    """A rank > 0: the adds and aborts rank 0 placed here (already checked there)."""
    for cmd in commands:
        if cmd[0] == ADD:
            engine.add_request(cmd[1], cmd[2], cmd[3])
        else:
            engine.abort(cmd[1])


@torch.inference_mode()
def idle_pass(model: Any) -> None:
    """A rank with no tokens this step: every MoE layer's all-to-alls with zero tokens of its own
    (it still computes the pairs other ranks send to its experts)."""
    H, k = model.cfg.hidden_size, model.cfg.num_experts_per_tok
    x = torch.empty(0, H, dtype=model.dtype, device=model.device)
    weights = torch.empty(0, k, dtype=model.dtype, device=model.device)
    experts = torch.empty(0, k, dtype=torch.int64, device=model.device)
    for block in model.layers:
        moe = block.ffn
        moe.ep.routed_all_to_all(x, weights, experts, moe.experts.w13, moe.experts.w2, moe.limit, model.ops_impl)


def local_step(group: Any, engine: Any) -> list:
    """Every rank, in lockstep: schedule its own plan and run it (or the idle pass) -> its outputs."""
    plan = engine.scheduler.schedule()
    mine = torch.tensor([0 if plan.is_empty else plan.num_batched_tokens], dtype=torch.int64)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(group.world_size)]
    dist.all_gather(counts, mine, group=group.control)
    if sum(int(c) for c in counts) == 0:
        return []
    if plan.is_empty:
        idle_pass(engine.model)
        return []
    sampling = engine._begin_step(plan)
    result = engine.runner.execute(plan, sampling)
    return engine._apply_result(plan, result)


def front_step(group: Any, engine: Any) -> list:
    """Rank 0's `Engine.step()`: commands out, one lockstep step, every rank's outputs in."""
    front: DataParallelFront = group.front
    dist.broadcast_object_list([front.take_commands()], src=0, group=group.control)
    outputs = local_step(group, engine)
    gathered: list = [None] * group.world_size
    dist.gather_object(outputs, gathered, dst=0, group=group.control)
    for part in gathered[1:]:
        for out in part:
            if out.request_id not in front.owner:
                continue  # aborted meanwhile
            if out.finished:
                del front.owner[out.request_id]
            outputs.append(out)
    return outputs


def worker_loop(group: Any, engine: Any, stop: Any) -> int:
    """A rank > 0 under data-parallel attention, until rank 0 says stop -> steps taken part in."""
    steps = 0
    while True:
        box: list = [None]
        dist.broadcast_object_list(box, src=0, group=group.control)
        if box[0] == stop:
            return steps
        apply_commands(engine, box[0][group.rank])
        outputs = local_step(group, engine)
        dist.gather_object(outputs, None, dst=0, group=group.control)
        steps += 1
