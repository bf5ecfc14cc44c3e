"""Scheduler policy, checked against a fake runner that keeps token ids in fake pools (no torch here).

The fake runner writes every computed token id into the comp and window blocks of the plan and,
before each step, reads back every position the model would read (all earlier tokens through the
compressed blocks, the last W - 1 through the window blocks). A wrong block table, a block reused
while still referenced, or a bad prefix hit shows up as a wrong token id.
"""

import random
import subprocess
import sys
from pathlib import Path

import pytest

from flashport.engine.config import CacheConfig, SchedulerConfig
from flashport.engine.plan import ScheduledSeq, SchedulerOutput, StepResult
from flashport.engine.request import Request, RequestStatus
from flashport.engine.scheduler import Scheduler
from flashport.errors import RequestError

B, W = 8, 4
STOP = 0  # the fake engine's EOS


def make_sched(num_comp=64, num_window=64, num_slots=8, max_seqs=8, budget=64, max_len=1000, prefix=True,
               block_size=B, window=W) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len),
                     CacheConfig(block_size=block_size, num_comp_blocks=num_comp, num_window_blocks=num_window,
                                 num_state_slots=num_slots, sliding_window=window, enable_prefix_caching=prefix))


def next_token(request_id: str, pos: int, stop_ok: bool = False) -> int:
    token = hash((request_id, pos)) % 50 + 1  # independent of scheduling: a deterministic "model"
    return STOP if stop_ok and token == 50 else token


