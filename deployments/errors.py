"""OpenAI-style errors: one exception type, one body shape, every status code.

Every failure the API reports, from a malformed body to a full queue, is an
`APIError` and leaves as `{"error": {"message", "type", "param", "code"}}`.
FastAPI's own validation (422) and routing (404/405) errors are turned into
the same shape by `install_handlers`.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# status -> (OpenAI error type, default code)
_KINDS: dict[int, tuple[str, Optional[str]]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("timeout_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    431: ("invalid_request_error", "request_header_fields_too_large"),
    500: ("server_error", "internal_error"),
    503: ("service_unavailable_error", "service_unavailable"),
}


class APIError(Exception):
    """A request failure with its HTTP status and OpenAI error fields.

    Args:
        status: the HTTP status code.
        message: what went wrong, for a person.
        param: the request field at fault, if one is.
        code: a machine-readable code; default per status.
        headers: extra response headers (Retry-After on a 429).
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        kind, default_code = _KINDS.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
        self.type = kind
        self.code = code if code is not None else default_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> str:
        """The error as one server-sent event, for a stream already under way."""
        return f"data: {json.dumps(self.body())}\n\n"


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def from_validation_errors(errors: Sequence[dict[str, Any]]) -> APIError:
    """One 400 from pydantic's error list: the first error names the field."""
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_tag(part)]
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return APIError(400, "request body must be a JSON object")
    if not loc and first.get("type") == "missing":
        return APIError(400, "request body is missing: send a JSON object")
    param = loc[0] if loc else None
    message = first.get("msg", "invalid value")
    where = f" at '{'.'.join(loc)}'" if loc else ""
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return APIError(400, f"{message}{where}{more}", param=param)


def _is_union_tag(part: Any) -> bool:
    """pydantic names the member of a union that failed ("constrained-str", "list[int]") in `loc`."""
    if not isinstance(part, str):
        return False
    return "[" in part or part in ("str", "int", "float", "bool", "none") or ("-" in part and part[:1].isalpha())


def install_handlers(app: FastAPI) -> None:
    """Make FastAPI answer its own errors (422, 404, 405, 500) in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_errors(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}").response()
