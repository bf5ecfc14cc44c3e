"""The async bridge: an asyncio front (HTTP handlers) over the synchronous `Engine`, which keeps
stepping in its own thread while requests arrive.

    handler (event loop)                          engine thread
    --------------------                          -------------
    encode prompt (tokenizer pool thread)
    submit() -> ("add", ...) ---- commands ---->  apply adds / aborts (between steps)
              <- add result --- call_soon_ts ---  step() -> outputs + stats snapshot
    handle.outputs() yields  <-- call_soon_ts ---  (one callback per step, all requests)

Only token ids cross into the engine: prompts are tokenized before `submit`, off both the event
loop and the engine thread. The engine detokenizes incrementally (UTF-8 safe, stop strings held
back), so a handler only diffs `outputs[i].text` between the cumulative outputs it receives. A
handle keeps only the newest output (outputs are cumulative), so a slow client never makes the
bridge buffer more than one output per request.

Aborts (client disconnect, shutdown) drop the handle at once and reach the engine before its next
step, which frees the request's blocks and slot. An exception inside `step()` fails only the
requests in flight at that moment (they are aborted and answered with an error); the loop goes on.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from flashport.errors import RequestError
from flashport.sampling_params import RequestOutput, SamplingParams


class QueueFull(Exception):
    """More requests wait for their first token than --max-waiting allows."""


class ShuttingDown(Exception):
    """The server stopped admitting requests (SIGTERM) or the engine thread is gone."""


class RequestFailed(Exception):
    """A request ended without finishing: reason is "aborted", "shutdown" or "engine_error"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Observer(Protocol):
    """What the bridge reports (metrics.py implements it)."""

    def on_admitted(self, num_prompt_tokens: int) -> None: ...
    def on_tokens(self, num_new_tokens: int) -> None: ...
    def on_first_token(self, ttft_s: float) -> None: ...
    def on_finished(self, reason: str, e2e_s: float, tpot_s: float | None) -> None: ...


