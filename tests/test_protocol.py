"""Request bodies (deployments/protocol.py) and their errors (deployments/errors.py): no Ray, no model."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shardline.deployments.errors import APIError, from_validation_errors
from shardline.deployments.protocol import SEED_MAX, ChatCompletionRequest, CompletionRequest


def completion(**fields):
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def chat(**fields):
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def error_of(model, body) -> APIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(body if isinstance(body, str) else json.dumps(body))
    return from_validation_errors(info.value.errors())


def test_defaults_follow_openai():
    c = completion()
    p = c.to_sampling_params()
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.logprobs) == (16, 1.0, 1.0, 1, None)
    q = chat().to_sampling_params()
    assert q.max_tokens is None  # chat: up to the context
    assert not c.stream and not c.include_usage


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("text", ["text"]),
        ([1, 2, 3], [[1, 2, 3]]),
        (["a", "b"], ["a", "b"]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_prompt_forms(prompt, expected):
    assert completion(prompt=prompt).prompts() == expected


def test_sampling_fields_map_to_engine_params():
    p = completion(
        temperature=0, top_p=0.5, seed=7, stop="x", presence_penalty=0.5, frequency_penalty=-0.5,
        logit_bias={"5": 10.0}, top_k=3, min_p=0.1, repetition_penalty=1.2, min_tokens=2, ignore_eos=True,
        stop_token_ids=[4], n=2, logprobs=3, max_tokens=9,
    ).to_sampling_params()
    assert p.temperature == 0.0 and p.top_p == 0.5 and p.seed == 7 and p.stop == ["x"]
    assert p.logit_bias == {5: 10.0} and p.top_k == 3 and p.min_p == 0.1 and p.repetition_penalty == 1.2
    assert p.min_tokens == 2 and p.ignore_eos and p.stop_token_ids == [4] and p.n == 2 and p.logprobs == 3
    assert p.max_tokens == 9 and p.presence_penalty == 0.5 and p.frequency_penalty == -0.5


def test_chat_max_completion_tokens_wins_and_logprobs_map():
    p = chat(max_tokens=5, max_completion_tokens=7, logprobs=True, top_logprobs=4).to_sampling_params()
    assert p.max_tokens == 7 and p.logprobs == 4
    assert chat(max_tokens=5).to_sampling_params().max_tokens == 5
    assert chat(logprobs=True).to_sampling_params().logprobs == 0  # the chosen token only
    assert chat().to_sampling_params().logprobs is None


def test_chat_content_parts_join_into_text():
    c = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert c.messages[0].as_template_input() == {"role": "user", "content": "a\nb"}


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": "0.5"}, "temperature"),  # lax mode would coerce this
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 5.0}, "max_tokens"),
        ({"stream": 1}, "stream"),
        ({"n": True}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"3": 101}}, "logit_bias"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop": [""]}, "stop"),
        ({"seed": SEED_MAX + 1}, "seed"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),  # unknown fields are refused, not dropped
    ],
)
def test_bad_completion_fields_are_400_naming_the_field(fields, param):
    err = error_of(CompletionRequest, {"model": "m", "prompt": "hi", **fields})
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.param == param, err.message


def test_missing_model_and_wrong_body_shapes():
    assert error_of(CompletionRequest, {"prompt": "x"}).param == "model"
    for body in ('"a string"', "[1, 2]", "3", "null"):
        err = error_of(CompletionRequest, body)
        assert err.status == 400 and "JSON object" in err.message and err.param is None
    err = error_of(CompletionRequest, "{not json")
    assert err.status == 400 and "not valid JSON" in err.message


def test_nan_and_infinity_are_refused():
    assert error_of(CompletionRequest, '{"model": "m", "prompt": "x", "temperature": NaN}').param == "temperature"
    assert error_of(CompletionRequest, '{"model": "m", "prompt": "x", "top_p": Infinity}').param == "top_p"


def test_chat_rules():
    assert error_of(ChatCompletionRequest, {"model": "m", "messages": []}).param == "messages"
    bad_role = {"model": "m", "messages": [{"role": "wizard", "content": "x"}]}
    assert error_of(ChatCompletionRequest, bad_role).param == "messages"
    needs_logprobs = {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    assert "requires logprobs" in error_of(ChatCompletionRequest, needs_logprobs).message
    options_without_stream = {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}
    assert "only allowed when stream" in error_of(CompletionRequest, options_without_stream).message


def test_error_body_shape():
    err = APIError(429, "busy", headers={"Retry-After": "1"})
    assert err.body() == {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}
    response = err.response()
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    event = APIError(500, "boom").sse_event()
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[6:])["error"]["type"] == "server_error"


def test_json_schema_states_the_constraints():
    schema = CompletionRequest.model_json_schema()
    props = schema["properties"]
    assert props["temperature"]["maximum"] == 2.0 and props["top_p"]["exclusiveMinimum"] == 0.0
    assert schema["additionalProperties"] is False
