"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`.

A thin loop over the `Engine`: add every prompt, step until all are done, return the outputs in
prompt order.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from flashport.chat import encode_messages
from flashport.engine.engine import Engine
from flashport.errors import RequestError
from flashport.sampling_params import RequestOutput, SamplingParams


class LLM:
    def __init__(self, model: str | Path, *, progress: bool = True, **engine_args: Any) -> None:
        """`engine_args` go to `Engine`: device, dtype, load_format, num_layers, dequantize,
        max_model_len, max_num_seqs, max_num_batched_tokens, block_size, gpu_memory_utilization,
        cache_bytes, enable_prefix_caching, seed, ops_impl, kv_cache_dtype, enforce_eager, overlap (launch
        step t+1 before processing step t; default on a GPU), expert_parallel_size (the routed experts
        split over N GPUs, one process each: docs/expert_parallel.md)."""
        self.engine = Engine(model, progress=progress, log=print if progress else None, **engine_args)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model(self):
        return self.engine.model

    @property
    def config(self):
        return self.engine.config

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, text or token ids
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, sp in zip(ids, prompts, params):
                self.engine.add_request(rid, prompt if isinstance(prompt, str) else list(prompt), sp)
            done: dict[str, RequestOutput] = {}
            with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
                while self.engine.has_unfinished():
                    for out in self.engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return [done[rid] for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             thinking: bool = False, reasoning_effort: str | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, in the DeepSeek-V4 chat encoding."""
        if self.tokenizer is None:
            raise RequestError("chat needs a tokenizer, and the model directory has no tokenizer.json")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [encode_messages(c, thinking=thinking, reasoning_effort=reasoning_effort) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
