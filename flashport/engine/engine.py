"""The engine: requests in, tokens out, one `step()` at a time (for `LLM` and the server).

    step() = schedule -> execute -> update

With `overlap` (the default on a GPU) a step's device work runs while the host processes the
step before it:

    step() = collect(t) -> scheduler.update(t) -> schedule(t+1) -> launch(t+1)
             -> detokenize, stop checks and outputs of t (the device is running t+1)

so the outputs a call returns are those of the step launched by the call before, and a sequence
that stops on EOS, a stop token or a stop string at step t has one more token computed at t+1,
which is dropped (the scheduler frees it when the engine finishes it; `update` skips it).
Only the scheduler's update, the scheduling and the input build of t+1 are left between the
device's steps.

The scheduler plans (pure Python), the runner runs the model over the state pools and samples
on the device, and the engine applies what needs text: detokenization, stop strings, EOS and
stop tokens. A request with `n > 1` runs as n sequences that share the prompt's cached blocks
through prefix reuse.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from flashport.engine.config import SchedulerConfig
from flashport.engine.graphs import DecodeGraphs, graphs_supported, profile_decode_bytes
from flashport.engine.memory import CapacityReport, plan_cache
from flashport.engine.plan import SchedulerOutput, StepResult
from flashport.engine.pools import StatePools, check_block_size, default_block_size
from flashport.engine.request import Request, RequestStatus
from flashport.engine.runner import ModelRunner, PendingStep, SeqSampling
from flashport.engine.scheduler import Scheduler
from flashport.errors import FlashportError, RequestError
from flashport.model.layers import REFERENCE
from flashport.model.loader import load_model
from flashport.platform import detect_platform
from flashport.sampling_params import CompletionOutput, Logprobs, RequestOutput, SamplingParams
from flashport.tokenizer import IncrementalDetokenizer, Tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Sequence:
    """One of a request's n samples, as the engine tracks it."""

    seq_id: str
    index: int
    sampling: SeqSampling
    detok: IncrementalDetokenizer | None
    text: str = ""
    logprobs: list[Logprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Group:
    """A user request: its prompt and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[_Sequence]
    prompt_logprobs: list[Logprobs | None] | None = None
    deferred: list[Request] = field(default_factory=list)  # samples 2..n, added once the prompt is cached
    prompt_out: list[int] | None = None  # the prompt ids every output of this request carries (one copy)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class Engine:
    def __init__(self, model: str | Path, *, device: str = "auto", dtype: str = "auto", load_format: str = "auto",
                 num_layers: int | None = None, dequantize: bool = False, max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, block_size: int | None = None,
                 gpu_memory_utilization: float = 0.9, cache_bytes: int | None = None,
                 enable_prefix_caching: bool = True, seed: int = 0, progress: bool = True,
                 ops_impl: str = "auto", kv_cache_dtype: str = "auto", enforce_eager: bool = False,
                 log: Callable[[str], None] | None = print, expert_parallel_size: int = 1,
                 parallel: Any = None, overlap: bool | None = None) -> None:
        # Expert parallelism (flashport.distributed): the routed experts split over N ranks, one per
        # GPU. Rank 0 (this process) starts ranks 1..N-1 with these same arguments (`parallel` is
        # their joined group); they run every step rank 0 schedules.
        engine_args = {k: v for k, v in locals().items() if k not in ("self", "log", "progress", "parallel", "overlap")}
        self.platform = detect_platform(None if device == "auto" else device)
        self.device = torch.device("cpu" if self.platform.backend == "cpu" else "cuda")
        self.parallel = parallel
        if parallel is None and expert_parallel_size != 1:
            from flashport.distributed.launch import start_expert_parallel

            engine_args["model"] = str(model)
            self.parallel = start_expert_parallel(expert_parallel_size, engine_args, self.device)
        if dtype == "auto":  # bf16 is the checkpoint dtype; CPUs run fp32 much faster than bf16
            torch_dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        elif dtype in _DTYPES:
            torch_dtype = _DTYPES[dtype]
        else:
            raise FlashportError(f"dtype {dtype!r}: expected one of auto, {', '.join(_DTYPES)}")
        self.model, self.config = load_model(
            model, device=self.device, dtype=torch_dtype, load_format=load_format, num_layers=num_layers,
            dequantize=dequantize, fp8_dtype=self.platform.fp8_dtype, seed=seed, progress=progress,
            ops_impl=ops_impl, expert_parallel=self.parallel)
        model_dir = Path(model)
        self.tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").exists() else None
        limit = self.config.max_position_embeddings
        if max_model_len is not None and not 1 < max_model_len <= limit:
            raise FlashportError(f"max_model_len = {max_model_len}: must be in [2, {limit}] (the model's "
                                 "max_position_embeddings)")
        self.sched_config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                            max_model_len=max_model_len or min(limit, 8192))
        block_size = block_size or default_block_size(self.model.cfg)
        check_block_size(self.model.cfg, block_size)
        entry_dtype = self._entry_dtype(kv_cache_dtype)
        # Decode steps replay captured graphs (engine/graphs.py) unless eager is forced or unsupported.
        use_graphs = not enforce_eager and graphs_supported(self.model)
        graph_bytes = profile_decode_bytes(self.model, block_size, max_num_seqs, self.sched_config.max_model_len,
                                           enable_prefix_caching, entry_dtype) if use_graphs else 0
        self.cache_config, self.capacity = plan_cache(
            self.model, self.sched_config, block_size, enable_prefix_caching=enable_prefix_caching,
            gpu_memory_utilization=gpu_memory_utilization, cache_bytes=cache_bytes, entry_dtype=entry_dtype,
            graph_bytes=graph_bytes)
        if self.parallel is not None:  # every rank's pools must hold what rank 0's scheduler hands out
            self.cache_config = self.parallel.agree_cache_config(self.cache_config)
        self.pools = StatePools(self.model.cfg, self.cache_config, self.model.dtype, self.device, entry_dtype)
        graphs = DecodeGraphs(self.model, self.pools, max_num_seqs=max_num_seqs,
                              max_model_len=self.sched_config.max_model_len, log=log) if use_graphs else None
        self.runner = ModelRunner(self.model, self.pools, max_num_batched_tokens, graphs=graphs)
        self.scheduler = Scheduler(self.sched_config, self.cache_config)
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._rng = random.Random(seed)
        # Overlap (module docstring): on by default where the device runs asynchronously (a GPU),
        # never with expert parallelism (its ranks step in lockstep through runner.execute).
        self.overlap = (self.device.type == "cuda" if overlap is None else overlap) and self.parallel is None
        self._inflight: PendingStep | None = None  # launched, not collected (overlap only)
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model (prefix hits excluded)
        self.num_steps = 0
        self._groups: dict[str, _Group] = {}
        self._seq_group: dict[str, _Group] = {}  # sequence id -> its request
        self._seqs: dict[str, _Sequence] = {}  # sequence id -> the sequence
        if log is not None:
            for line in self.capacity_report_lines():
                log(line)

    def _entry_dtype(self, kv_cache_dtype: str) -> torch.dtype | None:
        """kv_cache_dtype -> the dtype of the compressed entries and indexer keys (None: the model's)."""
        if kv_cache_dtype == "auto":
            return None
        if kv_cache_dtype != "fp8":
            raise FlashportError(f"kv_cache_dtype {kv_cache_dtype!r}: expected auto or fp8")
        if self.model.ops_impl == REFERENCE:
            raise FlashportError('kv_cache_dtype "fp8" needs the op path (ops_impl auto, torch or triton); '
                                 'the reference path keeps its state in the model dtype')
        return self.platform.fp8_dtype  # e4m3fnuz on MI300X, e4m3fn elsewhere

    # ------------------------------------------------------------------ public
    def capacity_report_lines(self) -> list[str]:
        return self.capacity.lines(self.cache_config, self.sched_config)

    @property
    def capacity_report(self) -> CapacityReport:
        return self.capacity

    def has_unfinished(self) -> bool:
        return (bool(self._groups) or self._inflight is not None
                or (self.parallel is not None and self.parallel.has_remote_requests()))

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if self.parallel is not None and self.parallel.place_request(self, request_id, prompt, params):
            return  # data-parallel attention: the request runs on another rank
        text, ids = self._check_request(request_id, prompt, params)
        group = _Group(request_id, text, ids, params, [],
                       prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        reqs = []
        for k in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{k}"
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=ids,
                                               skip_special_tokens=params.skip_special_tokens, stop=list(params.stop))
            sampling = SeqSampling(params, base_seed + k, ids, [])
            group.seqs.append(_Sequence(seq_id, k, sampling, detok,
                                        logprobs=[] if params.logprobs is not None else None))
            # Only the first sample computes prompt logprobs; the others reuse its cached prefix.
            reqs.append(Request(seq_id, ids, params.max_tokens, sampling_params=params,
                                want_prompt_logprobs=params.prompt_logprobs is not None and k == 0))
        # Samples 2..n join once the first has computed the prompt, so they reuse its cached blocks.
        self.scheduler.add_request(reqs[0])
        group.deferred = reqs[1:]
        for s, r in zip(group.seqs, reqs):
            # The runner reads the scheduler's live output list for penalties and the step index.
            s.sampling = SeqSampling(params, s.sampling.seed, ids, r.output_token_ids)
            self._seq_group[s.seq_id] = group
            self._seqs[s.seq_id] = s
        self._groups[request_id] = group

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its state (unknown ids are ignored)."""
        if self.parallel is not None and self.parallel.abort_remote(request_id):
            return
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        group.deferred = []
        for s in group.seqs:
            self.scheduler.abort(s.seq_id)
            self._seq_group.pop(s.seq_id, None)
            self._seqs.pop(s.seq_id, None)

    def step(self) -> list[RequestOutput]:
        """One engine step; returns the current output of every request that progressed."""
        if self.parallel is not None and self.parallel.data_parallel:  # each rank steps its own requests
            return self.parallel.data_parallel_step(self)
        if self.overlap:
            return self._overlapped_step()
        if self._inflight is not None:  # overlap was switched off: this call finishes the step in flight
            prev, self._inflight = self._inflight, None
            return self._apply_result(prev.plan, self.runner.collect(prev))
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        sampling = self._begin_step(plan)
        if self.parallel is None:
            result = self.runner.execute(plan, sampling)
        else:  # the plan goes to every rank first; a failure there stops the process (ranks out of step)
            result = self.parallel.execute(self.runner, plan, sampling)
        return self._apply_result(plan, result)

    def _overlapped_step(self) -> list[RequestOutput]:
        """Collect step t, launch step t+1, then process t while the device runs t+1."""
        prev, self._inflight = self._inflight, None
        finished: list[Request] = []
        if prev is not None:
            result = self.runner.collect(prev)
            finished = self.scheduler.update(prev.plan, result)
        plan = self.scheduler.schedule()
        if not plan.is_empty:
            self._inflight = self.runner.launch(plan, self._begin_step(plan))
        if prev is None:
            return []
        return self._apply_result(prev.plan, result, finished)

    def _begin_step(self, plan: SchedulerOutput) -> dict[str, SeqSampling]:
        """Count the step and its prompt tokens; -> the sampling state of the plan's sequences."""
        self.num_steps += 1
        for s in plan.seqs:
            num_prompt = len(self._seq_group[s.request_id].prompt_ids)
            self.num_prompt_tokens_computed += max(0, min(s.start_pos + len(s.token_ids), num_prompt) - s.start_pos)
        return {s.request_id: self._seqs[s.request_id].sampling for s in plan.seqs}

    def _apply_result(self, plan: SchedulerOutput, result: StepResult,
                      finished: list[Request] | None = None) -> list[RequestOutput]:
        """Scheduler update (unless done: `finished` is its return), detokenization and stop checks
        of a step's result; -> the outputs. A request aborted, or a sequence finished, since the
        step was launched (overlap) has its entries dropped."""
        if finished is None:
            finished = self.scheduler.update(plan, result)
        finished_by_length = {r.request_id for r in finished}
        touched: dict[str, _Group] = {}
        for rid, (first, rows) in result.prompt_logprobs.items():
            group = self._seq_group.get(rid)
            if group is None:
                continue
            # A chunk recomputed after a preemption may repeat entries: keep the first value.
            assert first <= len(group.prompt_logprobs), (rid, first)
            group.prompt_logprobs += rows[len(group.prompt_logprobs) - first:]
            touched[group.request_id] = group
        for rid, tok in result.sampled.items():
            group, seq = self._seq_group.get(rid), self._seqs.get(rid)
            if group is None or seq.finish_reason is not None:
                continue
            if seq.logprobs is not None:
                seq.logprobs.append(result.logprobs[rid])
            self._on_token(seq, tok, rid in finished_by_length)
            touched[group.request_id] = group
            if group.deferred:
                for r in group.deferred:
                    self.scheduler.add_request(r)
                group.deferred = []
        outputs = []
        for group in touched.values():
            outputs.append(self._output(group))
            if group.finished:
                del self._groups[group.request_id]
                for s in group.seqs:
                    self._seq_group.pop(s.seq_id, None)
                    self._seqs.pop(s.seq_id, None)
        return outputs

    # ------------------------------------------------------------------ internals
    def _check_request(self, request_id: str, prompt: str | list[int], params: SamplingParams
                       ) -> tuple[str | None, list[int]]:
        """A new request's checks (RequestError); -> (text, prompt token ids)."""
        if request_id in self._groups:
            raise RequestError(f"request id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        max_len = self.sched_config.max_model_len
        if len(ids) + params.max_tokens > max_len:
            raise RequestError(f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}: "
                               f"together more than max_model_len {max_len}")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer (the model directory has no tokenizer.json)")
        return text, ids

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer, and the model directory has no tokenizer.json")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            vocab = self.config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise RequestError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        if not ids:
            raise RequestError("the prompt is empty (it has no tokens)")
        return text, ids

    def _on_token(self, seq: _Sequence, tok: int, finished_by_length: bool) -> None:
        p = seq.sampling.params
        if tok in self.eos_token_ids and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif tok in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tok
        else:
            if seq.detok is not None:
                seq.text += seq.detok.add([tok])
                if seq.detok.stopped:
                    seq.finish_reason, seq.stop_reason = "stop", seq.detok.stop_str
            if seq.finish_reason is None and finished_by_length:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            if not finished_by_length:
                self.scheduler.finish(seq.seq_id, RequestStatus.FINISHED_STOPPED)
            if seq.detok is not None:
                seq.text += seq.detok.flush()

    def _output(self, group: _Group) -> RequestOutput:
        outs = [CompletionOutput(index=s.index, text=s.text, token_ids=list(s.sampling.output_ids),
                                 finish_reason=s.finish_reason, logprobs=s.logprobs, stop_reason=s.stop_reason)
                for s in group.seqs]
        if group.prompt_out is None:  # copied once, not per step (8K-token prompts x 64 requests per step)
            group.prompt_out = list(group.prompt_ids)
        return RequestOutput(request_id=group.request_id, prompt=group.prompt, prompt_token_ids=group.prompt_out,
                             prompt_logprobs=group.prompt_logprobs, outputs=outs, finished=group.finished)
