"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`.

This is the simple loop: every prompt is prefilled in token-budget chunks (several prompts per
forward), then all unfinished requests decode one token per step together. The model keeps the
per-sequence state. One host sync per step (the sampled tokens).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from flashport.chat import encode_messages
from flashport.engine.sampler import make_generator, sample, top_logprobs
from flashport.errors import FlashportError, RequestError
from flashport.model.loader import load_model
from flashport.model.state import SequenceState
from flashport.platform import detect_platform
from flashport.sampling_params import CompletionOutput, Logprobs, RequestOutput, SamplingParams
from flashport.tokenizer import IncrementalDetokenizer, Tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    state: SequenceState
    generator: torch.Generator | None
    detok: IncrementalDetokenizer | None
    num_prefilled: int = 0
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[Logprobs] | None = None
    prompt_logprobs: list[Logprobs | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class LLM:
    def __init__(self, model: str | Path, *, device: str = "auto", dtype: str = "auto",
                 load_format: str = "auto", num_layers: int | None = None, dequantize: bool = False,
                 max_model_len: int | None = None, max_num_batched_tokens: int = 2048, seed: int = 0,
                 progress: bool = True) -> None:
        self.platform = detect_platform(None if device == "auto" else device)
        self.device = torch.device("cpu" if self.platform.backend == "cpu" else "cuda")
        if dtype == "auto":  # bf16 is the checkpoint dtype; CPUs run fp32 much faster than bf16
            torch_dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        elif dtype in _DTYPES:
            torch_dtype = _DTYPES[dtype]
        else:
            raise FlashportError(f"dtype {dtype!r}: expected one of auto, {', '.join(_DTYPES)}")
        if max_num_batched_tokens < 1:
            raise FlashportError(f"max_num_batched_tokens = {max_num_batched_tokens}: must be >= 1")
        self.model, self.config = load_model(
            model, device=self.device, dtype=torch_dtype, load_format=load_format, num_layers=num_layers,
            dequantize=dequantize, fp8_dtype=self.platform.fp8_dtype, seed=seed, progress=progress)
        model_dir = Path(model)
        self.tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "tokenizer.json").exists() else None
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.max_num_batched_tokens = max_num_batched_tokens
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._ids = itertools.count()

    # ------------------------------------------------------------------ public
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
        reqs = [self._make_request(p, sp) for p, sp in zip(prompts, params)]
        bar = tqdm(total=len(reqs), desc="generate", disable=not use_tqdm)
        self._prefill(reqs)
        while True:
            running = [r for r in reqs if not r.finished]
            bar.n = len(reqs) - len(running)
            bar.refresh()
            if not running:
                break
            self._decode(running)
        bar.close()
        return [self._to_output(r) for r in reqs]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             thinking: bool = False, reasoning_effort: str | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, in the DeepSeek-V4 chat encoding."""
        self._require_tokenizer("chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [encode_messages(c, thinking=thinking, reasoning_effort=reasoning_effort) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # ------------------------------------------------------------------ steps
    def _make_request(self, prompt: str | Sequence[int], params: SamplingParams) -> _Request:
        if isinstance(prompt, str):
            self._require_tokenizer("a text prompt")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
            if bad:
                raise RequestError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {self.config.vocab_size})")
        if not ids:
            raise RequestError("the prompt is empty (it has no tokens)")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens, max_model_len is {self.max_model_len}: "
                               "no room to generate")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer (the model directory has no tokenizer.json)")
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=ids,
                                           skip_special_tokens=params.skip_special_tokens, stop=list(params.stop))
        return _Request(request_id=str(next(self._ids)), prompt=text, prompt_ids=ids, params=params,
                        state=self.model.new_state(), generator=make_generator(params, self.device), detok=detok,
                        logprobs=[] if params.logprobs is not None else None,
                        prompt_logprobs=[None] if params.prompt_logprobs is not None else None)

    def _prefill(self, reqs: list[_Request]) -> None:
        # Fill each forward with up to max_num_batched_tokens prompt tokens from as many requests as fit.
        pending = list(reqs)
        while pending:
            budget, chunk = self.max_num_batched_tokens, []
            for r in pending:
                n = min(len(r.prompt_ids) - r.num_prefilled, budget)
                if n == 0:
                    break
                chunk.append((r, n))
                budget -= n
            token_ids, rows, row = [], [], 0
            for r, n in chunk:
                token_ids += r.prompt_ids[r.num_prefilled:r.num_prefilled + n]
                want_all = r.params.prompt_logprobs is not None
                rows += list(range(row, row + n)) if want_all else [row + n - 1]
                row += n
            logits = self._forward(token_ids, [n for _, n in chunk], [r.state for r, _ in chunk], rows)
            at, done = 0, []
            for r, n in chunk:
                k = n if r.params.prompt_logprobs is not None else 1
                rl = logits[at:at + k]
                at += k
                start = r.num_prefilled
                r.num_prefilled += n
                if r.params.prompt_logprobs is not None:
                    # row t of the chunk predicts prompt token start + t + 1
                    nxt = r.prompt_ids[start + 1:start + n + 1]
                    if nxt:
                        r.prompt_logprobs += top_logprobs(
                            rl[: len(nxt)], torch.tensor(nxt, device=rl.device), r.params.prompt_logprobs)
                if r.num_prefilled == len(r.prompt_ids):
                    done.append((r, rl[-1:]))
            if done:
                self._sample_and_append([r for r, _ in done], torch.cat([lg for _, lg in done]))
            pending = [r for r in pending if r.num_prefilled < len(r.prompt_ids)]

    def _decode(self, running: list[_Request]) -> None:
        token_ids = [r.output_ids[-1] for r in running]
        logits = self._forward(token_ids, [1] * len(running), [r.state for r in running], None)
        self._sample_and_append(running, logits)

    def _forward(self, token_ids: list[int], seq_lens: list[int], states: list[SequenceState],
                 rows: list[int] | None) -> torch.Tensor:
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        sel = None if rows is None else torch.tensor(rows, dtype=torch.long, device=self.device)
        return self.model(ids, seq_lens, states, sel).float()

    def _sample_and_append(self, reqs: list[_Request], logits: torch.Tensor) -> None:
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs])
        want = max((r.params.logprobs for r in reqs if r.params.logprobs is not None), default=None)
        lps = top_logprobs(logits, tokens, want) if want is not None else None
        for i, (r, tok) in enumerate(zip(reqs, tokens.tolist())):  # the step's one host sync
            r.output_ids.append(tok)
            if r.logprobs is not None:
                n = r.params.logprobs
                full = lps[i]
                keep = sorted(full.items(), key=lambda kv: -kv[1])[:n]
                r.logprobs.append({tok: full[tok], **dict(keep)})
            self._check_stop(r, tok)

    def _check_stop(self, r: _Request, tok: int) -> None:
        p = r.params
        if tok in self.eos_token_ids and not p.ignore_eos:
            r.finish_reason = "stop"
        elif tok in p.stop_token_ids:
            r.finish_reason, r.stop_reason = "stop", tok
        else:
            if r.detok is not None:
                r.text += r.detok.add([tok])
                if r.detok.stopped:
                    r.finish_reason, r.stop_reason = "stop", r.detok.stop_str
            if not r.finished and (len(r.output_ids) >= p.max_tokens
                                   or len(r.prompt_ids) + len(r.output_ids) >= self.max_model_len):
                r.finish_reason = "length"
        if r.finished and r.detok is not None:
            r.text += r.detok.flush()

    def _to_output(self, r: _Request) -> RequestOutput:
        out = CompletionOutput(index=0, text=r.text, token_ids=list(r.output_ids), finish_reason=r.finish_reason,
                               logprobs=r.logprobs, stop_reason=r.stop_reason)
        return RequestOutput(request_id=r.request_id, prompt=r.prompt, prompt_token_ids=list(r.prompt_ids),
                             prompt_logprobs=r.prompt_logprobs, outputs=[out])

    def _require_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise RequestError(f"{what} needs a tokenizer, and the model directory has no tokenizer.json")
