"""Sampling parameters of one request, with vLLM's names and defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must fit, as vLLM's `structured_outputs` says it: exactly one of

    Args:
        json: a JSON schema (a dict, or its JSON text).
        json_object: any JSON object.
        regex: a regular expression the whole output matches.
        choice: the output is exactly one of these strings.
        grammar: a context-free grammar, in Lark syntax (a `start:` rule) or llama.cpp's GBNF (`root ::= ...`).
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                "structured outputs take exactly one of json, json_object, regex, choice, grammar"
                + (f"; got {', '.join(given)}" if given else "")
            )
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        if self.regex is not None and not self.regex:
            raise ValueError("regex must not be empty")
        if self.grammar is not None and not self.grammar.strip():
            raise ValueError("grammar must not be empty")

    @property
    def kind(self) -> str:
        """Which constraint this is: "json", "json_object", "regex", "choice" or "grammar"."""
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)

    def cache_key(self) -> str:
        """One string per distinct constraint (a schema's key order does not matter)."""
        value = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        return self.kind + ":" + json.dumps(value, sort_keys=True, ensure_ascii=False)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    Args:
        n: completions per prompt (parallel sampling; they share the prompt's KV blocks).
        temperature: 0 means greedy.
        top_p, top_k, min_p: nucleus, top-k (-1 or 0 = off) and min-p filtering.
        seed: makes this request's samples reproducible whatever else runs beside it.
        max_tokens: generated tokens at most (None: up to the model's context).
        min_tokens: stop tokens and eos are ignored before this many tokens.
        stop: strings that end generation; they are cut from the returned text.
        stop_token_ids: token ids that end generation (the token is kept in token_ids).
        ignore_eos: keep going past the model's eos tokens.
        logprobs: return the top-n log-probabilities at each generated token (plus the chosen one).
        presence_penalty, frequency_penalty: OpenAI's additive penalties on generated tokens.
        repetition_penalty: CTRL's multiplicative penalty on prompt and generated tokens (1 = off).
        logit_bias: token id -> bias added to its logit.
        skip_special_tokens: leave special tokens out of the text.
        include_stop_str_in_output: keep the matched stop string in the text.
        structured_outputs: the output fits a JSON schema, a regex, a choice or a grammar
            (engine/structured_output.py); the end-of-sequence token ends it even with ignore_eos.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k == -1 or self.top_k >= 1, f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            f"max_tokens must be an integer >= 1, got {self.max_tokens!r}",
        )
        check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be non-negative integers",
        )
        check(
            self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
            f"logprobs must be an integer >= 0, got {self.logprobs!r}",
        )
        check(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(
            -2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
        )
        check(self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logit_bias:
            check(
                all(isinstance(t, int) and t >= 0 for t in self.logit_bias),
                "logit_bias keys must be non-negative token ids",
            )
            check(all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()), "logit_bias values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def for_child(self, index: int) -> "SamplingParams":
        """Parameters of the index-th of n parallel samples: n=1 and a distinct seed."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)

    def token_ids_in_use(self) -> list[int]:
        """Every token id these parameters mention (for a vocabulary check)."""
        return list(self.stop_token_ids) + list(self.logit_bias or {})
