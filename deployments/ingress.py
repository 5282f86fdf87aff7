"""The HTTP face: a FastAPI app over OpenAIService, behind a guard.

`build_openai_app` is plain FastAPI (no Ray): Serve mounts it in the
OpenAIIngress deployment (app.py), tests mount it in process. Routes:

    POST /v1/completions        POST /v1/chat/completions
    GET  /v1/models             GET  /health
    /v1/files, /v1/batches      OpenAI's Files and Batches API (batch_api.py), when given a store

`Guard` is an ASGI middleware in front of every route. It answers, before
FastAPI parses anything: 431 when the headers are larger than
max_header_bytes, 413 when the body is larger than max_body_bytes (declared
or streamed), and 503 once the server drains for shutdown. It also counts
requests in flight, so a shutdown can wait for them. Serve's HTTP proxy does
not expose uvicorn's parser limits, which is why the limits live here.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from shardline.deployments.batch_api import MAX_FILE_BYTES, BatchStore
from shardline.deployments.config import ServeConfig
from shardline.deployments.errors import APIError, install_handlers
from shardline.deployments.protocol import ChatCompletionRequest, CompletionRequest
from shardline.deployments.service import OpenAIService

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class Gate:
    """Requests in flight, and whether new ones are still let in."""

    def __init__(self) -> None:
        self.num_inflight = 0
        self.draining = False


class Guard:
    """ASGI middleware: header and body size limits, drain, in-flight count.

    Args:
        app: the ASGI app behind it.
        gate: the shared Gate (the ingress deployment flips `draining`).
        max_body_bytes, max_header_bytes: the limits (413, 431).
    """

    # An upload to /v1/files may be this large (a batch's requests), beyond max_body_bytes.
    UPLOAD_PATH = "/v1/files"

    def __init__(self, app: Any, gate: Gate, max_body_bytes: int, max_header_bytes: int, max_upload_bytes: int = 0):
        self.app = app
        self.gate = gate
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.max_upload_bytes = max(max_upload_bytes, max_body_bytes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_upload_bytes if scope.get("path") == self.UPLOAD_PATH else self.max_body_bytes
        error = self._check_headers(scope, limit)
        if error is None and self.gate.draining:
            error = APIError(503, "server is shutting down; not taking new requests")
        if error is not None:
            await error.response()(scope, receive, send)
            return
        if scope["method"] in _BODY_METHODS:
            body, error = await self._read_body(receive, limit)
            if error is not None:
                await error.response()(scope, receive, send)
                return
            receive = _replay(body, receive)
        self.gate.num_inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.num_inflight -= 1

    def _check_headers(self, scope, limit: int) -> Optional[APIError]:
        size = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if size > self.max_header_bytes:
            return APIError(431, f"request headers are {size} bytes; the limit is {self.max_header_bytes}")
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                return self._too_large(int(v), limit)
        return None

    @staticmethod
    def _too_large(size: int, limit: int) -> APIError:
        return APIError(413, f"request body is {size} bytes or more; the limit is {limit}")

    async def _read_body(self, receive, limit: int) -> tuple[bytes, Optional[APIError]]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", APIError(400, "client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", self._too_large(size, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive):
    """A receive() that hands the buffered body over once, then the real one (disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class _ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    """OpenAI's error body."""

    error: _ErrorDetail


_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 408, 413, 429, 431, 500, 503)}
_GENERATION_RESPONSES = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}, "description": "The completion, or its stream."},
    **_ERRORS,
}


def _publish_model_names(app: FastAPI, names: list[str]) -> None:
    """State in the OpenAPI schema which `model` values exist (anything else is a 404)."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            for request in ("CompletionRequest", "ChatCompletionRequest"):
                schema["components"]["schemas"][request]["properties"]["model"]["enum"] = list(names)
        return app.openapi_schema

    app.openapi = openapi


def api_key_of(request: Request) -> Optional[str]:
    """The API key of `Authorization: Bearer <key>`, as OpenAI clients send it; None without one."""
    scheme, _, key = (request.headers.get("authorization") or "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


class BatchCreate(BaseModel):
    """POST /v1/batches."""

    model_config = ConfigDict(strict=True, extra="forbid")

    input_file_id: str = Field(min_length=1)
    endpoint: str
    completion_window: str = "24h"
    metadata: Optional[dict[str, str]] = None


# A request that sends this header with "batch" waits behind interactive ones and takes only idle
# capacity (the head node's scheduler); batch jobs in fleet mode send it (deployments/batch.py).
PRIORITY_HEADER = "x-shardline-priority"


def priority_of(request: Request) -> str:
    return "batch" if (request.headers.get(PRIORITY_HEADER) or "").strip().lower() == "batch" else "interactive"


def self_url(request: Request) -> str:
    """This app's OpenAI base URL as seen from this node: the address the request came in on."""
    host, port = request.scope.get("server") or ("127.0.0.1", 8000)
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{port}{request.scope.get('root_path', '')}/v1"


