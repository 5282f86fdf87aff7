"""Runs batch rows on an engine of its own: a dedicated batch job's unit of work.

`BatchEngine` owns an LLMEngine for one model and turns a shard's rows into
results: each row's body goes through the same checks as an HTTP request
(deployments/prepare.py), a row that fails them, or that the engine refuses (a
prompt past the context), becomes an error result with its line number, and the
others run together, continuously batched, to the end. Answers are built as the
HTTP endpoints build them (openai_format.ResponseBuilder), tool calls included.
Plain Python; deployments/batch.py wraps it in a Ray actor.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Optional, Union

from pydantic import ValidationError

from shardline.deployments.batch_io import BatchRow, RowResult
from shardline.deployments.errors import APIError, from_validation_errors
from shardline.deployments.events import ChoiceDelta
from shardline.deployments.openai_format import ResponseBuilder
from shardline.deployments.prepare import Prepared, RequestPreparer
from shardline.deployments.protocol import ChatCompletionRequest, CompletionRequest
from shardline.engine.outputs import RequestOutput


class BatchEngine:
    """An engine that runs rows of one model.

    Args:
        model: a model folder or pulled alias.
        served_model_name: the name rows send as `model`.
        engine: EngineConfig settings (dtype, max_num_seqs, kv_cache_memory_gb, ...).
        max_logprobs, max_n: limits, as the server's.
    """

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

    def ready(self) -> bool:
        return True

    def run(self, rows: list[BatchRow]) -> list[RowResult]:
        """Every row's result, in the rows' order."""
        results: dict[int, RowResult] = {}
        running: dict[str, tuple[BatchRow, Prepared]] = {}
        for row in rows:
            prepared = self._prepare(row, results)
            if prepared is None:
                continue
            rid = f"batch-{next(self._ids)}"
            try:
                self.engine.add_request(rid, {"prompt_token_ids": prepared.prompts[0]}, prepared.params)
            except ValueError as e:
                results[row.index] = RowResult.failed(row, f"line {row.line}: {e}")
                continue
            running[rid] = (row, prepared)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step(final_only=True):
                if out.finished and out.request_id in running:
                    row, prepared = running.pop(out.request_id)
                    results[row.index] = self._result(row, prepared, out)
        return [results[row.index] for row in rows]

    def _prepare(self, row: BatchRow, results: dict[int, RowResult]) -> Optional[Prepared]:
        """The row as engine input, or None with its error result recorded."""
        if row.error is not None:
            results[row.index] = RowResult.failed(row, row.error)
            return None
        request_type: type[Union[ChatCompletionRequest, CompletionRequest]] = (
            ChatCompletionRequest if row.kind == "chat" else CompletionRequest
        )
        try:
            body = request_type.model_validate(row.body)
            if body.stream:
                raise APIError(400, "stream is not allowed in a batch row", "stream")
            prepared = self.prepare.chat(body) if row.kind == "chat" else self.prepare.completion(body)
            if len(prepared.prompts) != 1:
                raise APIError(400, "a batch row holds one prompt", "prompt")
        except ValidationError as e:
            error = from_validation_errors(e.errors())
            results[row.index] = RowResult.failed(row, f"line {row.line}: {error.message}", error.status)
            return None
        except APIError as e:
            results[row.index] = RowResult.failed(row, f"line {row.line}: {e.message}", e.status)
            return None
        return prepared

    def _result(self, row: BatchRow, prepared: Prepared, out: RequestOutput) -> RowResult:
        kind = prepared.kind
        builder = ResponseBuilder(
            kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{out.request_id}", int(time.time()), self.model_name,
            prepared.params.n, prepared.top_logprobs, prepared.tool_calls,
        )
        builder.admitted(0, len(out.prompt_token_ids))
        for c in out.outputs:
            builder.add(0, ChoiceDelta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason), out.num_cached_tokens)
        body = builder.final_body()
        first = body["choices"][0]
        text = first["message"]["content"] if kind == "chat" else first["text"]
        usage = body["usage"]
        return RowResult(
            row.index, row.line, row.custom_id, row.passthrough, 200, body, None, text, first["finish_reason"],
            usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens"],
        )

    def stats(self) -> dict[str, Any]:
        return {"unfinished": self.engine.get_num_unfinished_requests()}
