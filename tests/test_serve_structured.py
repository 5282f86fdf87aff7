"""Structured outputs and tool calls over HTTP, through the real `openai` client, on a local Ray cluster.

    /       the tiny random model: whatever it would say, its answers must fit
    /smol   SmolLM2-135M-Instruct: `chat.completions.parse` and tool calls with a real model
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from shardline.deployments.config import SERVE_ENV, ServeConfig
from shardline.engine.pull import pull_model
from tests.models import make_model
from tests.serve_cluster import local_serve

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"]},
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
    },
}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    from ray import serve
    from ray.serve.api import RunTarget

    from shardline.deployments.app import build_app

    pull_model("smollm2-135m", progress=False)
    tiny = make_model(tmp_path_factory.mktemp("structured-tiny"))
    with local_serve(num_cpus=6, env=SERVE_ENV) as port:
        configs = {
            "tiny": ServeConfig(model=str(tiny), served_model_name="tiny", max_model_len=1024, num_kv_blocks=256, max_num_seqs=32),
            "smol": ServeConfig(model="smollm2-135m", max_model_len=2048, num_kv_blocks=256, dtype="bfloat16"),
        }
        prefixes = {"tiny": "/", "smol": "/smol"}
        serve.run_many([RunTarget(build_app(c), name=n, route_prefix=prefixes[n]) for n, c in configs.items()])
        yield {"tiny": f"http://127.0.0.1:{port}", "smol": f"http://127.0.0.1:{port}/smol"}


def client(urls, app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{urls[app]}/v1", api_key="unused", max_retries=0, timeout=180)


def test_response_format_json_schema_fits_on_a_random_model(urls):
    out = client(urls, "tiny").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=1.0, seed=3, n=6, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    finished = [c for c in out.choices if c.finish_reason == "stop"]
    assert finished, [c.message.content for c in out.choices]
    for c in finished:
        jsonschema.validate(json.loads(c.message.content), PERSON)
    for c in out.choices:
        if c.finish_reason == "length":  # cut short: never passed off as a whole document
            with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
                jsonschema.validate(json.loads(c.message.content), PERSON)


def test_json_object_and_the_structured_outputs_extension(urls):
    c = client(urls, "tiny")
    obj = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], seed=1, max_tokens=60,
                                    response_format={"type": "json_object"}, n=4)
    for choice in obj.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
    pattern = r"[A-Z][a-z]{1,6} [0-9]{2}"
    regex = c.completions.create(model="tiny", prompt="x", n=5, seed=2, max_tokens=20,
                                 extra_body={"structured_outputs": {"regex": pattern}})
    assert all(ch.finish_reason == "stop" and re.fullmatch(pattern, ch.text) for ch in regex.choices), regex.choices
    choices = ["red", "green", "blue"]
    streamed = c.completions.create(model="tiny", prompt="x", seed=4, max_tokens=8, stream=True,
                                    extra_body={"structured_outputs": {"choice": choices}})
    text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
    whole = c.completions.create(model="tiny", prompt="x", seed=4, max_tokens=8, extra_body={"structured_outputs": {"choice": choices}})
    assert text == whole.choices[0].text and text in choices
    grammar = 'root ::= "(" [1-9] " + " [1-9] ")"'
    g = c.completions.create(model="tiny", prompt="x", seed=5, max_tokens=12, extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"\([1-9] \+ [1-9]\)", g.choices[0].text)


def test_bad_constraints_are_400s_naming_the_field(urls):
    base = urls["tiny"]
    cases = [
        ({"structured_outputs": {"regex": "(("}}, "structured_outputs", "invalid regex"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nope"}}}},
         "response_format", "unsupported json"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, None, "not both"),
        ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among"),
        ({"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "cannot be combined"),
    ]
    for extra, param, message in cases:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        error = r.json()["error"]
        assert message in error["message"] and error["param"] == param, (extra, error)
    # the server still answers normally afterwards
    ok = client(urls, "tiny").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")


class City(pydantic.BaseModel):
    name: str
    country: str
    population: int


def test_parse_with_a_pydantic_model_on_smollm2(urls):
    done = client(urls, "smol").chat.completions.parse(
        model="smollm2-135m", messages=[{"role": "user", "content": "Describe Paris as JSON: name, country, population."}],
        response_format=City, temperature=0, max_tokens=120,
    )
    city = done.choices[0].message.parsed
    assert isinstance(city, City) and city.name and city.country


def _check_calls(calls, names=("get_weather", "add")):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_tool_calls_parse_stream_and_round_trip(urls):
    c = client(urls, "smol")
    messages = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    # One call at a time: greedy, a 135M model repeats a call for as long as more are allowed.
    out = c.chat.completions.create(model="smollm2-135m", messages=messages, tools=[WEATHER, ADD], tool_choice="required",
                                    parallel_tool_calls=False, temperature=0, max_tokens=120)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls)

    named = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Add 2 and 3."}],
                                      tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}},
                                      parallel_tool_calls=False, temperature=0, max_tokens=80)
    assert [call.function.name for call in named.choices[0].message.tool_calls] == ["add"]
    _check_calls(named.choices[0].message.tool_calls, ("add",))

    # streamed: the deltas add up to the same calls
    stream = c.chat.completions.create(model="smollm2-135m", messages=messages, tools=[WEATHER, ADD], tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=120, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(calls.items())] == [
        (t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls
    ]

    # the call and its result go back; the model answers in text
    first = choice.message.tool_calls[0]
    follow = messages + [
        {"role": "assistant", "content": None, "tool_calls": [first.model_dump()]},
        {"role": "tool", "tool_call_id": first.id, "content": json.dumps({"temperature_c": 21, "sky": "clear"})},
    ]
    answer = c.chat.completions.create(model="smollm2-135m", messages=follow, tools=[WEATHER, ADD], tool_choice="none",
                                       temperature=0, max_tokens=60)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_auto_tool_choice_gives_text_or_well_formed_calls(urls):
    out = client(urls, "tiny").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, ADD], temperature=1.0, seed=7, n=8,
        max_tokens=60,
    )
    for choice in out.choices:
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            if choice.finish_reason == "tool_calls":
                _check_calls(choice.message.tool_calls)
        else:
            assert not (choice.message.content or "").startswith("<tool_call>")


def test_parallel_calls_on_a_random_model_all_parse(urls):
    """Several calls in one answer (parallel_tool_calls): each a well-formed call to an offered function."""
    out = client(urls, "tiny").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER, ADD], tool_choice="required",
        temperature=1.0, seed=11, n=6, max_tokens=160,
    )
    for choice in out.choices:
        if choice.finish_reason == "tool_calls":
            _check_calls(choice.message.tool_calls)
            assert choice.message.content is None
    assert any(choice.finish_reason == "tool_calls" for choice in out.choices)