class FakeRunner:
    def __init__(self, sched: Scheduler, stop_ok: bool = False) -> None:
        self.sched, self.stop_ok = sched, stop_ok
        cc = sched.cache_config
        self.B, self.W = cc.block_size, cc.sliding_window
        self.comp = [[None] * self.B for _ in range(cc.num_comp_blocks)]
        self.window = [[None] * self.B for _ in range(cc.num_window_blocks)]
        self.known: dict[str, list[int]] = {}  # request id -> prompt + sampled tokens

    def add(self, request_id: str, prompt: list[int], max_tokens: int, **kw) -> Request:
        req = Request(request_id, list(prompt), max_tokens, **kw)
        self.sched.add_request(req)
        self.known[request_id] = list(prompt)
        return req

    def execute(self, out: SchedulerOutput) -> StepResult:
        B, W, cache = self.B, self.W, self.sched.cache
        result = StepResult()
        assert len({s.state_slot for s in out.seqs}) == len(out.seqs)
        assert out.num_batched_tokens == sum(len(s.token_ids) for s in out.seqs)
        for seq in out.seqs:
            toks, start, n = self.known[seq.request_id], seq.start_pos, len(seq.token_ids)
            assert n >= 1 and seq.token_ids == tuple(toks[start:start + n])
            assert len(seq.comp_blocks) == len(seq.window_blocks) == -(-(start + n) // B)
            assert seq.sample == (start + n == len(toks))
            assert seq.reset_state or start > 0
            for pos in range(start):  # the compressed history (and boundary state) the model reads
                assert self.comp[seq.comp_blocks[pos // B]][pos % B] == toks[pos], (seq.request_id, pos)
            for pos in range(max(0, start - (W - 1)), start):  # the window tail
                block = seq.window_blocks[pos // B]
                assert block != -1 and self.window[block][pos % B] == toks[pos], (seq.request_id, pos)
            for pos in range(start, start + n):  # writes: only into private, uncached blocks
                cb, wb = seq.comp_blocks[pos // B], seq.window_blocks[pos // B]
                assert cache.comp_pool.ref_counts[cb] == 1 and cache.comp_pool.block_hashes[cb] is None
                assert cache.window_pool.ref_counts[wb] == 1 and cache.window_pool.block_hashes[wb] is None
                self.comp[cb][pos % B] = toks[pos]
                self.window[wb][pos % B] = toks[pos]
            if seq.sample:
                result.sampled[seq.request_id] = next_token(seq.request_id, start + n, self.stop_ok)
        return result

    def step(self) -> tuple[SchedulerOutput, list[Request]]:
        sched = self.sched
        head = sched.running[0].request_id if sched.running else None
        out = sched.schedule()
        if head is not None:  # starvation protection: the head is never preempted, always progresses
            assert head not in out.preempted and out.seqs[0].request_id == head
        result = self.execute(out)
        finished = sched.update(out, result)
        for request_id, token in result.sampled.items():
            self.known[request_id].append(token)
            if token == STOP and request_id in sched.requests:
                finished.append(sched.finish(request_id, RequestStatus.FINISHED_STOPPED))
        check_state(sched)
        return out, finished

    def run(self, max_steps: int = 10_000) -> list[SchedulerOutput]:
        outs = []
        while self.sched.has_unfinished():
            assert len(outs) < max_steps, "no progress"
            outs.append(self.step()[0])
        return outs


def check_state(sched: Scheduler) -> None:
    cache, size = sched.cache, sched.cache_config.block_size
    cache.comp_pool.check_invariants()
    cache.window_pool.check_invariants()
    comp_refs = [0] * cache.comp_pool.num_blocks
    window_refs = [0] * cache.window_pool.num_blocks
    for req in sched.running:
        assert req.status == RequestStatus.RUNNING and req.state_slot != -1
        assert req.num_computed_tokens < req.num_tokens
        assert len(req.comp_blocks) == len(req.window_blocks) and len(req.comp_blocks) * size >= req.num_computed_tokens
        released = max(0, req.num_computed_tokens - (sched.cache_config.sliding_window - 1)) // size
        assert req.num_window_released == released
        assert all(b == -1 for b in req.window_blocks[:released]) and -1 not in req.window_blocks[released:]
        for b in req.comp_blocks:
            comp_refs[b] += 1
        for b in req.window_blocks[released:]:
            window_refs[b] += 1
    assert comp_refs == cache.comp_pool.ref_counts and window_refs == cache.window_pool.ref_counts
    assert len(cache.free_slots) + len(sched.running) == cache.num_state_slots
    for req in sched.waiting:
        assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert req.state_slot == -1 and not req.comp_blocks and req.num_computed_tokens == 0


def assert_all_free(sched: Scheduler) -> None:
    cache = sched.cache
    for pool in (cache.comp_pool, cache.window_pool):
        assert pool.num_held == 0 and set(pool.ref_counts) == {0}
        assert pool.num_free + pool.num_evictable == pool.num_blocks
        if not cache.enable_prefix_caching:
            assert pool.num_free == pool.num_blocks
    assert sorted(cache.free_slots) == list(range(cache.num_state_slots))


def spans(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(s.request_id, s.start_pos, len(s.token_ids), s.sample) for s in out.seqs]


# ---- batching -----------------------------------------------------------------------------------

def test_chunked_prefill_splits_by_budget():
    run = FakeRunner(make_sched(budget=16))
    run.add("a", list(range(1, 41)), max_tokens=3)
    assert [spans(run.step()[0]) for _ in range(5)] == [
        [("a", 0, 16, False)], [("a", 16, 16, False)], [("a", 32, 8, True)], [("a", 40, 1, True)],
        [("a", 41, 1, True)]]
    assert not run.sched.has_unfinished()
    assert_all_free(run.sched)


def test_chunks_mix_with_decodes_and_last_admitted_gets_partial_chunk():
    run = FakeRunner(make_sched(budget=16))
    run.add("a", [1, 2, 3, 4, 5], max_tokens=10)
    assert spans(run.step()[0]) == [("a", 0, 5, True)]
    run.add("b", list(range(1, 31)), max_tokens=2)
    run.add("c", list(range(101, 111)), max_tokens=2)
    out, _ = run.step()
    assert spans(out) == [("a", 5, 1, True), ("b", 0, 15, False)]  # c waits: no budget left
    out, _ = run.step()
    assert spans(out) == [("a", 6, 1, True), ("b", 15, 15, True)]
    out, _ = run.step()  # c is admitted behind the two decodes with what is left of the budget
    assert spans(out) == [("a", 7, 1, True), ("b", 30, 1, True), ("c", 0, 10, True)]
    assert out.num_batched_tokens == 12 and (run.sched.num_running, run.sched.num_waiting) == (2, 0)
    run.run()
    assert_all_free(run.sched)


def test_max_num_seqs_and_state_slots_bound_running():
    for max_seqs, num_slots in ((2, 8), (8, 2)):
        run = FakeRunner(make_sched(max_seqs=max_seqs, num_slots=num_slots))
        for i in range(5):
            run.add(f"r{i}", [i + 1] * 3, max_tokens=4)
        out, _ = run.step()
        assert [s.request_id for s in out.seqs] == ["r0", "r1"]  # FCFS
        assert (run.sched.num_running, run.sched.num_waiting) == (2, 3)
        while run.sched.has_unfinished():
            run.step()
            assert run.sched.num_running <= 2
        assert_all_free(run.sched)


def test_fcfs_admission_order():
    run = FakeRunner(make_sched(max_seqs=1))
    for name in ("x", "b", "m"):
        run.add(name, [1, 2], max_tokens=2)
    order = []
    for out in run.run():
        for s in out.seqs:
            if s.reset_state:
                order.append(s.request_id)
    assert order == ["x", "b", "m"]


# ---- prefix reuse -------------------------------------------------------------------------------

def test_prefix_hit_through_the_scheduler():
    run = FakeRunner(make_sched())
    prompt = list(range(1, 2 * B + 4))
    run.add("a", prompt, max_tokens=2)
    run.run()
    b = run.add("b", prompt, max_tokens=2)
    out, _ = run.step()
    assert spans(out) == [("b", 2 * B, 3, True)] and out.seqs[0].reset_state
    assert b.num_cached_tokens == 2 * B and out.seqs[0].token_ids == tuple(prompt[2 * B:])
    c = run.add("c", prompt[:2 * B], max_tokens=2)  # fully cached: the last block is recomputed
    out, _ = run.step()
    assert ("c", B, B, True) in spans(out) and c.num_cached_tokens == B
    run.run()
    cache = run.sched.cache
    assert cache.num_prefix_hit_tokens == 3 * B and cache.num_prefix_query_tokens == 3 * len(prompt) - 3
    assert_all_free(run.sched)


def test_prompt_logprobs_flags_and_no_prefix_hit():
    run = FakeRunner(make_sched(budget=8))
    prompt = list(range(1, 21))
    run.add("a", prompt, max_tokens=2)
    run.run()
    run.add("lp", prompt, max_tokens=2, want_prompt_logprobs=True)
    outs = run.run()
    assert [(s.start_pos, len(s.token_ids), s.want_prompt_logprobs) for o in outs for s in o.seqs] == [
        (0, 8, True), (8, 8, True), (16, 4, True), (20, 1, False)]  # every prompt row computed


# ---- preemption ---------------------------------------------------------------------------------

def test_preempted_request_resumes_with_prompt_plus_output():
    run = FakeRunner(make_sched(num_comp=4, num_window=4, num_slots=2, budget=64, prefix=False,
                                block_size=4, window=2))
    run.add("a", list(range(1, 8)), max_tokens=10)
    b = run.add("b", list(range(11, 18)), max_tokens=10)
    assert spans(run.step()[0]) == [("a", 0, 7, True), ("b", 0, 7, True)]  # 2 + 2 blocks: all taken
    assert spans(run.step()[0]) == [("a", 7, 1, True), ("b", 7, 1, True)]
    out, _ = run.step()  # a needs a third block: b (latest admitted) is preempted
    assert out.preempted == ("b",) and spans(out) == [("a", 8, 1, True)]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and len(b.output_token_ids) == 2
    assert run.sched.waiting[0] is b
    outs = run.run()
    resumed = [s for o in outs for s in o.seqs if s.request_id == "b"][0]
    assert resumed.reset_state and resumed.start_pos == 0 and len(resumed.token_ids) == 9 and resumed.sample
    assert len(b.output_token_ids) == 10 and b.status == RequestStatus.FINISHED_LENGTH
    assert_all_free(run.sched)


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_under_memory_pressure_finishes_and_frees_everything(prefix, seed):
    rng = random.Random(seed)
    sched = make_sched(num_comp=14, num_window=6, num_slots=5, max_seqs=4, budget=24, max_len=90, prefix=prefix)
    run = FakeRunner(sched, stop_ok=True)
    shared = [rng.randrange(1, 50) for _ in range(3 * B)]
    reqs = []
    for i in range(24):
        prompt = shared[:rng.randrange(0, 3 * B)] + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 30))]
        reqs.append(run.add(f"r{i}", prompt, max_tokens=rng.randrange(1, 50)))
        if i % 3 == 2:
            run.step()  # requests keep arriving while others run
    run.run()
    assert sched.num_preemptions > 0  # the pools are small enough to force preemptions
    for req in reqs:
        assert req.is_finished and req.output_token_ids == run.known[req.request_id][req.num_prompt_tokens:]
        num_out = len(req.output_token_ids)
        if req.status == RequestStatus.FINISHED_LENGTH:
            assert num_out == req.max_tokens or req.num_tokens == 90
        else:
            assert req.status == RequestStatus.FINISHED_STOPPED and req.output_token_ids[-1] == STOP
        for pos in range(req.num_prompt_tokens, req.num_tokens):  # same tokens as an unpreempted run
            assert req.all_token_ids[pos] == next_token(req.request_id, pos, True)
    assert_all_free(sched)
    if prefix:
        assert sched.cache.num_prefix_hit_tokens > 0


def test_lone_request_filling_the_whole_pool_runs_with_tiny_window_pool():
    run = FakeRunner(make_sched(num_comp=4, num_window=2, budget=64))
    req = run.add("big", list(range(1, 26)), max_tokens=8)  # computes 32 tokens = all 4 comp blocks
    outs = run.run()
    assert [len(s.token_ids) for s in outs[0].seqs] == [16]  # the first chunk shrinks to 2 blocks
    assert len(req.output_token_ids) == 8
    assert_all_free(run.sched)


# ---- abort, finish, rejection --------------------------------------------------------------------

def test_abort_frees_everything_waiting_or_running():
    run = FakeRunner(make_sched(max_seqs=2, prefix=False))
    for i in range(3):
        run.add(f"r{i}", list(range(1, 20)), max_tokens=5)
    run.step()
    sched = run.sched
    assert sched.abort("r2").status == RequestStatus.FINISHED_ABORTED  # waiting
    out = sched.schedule()
    result = run.execute(out)
    assert sched.abort("r0").status == RequestStatus.FINISHED_ABORTED  # running, step in flight
    sched.update(out, result)  # r0's part of the step is ignored
    check_state(sched)
    assert sched.schedule().finished_freed == ("r0",)
    assert sched.abort("nope") is None
    sched.abort("r1")
    assert not sched.has_unfinished() and sched.num_running == sched.num_waiting == 0
    assert_all_free(sched)


def test_engine_finish_and_max_model_len():
    run = FakeRunner(make_sched(max_len=12))
    req = run.add("a", list(range(1, 11)), max_tokens=100)
    run.step()
    sched = run.sched
    _, finished = run.step()
    assert finished == [req] and req.status == RequestStatus.FINISHED_LENGTH and req.num_tokens == 12
    other = run.add("b", [1, 2, 3], max_tokens=100)
    run.step()
    assert sched.finish("b", RequestStatus.FINISHED_STOPPED) is other and other.status.is_finished
    assert sched.schedule().finished_freed == ("b",)
    with pytest.raises(ValueError):
        sched.finish("b", RequestStatus.RUNNING)
    assert_all_free(sched)


def test_impossible_requests_are_rejected():
    sched = make_sched(num_comp=4, num_window=4, max_len=40)
    with pytest.raises(RequestError, match="need 5 compressed blocks"):
        sched.add_request(Request("big", list(range(20)), max_tokens=20))  # 39 cached tokens > 32
    sched.add_request(Request("ok", list(range(20)), max_tokens=13))  # 32 cached tokens fit
    with pytest.raises(RequestError, match="already in use"):
        sched.add_request(Request("ok", [1], max_tokens=1))
    with pytest.raises(RequestError, match="max_model_len"):
        sched.add_request(Request("long", list(range(40)), max_tokens=1))
    with pytest.raises(RequestError, match="empty"):
        sched.add_request(Request("empty", [], max_tokens=1))
    with pytest.raises(RequestError, match="max_tokens"):
        sched.add_request(Request("zero", [1], max_tokens=0))
    capped = make_sched(num_comp=4, num_window=4, max_len=33)  # max_model_len caps the growth
    capped.add_request(Request("big", list(range(20)), max_tokens=20))
    assert capped.num_waiting == 1 and sched.num_waiting == 1


def test_scheduler_does_not_import_torch():
    code = (
        "import sys\n"
        "from flashport.engine.scheduler import Scheduler\n"
        "from flashport.engine.request import Request\n"
        "from flashport.engine.config import CacheConfig, SchedulerConfig\n"
        "from flashport.engine.plan import StepResult\n"
        "s = Scheduler(SchedulerConfig(), CacheConfig(16, 8, 8, 4, 4))\n"
        "s.add_request(Request('a', [1, 2, 3], 3))\n"
        "while s.has_unfinished():\n"
        "    out = s.schedule()\n"
        "    s.update(out, StepResult(sampled={q.request_id: 7 for q in out.seqs if q.sample}))\n"
        "print('torch' in sys.modules)\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_fast_scheduled_seq_build_equals_the_constructor(monkeypatch):
    import dataclasses

    from flashport.engine import scheduler as scheduler_module

    assert scheduler_module._FAST_SEQ  # ScheduledSeq is still what the fast build was written for
    outs = {}
    for fast in (True, False):
        monkeypatch.setattr(scheduler_module, "_FAST_SEQ", fast)
        run = FakeRunner(make_sched(num_comp=10, num_window=5, num_slots=3, budget=16))
        for i in range(6):
            run.add(f"r{i}", list(range(1, 5 + 7 * i)), max_tokens=9, want_prompt_logprobs=i == 2)
        outs[fast] = run.run()
    assert outs[True] == outs[False] and len(outs[True]) > 10
    seq = outs[True][0].seqs[0]
    assert type(seq) is ScheduledSeq and vars(seq) == dataclasses.asdict(seq)
    with pytest.raises(dataclasses.FrozenInstanceError):
        seq.start_pos = 3
