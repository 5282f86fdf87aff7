"""OpenAI response bodies and stream chunks, built from replica deltas.

Pure functions and one accumulator: no I/O, no engine. The shapes are
OpenAI's (Completion, ChatCompletion, their chunks, CompletionUsage with
`prompt_tokens_details.cached_tokens`), so the official client parses them.

A choice's index across a batch is `prompt_index * n + completion_index`, as
in OpenAI's API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from shardline.deployments.events import ChoiceDelta
from shardline.deployments.tool_calls import ToolCall, ToolCallStream, parse_tool_calls
from shardline.engine.outputs import PositionLogprobs

Kind = Literal["completion", "chat"]

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _token_text(lp_entry: PositionLogprobs, token_id: int) -> str:
    lp = lp_entry.get(token_id)
    return (lp.decoded_token if lp is not None and lp.decoded_token is not None else "") or ""


def _top(entry: PositionLogprobs, n: int) -> list[tuple[int, Any]]:
    """The n most likely candidates at one position, most likely first."""
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)
    return [kv for kv in ranked if kv[1].rank <= n][:n]


def chat_logprobs(entries: list[PositionLogprobs], token_ids: list[int], top_n: int) -> dict[str, Any]:
    """ChatCompletion's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for entry, tid in zip(entries, token_ids):
        text = _token_text(entry, tid)
        lp = entry[tid].logprob if tid in entry else float("-inf")
        top = [
            {"token": t.decoded_token or "", "logprob": t.logprob, "bytes": list((t.decoded_token or "").encode())}
            for _, t in _top(entry, top_n)
        ]
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(
    entries: list[PositionLogprobs], token_ids: list[int], top_n: int, text_offset: int = 0
) -> dict[str, Any]:
    """Completion's `logprobs`: parallel lists tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = text_offset
    for entry, tid in zip(entries, token_ids):
        text = _token_text(entry, tid)
        tokens.append(text)
        token_logprobs.append(entry[tid].logprob if tid in entry else None)
        tops.append({(t.decoded_token or ""): t.logprob for _, t in _top(entry, top_n)} if top_n else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    # Characters in `text` before its last piece (a chunk's logprob text offset).
    text_offset: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: Optional[str] = None
    # With tools: the streamed text split into content and calls.
    tool_stream: Optional[ToolCallStream] = None


class ResponseBuilder:
    """Accumulates deltas of every prompt of one request; renders chunks and the final body.

    Args:
        kind: "completion" (/v1/completions) or "chat" (/v1/chat/completions).
        response_id, created, model: the response's id, Unix time and model name.
        n: completions per prompt.
        top_logprobs: candidates per position when logprobs were asked for, else None.
        tool_calls: chat answers may hold tool calls (deployments/tool_calls.py), parsed out of the text.
    """

    def __init__(
        self, kind: Kind, response_id: str, created: int, model: str, n: int, top_logprobs: Optional[int],
        tool_calls: bool = False,
    ):
        self.kind = kind
        self.tool_calls = tool_calls and kind == "chat"
        self.id = response_id
        self.created = created
        self.model = model
        self.n = n
        self.top_logprobs = top_logprobs
        self.choices: dict[int, _Choice] = {}
        self.prompt_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}

    # ---- accumulation -----------------------------------------------------------

    def index(self, prompt_index: int, completion_index: int) -> int:
        return prompt_index * self.n + completion_index

    def admitted(self, prompt_index: int, prompt_tokens: int) -> None:
        self.prompt_tokens[prompt_index] = prompt_tokens
        for i in range(self.n):
            self._choice(self.index(prompt_index, i))

    def _choice(self, idx: int) -> _Choice:
        c = self.choices.get(idx)
        if c is None:
            c = self.choices[idx] = _Choice(tool_stream=ToolCallStream() if self.tool_calls else None)
        return c

    def add(self, prompt_index: int, delta: ChoiceDelta, cached_tokens: int) -> int:
        """Record a delta; returns the choice's index in the response."""
        self.cached_tokens[prompt_index] = max(self.cached_tokens.get(prompt_index, 0), cached_tokens)
        idx = self.index(prompt_index, delta.index)
        c = self._choice(idx)
        if c.text:
            c.text_offset += len(c.text[-1])
        c.text.append(delta.text)
        c.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            c.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            c.finish_reason = delta.finish_reason
        return idx

    def usage(self) -> dict[str, Any]:
        return usage(
            sum(self.prompt_tokens.values()),
            sum(len(c.token_ids) for c in self.choices.values()),
            sum(self.cached_tokens.values()),
        )

    # ---- rendering --------------------------------------------------------------

    def _logprobs(self, entries: list[PositionLogprobs], token_ids: list[int], text_offset: int = 0):
        if self.top_logprobs is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries, token_ids, self.top_logprobs)
        return completion_logprobs(entries, token_ids, self.top_logprobs, text_offset)

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def final_body(self) -> dict[str, Any]:
        """The non-streaming response."""
        choices = []
        for idx in sorted(self.choices):
            c = self.choices[idx]
            text = "".join(c.text)
            logprobs = self._logprobs(c.logprobs, c.token_ids)
            if self.kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                finish_reason = c.finish_reason
                if self.tool_calls:
                    content, calls = parse_tool_calls(text)
                    message["content"] = content
                    if calls:
                        message["tool_calls"] = [call.as_openai() for call in calls]
                        finish_reason = _tool_finish(finish_reason)
                choices.append({"index": idx, "message": message, "logprobs": logprobs, "finish_reason": finish_reason})
            else:
                choices.append({"index": idx, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {**self._envelope(chunk=False), "choices": choices, "usage": self.usage()}

    def role_chunk(self, idx: int, include_usage: bool) -> dict[str, Any]:
        """Chat streams open each choice with the assistant role and empty content."""
        choice = {"index": idx, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._chunk([choice], include_usage)

    def has_news(self, delta: ChoiceDelta) -> bool:
        """Whether a delta is worth a chunk: text, a finish, or tokens whose logprobs were asked for."""
        return bool(delta.text) or delta.finish_reason is not None or (self.top_logprobs is not None and bool(delta.token_ids))

    def delta_chunk(self, idx: int, delta: ChoiceDelta, include_usage: bool) -> Optional[dict[str, Any]]:
        """One choice's delta as a stream chunk (after `add`); None when a tool answer holds it back."""
        c = self.choices[idx]
        logprobs = self._logprobs(delta.logprobs or [], delta.token_ids, c.text_offset) if delta.token_ids else None
        if self.kind != "chat":
            choice = {"index": idx, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}
            return self._chunk([choice], include_usage)
        finish_reason = delta.finish_reason
        if c.tool_stream is None:
            body: dict[str, Any] = {"content": delta.text} if (delta.text or delta.finish_reason is None) else {}
        else:
            parts = c.tool_stream.feed(delta.text) + (c.tool_stream.finish() if finish_reason is not None else [])
            body = self._tool_delta(c.tool_stream, parts)
            if finish_reason is not None and c.tool_stream.num_calls:
                finish_reason = _tool_finish(finish_reason)
            if not body and finish_reason is None and logprobs is None:
                return None
        choice = {"index": idx, "delta": body, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._chunk([choice], include_usage)

    @staticmethod
    def _tool_delta(stream: ToolCallStream, parts: list) -> dict[str, Any]:
        """A chat delta from text pieces and whole calls (each call one tool_calls entry, indexed in order)."""
        text = "".join(p for p in parts if isinstance(p, str))
        calls = [p for p in parts if isinstance(p, ToolCall)]
        body: dict[str, Any] = {}
        if text.strip() or (text and not stream.num_calls):
            body["content"] = text
        if calls:
            first = stream.num_calls - len(calls)
            body["tool_calls"] = [call.as_openai(first + k) for k, call in enumerate(calls)]
        return body

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk under stream_options.include_usage: no choices, the whole usage."""
        return {**self._envelope(chunk=True), "choices": [], "usage": self.usage()}

    def _chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
        chunk = {**self._envelope(chunk=True), "choices": choices}
        if include_usage:
            chunk["usage"] = None
        return chunk


def _tool_finish(finish_reason: Optional[str]) -> Optional[str]:
    """OpenAI's finish_reason for an answer that made calls: "tool_calls" unless it was cut short."""
    return "tool_calls" if finish_reason == "stop" else finish_reason
