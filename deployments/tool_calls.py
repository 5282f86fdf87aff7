"""Tool calling on chat completions: the prompt, the grammar, and the calls parsed back out.

The model writes each call as a Hermes-style block, the format Qwen2.5, Hermes
and many fine-tunes are trained on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that knows `tools` gets them as they are; one that does not
(SmolLM2's) gets them in a system message written here (`tools_system_prompt`).
`tool_choice` becomes a grammar (engine/structured_output.py): `required` and a
named function allow only well-formed calls to the offered functions, whose
arguments fit each function's JSON schema, so they always parse; `auto` allows
calls or text that does not start like one. Earlier calls in the conversation
are rendered back as the same blocks, tool results as `tool` messages.

Pure: no I/O, no engine; `ToolCallStream` turns streamed text into text pieces
and whole calls, for OpenAI's `tool_calls` deltas.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from shardline.engine.sampling_params import StructuredOutputsParams
from shardline.engine.structured_output import JSON_OPTIONS, closed_schema

OPEN = "<tool_call>\n"
CLOSE = "\n</tool_call>\n"

# Named function choice: {"type": "function", "function": {"name": ...}}; else "none", "auto", "required".
ToolChoice = Union[str, dict[str, Any]]


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: OpenAI's {id, type: "function", function: {name, arguments}}."""

    id: str
    name: str
    arguments: str

    def as_openai(self, index: Optional[int] = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def function_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call block's body: {"name": <the name>, "arguments": <its parameters>}."""
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
    }


def tools_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """How to call the offered functions, for a chat template that has no place for tools."""
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You can call functions. To call one, answer with a block like this and nothing else:\n"
        f'{OPEN}{{"name": "<function name>", "arguments": {{<its arguments>}}}}{CLOSE}'
        "Write one block per call. The functions:\n" + listed
    )


def render_messages(
    messages: list[dict[str, Any]], tools: Optional[Sequence[dict[str, Any]]], template_takes_tools: bool
) -> list[dict[str, Any]]:
    """Messages as the chat template should see them: earlier calls as blocks, and the tools in a
    system message when the template has no place of its own for them."""
    rendered = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            blocks = "".join(
                OPEN + json.dumps({"name": c["function"]["name"], "arguments": _loads_or_text(c["function"]["arguments"])},
                                  ensure_ascii=False) + CLOSE
                for c in calls
            )
            m = {**{k: v for k, v in m.items() if k != "tool_calls"}, "content": (m.get("content") or "") + blocks}
        rendered.append(m)
    if tools and not template_takes_tools:
        prompt = tools_system_prompt(tools)
        if rendered and rendered[0]["role"] in ("system", "developer"):
            rendered[0] = {**rendered[0], "content": rendered[0]["content"] + "\n\n" + prompt}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    return rendered


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (json.JSONDecodeError, TypeError):
        return arguments


def chosen_functions(tools: Sequence[dict[str, Any]], tool_choice: ToolChoice) -> list[dict[str, Any]]:
    """The functions a call may name under `tool_choice` (ValueError for a name not offered)."""
    functions = [t["function"] for t in tools]
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        named = [f for f in functions if f["name"] == name]
        if not named:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return named
    return functions


def tool_grammar(tools: Sequence[dict[str, Any]], tool_choice: ToolChoice, parallel: bool) -> Optional[StructuredOutputsParams]:
    """The constraint `tool_choice` puts on the answer; None for "none"."""
    if tool_choice == "none" or not tools:
        return None
    schemas = [closed_schema({**function_schema(f), "x-guidance": JSON_OPTIONS}) for f in chosen_functions(tools, tool_choice)]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas, "x-guidance": JSON_OPTIONS}
    call = f"call: {json.dumps(OPEN)} %json {json.dumps(body)} {json.dumps(CLOSE)}"
    calls = "call+" if parallel else "call"
    if tool_choice == "auto":
        # Text, as long as it does not start like a call; or calls.
        start = f"start: TEXT | {calls}\nTEXT: /(.|\\n)+/ & ~/{re.escape(OPEN.strip())}(.|\\n)*/"
    else:
        start = f"start: {calls}"
    return StructuredOutputsParams(grammar=f"{start}\n{call}\n")


def parse_tool_calls(text: str) -> tuple[Optional[str], list[ToolCall]]:
    """(content, calls) of a finished answer: whole, well-formed blocks become calls; the rest,
    stripped, is the content (None when nothing is left). A block that does not parse stays text."""
    calls: list[ToolCall] = []
    content: list[str] = []
    rest = text
    while True:
        start = rest.find(OPEN.strip())
        if start < 0:
            content.append(rest)
            break
        end = rest.find(CLOSE.strip(), start)
        if end < 0:
            content.append(rest)
            break
        call = _parse_block(rest[start + len(OPEN.strip()) : end])
        if call is None:
            content.append(rest[: end + len(CLOSE.strip())])
        else:
            content.append(rest[:start])
            calls.append(call)
        rest = rest[end + len(CLOSE.strip()) :]
    joined = "".join(content).strip()
    return (joined or None), calls


def _parse_block(body: str) -> Optional[ToolCall]:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or "arguments" not in data:
        return None
    return ToolCall(new_call_id(), data["name"], json.dumps(data["arguments"], ensure_ascii=False))


class ToolCallStream:
    """Splits one choice's streamed text into text pieces and whole calls.

    Text that could be the start of a call block is held back until it is known
    not to be; a block is held until it closes, then comes out as one call.
    """

    def __init__(self) -> None:
        self._pending = ""
        self.num_calls = 0

    def feed(self, piece: str) -> list[Union[str, ToolCall]]:
        self._pending += piece
        if self.num_calls:
            self._pending = self._pending.lstrip("\n")  # the line break that ends a block
        out: list[Union[str, ToolCall]] = []
        opener, closer = OPEN.strip(), CLOSE.strip()
        while self._pending:
            start = self._pending.find(opener)
            if start < 0:
                keep = _partial_suffix(self._pending, opener)
                text = self._pending[: len(self._pending) - keep]
                if text:
                    out.append(text)
                self._pending = self._pending[len(text) :]
                break
            if start > 0:
                out.append(self._pending[:start])
                self._pending = self._pending[start:]
            end = self._pending.find(closer)
            if end < 0:
                break
            block = self._pending[: end + len(closer)]
            self._pending = self._pending[end + len(closer) :]
            call = _parse_block(block[len(opener) : end])
            if call is None:
                out.append(block)
            else:
                out.append(call)
                self.num_calls += 1
                self._pending = self._pending.lstrip("\n")
        return out

    def finish(self) -> list[Union[str, ToolCall]]:
        """Whatever is still held when the answer ends: it is text."""
        rest, self._pending = self._pending, ""
        return [rest] if rest else []


def _partial_suffix(text: str, word: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `word`."""
    for n in range(min(len(text), len(word) - 1), 0, -1):
        if text.endswith(word[:n]):
            return n
    return 0
