"""What the engine hands back for a request (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """Log-probability of one candidate token at one position."""

    logprob: float
    # 1 = the most likely token.
    rank: int
    decoded_token: str | None = None


# Per generated position: token id -> Logprob (the chosen token plus the top-n).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One of a request's n completions, cumulative so far."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    # "stop", "length", "abort" once finished.
    finish_reason: str | None = None
    # The stop string or stop token id that ended it, if any.
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after a step: prompt, completions so far, and whether it is done."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # Prompt tokens served from the prefix cache (the most over the n completions).
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
