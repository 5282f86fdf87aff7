"""Structured outputs in the engine: the spec, the grammar compiler, the bitmask, and generations that fit.

A random-weight model says nothing sensible, which makes it a good witness: whatever
it would pick, every output must still fit its constraint. The 52-schema suite runs
on SmolLM2 (slow), at temperature 1, as the issue asks.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from shardline.engine import LLM, SamplingParams, StructuredOutputsParams
from shardline.engine.sampler import Sampler, SamplingRow
from shardline import kernels
from shardline.engine.structured_output import BitmaskFiller, GrammarCompiler
from shardline.engine.tokenizer import Tokenizer
from tests.structured_schemas import SCHEMA_INSTANCES, SCHEMAS

I = {"type": "integer"}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def test_spec_takes_exactly_one_constraint():
    assert StructuredOutputsParams(regex="a+").kind == "regex"
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="got json, regex"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    # key order of a schema does not make a different spec
    a = StructuredOutputsParams(json={"type": "object", "required": []})
    b = StructuredOutputsParams(json='{"required": [], "type": "object"}')
    assert a.cache_key() == b.cache_key()


def test_closed_schema_closes_objects_and_bounds_address_formats():
    from shardline.engine.structured_output import closed_schema

    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": I}}, "e": {"type": "string", "format": "email"}},
        "allOf": [{"properties": {"x": I}}, {"properties": {"y": I}}],
    }
    closed = closed_schema(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["e"]["maxLength"] == 254
    assert all("additionalProperties" not in part for part in closed["allOf"])  # closed, no instance would fit both
    assert closed_schema({"type": "object", "additionalProperties": True}) == {"type": "object", "additionalProperties": True}
    assert schema["properties"]["a"] == {"type": "object", "properties": {"b": I}}  # the caller's schema is untouched


@pytest.fixture(scope="module")
def compiler(model_dir):
    tok = Tokenizer(model_dir)
    return GrammarCompiler(tok.to_json(), 512, [tok.eos_token_id])


def test_compiler_caches_each_spec_once_and_names_what_is_wrong(compiler):
    spec = StructuredOutputsParams(json=PERSON)
    before = compiler.stats()
    first = compiler.compile(spec)
    assert compiler.compile(StructuredOutputsParams(json=json.dumps(PERSON))) is first
    after = compiler.stats()
    assert after["hits"] == before["hits"] + 1 and after["misses"] <= before["misses"] + 1
    with pytest.raises(ValueError, match="invalid regex"):
        compiler.compile(StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match="not valid JSON"):
        compiler.compile(StructuredOutputsParams(json="{nope"))
    with pytest.raises(ValueError, match="unsupported json"):
        compiler.compile(StructuredOutputsParams(json={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}))
    with pytest.raises(ValueError, match="unsupported grammar"):
        compiler.compile(StructuredOutputsParams(grammar="start: undefined_rule"))
    with pytest.raises(ValueError, match="Unknown format: no-such-format"):
        compiler.compile(StructuredOutputsParams(json={"type": "string", "format": "no-such-format"}))
    with pytest.raises(ValueError, match="no output can satisfy it"):  # a $ref cycle with nothing else
        compiler.compile(StructuredOutputsParams(json={"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}))


def test_cache_keeps_the_most_recent_specs(model_dir):
    tok = Tokenizer(model_dir)
    small = GrammarCompiler(tok.to_json(), 512, [tok.eos_token_id], cache_size=2)
    for r in ("a+", "b+", "c+"):
        small.compile(StructuredOutputsParams(regex=r))
    assert small.stats()["cached"] == 2
    small.compile(StructuredOutputsParams(regex="c+"))
    assert small.stats()["hits"] == 1


def test_bitmask_allows_exactly_the_grammar_tokens(compiler, model_dir):
    tok = Tokenizer(model_dir)
    state = compiler.new_state(StructuredOutputsParams(choice=["yes", "no"]))
    mask = BitmaskFiller(512).fill([state])
    allowed = {t for t in range(512) if (int(mask[0, t // 32]) >> (t % 32)) & 1}
    assert allowed, "something must be allowed"
    for t in allowed:  # every allowed token starts "yes" or "no"
        text = tok.decode([t], skip_special_tokens=False)
        assert "yes".startswith(text) or "no".startswith(text), text
    logits = torch.randn(1, 512)
    kernels.apply_token_bitmask(logits, mask, torch.tensor([0]))
    assert {t for t in range(512) if logits[0, t] > float("-inf")} == allowed


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("vocab", [100, 128, 140])  # past the mask's last word (140 > 4 * 32): blocked
def test_apply_token_bitmask_matches_a_plain_loop(impl, vocab):
    if impl == "native" and not kernels.dispatch.native_available():
        pytest.skip("no native kernels here")
    torch.manual_seed(vocab)
    bits = torch.randint(-(2**31), 2**31 - 1, (3, 4), dtype=torch.int32)
    bits[1, 0], bits[1, 1] = -1, 0  # a word that allows everything, one that allows nothing
    logits = torch.randn(5, vocab)
    rows = torch.tensor([4, 0, 2])  # mask row k masks logits row rows[k]; rows 1 and 3 stay as they are
    expected = logits.clone()
    for k, r in enumerate(rows.tolist()):
        for t in range(vocab):
            if t >= 128 or not (int(bits[k, t // 32]) >> (t % 32)) & 1:
                expected[r, t] = float("-inf")
    kernels.apply_token_bitmask(logits, bits, rows, impl=impl)
    assert torch.equal(logits, expected)


def test_sampler_masks_only_the_constrained_rows(compiler):
    state = compiler.new_state(StructuredOutputsParams(regex="[0-9]+"))
    mask = BitmaskFiller(512).fill([state])
    free, bound = SamplingParams(temperature=0), SamplingParams(temperature=0)
    logits = torch.zeros(2, 512)
    logits[:, 5] = 10.0  # the free row's argmax; token 5 is not a digit
    rows = [SamplingRow(free, [1], []), SamplingRow(bound, [1], [], grammar=state, mask_row=0)]
    out = Sampler(0)(logits, rows, mask)
    assert out.token_ids[0] == 5
    assert (int(mask[0, out.token_ids[1] // 32]) >> (out.token_ids[1] % 32)) & 1


@pytest.fixture(scope="module")
def tiny_llm(model_dir):
    with LLM(str(model_dir), num_kv_blocks=128, block_size=4) as llm:
        yield llm


def _generate(llm, spec, n=1, temperature=1.0, max_tokens=64, seeds=range(6), **kw):
    params = [SamplingParams(temperature=temperature, seed=s, n=n, max_tokens=max_tokens, structured_outputs=spec, **kw)
              for s in seeds]
    outs = llm.generate(["The answer is"] * len(params), params, use_tqdm=False)
    return [c for o in outs for c in o.outputs]


def test_random_model_outputs_fit_a_regex_a_choice_and_a_grammar(tiny_llm):
    for c in _generate(tiny_llm, StructuredOutputsParams(regex="[a-z]{2,5}-[0-9]{1,3}")):
        assert c.finish_reason == "stop" and re.fullmatch("[a-z]{2,5}-[0-9]{1,3}", c.text), c.text
    for c in _generate(tiny_llm, StructuredOutputsParams(choice=["Paris", "Berlin", "Rome"]), n=3):
        assert c.finish_reason == "stop" and c.text in ("Paris", "Berlin", "Rome"), c.text
    lark = 'start: "(" num (" + " num)* ")"\nnum: /[1-9][0-9]?/'
    for c in _generate(tiny_llm, StructuredOutputsParams(grammar=lark), max_tokens=48):
        if c.finish_reason == "stop":
            assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", c.text), c.text
    gbnf = 'root ::= "yes" | "no" | "maybe"'
    for c in _generate(tiny_llm, StructuredOutputsParams(grammar=gbnf)):
        assert c.finish_reason == "stop" and c.text in ("yes", "no", "maybe"), c.text


def test_random_model_json_fits_its_schema_with_logprobs_and_ignore_eos(tiny_llm):
    outs = _generate(tiny_llm, StructuredOutputsParams(json=PERSON), max_tokens=96, logprobs=2, ignore_eos=True)
    finished = [c for c in outs if c.finish_reason == "stop"]
    assert finished, [c.text for c in outs]
    for c in finished:
        jsonschema.validate(json.loads(c.text), PERSON)
        assert len(c.logprobs) == len(c.token_ids)
    for c in outs:  # cut by max_tokens: never a complete document
        if c.finish_reason == "length":
            with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
                jsonschema.validate(json.loads(c.text), PERSON)


def test_a_bad_spec_is_refused_before_anything_runs(tiny_llm):
    good = SamplingParams(max_tokens=4)
    bad = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex="(("))
    with pytest.raises(ValueError, match="invalid regex"):
        tiny_llm.generate(["a", "b"], [good, bad], use_tqdm=False)
    assert not tiny_llm.engine.has_unfinished_requests()


@pytest.mark.slow
def test_every_schema_of_the_suite_validates_on_smollm2_at_temperature_1():
    """52 schemas (nested objects, bounded arrays, enums, anyOf, patterns, ranges, $defs), one request each,
    SmolLM2 asked for a document: every output parses and validates."""
    assert len(SCHEMAS) >= 50
    for schema, instance in SCHEMA_INSTANCES:
        jsonschema.validate(instance, schema, format_checker=jsonschema.FormatChecker())
    with LLM("smollm2-135m", dtype="bfloat16", max_num_seqs=64) as llm:
        conversations = [[{"role": "user", "content": f"Write a JSON document for this JSON schema: {json.dumps(s)}"}]
                         for s in SCHEMAS]
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=384, structured_outputs=StructuredOutputsParams(json=s))
                  for i, s in enumerate(SCHEMAS)]
        outs = llm.chat(conversations, params, use_tqdm=False)
    for schema, out in zip(SCHEMAS, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (schema, c.text[-200:])
        jsonschema.validate(json.loads(c.text), schema, format_checker=jsonschema.FormatChecker())
