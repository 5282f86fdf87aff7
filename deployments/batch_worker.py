"""Runs batch rows: on an engine of its own (dedicated jobs), or through the served app (fleet jobs).

`BatchEngine` owns an LLMEngine for one model and turns a shard's rows into
results: each row's body goes through the same checks as an HTTP request
(deployments/prepare.py), a row that fails them, or that the engine refuses (a
prompt past the context), becomes an error result with its line number, and the
others run together, continuously batched, to the end. Answers are built as the
HTTP endpoints build them (openai_format.ResponseBuilder), tool calls included.
Plain Python; deployments/batch.py wraps it in a Ray actor.

`run_over_http` sends a fleet job's shard to the app's OpenAI endpoints with the
batch priority header, so that its rows wait behind interactive requests in the
head node's scheduler and take only idle capacity; the API key's tenant pays and
its quotas apply. A full queue's 429 is waited out (Retry-After); another 4xx is
the row's error; a 5xx or a lost connection fails the shard, which runs again.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pydantic import ValidationError

from shardline.deployments.batch_io import BatchRow, RowResult
from shardline.deployments.errors import APIError, from_validation_errors
from shardline.deployments.events import ChoiceDelta
from shardline.deployments.openai_format import ResponseBuilder
from shardline.deployments.prepare import Prepared, RequestPreparer
from shardline.deployments.protocol import ChatCompletionRequest, CompletionRequest
from shardline.engine.outputs import RequestOutput


@dataclass
class _ShardRun:
    """One `run` call's rows: results so far, requests still in the engine, and its wake-up."""

    rows: list[BatchRow]
    results: dict[int, RowResult] = field(default_factory=dict)
    running: dict[str, tuple[BatchRow, Prepared]] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)


class BatchEngine:
    """An engine that runs rows of one model.

    `run` may be called by several threads at once (the Ray actor takes `SHARDS_IN_FLIGHT`
    calls): every call's rows join one engine, which one thread steps, so the next shard's rows
    fill the batch while the last rows of the one before are still decoding, instead of the batch
    draining at every shard's end.

    Args:
        model: a model folder or pulled alias.
        served_model_name: the name rows send as `model`.
        engine: EngineConfig settings (dtype, max_num_seqs, kv_cache_memory_gb, ...).
        max_logprobs, max_n: limits, as the server's.
    """

    SHARDS_IN_FLIGHT = 2

    def __init__(
        self, model: str, served_model_name: str, engine: Optional[dict[str, Any]] = None,
        max_logprobs: int = 20, max_n: int = 16,
    ):
        from shardline.engine import EngineConfig, LLMEngine
        from shardline.engine.pull import resolve_model

        self.model_name = served_model_name
        self.engine = LLMEngine(EngineConfig(model=resolve_model(model), **(engine or {})))
        if self.engine.tokenizer is None:
            raise ValueError(f"model {model} has no tokenizer: batch rows are text")
        self.prepare = RequestPreparer(served_model_name, self.engine.tokenizer, max_logprobs, max_n)
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._owner: dict[str, _ShardRun] = {}
        self._stepper = threading.Thread(target=self._step_forever, name="batch-engine", daemon=True)
        self._stepper.start()

    def ready(self) -> bool:
        return True

    def run(self, rows: list[BatchRow]) -> list[RowResult]:
        """Every row's result, in the rows' order."""
        shard = _ShardRun(rows)
        with self._lock:
            for row in rows:
                prepared = self._prepare(row, shard.results)
                if prepared is None:
                    continue
                rid = f"batch-{next(self._ids)}"
                try:
                    self.engine.add_request(rid, {"prompt_token_ids": prepared.prompts[0]}, prepared.params)
                except ValueError as e:
                    shard.results[row.index] = RowResult.failed(row, f"line {row.line}: {e}")
                    continue
                shard.running[rid] = (row, prepared)
                self._owner[rid] = shard
            if not shard.running:
                shard.done.set()
            self._lock.notify_all()
        shard.done.wait()
        return [shard.results[row.index] for row in rows]

    def _step_forever(self) -> None:
        while True:
            with self._lock:
                while not self.engine.has_unfinished_requests():
                    self._lock.wait()
                outputs = self.engine.step(final_only=True)
                for out in outputs:
                    shard = self._owner.pop(out.request_id, None) if out.finished else None
                    if shard is None:
                        continue
                    row, prepared = shard.running.pop(out.request_id)
                    shard.results[row.index] = self._result(row, prepared, out)
                    if not shard.running:
                        shard.done.set()

    def _prepare(self, row: BatchRow, results: dict[int, RowResult]) -> Optional[Prepared]:
        prepared = prepare_row(self.prepare, row)
        if isinstance(prepared, RowResult):
            results[row.index] = prepared
            return None
        return prepared

    def _result(self, row: BatchRow, prepared: Prepared, out: RequestOutput) -> RowResult:
        choices = [ChoiceDelta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason) for c in out.outputs]
        return row_result(row, prepared, self.model_name, out.request_id, len(out.prompt_token_ids), out.num_cached_tokens,
                          choices)

    def stats(self) -> dict[str, Any]:
        return {"unfinished": self.engine.get_num_unfinished_requests()}