@dataclass
class EngineStats:
    """A snapshot the engine thread takes after each iteration (read by /metrics and /health)."""

    num_running: int = 0
    num_waiting: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    prefix_hit_rate: float = 0.0
    # kind -> (free or evictable, total); kinds: compressed, window, state_slot
    pools: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class RequestHandle:
    """One engine request as the event loop sees it."""

    request_id: str
    num_prompt_tokens: int
    arrival: float
    _event: asyncio.Event = field(default_factory=asyncio.Event)
    _latest: RequestOutput | None = None
    _failure: str | None = None
    queued: bool = True  # no output yet (counts against --max-waiting)
    first_token_time: float | None = None
    num_tokens: int = 0  # generated tokens seen so far, all samples together
    finished: bool = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The cumulative outputs, newest only, until the finished one; RequestFailed if it ends otherwise."""
        while True:
            await self._event.wait()
            self._event.clear()
            out, self._latest = self._latest, None
            if out is not None:
                yield out
                if out.finished:
                    return
            if self._failure is not None:
                raise RequestFailed(self._failure)

    async def result(self) -> RequestOutput:
        last = None
        async for out in self.outputs():
            last = out
        assert last is not None and last.finished
        return last


class AsyncEngine:
    def __init__(self, engine: Any, *, max_waiting: int = 1024, observer: Observer | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.sched_config.max_model_len
        self.vocab_size: int = engine.config.vocab_size
        self.max_waiting = max_waiting
        self.observer = observer
        self.log = log
        self.stats = EngineStats()
        self.draining = False
        self.engine_error: str | None = None  # set when the engine thread died
        self._handles: dict[str, RequestHandle] = {}
        self._num_queued = 0
        self._cv = threading.Condition()
        self._cmds: list[tuple] = []
        self._stopping = False
        self._live: set[str] = set()  # engine thread only: ids added and not finished or aborted
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tok_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flashport-tokenize")
        self._token_str: dict[int, str] = {}
        self._stats_from_engine()  # counters before the first step

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread (call from the event loop that will use the bridge)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run_guarded, name="flashport-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.engine_error is None

    @property
    def num_in_flight(self) -> int:
        return len(self._handles)

    @property
    def num_queued(self) -> int:
        return self._num_queued

    def begin_drain(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        while self._handles:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def abort_all(self, reason: str) -> int:
        ids = list(self._handles)
        for rid in ids:
            self.abort(rid, reason)
        return len(ids)

    async def stop(self, timeout: float = 30.0) -> None:
        self.draining = True
        self.abort_all("shutdown")
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
        self._tok_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ requests
    async def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, computed in the tokenizer pool (off the loop and the engine thread)."""
        if self.tokenizer is None:
            raise RequestError("a text prompt needs a tokenizer, and the model directory has no tokenizer.json")
        return await asyncio.get_running_loop().run_in_executor(self._tok_pool, self.tokenizer.encode, text)

    def token_str(self, token_id: int) -> str:
        """The text of one token (for logprobs), cached; the vocabulary bounds the cache."""
        s = self._token_str.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"<{token_id}>"
            if 0 <= token_id < self.vocab_size:
                self._token_str[token_id] = s
        return s

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    async def submit(self, items: list[tuple[str, list[int], SamplingParams]]) -> list[RequestHandle]:
        """Add requests (id, prompt ids, params) together: all are admitted, or none.

        Raises ShuttingDown, QueueFull, or the engine's RequestError for the first one it refuses
        (with `.index` set to its position in `items`)."""
        if self.draining or not self.alive:
            raise ShuttingDown("the server is shutting down" if self.draining else "the engine is not running")
        if self._num_queued + len(items) > self.max_waiting:
            raise QueueFull(f"{self._num_queued} requests are waiting (limit {self.max_waiting})")
        assert self._loop is not None
        now = time.monotonic()
        handles, futures = [], []
        for rid, ids, params in items:
            h = RequestHandle(rid, len(ids), now)
            self._handles[rid] = h
            self._num_queued += 1
            fut = self._loop.create_future()
            handles.append(h)
            futures.append(fut)
            self._post(("add", rid, ids, params, fut))
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except BaseException:  # cancelled (client gone) while waiting for the engine thread
            for h in handles:
                self.abort(h.request_id, "aborted")
            raise
        errors = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        if errors:
            for h in handles:
                self.abort(h.request_id, "aborted", count=False)
            index, exc = errors[0]
            exc.index = index  # type: ignore[attr-defined]
            raise exc
        if self.observer is not None:
            for h in handles:
                self.observer.on_admitted(h.num_prompt_tokens)
        return handles

    def abort(self, request_id: str, reason: str = "aborted", count: bool = True) -> None:
        """End a request now (client gone, shutdown); unknown or finished ids are ignored."""
        h = self._handles.pop(request_id, None)
        if h is None:
            return
        self._unqueue(h)
        h._failure = reason
        h._event.set()
        if count and self.observer is not None:
            self.observer.on_finished(reason, time.monotonic() - h.arrival, None)
        self._post(("abort", request_id))

    # ------------------------------------------------------------------ event-loop side
    def _post(self, cmd: tuple) -> None:
        with self._cv:
            self._cmds.append(cmd)
            self._cv.notify()

    def _unqueue(self, h: RequestHandle) -> None:
        if h.queued:
            h.queued = False
            self._num_queued -= 1

    def _deliver(self, adds: list[tuple[asyncio.Future, BaseException | None]], outputs: list[RequestOutput],
                 failed: list[str], stats: EngineStats) -> None:
        # (`stats` is already in self.stats: the engine thread sets it, newest last.)
        for fut, exc in adds:
            if not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)
        now = time.monotonic()
        obs = self.observer
        for out in outputs:
            h = self._handles.get(out.request_id)
            if h is None:
                continue  # aborted since
            self._unqueue(h)
            num = sum(len(o.token_ids) for o in out.outputs)
            if num > h.num_tokens:
                if h.first_token_time is None:
                    h.first_token_time = now
                    if obs is not None:
                        obs.on_first_token(now - h.arrival)
                if obs is not None:
                    obs.on_tokens(num - h.num_tokens)
                h.num_tokens = num
            h._latest = out
            h._event.set()
            if out.finished:
                h.finished = True
                del self._handles[out.request_id]
                if obs is not None:
                    longest = max((len(o.token_ids) for o in out.outputs), default=0)
                    tpot = ((now - h.first_token_time) / (longest - 1)
                            if h.first_token_time is not None and longest > 1 else None)
                    reasons = [o.finish_reason or "stop" for o in out.outputs]
                    obs.on_finished("length" if "length" in reasons else "stop", now - h.arrival, tpot)
        for rid in failed:
            self.abort(rid, "engine_error")

    def _engine_died(self, message: str) -> None:
        self.engine_error = message
        self.abort_all("engine_error")

    # ------------------------------------------------------------------ engine thread
    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException:  # a bug in the loop itself: report, fail everything, stop serving
            self.log("engine thread died:\n" + traceback.format_exc())
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._engine_died, "the engine thread died")

    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cv:
                while not self._cmds and not self._stopping and not eng.has_unfinished():
                    self._cv.wait()
                cmds, self._cmds = self._cmds, []
                stopping = self._stopping
            adds: list[tuple[asyncio.Future, BaseException | None]] = []
            for cmd in cmds:
                if cmd[0] == "add":
                    _, rid, ids, params, fut = cmd
                    try:
                        eng.add_request(rid, ids, params)
                        self._live.add(rid)
                        adds.append((fut, None))
                    except RequestError as exc:
                        adds.append((fut, exc))
                    except Exception as exc:  # a bug: keep the traceback on the server
                        self.log(f"add_request {rid!r} failed:\n" + traceback.format_exc())
                        adds.append((fut, exc))
                else:
                    eng.abort(cmd[1])
                    self._live.discard(cmd[1])
            if stopping:
                for rid in list(self._live):
                    eng.abort(rid)
                self._live.clear()
                stats = self._stats_from_engine()
                if self._loop is not None:  # resolve the last adds' futures
                    try:
                        self._loop.call_soon_threadsafe(self._deliver, adds, [], [], stats)
                    except RuntimeError:  # the loop is closed
                        pass
                return
            outputs: list[RequestOutput] = []
            failed: list[str] = []
            if eng.has_unfinished():
                steps_before = eng.num_steps
                try:
                    outputs = eng.step()
                except Exception:
                    # Fail only what is in flight now; the engine keeps serving new requests.
                    self.log("engine step failed; aborting the requests in flight:\n" + traceback.format_exc())
                    failed = sorted(self._live)
                    for rid in failed:
                        eng.abort(rid)
                    self._live.clear()
                if eng.num_steps == steps_before and not outputs and not failed:
                    # Nothing scheduled and nothing returned (only the last launched step collected,
                    # or nothing could be scheduled): don't spin holding the GIL.
                    with self._cv:
                        self._cv.wait(0.005)
            for out in outputs:
                if out.finished:
                    self._live.discard(out.request_id)
            stats = self._stats_from_engine()
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._deliver, adds, outputs, failed, stats)
                except RuntimeError:  # the loop closed under us (interpreter exit)
                    return

    def _stats_from_engine(self) -> EngineStats:
        eng = self.engine
        sched = eng.scheduler
        cache = sched.cache
        cc = eng.cache_config
        stats = EngineStats(
            num_running=sched.num_running, num_waiting=sched.num_waiting, num_preemptions=sched.num_preemptions,
            num_steps=eng.num_steps, prefix_hit_rate=cache.prefix_hit_rate,
            pools={"compressed": (cache.num_free_comp_blocks, cc.num_comp_blocks),
                   "window": (cache.num_free_window_blocks, cc.num_window_blocks),
                   "state_slot": (cache.num_free_state_slots, cc.num_state_slots)})
        self.stats = stats  # one attribute store: readers on the event loop see this or the previous one
        return stats
