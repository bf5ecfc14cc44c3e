"""OpenAI error objects: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Every failure a client can see goes through `APIError` (or one of the handlers in app.py that build
one), so no traceback or internal detail ever reaches a client:

    400 invalid_request_error   malformed JSON, invalid UTF-8, out-of-range values, engine RequestError
    401 authentication_error    missing or wrong API key
    404 not_found_error         unknown model or route
    413 invalid_request_error   body over --max-request-bytes
    422 invalid_request_error   wrong JSON types, missing required fields (schema violations)
    503 service_unavailable     waiting queue full (with Retry-After) or the server is shutting down
    500 server_error            a bug: logged with its traceback on the server, a generic message here
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

from flashport.errors import RequestError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


_SP_FIELD = re.compile(r"^SamplingParams\.(\w+)")


def from_request_error(exc: RequestError, param: str | None = None) -> APIError:
    """An engine or SamplingParams `RequestError` as a 400; `SamplingParams.x = v: why` names field x."""
    message = " ".join(str(exc).split()) or "invalid request"
    m = _SP_FIELD.match(message)
    if m:
        param = param or m.group(1)
        message = message[len("SamplingParams."):]
    return APIError(400, message, param=param)


def internal_error() -> APIError:
    return APIError(500, "internal server error (the server log has the details)", code="internal_error")
