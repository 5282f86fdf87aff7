"""Tool calling's pure parts: the prompt, the grammars, parsing, and the streamed split (deployments/tool_calls.py)."""

from __future__ import annotations

import json

import pytest

from shardline.deployments.events import ChoiceDelta
from shardline.deployments.openai_format import ResponseBuilder
from shardline.deployments.tool_calls import (
    CLOSE,
    OPEN,
    ToolCall,
    ToolCallStream,
    parse_tool_calls,
    render_messages,
    tool_grammar,
)
from shardline.engine.sampling_params import StructuredOutputsParams
from shardline.engine.structured_output import GrammarCompiler
from shardline.engine.tokenizer import Tokenizer

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
NOTE = {"type": "function", "function": {"name": "note", "description": "Take a note."}}


def block(name: str, arguments: dict) -> str:
    return OPEN + json.dumps({"name": name, "arguments": arguments}) + CLOSE


def test_parse_takes_whole_blocks_and_leaves_the_rest_as_content():
    content, calls = parse_tool_calls(block("add", {"a": 1, "b": 2}) + block("note", {}))
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2}), ("note", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    content, calls = parse_tool_calls("Let me add.\n" + block("add", {"a": 1, "b": 2}))
    assert content == "Let me add." and len(calls) == 1
    broken = OPEN + '{"name": "add", "arguments": ' + CLOSE  # does not parse: stays text
    assert parse_tool_calls(broken) == (broken.strip(), [])
    assert parse_tool_calls("plain text") == ("plain text", [])
    assert parse_tool_calls(OPEN + '{"name": "add"') == ((OPEN + '{"name": "add"').strip(), [])  # cut short


@pytest.mark.parametrize("size", [1, 2, 5, 100])
def test_stream_splits_text_and_calls_at_any_chunk_size(size):
    text = "Sure <tool it is.\n" + block("add", {"a": 1, "b": 2}) + block("note", {"x": "y"}) + "done"
    stream, out = ToolCallStream(), []
    for i in range(0, len(text), size):
        out += stream.feed(text[i : i + size])
    out += stream.finish()
    pieces = "".join(p for p in out if isinstance(p, str))
    calls = [p for p in out if isinstance(p, ToolCall)]
    assert pieces == "Sure <tool it is.\ndone"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2}), ("note", {"x": "y"})]
    assert stream.num_calls == 2


def test_tools_go_into_a_system_message_when_the_template_has_no_place_for_them():
    messages = [{"role": "user", "content": "hi"}]
    rendered = render_messages(messages, [ADD], template_takes_tools=False)
    assert rendered[0]["role"] == "system" and '"name": "add"' in rendered[0]["content"] and OPEN.strip() in rendered[0]["content"]
    with_system = render_messages([{"role": "system", "content": "Be brief."}, *messages], [ADD], False)
    assert with_system[0]["content"].startswith("Be brief.") and len(with_system) == 2
    assert render_messages(messages, [ADD], template_takes_tools=True) == messages
    earlier = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]}]
    (assistant,) = render_messages(earlier, None, False)
    assert "tool_calls" not in assistant and assistant["content"] == block("add", {"a": 1, "b": 2})


@pytest.fixture(scope="module")
def compiler(model_dir):
    tok = Tokenizer(model_dir)
    return GrammarCompiler(tok.to_json(), 512, [tok.eos_token_id])


def _accepts(compiler: GrammarCompiler, spec: StructuredOutputsParams, text: str, tok: Tokenizer) -> bool:
    matcher = compiler.compile(spec).deep_copy()
    return matcher.consume_tokens(tok.encode(text, add_special_tokens=False)) and matcher.is_accepting()


def test_each_tool_choice_compiles_and_allows_what_it_should(compiler, model_dir):
    tok = Tokenizer(model_dir)
    assert tool_grammar([ADD], "none", True) is None
    required = tool_grammar([ADD, NOTE], "required", parallel=True)
    one = tool_grammar([ADD, NOTE], "required", parallel=False)
    named = tool_grammar([ADD, NOTE], {"type": "function", "function": {"name": "note"}}, parallel=False)
    auto = tool_grammar([ADD, NOTE], "auto", parallel=True)
    two = block("add", {"a": 1, "b": 2}) + block("note", {})
    assert _accepts(compiler, required, two, tok) and not _accepts(compiler, one, two, tok)
    assert not _accepts(compiler, required, block("add", {"a": "x", "b": 2}), tok)  # arguments fit the schema
    assert not _accepts(compiler, required, block("sub", {"a": 1, "b": 2}), tok)  # only offered functions
    assert _accepts(compiler, named, block("note", {}), tok) and not _accepts(compiler, named, block("add", {"a": 1, "b": 2}), tok)
    assert _accepts(compiler, auto, "Just text.", tok) and _accepts(compiler, auto, two, tok)
    assert not _accepts(compiler, auto, OPEN + "not json" + CLOSE, tok)  # starts like a call: must be one
    with pytest.raises(ValueError, match="not among the tools"):
        tool_grammar([ADD], {"type": "function", "function": {"name": "missing"}}, True)


def test_response_builder_streams_calls_as_tool_call_deltas_and_finishes_with_tool_calls():
    builder = ResponseBuilder("chat", "id", 0, "m", 1, None, tool_calls=True)
    builder.admitted(0, 5)
    text = block("add", {"a": 1, "b": 2})
    chunks = []
    for i, piece in enumerate([text[:7], text[7:30], text[30:]]):
        delta = ChoiceDelta(0, piece, [i], None, "stop" if i == 2 else None)
        idx = builder.add(0, delta, 0)
        chunk = builder.delta_chunk(idx, delta, False)
        if chunk is not None:
            chunks.append(chunk["choices"][0])
    assert len(chunks) == 1  # held back until the block closed, then one delta with the whole call
    (call,) = chunks[0]["delta"]["tool_calls"]
    assert call["index"] == 0 and call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert chunks[0]["finish_reason"] == "tool_calls"
    final = builder.final_body()["choices"][0]
    assert final["finish_reason"] == "tool_calls" and final["message"]["content"] is None
    assert final["message"]["tool_calls"][0]["function"]["name"] == "add"
