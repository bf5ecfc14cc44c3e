"""Request models (pydantic, strict types) and the JSON shapes of responses, as in the OpenAI API.

Requests are validated in two stages, so each failure gets the status OpenAI clients expect:
  1. types (`parse_request`): a field of the wrong JSON type or a missing required field -> 422,
     naming the field; unknown fields are ignored (clients send many optional ones).
  2. values (app.py, SamplingParams, the engine): out of range, too long, unsupported -> 400.
Types are strict: "16" is not an integer, true is not a number, 1.0 is not an integer.

Responses are plain dicts built by the functions at the end (they go straight to JSON; SSE chunks
are built once per engine step per request, so no model validation happens on that path).
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from flashport.server.errors import APIError


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _SamplingRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM extensions)."""

    model: str | None = None  # matched against the served name; omitted = the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension; -1 or 0 = all tokens
    min_p: float | None = None  # vLLM extension
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM extension
    ignore_eos: bool | None = False  # vLLM extension
    skip_special_tokens: bool | None = True  # vLLM extension
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    # Accepted only when they ask for nothing (rejected with 400 otherwise): not implemented.
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_SamplingRequest):
    # One prompt (text or token ids) or a batch of them.
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # top-N per token, 0..20
    echo: bool | None = False
    suffix: str | None = None  # not supported (rejected unless null/empty)
    best_of: int | None = None  # only best_of == n (or null) is supported


class ChatCompletionRequest(_SamplingRequest):
    messages: list[dict[str, Any]]  # roles and contents are checked by flashport.chat
    max_completion_tokens: int | None = None  # the newer name of max_tokens; wins when both are set
    logprobs: bool | None = False
    top_logprobs: int | None = None  # 0..20, needs logprobs=true
    reasoning_effort: str | None = None  # low/medium/high/max; selects thinking mode
    chat_template_kwargs: dict[str, Any] | None = None  # {"thinking": bool} (or "enable_thinking")
    add_generation_prompt: bool | None = True  # vLLM extension
    # Tool calling and structured output are not implemented: rejected when they ask for something.
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


# What the union-typed fields accept, for a readable 422 message.
_UNION_TYPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
}


def parse_request(model: type[_Strict], data: Any) -> Any:
    """Validate a decoded JSON body against `model`; 422 naming the first offending field."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(data)}", param=None)
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        loc = [str(x) for x in first["loc"]]
        field = loc[0] if loc else None
        if field in _UNION_TYPES and first["type"] != "missing":
            message = f"{field}: invalid type: expected {_UNION_TYPES[field]}"
            param = field
        else:
            # Drop pydantic's union-branch tags ("list[int]", "str") from the location.
            path = [x for x in loc if "[" not in x and x not in ("str", "int", "float", "bool")]
            param = ".".join(path) or None
            if first["type"] == "missing":
                message = f"{param}: field required"
            else:
                message = f"{param}: {first['msg']} (got {_json_type(first.get('input'))})"
        raise APIError(422, message, param=param) from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# ---------------------------------------------------------------------------------- responses

def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": use}


def completion_chunk(rid: str, created: int, model: str, choices: list[dict], use: dict | None = None,
                     with_usage: bool = False) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if with_usage:
        out["usage"] = use
    return out


def chat_response(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": use}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict], use: dict | None = None,
               with_usage: bool = False) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if with_usage:
        out["usage"] = use
    return out


def model_card(name: str, created: int, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "flashport",
            "max_model_len": max_model_len}