def build_openai_app(
    service: OpenAIService, gate: Gate, config: ServeConfig, store: Optional[BatchStore] = None,
    start_batch: Optional[Any] = None,
) -> FastAPI:
    """The OpenAI-compatible FastAPI app over `service`, guarded by `gate` and config's limits; with
    `store` (and `start_batch`, which runs a created batch's job), the Files and Batches API too."""
    app = FastAPI(title="shardline", summary="OpenAI-compatible LLM serving", docs_url=None, redoc_url=None)
    install_handlers(app)

    @app.post("/v1/completions", responses=_GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request):
        return await service.completions(body, api_key_of(request), priority_of(request))

    @app.post("/v1/chat/completions", responses=_GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await service.chat(body, api_key_of(request), priority_of(request))

    @app.get("/v1/models", responses=_ERRORS)
    async def models():
        return service.models()

    @app.get("/health", responses={503: {"model": ErrorBody}})
    async def health():
        if gate.draining:
            return APIError(503, "server is shutting down").response()
        return JSONResponse({"status": "ok"})

    if store is not None:
        _add_batch_routes(app, service, store, start_batch)
    _publish_model_names(app, [config.model_name])
    app.add_middleware(Guard, gate=gate, max_body_bytes=config.max_body_bytes, max_header_bytes=config.max_header_bytes,
                       max_upload_bytes=MAX_FILE_BYTES if store is not None else 0)
    return app


def _add_batch_routes(app: FastAPI, service: OpenAIService, store: BatchStore, start_batch: Optional[Any]) -> None:
    def owner(request: Request) -> str:
        return service._tenant(api_key_of(request), None).tenant_id

    @app.post("/v1/files", responses=_ERRORS)
    async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form(...)):
        who = owner(request)
        data = await file.read()
        return await asyncio.to_thread(store.add_file, data, file.filename or "upload.jsonl", purpose, who)

    @app.get("/v1/files", responses=_ERRORS)
    async def list_files(request: Request):
        return await asyncio.to_thread(store.list_files, owner(request))

    @app.get("/v1/files/{file_id}", responses=_ERRORS)
    async def get_file(file_id: str, request: Request):
        return await asyncio.to_thread(store.get_file, file_id, owner(request))

    @app.get("/v1/files/{file_id}/content", responses=_ERRORS)
    async def file_content(file_id: str, request: Request):
        path = await asyncio.to_thread(store.file_path, file_id, owner(request))
        return Response(await asyncio.to_thread(path.read_bytes), media_type="application/octet-stream")

    @app.post("/v1/batches", responses=_ERRORS)
    async def create_batch(body: BatchCreate, request: Request):
        who = owner(request)
        job = await asyncio.to_thread(
            store.create_batch, body.input_file_id, body.endpoint, body.completion_window, body.metadata, who,
            self_url(request),
        )
        if start_batch is not None:
            start_batch(job, api_key_of(request))
        return await asyncio.to_thread(store.batch, job.spec.job_id, who)

    @app.get("/v1/batches", responses=_ERRORS)
    async def list_batches(request: Request):
        return await asyncio.to_thread(store.list_batches, owner(request))

    @app.get("/v1/batches/{batch_id}", responses=_ERRORS)
    async def get_batch(batch_id: str, request: Request):
        return await asyncio.to_thread(store.batch, batch_id, owner(request))

    @app.post("/v1/batches/{batch_id}/cancel", responses=_ERRORS)
    async def cancel_batch(batch_id: str, request: Request):
        return await asyncio.to_thread(store.cancel, batch_id, owner(request))
