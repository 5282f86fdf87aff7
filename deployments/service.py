"""The OpenAI endpoints' logic: body -> token ids -> replica streams -> response.

`OpenAIService` is plain Python over a `Backend` (anything with
`generate(GenerateRequest) -> async iterator of ReplicaEvent`): the Serve
router in production, a ModelReplica itself in tests. For one request it

1. names the tenant (the API key's, else the `user` field's; 401 when the
   server requires a key); the tenant's cache salt comes from its record only,
2. checks the body and turns it into SamplingParams and token ids (prepare.py:
   404, 400s; the ingress owns the tokenizer, so the scheduler routes on token
   ids: router.py hashes them),
3. opens one replica stream per prompt and waits for each to be admitted or
   rejected, so a 400/429 is answered before any byte of a 200,
4. answers with one JSON body, or streams server-sent events ending in
   `data: [DONE]`; an error after the stream started becomes an error event
   followed by `[DONE]`.

The whole request runs under one deadline (`request_timeout_s`): 408 before
the response starts, an error event after.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator, Optional, Protocol, Union

from fastapi.responses import JSONResponse, StreamingResponse

from shardline.cluster.tenants import Tenant, TenantRegistry, UnknownApiKey
from shardline.deployments.config import ServeConfig
from shardline.deployments.errors import APIError
from shardline.deployments.events import Admitted, Delta, Failed, GenerateRequest, Rejected, ReplicaEvent
from shardline.deployments.openai_format import SSE_DONE, ResponseBuilder, sse
from shardline.deployments.prepare import Prepared, RequestPreparer
from shardline.deployments.protocol import ChatCompletionRequest, CompletionRequest
from shardline.engine.tokenizer import Tokenizer


class Backend(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[ReplicaEvent]: ...


class _Deadline:
    """Seconds left of a request's time budget (None: unlimited)."""

    def __init__(self, timeout_s: Optional[float]):
        self._end = None if timeout_s is None else time.monotonic() + timeout_s
        self.timeout_s = timeout_s

    def remaining(self) -> Optional[float]:
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def error(self) -> APIError:
        return APIError(408, f"request did not finish within {self.timeout_s} s")


async def _next(it: AsyncIterator, deadline: _Deadline):
    """The stream's next item, or TimeoutError past the deadline.

    NOTE: `asyncio.timeout`, not `wait_for`: this runs once per streamed token,
    and `wait_for` wraps each await in a new Task.
    """
    remaining = deadline.remaining()
    if remaining is None:
        return await it.__anext__()
    async with asyncio.timeout(remaining):
        return await it.__anext__()


def _rejection(event: ReplicaEvent) -> APIError:
    if isinstance(event, Rejected):
        headers = {"Retry-After": str(event.retry_after_s)} if event.retry_after_s else None
        return APIError(event.status, event.message, event.param, headers=headers)
    if isinstance(event, Failed):
        return APIError(500, event.message)
    return APIError(500, f"unexpected first event from the replica: {type(event).__name__}")


