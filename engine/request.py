"""A request as the scheduler sees it: token ids, progress and stop conditions.

Plain Python. Sampling knobs travel opaquely in `sampling`; the scheduler
reads only the fields below.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from shardline.engine.kv_cache import BlockHash, hash_block_tokens, ROOT_HASH


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason for a finished status, else None."""
        return self.value if self.finished else None


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated (a child of a parallel-sampling request counts as one)."""

    request_id: str
    prompt_token_ids: list[int]
    # Stop after this many generated tokens.
    max_tokens: int
    # Token ids that end generation (eos unless ignore_eos, plus stop_token_ids).
    stop_token_ids: frozenset[int] = frozenset()
    # No stop token is honoured before this many generated tokens.
    min_tokens: int = 0
    # Extra keys mixed into every block hash (a tenant's salt).
    cache_salt: bytes | None = None
    # Opaque to the scheduler: the sampler's parameters, and the grammar state of a constrained output.
    sampling: Any = None
    grammar: Any = None
    # Wall-clock arrival, for metrics only.
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    # Prompt plus output, the tokens whose KV the sequence needs.
    all_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is computed (or scheduled this step).
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at the first scheduling; -1 before.
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    # Why a stop happened: the stop token id, or a stop string set by the engine.
    stop_reason: int | str | None = None
    # Hashes of every full block of all_token_ids, chained.
    block_hashes: list[BlockHash] = field(default_factory=list)
    _block_size: int = 0

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def extra_keys(self) -> tuple[bytes, ...]:
        return (self.cache_salt,) if self.cache_salt else ()

    def init_block_hashes(self, block_size: int) -> None:
        """Hash the prompt's full blocks; later blocks are hashed as tokens arrive."""
        self._block_size = block_size
        self.block_hashes = []
        self._extend_block_hashes()

    def _extend_block_hashes(self) -> None:
        bs = self._block_size
        if bs == 0:
            return
        while (len(self.block_hashes) + 1) * bs <= len(self.all_token_ids):
            start = len(self.block_hashes) * bs
            parent = self.block_hashes[-1] if self.block_hashes else ROOT_HASH
            self.block_hashes.append(hash_block_tokens(parent, self.all_token_ids[start : start + bs], self.extra_keys))

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self._extend_block_hashes()

    @property
    def is_finished(self) -> bool:
        return self.status.finished
