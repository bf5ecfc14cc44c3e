"""The OpenAI-compatible HTTP server: FastAPI routes over the async engine bridge, run by uvicorn.

    POST /v1/completions        prompt (text, texts, token ids), echo + logprobs, stream
    POST /v1/chat/completions   messages in the DeepSeek-V4 encoding, thinking mode, stream
    GET  /v1/models             the served model
    GET  /health                200 while serving, 503 while draining or if the engine died
    GET  /version               {"version": ...}
    GET  /metrics               Prometheus text format (metrics.py lists them)

Each POST handler: read the body (size limit, UTF-8, JSON) -> types (protocol.py, 422) -> values
(400) -> tokenize (tokenizer pool) -> `bridge.submit` (503 when the waiting queue is full) -> wait
for the outputs, or stream their deltas as SSE. A task watching the connection aborts the
engine requests as soon as the client goes away. SIGTERM/SIGINT: stop accepting, let requests in
flight finish for --shutdown-grace seconds, abort the rest (their clients get an error), exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import flashport
from flashport.chat import REASONING_EFFORTS, THINK_END, encode_messages, split_reasoning
from flashport.errors import RequestError
from flashport.sampling_params import CompletionOutput, Logprobs, RequestOutput, SamplingParams
from flashport.server import protocol as P
from flashport.server.bridge import AsyncEngine, QueueFull, RequestFailed, RequestHandle, ShuttingDown
from flashport.server.errors import APIError, bad_request, from_request_error, internal_error
from flashport.server.metrics import CONTENT_TYPE, ServerMetrics

MAX_LOGPROBS = 20  # top-N per token, as vLLM's default max_logprobs
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MAX_STOP = 16  # stop strings per request
_DRAIN_CAP = 8 * 1024 * 1024  # bytes read and dropped past the limit so the 413 reaches the client
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/version", "/metrics")


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_request_bytes: int = 16 * 1024 * 1024
    shutdown_grace: float = 30.0
    created: int = 0


def _err_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- body parsing

async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 over `limit` bytes, 400 if empty, not UTF-8 or not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise bad_request("invalid Content-Length header") from None
        if size > limit + _DRAIN_CAP:  # too big to drain: answer at once and close the connection
            raise APIError(413, f"the request body has {size} bytes, more than the limit of {limit}",
                           headers={"Connection": "close"})
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > limit + _DRAIN_CAP:
                break
    except ClientDisconnect:
        raise bad_request("the client disconnected while sending the body") from None
    if size > limit:
        raise APIError(413, f"the request body has {'more than ' if size > limit + _DRAIN_CAP else ''}"
                            f"{size} bytes, more than the limit of {limit}",
                       headers={"Connection": "close"} if size > limit + _DRAIN_CAP else None)
    body = b"".join(chunks)
    if not body.strip():
        raise bad_request("the request body is empty: expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise bad_request(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise bad_request("malformed JSON: nested too deeply") from None
    except ValueError as exc:
        raise bad_request(f"malformed JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_text(value: str, param: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} contains invalid Unicode (a lone surrogate escape)", param=param) from None


def _lp(v: float) -> float:
    return v if math.isfinite(v) else -9999.0


# ---------------------------------------------------------------------------------- the app

class _Guard:
    """ASGI middleware: API key check on /v1/*, HTTP request counter."""

    def __init__(self, app: Any, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app = app
        self.key = settings.api_key.encode() if settings.api_key else None
        self.metrics = metrics

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key is not None and path.startswith("/v1/") and not self._authorized(scope):
                err = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.http.labels(path if path in _ROUTES else "other", str(status[0])).inc()


def build_app(bridge: AsyncEngine, metrics: ServerMetrics, settings: ServerSettings,
              on_started: Callable[[], None] | None = None) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bridge.start()
        if on_started is not None:
            on_started()
        yield
        await bridge.stop()

    app = FastAPI(title="flashport", version=flashport.__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    api = _Api(bridge, metrics, settings)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, message).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return APIError(422, "invalid request").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback on the server; the client gets a generic message only.
        return internal_error().response()

    @app.get("/health")
    async def health() -> Response:
        if bridge.alive and not bridge.draining:
            return JSONResponse({"status": "ok"})
        why = "draining" if bridge.draining else "engine not running"
        return JSONResponse({"status": why}, status_code=503)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": flashport.__version__})

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        card = P.model_card(settings.served_model_name, settings.created, bridge.max_model_len)
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.chat(request)

    return _Guard(app, settings, metrics)


# ---------------------------------------------------------------------------------- handlers

class _Api:
    def __init__(self, bridge: AsyncEngine, metrics: ServerMetrics, settings: ServerSettings) -> None:
        self.bridge = bridge
        self.metrics = metrics
        self.settings = settings

    # ---- shared validation
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.served_model_name:
            shown = model if len(model) <= 80 else model[:80] + "..."
            raise APIError(404, f"the model {shown!r} does not exist; this server serves "
                                f"{self.settings.served_model_name!r}", param="model", code="model_not_found")

    @staticmethod
    def _check_unsupported(req: P._SamplingRequest) -> None:
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias")
        if req.stop is not None:
            stops = [req.stop] if isinstance(req.stop, str) else req.stop
            if len(stops) > MAX_STOP:
                raise bad_request(f"stop: at most {MAX_STOP} stop strings, got {len(stops)}", param="stop")
            for s in stops:
                if not s:
                    raise bad_request("stop: stop strings must not be empty", param="stop")
                _check_text(s, "stop")

    def _sampling_params(self, req: P._SamplingRequest, max_tokens: int, logprobs: int | None,
                         prompt_logprobs: int | None) -> SamplingParams:
        def pick(v: Any, default: Any) -> Any:
            return default if v is None else v

        try:
            return SamplingParams(
                max_tokens=max_tokens, n=pick(req.n, 1), temperature=pick(req.temperature, 1.0),
                top_p=pick(req.top_p, 1.0), top_k=pick(req.top_k, -1), min_p=pick(req.min_p, 0.0),
                seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
                presence_penalty=pick(req.presence_penalty, 0.0), frequency_penalty=pick(req.frequency_penalty, 0.0),
                repetition_penalty=pick(req.repetition_penalty, 1.0), ignore_eos=bool(req.ignore_eos),
                skip_special_tokens=pick(req.skip_special_tokens, True), logprobs=logprobs,
                prompt_logprobs=prompt_logprobs)
        except RequestError as exc:
            raise from_request_error(exc) from None

    def _check_lengths(self, num_prompt: int, max_tokens: int, prompt_param: str, max_tokens_param: str) -> None:
        limit = self.bridge.max_model_len
        if num_prompt == 0:
            raise bad_request("the prompt is empty (it has no tokens)", param=prompt_param)
        if num_prompt >= limit:
            raise APIError(400, f"the prompt has {num_prompt} tokens; this model's maximum context length is "
                                f"{limit} tokens", param=prompt_param, code="context_length_exceeded")
        if num_prompt + max_tokens > limit:
            raise APIError(400, f"{max_tokens_param} = {max_tokens} is too large: the prompt has {num_prompt} "
                                f"tokens and the maximum context length is {limit}, so at most "
                                f"{limit - num_prompt} tokens can be generated", param=max_tokens_param,
                           code="context_length_exceeded")

    async def _submit(self, items: list[tuple[str, list[int], SamplingParams]], prompt_param: str
                      ) -> list[RequestHandle]:
        if len(items) > self.bridge.max_waiting:
            raise bad_request(f"{prompt_param}: {len(items)} prompts in one request, more than the server's "
                              f"waiting-queue limit of {self.bridge.max_waiting}", param=prompt_param)
        try:
            return await self.bridge.submit(items)
        except QueueFull as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(503, f"the server is overloaded: {exc}; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown as exc:
            self.metrics.rejected.labels("shutting_down").inc()
            raise APIError(503, str(exc), code="shutting_down", headers={"Retry-After": "5"}) from None
        except RequestError as exc:
            raise from_request_error(exc, param=prompt_param) from None

    # ---- waiting for results, watching the connection
    async def _watch_disconnect(self, request: Request, handles: list[RequestHandle]) -> None:
        """Abort `handles` when the client disconnects (the body has been read already)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for h in handles:
                    self.bridge.abort(h.request_id, "aborted")
                return

    async def _results(self, request: Request, handles: list[RequestHandle]) -> list[RequestOutput] | None:
        """Every handle's final output, or None if the client went away first."""
        watcher = asyncio.ensure_future(self._watch_disconnect(request, handles))
        results = asyncio.ensure_future(asyncio.gather(*(h.result() for h in handles)))
        try:
            await asyncio.wait({watcher, results}, return_when=asyncio.FIRST_COMPLETED)
            if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
                await asyncio.wait({results})  # cannot watch the connection: just wait
            if not results.done():
                results.cancel()
                return None
            try:
                return results.result()
            except RequestFailed as exc:
                raise _failure_error(exc.reason) from None
        finally:
            watcher.cancel()
            if not results.done():
                results.cancel()
            for h in handles:
                self.bridge.abort(h.request_id, "aborted")

    async def _merged(self, handles: list[RequestHandle]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) from all handles as they come."""
        if len(handles) == 1:
            async for out in handles[0].outputs():
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, h: RequestHandle) -> None:
            try:
                async for out in h.outputs():
                    queue.put_nowait((i, out, None))
            except RequestFailed as exc:
                queue.put_nowait((i, None, exc))
                return
            queue.put_nowait((i, None, None))

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
        try:
            remaining = len(handles)
            while remaining:
                i, out, exc = await queue.get()
                if exc is not None:
                    raise exc
                if out is None:
                    remaining -= 1
                else:
                    yield i, out
        finally:
            for t in tasks:
                t.cancel()

    def _sse(self, request: Request, handles: list[RequestHandle], events: AsyncIterator[dict]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            watcher = asyncio.ensure_future(self._watch_disconnect(request, handles))
            try:
                try:
                    async for payload in events:
                        yield "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"
                except RequestFailed as exc:
                    err = _failure_error(exc.reason)
                    yield "data: " + json.dumps(err.body()) + "\n\n"
                except Exception:  # a bug while building chunks: logged here, a generic error to the client
                    import traceback
                    _err_log("error while streaming a response:\n" + traceback.format_exc())
                    yield "data: " + json.dumps(internal_error().body()) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                watcher.cancel()
                for h in handles:
                    self.bridge.abort(h.request_id, "aborted")

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- logprobs
    def _completion_logprobs(self, token_ids: list[int], lps: list[Logprobs | None], offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, d in zip(token_ids, lps):
            s = self.bridge.token_str(tid)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            if d is None:
                token_lps.append(None)
                tops.append(None)
            else:
                token_lps.append(_lp(d[tid]) if tid in d else None)
                tops.append({self.bridge.token_str(t): _lp(v) for t, v in d.items()})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, token_ids: list[int], lps: list[Logprobs], num_top: int) -> list[dict]:
        content = []
        for tid, d in zip(token_ids, lps):
            s = self.bridge.token_str(tid)
            top = sorted(d.items(), key=lambda kv: -kv[1])[:num_top]
            content.append({"token": s, "logprob": _lp(d.get(tid, -math.inf)), "bytes": list(s.encode("utf-8")),
                            "top_logprobs": [{"token": (t := self.bridge.token_str(i)), "logprob": _lp(v),
                                              "bytes": list(t.encode("utf-8"))} for i, v in top]})
        return content

    # ---- /v1/completions
    async def completions(self, request: Request) -> Response:
        req: P.CompletionRequest = P.parse_request(P.CompletionRequest, await read_json(request,
                                                                                          self.settings.max_request_bytes))
        self._check_model(req.model)
        self._check_unsupported(req)
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        n = 1 if req.n is None else req.n
        if req.best_of is not None and req.best_of != n:
            raise bad_request("best_of is not supported (only best_of == n)", param="best_of")
        echo = bool(req.echo)
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs = {req.logprobs}: must be in [0, {MAX_LOGPROBS}]", param="logprobs")
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens < 0 or (max_tokens == 0 and not echo):
            raise bad_request(f"max_tokens = {max_tokens}: must be >= 1 (0 only with echo)", param="max_tokens")

        # The prompts: one or several, text or token ids.
        p = req.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            prompts: list[str | list[int]] = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise bad_request("prompt is empty", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise bad_request(f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
        ids_list: list[list[int]] = []
        texts: list[str] = []
        vocab = self.bridge.vocab_size
        for prompt in prompts:
            if isinstance(prompt, str):
                _check_text(prompt, "prompt")
                try:
                    ids = await self.bridge.encode(prompt)
                except RequestError as exc:
                    raise from_request_error(exc, param="prompt") from None
                texts.append(prompt)
            else:
                bad = next((t for t in prompt if not 0 <= t < vocab), None)
                if bad is not None:
                    raise bad_request(f"prompt: token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
                ids = list(prompt)
                texts.append(self.bridge.decode(ids) if echo else "")
            self._check_lengths(len(ids), max(max_tokens, 1), "prompt", "max_tokens")
            ids_list.append(ids)
        params = self._sampling_params(req, max(max_tokens, 1), req.logprobs,
                                       req.logprobs if echo and req.logprobs is not None else None)
        rid = f"cmpl-{uuid.uuid4().hex}"
        items = [(f"{rid}-{i}", ids, params) for i, ids in enumerate(ids_list)]
        handles = await self._submit(items, "prompt")
        created = P.now()
        model = self.settings.served_model_name
        ctx = _CompletionCtx(self, texts, n, req.logprobs, echo, max_tokens == 0)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse(request, handles, self._completion_events(handles, ctx, rid, created, model,
                                                                       include_usage))
        outs = await self._results(request, handles)
        if outs is None:
            return Response(status_code=499)
        choices = []
        prompt_tokens = completion_tokens = 0
        for i, out in enumerate(outs):
            prompt_tokens += len(out.prompt_token_ids)
            for o in out.outputs:
                choice, num = ctx.final_choice(i, out, o)
                choices.append(choice)
                completion_tokens += num
        return JSONResponse(P.completion_response(rid, created, model, choices,
                                                  P.usage(prompt_tokens, completion_tokens)))

    async def _completion_events(self, handles: list[RequestHandle], ctx: "_CompletionCtx", rid: str, created: int,
                                 model: str, include_usage: bool) -> AsyncIterator[dict]:
        prompt_tokens: dict[int, int] = {}
        async for i, out in self._merged(handles):
            prompt_tokens[i] = len(out.prompt_token_ids)
            choices = [c for o in out.outputs if (c := ctx.delta_choice(i, out, o)) is not None]
            if choices:
                yield P.completion_chunk(rid, created, model, choices, None, include_usage)
        if include_usage:
            use = P.usage(sum(prompt_tokens.values()), ctx.completion_tokens)
            yield P.completion_chunk(rid, created, model, [], use, True)

    # ---- /v1/chat/completions
    async def chat(self, request: Request) -> Response:
        req: P.ChatCompletionRequest = P.parse_request(P.ChatCompletionRequest, await read_json(
            request, self.settings.max_request_bytes))
        self._check_model(req.model)
        self._check_unsupported(req)
        if req.tools:
            raise bad_request("tools are not supported", param="tools")
        if req.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice is not supported", param="tool_choice")
        if req.response_format is not None and req.response_format.get("type", "text") != "text":
            raise bad_request("response_format: only {'type': 'text'} is supported", param="response_format")
        if not req.messages:
            raise bad_request("messages must be a non-empty list", param="messages")
        if req.reasoning_effort is not None and req.reasoning_effort not in REASONING_EFFORTS:
            raise bad_request(f"reasoning_effort = {req.reasoning_effort!r}: must be one of "
                              f"{', '.join(REASONING_EFFORTS)} or null", param="reasoning_effort")
        kwargs = req.chat_template_kwargs or {}
        thinking = kwargs.get("thinking", kwargs.get("enable_thinking"))
        if thinking is None:
            thinking = req.reasoning_effort is not None
        elif not isinstance(thinking, bool):
            raise APIError(422, "chat_template_kwargs.thinking: must be a boolean", param="chat_template_kwargs")
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise bad_request("top_logprobs needs logprobs = true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(f"top_logprobs = {req.top_logprobs}: must be in [0, {MAX_LOGPROBS}]",
                                  param="top_logprobs")
        num_top = (req.top_logprobs or 0) if req.logprobs else None
        try:
            prompt_text = encode_messages(req.messages, thinking=thinking, reasoning_effort=req.reasoning_effort,
                                          add_generation_prompt=req.add_generation_prompt is not False)
        except RequestError as exc:
            raise from_request_error(exc, param="messages") from None
        _check_text(prompt_text, "messages")
        try:
            ids = await self.bridge.encode(prompt_text)
        except RequestError as exc:
            raise from_request_error(exc, param="messages") from None
        mt_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, self.bridge.max_model_len - len(ids))
        elif max_tokens < 1:
            raise bad_request(f"{mt_param} = {max_tokens}: must be >= 1", param=mt_param)
        self._check_lengths(len(ids), max_tokens, "messages", mt_param)
        params = self._sampling_params(req, max_tokens, num_top, None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        handles = await self._submit([(rid, ids, params)], "messages")
        created = P.now()
        model = self.settings.served_model_name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._sse(request, handles, self._chat_events(handles[0], thinking, num_top, rid, created, model,
                                                                 include_usage))
        outs = await self._results(request, handles)
        if outs is None:
            return Response(status_code=499)
        out = outs[0]
        choices = []
        for o in out.outputs:
            reasoning, content = split_reasoning(o.text, thinking)
            choice: dict[str, Any] = {
                "index": o.index,
                "message": {"role": "assistant", "content": content, "reasoning_content": reasoning},
                "logprobs": None, "finish_reason": o.finish_reason or "stop", "stop_reason": o.stop_reason}
            if num_top is not None:
                choice["logprobs"] = {"content": self._chat_logprobs(o.token_ids, (o.logprobs or [])[:len(o.token_ids)],
                                                                     num_top)}
            choices.append(choice)
        use = P.usage(len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs))
        return JSONResponse(P.chat_response(rid, created, model, choices, use))

    async def _chat_events(self, handle: RequestHandle, thinking: bool, num_top: int | None, rid: str, created: int,
                           model: str, include_usage: bool) -> AsyncIterator[dict]:
        streams: dict[int, ReasoningDeltas] = {}
        tokens_sent: dict[int, int] = {}
        finished: set[int] = set()
        out: RequestOutput | None = None
        async for out in handle.outputs():
            new = [o.index for o in out.outputs if o.index not in streams]
            if new:  # the first chunk of each choice carries only the role, as OpenAI's do
                for k in new:
                    streams[k] = ReasoningDeltas(thinking)
                    tokens_sent[k] = 0
                yield P.chat_chunk(rid, created, model, [
                    {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for k in new], None, include_usage)
            choices = []
            for o in out.outputs:
                if o.index in finished:
                    continue
                done = o.finish_reason is not None
                reasoning, content = streams[o.index].update(o.text, done)
                delta: dict[str, Any] = {}
                if reasoning:
                    delta["reasoning_content"] = reasoning
                if content:
                    delta["content"] = content
                n_tok, sent = len(o.token_ids), tokens_sent[o.index]
                lp = None
                if num_top is not None and n_tok > sent:
                    lp = {"content": self._chat_logprobs(o.token_ids[sent:], (o.logprobs or [])[sent:n_tok], num_top)}
                tokens_sent[o.index] = n_tok
                if done:
                    finished.add(o.index)
                if delta or done or lp is not None:
                    choice = {"index": o.index, "delta": delta, "logprobs": lp, "finish_reason": o.finish_reason}
                    if done:
                        choice["stop_reason"] = o.stop_reason
                    choices.append(choice)
            if choices:
                yield P.chat_chunk(rid, created, model, choices, None, include_usage)
        if include_usage and out is not None:
            use = P.usage(len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs))
            yield P.chat_chunk(rid, created, model, [], use, True)


class ReasoningDeltas:
    """Streams one choice of a chat completion: cumulative text -> (reasoning delta, content delta).

    In thinking mode everything before the first `</think>` is reasoning. While the reasoning is
    still open, a tail that could be the start of `</think>` spelled by ordinary tokens is held
    back (the special token itself always arrives whole), so the marker never leaks into either part.
    """

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking
        self.reasoning_sent = 0
        self.content_sent = 0

    def update(self, text: str, final: bool) -> tuple[str, str]:
        reasoning, content = split_reasoning(text, self.thinking)
        r_delta = ""
        if reasoning is not None:
            closed = len(reasoning) + len(content) < len(text)  # `</think>` was found
            end = len(reasoning) if closed or final else _safe_end(reasoning)
            if end > self.reasoning_sent:
                r_delta = reasoning[self.reasoning_sent:end]
                self.reasoning_sent = end
        c_delta = content[self.content_sent:]
        self.content_sent = len(content)
        return r_delta, c_delta


def _safe_end(reasoning: str) -> int:
    """How much of an open reasoning can be sent: all but a tail that may begin `</think>`."""
    for k in range(min(len(THINK_END) - 1, len(reasoning)), 0, -1):
        if THINK_END.startswith(reasoning[-k:]):
            return len(reasoning) - k
    return len(reasoning)


def _failure_error(reason: str) -> APIError:
    if reason == "shutdown":
        return APIError(503, "the server shut down before this request finished", code="shutting_down")
    if reason == "engine_error":
        return APIError(500, "the engine failed while running this request (the server log has the details)",
                        code="engine_error")
    return APIError(400, "the request was aborted", code="aborted")


class _CompletionCtx:
    """Per-choice bookkeeping for one /v1/completions request (final or streamed)."""

    def __init__(self, api: _Api, texts: list[str], n: int, logprobs: int | None, echo: bool, echo_only: bool) -> None:
        self.api = api
        self.texts = texts  # prompt texts (for echo)
        self.n = n
        self.logprobs = logprobs
        self.echo = echo
        self.echo_only = echo_only  # max_tokens = 0: the engine ran one token, which is dropped
        self.sent: dict[int, list[int]] = {}  # choice index -> [chars sent, tokens sent, echo sent]
        self.finished: set[int] = set()
        self.completion_tokens = 0

    def _generated(self, o: CompletionOutput) -> tuple[str, list[int], list]:
        if self.echo_only:
            return "", [], []
        lps = (o.logprobs or [])[:len(o.token_ids)]
        return o.text, list(o.token_ids), lps

    def _prompt_part(self, i: int, out: RequestOutput) -> tuple[str, dict | None]:
        text = self.texts[i]
        if self.logprobs is None:
            return text, None
        plps = list(out.prompt_logprobs or [])[:len(out.prompt_token_ids)]
        plps += [None] * (len(out.prompt_token_ids) - len(plps))
        return text, self.api._completion_logprobs(out.prompt_token_ids, plps, 0)

    def final_choice(self, i: int, out: RequestOutput, o: CompletionOutput) -> tuple[dict, int]:
        text, ids, lps = self._generated(o)
        logprobs = None
        prefix = ""
        if self.echo:
            prefix, prompt_lp = self._prompt_part(i, out)
            if prompt_lp is not None:
                logprobs = prompt_lp
        if self.logprobs is not None:
            gen = self.api._completion_logprobs(ids, lps, len(prefix))
            if logprobs is None:
                logprobs = gen
            else:
                for key in logprobs:
                    logprobs[key] += gen[key]
        finish = "length" if self.echo_only else (o.finish_reason or "stop")
        choice = {"index": i * self.n + o.index, "text": prefix + text, "logprobs": logprobs,
                  "finish_reason": finish, "stop_reason": None if self.echo_only else o.stop_reason}
        return choice, len(ids)

    def delta_choice(self, i: int, out: RequestOutput, o: CompletionOutput) -> dict | None:
        index = i * self.n + o.index
        if index in self.finished:
            return None
        st = self.sent.setdefault(index, [0, 0, 0, 0])  # chars sent, tokens sent, echo sent, text offset
        text, ids, lps = self._generated(o)
        finished = o.finish_reason is not None
        if not ids and not finished:
            return None  # nothing generated yet (e.g. the prompt logprobs of a prefill chunk)
        prefix, logprobs = "", None
        if self.echo and not st[2]:
            st[2] = 1
            prefix, logprobs = self._prompt_part(i, out)
            st[3] = len(prefix)
        new_text = text[st[0]:]
        new_ids, new_lps = ids[st[1]:], lps[st[1]:]
        if self.logprobs is not None:
            gen = self.api._completion_logprobs(new_ids, new_lps, st[3])
            if gen["tokens"]:
                st[3] = gen["text_offset"][-1] + len(gen["tokens"][-1])
            if logprobs is None:
                logprobs = gen
            else:
                for key in logprobs:
                    logprobs[key] += gen[key]
        st[0], st[1] = len(text), len(ids)
        self.completion_tokens += len(new_ids)
        if finished:
            self.finished.add(index)
        if not (prefix or new_text or finished or (self.logprobs is not None and new_ids)):
            return None
        finish = ("length" if self.echo_only else o.finish_reason) if finished else None
        return {"index": index, "text": prefix + new_text, "logprobs": logprobs, "finish_reason": finish,
                "stop_reason": None if (self.echo_only or not finished) else o.stop_reason}


# ---------------------------------------------------------------------------------- running it

def run_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               served_model_name: str | None = None, max_waiting: int = 1024,
               max_request_bytes: int = 16 * 1024 * 1024, shutdown_grace: float = 30.0, log_level: str = "info",
               access_log: bool = False, engine_args: dict[str, Any] | None = None) -> int:
    """Load the engine, bind, serve until SIGTERM/SIGINT; returns the exit code."""
    from flashport.engine.engine import Engine
    from flashport.errors import FlashportError

    name = served_model_name or _default_name(model)
    # Bind before loading: a busy port fails in a second, not after the weights are read.
    sock = _bind(host, port)
    engine = Engine(model, log=lambda line: print(line, flush=True), **(engine_args or {}))
    metrics = ServerMetrics()
    bridge = AsyncEngine(engine, max_waiting=max_waiting, observer=metrics, log=_err_log)
    metrics.bridge = bridge
    settings = ServerSettings(served_model_name=name, api_key=api_key, max_request_bytes=max_request_bytes,
                              shutdown_grace=shutdown_grace, created=P.now())
    bound = sock.getsockname()
    shown_host = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    address = f"http://{shown_host}:{bound[1]}"

    def started() -> None:
        auth = "API key required on /v1/*" if api_key else "no API key"
        print(f"flashport: serving {name!r} at {address}/v1 ({auth}; max_model_len {bridge.max_model_len}, "
              f"max waiting {max_waiting})", flush=True)
        loopback = bound[0] in ("::1",) or bound[0].startswith("127.")
        if not loopback and not api_key:
            _err_log(f"flashport: warning: listening on {bound[0]} without an API key: anyone who can reach "
                     "this address can use the model (set --api-key or FLASHPORT_API_KEY)")

    app = build_app(bridge, metrics, settings, on_started=started)
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=shutdown_grace + 10, timeout_keep_alive=5)
    server = _Server(config, bridge, shutdown_grace)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise FlashportError("the server did not start (see the log above)")
    print("flashport: server stopped", flush=True)
    return 0


def _default_name(model: str) -> str:
    from pathlib import Path

    return Path(model).resolve().name or "model"


def _bind(host: str, port: int) -> socket.socket:
    from flashport.errors import FlashportError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise FlashportError(f"--host {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise FlashportError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's Server with our own SIGTERM/SIGINT handling: drain within the grace period, exit 0.

    (uvicorn's own handler re-raises the signal after shutting down, so the process would end
    with -15 instead of 0.)"""

    def __init__(self, config: uvicorn.Config, bridge: AsyncEngine, grace: float) -> None:
        super().__init__(config)
        self.bridge = bridge
        self.grace = grace
        self._drain_task: asyncio.Future | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        bridge = self.bridge
        if self._drain_task is not None:  # a second signal: stop now
            _err_log("flashport: second signal, exiting now")
            bridge.abort_all("shutdown")
            self.force_exit = True
            self.should_exit = True
            return
        _err_log(f"flashport: {signal.Signals(sig).name}: not accepting new requests; {bridge.num_in_flight} "
                 f"in flight get up to {self.grace:g} s to finish")
        bridge.begin_drain()
        self.should_exit = True  # uvicorn stops listening and waits for the open connections
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        t0 = time.monotonic()
        if not await self.bridge.wait_idle(self.grace):
            n = self.bridge.abort_all("shutdown")
            _err_log(f"flashport: aborted {n} requests still running after {time.monotonic() - t0:.1f} s")