def prepare_row(preparer: RequestPreparer, row: BatchRow) -> Union[Prepared, RowResult]:
    """A row as engine input, through the same checks as an HTTP request; or its error result."""
    if row.error is not None:
        return RowResult.failed(row, row.error)
    request_type: type[Union[ChatCompletionRequest, CompletionRequest]] = (
        ChatCompletionRequest if row.kind == "chat" else CompletionRequest
    )
    try:
        body = request_type.model_validate(row.body)
        if body.stream:
            raise APIError(400, "stream is not allowed in a batch row", "stream")
        prepared = preparer.chat(body) if row.kind == "chat" else preparer.completion(body)
        if len(prepared.prompts) != 1:
            raise APIError(400, "a batch row holds one prompt", "prompt")
    except ValidationError as e:
        error = from_validation_errors(e.errors())
        return RowResult.failed(row, f"line {row.line}: {error.message}", error.status)
    except APIError as e:
        return RowResult.failed(row, f"line {row.line}: {e.message}", e.status)
    return prepared


def row_result(
    row: BatchRow, prepared: Prepared, model_name: str, request_id: str, prompt_tokens: int, cached_tokens: int,
    choices: list[ChoiceDelta],
) -> RowResult:
    """A finished row's result: the OpenAI response body, as the HTTP endpoints build it, and its usage."""
    kind = prepared.kind
    builder = ResponseBuilder(
        kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}", int(time.time()), model_name,
        prepared.params.n, prepared.top_logprobs, prepared.tool_calls,
    )
    builder.admitted(0, prompt_tokens)
    for choice in choices:
        builder.add(0, choice, cached_tokens)
    body = builder.final_body()
    first = body["choices"][0]
    usage = body["usage"]
    return RowResult(
        row.index, row.line, row.custom_id, row.passthrough, 200, body, None,
        first["message"]["content"] if kind == "chat" else first["text"], first["finish_reason"],
        usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens"],
    )


PRIORITY_HEADER = "x-shardline-priority"  # deployments/ingress.py reads it
ROUTES = {"chat": "/chat/completions", "completion": "/completions"}


class ShardFailed(RuntimeError):
    """The app could not answer a row (a 5xx, a lost connection): the whole shard runs again."""


def run_over_http(
    base_url: str, rows: list[BatchRow], api_key: Optional[str] = None, concurrency: int = 16, timeout_s: float = 600.0
) -> list[RowResult]:
    """A fleet shard's rows through the app at `base_url` (".../v1"), `concurrency` at a time."""
    import httpx

    headers = {PRIORITY_HEADER: "batch"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    async def one(client: httpx.AsyncClient, gate: asyncio.Semaphore, row: BatchRow) -> RowResult:
        if row.error is not None:
            return RowResult.failed(row, row.error)
        body = {**(row.body or {}), "stream": False}
        async with gate:
            while True:
                try:
                    reply = await client.post(base_url.rstrip("/") + ROUTES[row.kind], json=body)
                except httpx.HTTPError as e:
                    raise ShardFailed(f"row {row.index}: {type(e).__name__}: {e}") from None
                if reply.status_code == 429:
                    await asyncio.sleep(float(reply.headers.get("retry-after") or 1))
                    continue
                break
        if reply.status_code >= 500:
            raise ShardFailed(f"row {row.index}: HTTP {reply.status_code}: {reply.text[:200]}")
        data = reply.json()
        if reply.status_code != 200:
            message = (data.get("error") or {}).get("message", reply.text[:200]) if isinstance(data, dict) else reply.text[:200]
            return RowResult.failed(row, f"line {row.line}: {message}", reply.status_code)
        return _http_result(row, data)

    async def all_rows() -> list[RowResult]:
        gate = asyncio.Semaphore(max(1, concurrency))
        async with httpx.AsyncClient(headers=headers, timeout=timeout_s) as client:
            return list(await asyncio.gather(*(one(client, gate, row) for row in rows)))

    return asyncio.run(all_rows())


def _http_result(row: BatchRow, body: dict[str, Any]) -> RowResult:
    first = body["choices"][0]
    usage = body.get("usage") or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    text = first["message"].get("content") if "message" in first else first.get("text")
    return RowResult(
        row.index, row.line, row.custom_id, row.passthrough, 200, body, None, text, first.get("finish_reason"),
        usage.get("prompt_tokens", 0), cached, usage.get("completion_tokens", 0),
    )