def _failure(error: Exception) -> APIError:
    """A 500 for an error that is not the request's fault (a replica died, the engine failed)."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return APIError(500, f"generation failed: {type(error).__name__}: {first_line}")


class _Streams:
    """The replica streams of one request's prompts, admitted together and merged.

    Args:
        iterators: one replica stream per prompt, in prompt order.
    """

    def __init__(self, iterators: list[AsyncIterator[ReplicaEvent]]):
        self.iterators = iterators
        self._tasks: list[asyncio.Task] = []

    async def admit(self, deadline: _Deadline) -> list[Admitted]:
        """Every prompt's Admitted, or the first rejection as an APIError (all streams closed)."""
        try:
            firsts = await asyncio.gather(*(_next(it, deadline) for it in self.iterators))
        except asyncio.TimeoutError:
            await self.close()
            raise deadline.error() from None
        except BaseException:
            await self.close()
            raise
        for event in firsts:
            if not isinstance(event, Admitted):
                await self.close()
                raise _rejection(event)
        return firsts

    async def events(self) -> AsyncIterator[tuple[int, ReplicaEvent]]:
        """(prompt index, event) as they arrive, until every stream ends."""
        if len(self.iterators) == 1:
            async for event in self.iterators[0]:
                yield 0, event
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int, it: AsyncIterator[ReplicaEvent]) -> None:
            try:
                async for event in it:
                    await queue.put((i, event))
            except Exception as e:  # surfaced to the consumer, in order
                await queue.put((i, e))
            finally:
                await queue.put((i, done))

        self._tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(self.iterators)]
        remaining = len(self._tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item

    async def close(self) -> None:
        """Stop every stream (aborting unfinished requests at their replicas)."""
        for task in self._tasks:
            task.cancel()
        for it in self.iterators:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except (RuntimeError, StopAsyncIteration):
                    pass  # already running in a cancelled pump task, or finished


class OpenAIService:
    """Completions and chat completions over a backend of model replicas.

    Args:
        config: the app's ServeConfig (model name, limits, timeout).
        tokenizer: the served model's tokenizer (chat template included).
        backend: where GenerateRequests run (the Serve router, or a ModelReplica).
        tenants: who a request belongs to, by API key or `user` (default: everyone anonymous).
    """

    def __init__(
        self, config: ServeConfig, tokenizer: Tokenizer, backend: Backend, tenants: Optional[TenantRegistry] = None
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.backend = backend
        self.tenants = tenants or TenantRegistry()
        self.created = int(time.time())
        self.prepare = RequestPreparer(config.model_name, tokenizer, config.max_logprobs, config.max_n)

    # ---- endpoints ---------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        card = {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "shardline"}
        return {"object": "list", "data": [card]}

    async def completions(self, body: CompletionRequest, api_key: Optional[str] = None, priority: str = "interactive"):
        tenant = self._tenant(api_key, body.user)
        return await self._respond(body, self.prepare.completion(body), tenant, priority)

    async def chat(self, body: ChatCompletionRequest, api_key: Optional[str] = None, priority: str = "interactive"):
        tenant = self._tenant(api_key, body.user)
        return await self._respond(body, self.prepare.chat(body), tenant, priority)

    # ---- steps -------------------------------------------------------------------

    def _tenant(self, api_key: Optional[str], user: Optional[str]) -> Tenant:
        """The request's tenant: its API key, else its `user` field (401 when a key is required)."""
        try:
            return self.tenants.resolve(api_key, user)
        except UnknownApiKey as e:
            raise APIError(401, str(e)) from None

    async def _respond(
        self, body: Union[CompletionRequest, ChatCompletionRequest], prepared: Prepared, tenant: Tenant, priority: str
    ):
        deadline = _Deadline(self.config.request_timeout_s)
        response_id = f"{'chatcmpl' if prepared.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        now = time.time()
        params = prepared.params
        requests = [
            GenerateRequest(
                f"{response_id}-{i}", ids, params, prepared.prompt_param, cache_salt=tenant.cache_salt, arrival_time=now,
                tenant_id=tenant.tenant_id, priority=priority,
            )
            for i, ids in enumerate(prepared.prompts)
        ]
        streams = _Streams([self.backend.generate(r) for r in requests])
        try:
            admitted = await streams.admit(deadline)
        except APIError:
            raise
        except Exception as e:  # the replica could not be reached or died
            raise _failure(e) from None
        builder = ResponseBuilder(
            prepared.kind, response_id, int(now), self.config.model_name, params.n, prepared.top_logprobs, prepared.tool_calls
        )
        for i, a in enumerate(admitted):
            builder.admitted(i, a.prompt_tokens)
        if body.stream:
            return StreamingResponse(
                self._sse(builder, streams, deadline, body.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            await self._collect(builder, streams, deadline)
        except APIError:
            raise
        except Exception as e:
            raise _failure(e) from None
        finally:
            await streams.close()
        return JSONResponse(builder.final_body())

    async def _collect(self, builder: ResponseBuilder, streams: _Streams, deadline: _Deadline) -> None:
        events = streams.events()
        try:
            while True:
                try:
                    i, event = await _next(events, deadline)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise deadline.error() from None
                if isinstance(event, Delta):
                    for choice in event.choices:
                        builder.add(i, choice, event.num_cached_tokens)
                elif not isinstance(event, Admitted):
                    raise _rejection(event)
        finally:
            await events.aclose()

    async def _sse(
        self, builder: ResponseBuilder, streams: _Streams, deadline: _Deadline, include_usage: bool
    ) -> AsyncIterator[str]:
        events = streams.events()
        try:
            if builder.kind == "chat":
                for idx in sorted(builder.choices):
                    yield sse(builder.role_chunk(idx, include_usage))
            while True:
                try:
                    i, event = await _next(events, deadline)
                except StopAsyncIteration:
                    break
                if isinstance(event, Delta):
                    for choice in event.choices:
                        idx = builder.add(i, choice, event.num_cached_tokens)
                        if builder.has_news(choice):
                            chunk = builder.delta_chunk(idx, choice, include_usage)
                            if chunk is not None:
                                yield sse(chunk)
                elif not isinstance(event, Admitted):
                    raise _rejection(event)
            if include_usage:
                yield sse(builder.usage_chunk())
        except asyncio.TimeoutError:
            yield deadline.error().sse_event()
        except APIError as e:
            yield e.sse_event()
        except Exception as e:  # the replica died, the engine failed: tell the client, then end
            yield _failure(e).sse_event()
        finally:
            await events.aclose()
            await streams.close()
        yield SSE_DONE
