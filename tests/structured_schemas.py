"""JSON schemas for structured-output tests and benchmarks, each with one valid instance.

Nested objects, arrays with bounds, enums, anyOf/oneOf, string patterns and
formats, numbers with ranges, required and optional fields, $defs references.
The instance proves the schema is satisfiable (tests check it with jsonschema)
and gives the grammar benchmark a realistic token walk.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> Schema:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required, **extra}


S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}

SCHEMA_INSTANCES: list[tuple[Schema, Any]] = [
    # flat objects
    (_obj({"name": S, "age": I}), {"name": "Ada", "age": 36}),
    (_obj({"city": S, "population": I, "capital": B}), {"city": "Paris", "population": 2100000, "capital": True}),
    (_obj({"title": S, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}}), {"title": "Dune", "year": 1965}),
    (_obj({"x": N, "y": N}), {"x": 1.5, "y": -2.25}),
    (_obj({"ok": B}), {"ok": False}),
    (_obj({"name": S, "nickname": S}, required=["name"]), {"name": "Grace"}),
    (_obj({"id": I, "note": S, "tags": {"type": "array", "items": S}}, required=["id"]), {"id": 7, "tags": ["a"]}),
    (_obj({"a": S, "b": S, "c": S}, additionalProperties=False), {"a": "1", "b": "2", "c": "3"}),
    (_obj({"score": {"type": "number", "minimum": 0, "maximum": 1}}), {"score": 0.75}),
    (_obj({"count": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}}), {"count": 42}),
    # enums and constants
    (_obj({"color": {"enum": ["red", "green", "blue"]}}), {"color": "green"}),
    (_obj({"level": {"enum": [1, 2, 3]}, "unit": {"const": "kg"}}), {"level": 2, "unit": "kg"}),
    (_obj({"sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]}, "confidence": N}),
     {"sentiment": "neutral", "confidence": 0.5}),
    (_obj({"answer": {"enum": ["yes", "no", None]}}), {"answer": None}),
    (_obj({"day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}, "open": B}), {"day": "sat", "open": False}),
    # strings with patterns, lengths and formats
    (_obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}), {"zip": "75001"}),
    (_obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}}), {"code": "ABC-123"}),
    (_obj({"word": {"type": "string", "minLength": 3, "maxLength": 8}}), {"word": "hello"}),
    (_obj({"email": {"type": "string", "format": "email"}}), {"email": "ada@example.com"}),
    (_obj({"when": {"type": "string", "format": "date"}}), {"when": "2026-12-08"}),
    (_obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}, "alpha": {"type": "number", "minimum": 0, "maximum": 1}}),
     {"hex": "#ff8800", "alpha": 1}),
    (_obj({"id": {"type": "string", "format": "uuid"}}), {"id": "123e4567-e89b-12d3-a456-426614174000"}),
    (_obj({"at": {"type": "string", "format": "date-time"}}), {"at": "2026-12-08T10:00:00Z"}),
    # arrays with bounds
    ({"type": "array", "items": I, "minItems": 1, "maxItems": 4}, [1, 2, 3]),
    ({"type": "array", "items": S, "minItems": 2, "maxItems": 2}, ["left", "right"]),
    (_obj({"steps": {"type": "array", "items": S, "minItems": 1, "maxItems": 5}}), {"steps": ["mix", "bake"]}),
    (_obj({"matrix": {"type": "array", "items": {"type": "array", "items": I, "maxItems": 3}, "maxItems": 3}}),
     {"matrix": [[1, 0], [0, 1]]}),
    (_obj({"pair": {"type": "array", "prefixItems": [S, I], "items": False}}), {"pair": ["a", 1]}),
    (_obj({"flags": {"type": "array", "items": B, "maxItems": 3}}), {"flags": [True, False]}),
    (_obj({"people": {"type": "array", "items": _obj({"name": S, "age": I}), "maxItems": 3}}),
     {"people": [{"name": "A", "age": 1}, {"name": "B", "age": 2}]}),
    # nested objects
    (_obj({"user": _obj({"name": S, "email": S})}), {"user": {"name": "Lin", "email": "lin@x.org"}}),
    (_obj({"address": _obj({"street": S, "city": S, "zip": S}), "phone": S}, required=["address"]),
     {"address": {"street": "1 Main St", "city": "Oslo", "zip": "0150"}}),
    (_obj({"a": _obj({"b": _obj({"c": _obj({"d": I})})})}), {"a": {"b": {"c": {"d": 4}}}}),
    (_obj({"order": _obj({"id": I, "items": {"type": "array", "items": _obj({"sku": S, "qty": {"type": "integer", "minimum": 1}}),
                                               "minItems": 1, "maxItems": 3}}), "paid": B}),
     {"order": {"id": 1, "items": [{"sku": "X1", "qty": 2}]}, "paid": True}),
    (_obj({"meta": _obj({"version": S, "debug": B}, required=["version"])}), {"meta": {"version": "1.2"}}),
    # anyOf / oneOf / allOf
    (_obj({"value": {"anyOf": [I, S]}}), {"value": "seven"}),
    (_obj({"value": {"anyOf": [N, {"type": "null"}]}}), {"value": None}),
    (_obj({"shape": {"oneOf": [_obj({"kind": {"const": "circle"}, "r": N}), _obj({"kind": {"const": "square"}, "side": N})]}}),
     {"shape": {"kind": "square", "side": 2}}),
    (_obj({"id": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": "^[a-z]+$"}]}}), {"id": 12}),
    (_obj({"item": {"allOf": [_obj({"name": S}), _obj({"price": N})]}}), {"item": {"name": "pen", "price": 1.5}}),
    ({"anyOf": [_obj({"error": S}), _obj({"result": I})]}, {"result": 3}),
    # $defs and references
    ({"$defs": {"point": _obj({"x": I, "y": I})}, **_obj({"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}})},
     {"from": {"x": 0, "y": 0}, "to": {"x": 3, "y": 4}}),
    ({"$defs": {"tag": {"type": "string", "maxLength": 10}}, **_obj({"tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3}})},
     {"tags": ["x", "y"]}),
    ({"$defs": {"node": _obj({"value": I, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
                              required=["value"])}, "$ref": "#/$defs/node"},
     {"value": 1, "children": [{"value": 2}]}),
    # typical application shapes
    (_obj({"name": S, "arguments": _obj({"location": S, "unit": {"enum": ["celsius", "fahrenheit"]}})}),
     {"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}),
    (_obj({"summary": {"type": "string", "maxLength": 200}, "keywords": {"type": "array", "items": S, "maxItems": 5}}),
     {"summary": "A short text.", "keywords": ["short", "text"]}),
    (_obj({"question": S, "answer": S, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
     {"question": "2+2?", "answer": "4", "confidence": 0.99}),
    (_obj({"entities": {"type": "array", "items": _obj({"text": S, "label": {"enum": ["PER", "ORG", "LOC"]}}), "maxItems": 4}}),
     {"entities": [{"text": "Paris", "label": "LOC"}]}),
    (_obj({"rating": {"type": "integer", "minimum": 1, "maximum": 5}, "review": {"type": "string", "maxLength": 100}}),
     {"rating": 4, "review": "Good."}),
    (_obj({"is_spam": B, "reason": {"type": "string", "maxLength": 80}}), {"is_spam": False, "reason": "Looks fine."}),
    (_obj({"sql": S, "tables": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}), {"sql": "SELECT 1", "tables": ["t"]}),
    (_obj({"lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180, "maximum": 180}}),
     {"lat": 48.85, "lon": 2.35}),
]

SCHEMAS: list[Schema] = [schema for schema, _ in SCHEMA_INSTANCES]
