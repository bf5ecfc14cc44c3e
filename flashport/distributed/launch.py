"""Starting the ranks of an expert-parallel group, and the workers' loop.

One host: `Engine(..., expert_parallel_size=N)` (what `flashport serve/generate
--expert-parallel-size N` does) runs rank 0 in the calling process and spawns ranks 1..N-1, one per
GPU (cuda:r), with the same engine arguments. Several hosts: start every rank with torchrun (it
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); rank 0 serves, every other rank turns
into a worker inside `Engine(...)` and exits when rank 0 stops (docs/expert_parallel.md).

Failure handling, so that nothing hangs:
- a spawned worker that exits before rank 0 closes the group -> rank 0 prints which rank died and
  stops: SIGTERM to itself (the server drains and exits), then exit code 1 at the latest after
  FLASHPORT_EP_EXIT_GRACE_S (default 20 s);
- rank 0 gone -> a spawned worker notices its parent changed (checked every second) and exits; the
  control plane's TCP connections also break;
- an error inside a step on any rank -> the ranks are out of step: that rank exits with the
  traceback, and the others see the collective fail (or time out after FLASHPORT_EP_TIMEOUT_S).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flashport.distributed.group import ExpertParallel, backend_for, data_timeout
from flashport.errors import FlashportError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def start_expert_parallel(size: int, engine_args: dict[str, Any], device: torch.device) -> ExpertParallel:
    """Rank 0's entry (called by `Engine`): start or join the group of `size` ranks.

    Under torchrun a rank > 0 becomes a worker here and never returns (the process exits when rank 0
    stops)."""
    if size < 1:
        raise FlashportError(f"expert_parallel_size = {size}: must be >= 1")
    if device.type == "cuda":
        have = torch.cuda.device_count()
        if not under_torchrun() and have < size:
            raise FlashportError(f"--expert-parallel-size {size} needs {size} GPUs on this host, "
                                 f"{have} are visible")
    if under_torchrun():
        return _join_torchrun(size, engine_args, device)
    return _spawn_local(size, engine_args, device)


# ---------------------------------------------------------------------- one host: spawn
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_local(size: int, engine_args: dict[str, Any], device: torch.device) -> ExpertParallel:
    # Fresh interpreters (`python -m flashport.distributed.launch`), not multiprocessing's spawn: that
    # one re-imports the caller's main script, which a script without a __main__ guard cannot take.
    port = _free_port()
    procs = []
    for rank in range(1, size):
        spec = json.dumps({"rank": rank, "size": size, "addr": "127.0.0.1", "port": port, "device": device.type,
                           "parent": os.getpid(), "engine_args": engine_args})
        procs.append((rank, subprocess.Popen([sys.executable, "-m", "flashport.distributed.launch", spec],
                                             env=_worker_env())))
    state: dict[str, Any] = {"group": None}
    threading.Thread(target=_monitor, args=(procs, state), name="flashport-ep-monitor", daemon=True).start()
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend_for(device), init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=size, timeout=data_timeout())
    group = ExpertParallel(0, size, device)
    group.on_fatal = _take_down
    group.workers = [p for _, p in procs]
    state["group"] = group

    def close() -> None:
        group.close()
        deadline = time.monotonic() + 10
        for _, p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()

    atexit.register(close)
    return group


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the flashport package
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _monitor(procs: list, state: dict[str, Any]) -> None:
    """Rank 0: watch the workers; one that exits before rank 0 closed the group is fatal."""
    while True:
        for rank, p in procs:
            code = p.poll()
            if code is None:
                continue
            group = state["group"]
            if group is not None and group.closed:
                return
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code} (its error is above)"
            msg = (f"expert parallel rank {rank} (pid {p.pid}) {how}" + (" while starting up" if group is None else "")
                   + "; rank 0 stops: the group cannot continue without it")
            if group is None:  # rank 0 is still inside init_process_group: nothing to unwind
                print(f"flashport: error: {msg}", file=sys.stderr, flush=True)
                os._exit(1)
            group.fail(msg)
            return
        time.sleep(0.2)


def _take_down(message: str) -> None:
    """Rank 0 after a fatal error: an orderly stop (SIGTERM: the server drains), exit code 1 whatever happens."""
    grace = float(os.environ.get("FLASHPORT_EP_EXIT_GRACE_S", "20"))

    def hard_exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    atexit.register(hard_exit)  # registered last: runs first at exit
    timer = threading.Timer(grace, hard_exit)
    timer.daemon = True
    timer.start()
    os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent: int) -> None:
    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                print(f"flashport: expert parallel worker {os.getpid()}: rank 0 (pid {parent}) is gone, exiting",
                      file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=watch, name="flashport-ep-parent", daemon=True).start()


def _worker_main(spec: dict[str, Any]) -> None:
    rank, size, device_type = spec["rank"], spec["size"], spec["device"]
    _watch_parent(spec["parent"])
    try:
        if device_type == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend_for(torch.device(device_type)),
                                init_method=f"tcp://{spec['addr']}:{spec['port']}", rank=rank, world_size=size,
                                timeout=data_timeout())
        _serve_as_worker(ExpertParallel(rank, size, torch.device(device_type)), spec["engine_args"])
    except BaseException:
        print(f"flashport: expert parallel rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: the process group needs no unwinding once rank 0 said stop


# ---------------------------------------------------------------------- torchrun
def is_torchrun_worker() -> bool:
    """True in a rank > 0 started by torchrun (it must not bind the server's port)."""
    return under_torchrun() and int(os.environ["RANK"]) != 0


def run_torchrun_worker(model: str, engine_args: dict[str, Any]) -> None:
    """A torchrun rank > 0 of `flashport serve`: join the group and follow rank 0; never returns."""
    from flashport.engine.engine import Engine

    Engine(model, **engine_args)  # joins as a worker inside, exits when rank 0 stops
    raise AssertionError("unreachable: a torchrun worker exits inside Engine()")


def _join_torchrun(size: int, engine_args: dict[str, Any], device: torch.device) -> ExpertParallel:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != size:
        raise FlashportError(f"--expert-parallel-size {size} but torchrun started WORLD_SIZE={world} ranks")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=data_timeout())  # env:// from torchrun
    group = ExpertParallel(rank, world, device)
    if rank == 0:
        group.on_fatal = _take_down
        atexit.register(group.close)
        return group
    try:
        _serve_as_worker(group, engine_args)
    except BaseException:
        print(f"flashport: expert parallel rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------------- the worker loop
def _serve_as_worker(group: ExpertParallel, engine_args: dict[str, Any]) -> None:
    from flashport.engine.engine import Engine

    args = dict(engine_args)
    args.update(expert_parallel_size=group.world_size, parallel=group, progress=False, log=None)
    run_worker(Engine(**args))


def run_worker(engine: Any) -> int:
    """A rank > 0: run every plan rank 0 sends through this rank's runner until told to stop.
    Returns the number of steps run. Sampling here is a throwaway greedy pick (rank 0 samples)."""
    from flashport.engine.runner import SeqSampling
    from flashport.sampling_params import SamplingParams

    group: ExpertParallel = engine.parallel
    if group.data_parallel:
        from flashport.distributed.data_parallel import worker_loop
        from flashport.distributed.group import STOP

        return worker_loop(group, engine, STOP)
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    steps = 0
    while True:
        plan = group.recv_plan()
        if plan is None:
            return steps
        engine.runner.execute(plan, {s.request_id: SeqSampling(greedy, 0, [], []) for s in plan.seqs})
        steps += 1


if __name__ == "__main__":  # a spawned worker: python -m flashport.distributed.launch SPEC_JSON
    _worker_main(json.loads(sys.argv[1]))
