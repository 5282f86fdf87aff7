"""What crosses between the ingress and a ModelReplica: small dataclasses.

The ingress sends one `GenerateRequest` per prompt; the replica streams back
events. The first event always settles whether the request runs: `Admitted`
(then `Delta`s until one with `finished`, on the same call or, for a request
with a `subscriber`, on that ingress's step stream: step_stream.py) or
`Rejected` (a 4xx the ingress reports before any byte of a response is sent). `Failed` is an engine error
after admission. Deltas carry only what is new since the previous event, so a
long completion costs O(length) on the wire, not O(length^2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from shardline.engine.outputs import PositionLogprobs
from shardline.engine.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    """One prompt to run, already tokenized by the ingress."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # The request field a token-id or length problem is reported against ("prompt" or "messages").
    prompt_param: str = "prompt"
    # Tenant salt for prefix-cache isolation (None: share with everyone); from the
    # server's tenant record, never from the request body.
    cache_salt: Optional[Union[str, bytes]] = None
    # Wall-clock arrival at the ingress, for latency metrics.
    arrival_time: float = 0.0
    # Who the request is charged to and queued as (cluster.tenants).
    tenant_id: str = "anonymous"
    # "interactive", or "batch" (takes only idle capacity).
    priority: str = "interactive"
    # Serve replica id the head-node scheduler chose; Serve's request router
    # (serve_router.py) sends the request there. None: Serve's own choice.
    replica_hint: Optional[str] = None
    # Prompt tokens the scheduler expects the replica to serve from its cache.
    expected_cached_tokens: int = 0
    # The ingress whose step stream carries this request's deltas (step_stream.py);
    # None: they come back on this call, one message each.
    subscriber: Optional[str] = None


@dataclass(slots=True)
class Admitted:
    """The replica took the request; deltas follow."""

    prompt_tokens: int
    # The Serve replica that runs it (where its step stream comes from).
    replica_id: str = ""


@dataclass(slots=True)
class Rejected:
    """The request will not run; the ingress answers with this status."""

    status: int
    message: str
    # The request field at fault, if any.
    param: Optional[str] = None
    # Seconds for Retry-After (429 only).
    retry_after_s: Optional[int] = None


@dataclass(slots=True)
class ChoiceDelta:
    """What one of the request's n completions gained since the last event."""

    index: int
    text: str
    token_ids: list[int]
    # One dict per new token (token id -> Logprob), when logprobs were asked for.
    logprobs: Optional[list[PositionLogprobs]] = None
    # Set once, on the completion's last delta: "stop" or "length".
    finish_reason: Optional[str] = None


@dataclass(slots=True)
class Delta:
    """One engine step's progress on a request."""

    choices: list[ChoiceDelta] = field(default_factory=list)
    # Prompt tokens served from the prefix cache (known after the first step).
    num_cached_tokens: int = 0
    finished: bool = False


@dataclass(slots=True)
class Failed:
    """The engine failed after admission; the request cannot finish."""

    message: str


ReplicaEvent = Union[Admitted, Rejected, Delta, Failed]
