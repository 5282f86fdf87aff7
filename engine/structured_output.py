"""Constrained decoding: outputs that fit a JSON schema, a regex, a list of choices or a grammar.

The grammar engine is llguidance (Microsoft's, in Rust; the engine behind
vLLM's `guidance` backend and llama.cpp's `%llguidance`), chosen over xgrammar
on measurements here (benchmarks/grammar_backends.py, SmolLM2's 49152 tokens,
52 schemas): xgrammar fills a token mask faster (3.0 against 20.7 us median,
6.8 against 33.5 mean), llguidance compiles a schema 6x faster (0.7 against
4.0 ms median, 1.0 against 21 ms p99; a new schema's compile is on its
request's time to first token), takes every schema of the suite where xgrammar
warns that allOf is partly supported, and builds its vocabulary from
tokenizer.json alone where xgrammar imports transformers and triton (2.8 s in
every replica). Either mask is a fraction of a percent of a decode step, and
it is filled beside the forward pass.

`GrammarCompiler` turns a request's `StructuredOutputsParams` into a grammar
and a template matcher, once per distinct spec (LRU cache); each sequence gets
a copy (`GrammarState`). Every step the sequences that need one fill a row of a
shared bitmask (`BitmaskFiller`, in parallel on llguidance's own threads and
outside the GIL, while the forward pass runs), the sampler applies it before
any other filter (`kernels.apply_token_bitmask`), and the chosen token advances the state. When
the grammar is complete the mask allows the end-of-sequence token; when
nothing else can follow, only that.

JSON is generated with fixed separators (", " and ": ", as `json.dumps`
writes it): with free whitespace a small model can spend its whole budget on
newlines inside a valid document. For the same reason objects are closed to
keys their schema does not name unless it says otherwise (`closed_schema`).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any, Sequence

import llguidance as llg
import numpy as np
import torch
from llguidance.gbnf_to_lark import any_to_lark
from llguidance.numpy import fill_next_token_bitmask_par

from shardline.engine.sampling_params import StructuredOutputsParams

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _lark_literal(text: str) -> str:
    """`text` as a quoted Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


# Formats whose values have a length limit of their own (RFC 5321 for an address, RFC 1035 for a name).
FORMAT_MAX_LENGTH = {"email": 254, "idn-email": 254, "hostname": 253, "idn-hostname": 253}


def closed_schema(schema: Any, *, inside_all_of: bool = False) -> Any:
    """`schema` as generation reads it, with two limits a valid value has anyway made explicit.

    Every object that does not say otherwise is closed to properties it does not name
    (`additionalProperties: false`), as OpenAI's strict mode requires and vLLM's default backend
    assumes; left open, a small model at temperature 1 tends to add keys until max_tokens. (The
    parts of an allOf stay open: each closed, no instance could satisfy them all.) A string of a
    format with a length limit (`FORMAT_MAX_LENGTH`) gets it as maxLength when it has none.
    """
    if isinstance(schema, list):
        return [closed_schema(s, inside_all_of=inside_all_of) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_schema(v, inside_all_of=(k == "allOf")) for k, v in schema.items()}
    is_object = schema.get("type") == "object" or "properties" in schema
    if is_object and not inside_all_of and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    limit = FORMAT_MAX_LENGTH.get(schema.get("format"))
    if limit is not None and "maxLength" not in schema:
        out["maxLength"] = limit
    return out


def grammar_of(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) for one spec; ValueError for a spec that is not even well-formed."""
    if spec.json is not None:
        schema = spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("a JSON schema must be an object or a boolean")
        return llg.LLMatcher.grammar_from_json_schema(closed_schema(schema), defaults=JSON_OPTIONS)
    if spec.json_object:
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.regex is not None:
        try:
            re.compile(spec.regex)
        except re.error as e:
            raise ValueError(f"invalid regex: {e}") from None
        return llg.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(_lark_literal(c) for c in spec.choice))
    assert spec.grammar is not None
    try:
        lark = any_to_lark(spec.grammar)  # GBNF (llama.cpp's `root ::= ...`) becomes Lark
    except Exception as e:  # the converter's own parse errors
        raise ValueError(f"invalid grammar: {e}") from None
    return llg.LLMatcher.grammar_from_lark(lark)


class GrammarState:
    """One sequence's position in its grammar."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: llg.LLMatcher):
        self.matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token. A token the mask did not allow (it cannot happen unless every
        token was masked) leaves the matcher in its error state, whose mask allows only the
        end-of-sequence token: the output ends there, and nothing else in the batch is touched."""
        return self.matcher.consume_token(token_id)

    @property
    def error(self) -> str:
        """Why the matcher stopped accepting tokens ("" when it has not)."""
        return self.matcher.get_error()

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens (rejected speculative ones)."""
        self.matcher.rollback(num_tokens)

    @property
    def finished(self) -> bool:
        """Nothing but the end-of-sequence token can follow."""
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Compiles specs into matchers for one model's tokenizer; compiled grammars are cached per spec.

    Args:
        tokenizer_json: the model's tokenizer.json, as text.
        vocab_size: rows of the model's logits (may exceed the tokenizer's vocabulary).
        eos_token_ids: tokens that end a sequence; the mask allows them where the grammar may end.
        cache_size: compiled specs kept (least recently used go first).
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 256):
        eos = sorted(eos_token_ids)
        self.tokenizer = llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos or None)
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, llg.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def compile(self, spec: StructuredOutputsParams) -> llg.LLMatcher:
        """The template matcher for `spec`; ValueError naming what is wrong with an invalid one."""
        key = spec.cache_key()
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return template
        grammar = grammar_of(spec)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(f"unsupported {spec.kind}: {messages[0]}")
        template = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise ValueError(f"unsupported {spec.kind}: {template.get_error()}")
        # Some grammars compile yet cannot start an output (a schema that only refers to itself):
        # their first mask puts the matcher in its error state. Refuse them here, not mid-request.
        probe = template.deep_copy()
        probe.compute_bitmask()
        if probe.is_error():
            raise ValueError(f"unsupported {spec.kind}: no output can satisfy it ({probe.get_error().splitlines()[0]})")
        with self._lock:
            self.misses += 1
            self._cache[key] = template
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return template

    def new_state(self, spec: StructuredOutputsParams) -> GrammarState:
        return GrammarState(self.compile(spec).deep_copy())

    def stats(self) -> dict[str, int]:
        return {"cached": len(self._cache), "hits": self.hits, "misses": self.misses}


class BitmaskFiller:
    """Fills the step's token bitmask, one row per constrained sequence, on llguidance's threads."""

    def __init__(self, vocab_size: int):
        self.width = (vocab_size + 31) // 32
        self._executor = llg.LLExecutor()
        self._buffer = np.empty((0, self.width), dtype=np.int32)

    def fill(self, states: Sequence[GrammarState]) -> torch.Tensor:
        """[len(states), width] int32 bitmask: bit t of a row set where token t is allowed."""
        if self._buffer.shape[0] < len(states):
            self._buffer = np.empty((max(len(states), 2 * self._buffer.shape[0]), self.width), dtype=np.int32)
        rows = self._buffer[: len(states)]
        fill_next_token_bitmask_par(self._executor, [(s.matcher, i) for i, s in enumerate(states)], rows)
        return torch.from_numpy(rows)

