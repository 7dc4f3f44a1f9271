"""What the simulated model "writes": schema-conforming JSON, tool arguments, or a sentence.

Everything is drawn from a ``random.Random`` seeded by the caller from the request hash, so the
same body and seed always produce the same text.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from typing import Any

import orjson

from .strings import WORDS, fit_length, formatted, from_pattern, phrase, sentence

Schema = dict[str, Any]

_MAX_DEPTH = 8  # beyond this, pick the smallest legal value so recursive schemas terminate
_HARD_DEPTH = 24
_SCHEMA_HINT_KEYS = ("properties", "type", "$defs", "anyOf", "oneOf", "items")
_MAX_BRACES_TRIED = 64


class SchemaFaker:
    """Draws one value conforming (as far as reasonable) to a JSON Schema."""

    def __init__(self, root: Schema, rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    def value(self, schema: Any = None, depth: int = 0) -> Any:
        schema = self.root if schema is None and depth == 0 else schema
        if schema is True or schema is None or schema == {}:
            return phrase(self.rng)
        if schema is False or not isinstance(schema, dict) or depth > _HARD_DEPTH:
            return None
        if "$ref" in schema:
            return self.value(self.resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if schema.get(key):
                return self.value(self._pick_branch(schema[key], depth), depth + 1)
        if "allOf" in schema:
            return self.value(self._merge_all_of(schema), depth + 1)
        kind = self._pick_type(schema, depth)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return self._string(schema)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self.rng.random() < 0.5
        return None

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}
        node: Any = self.root
        for token in ref[1:].lstrip("/").split("/") if ref != "#" else []:
            token = token.replace("~1", "/").replace("~0", "~")
            node = node[int(token)] if isinstance(node, list) else node.get(token, {})
        return node

    def _pick_branch(self, branches: list[Any], depth: int) -> Any:
        if depth >= _MAX_DEPTH:
            for b in branches:  # prefer a branch that ends recursion
                if isinstance(b, dict) and b.get("type") in ("null", "string", "integer", "number", "boolean"):
                    return b
        return self.rng.choice(branches)

    def _merge_all_of(self, schema: Schema) -> Schema:
        merged: Schema = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = self.resolve(part["$ref"]) if isinstance(part, dict) and "$ref" in part else part
            if not isinstance(part, dict):
                continue
            for k, v in part.items():
                if k == "properties":
                    merged.setdefault("properties", {}).update(v)
                elif k == "required":
                    merged["required"] = list(dict.fromkeys([*merged.get("required", []), *v]))
                else:
                    merged.setdefault(k, v)
        return merged

    def _pick_type(self, schema: Schema, depth: int) -> str:
        kind = schema.get("type")
        if isinstance(kind, list):
            concrete = [k for k in kind if k != "null"]
            if not concrete or (len(concrete) < len(kind) and (depth >= _MAX_DEPTH or self.rng.random() < 0.2)):
                return "null"
            return str(self.rng.choice(concrete))
        if isinstance(kind, str):
            return kind
        if "properties" in schema or "additionalProperties" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        return "string"

    def _object(self, schema: Schema, depth: int) -> dict[str, Any]:
        props: dict[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        out: dict[str, Any] = {}
        for name, sub in props.items():  # schema key order, as OpenAI strict mode promises
            if name in required or (depth < _MAX_DEPTH and self.rng.random() < 0.5):
                out[name] = self.value(sub, depth + 1)
        for name in required:  # required keys the properties map does not describe
            if name not in out:
                out[name] = phrase(self.rng)
        low = int(schema.get("minProperties", 0))
        extra = schema.get("additionalProperties", True)
        while len(out) < low and extra is not False:
            out[f"{self.rng.choice(WORDS)}_{len(out)}"] = self.value(extra if isinstance(extra, dict) else {},
                                                                     depth + 1)
        return out

    def _array(self, schema: Schema, depth: int) -> list[Any]:
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", {})
        if isinstance(items, list):  # draft-4 tuple form
            prefix, items = items, schema.get("additionalItems", {})
        low = int(schema.get("minItems", 0))
        high = schema.get("maxItems")
        count = low if depth >= _MAX_DEPTH else self.rng.randint(max(low, 1), max(low, 3))
        if high is not None:
            count = min(count, int(high))
        if items is False:
            count = min(count, len(prefix))
        count = max(count, low)
        out: list[Any] = [self.value(prefix[i], depth + 1) if i < len(prefix) else self.value(items, depth + 1)
                          for i in range(count)]
        if schema.get("uniqueItems"):
            out = self._unique(out, items, depth, low)
        return out

    def _unique(self, values: list[Any], items: Any, depth: int, low: int) -> list[Any]:
        seen: dict[bytes, Any] = {}
        for v in values:
            seen.setdefault(orjson.dumps(v, option=orjson.OPT_SORT_KEYS), v)
        for _ in range(20):  # enough draws to fill small enums without looping forever
            if len(seen) >= low:
                break
            v = self.value(items, depth + 1)
            seen.setdefault(orjson.dumps(v, option=orjson.OPT_SORT_KEYS), v)
        return list(seen.values())

    def _string(self, schema: Schema) -> str:
        text: str | None = None
        if "pattern" in schema:
            text = from_pattern(schema["pattern"], self.rng)
        if text is None and "format" in schema:
            text = formatted(schema["format"], self.rng)
        if text is None:
            text = phrase(self.rng)
        if "pattern" in schema and text is not None and "minLength" not in schema and "maxLength" not in schema:
            return text
        return fit_length(text, int(schema.get("minLength", 0)), schema.get("maxLength"), self.rng)

    def _bounds(self, schema: Schema, step: float) -> tuple[float, float]:
        low = schema.get("minimum", -math.inf)
        high = schema.get("maximum", math.inf)
        ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if isinstance(ex_low, bool):  # draft-4 boolean form modifies minimum
            ex_low = low if ex_low else None
        if isinstance(ex_high, bool):
            ex_high = high if ex_high else None
        if isinstance(ex_low, (int, float)):
            low = max(low, ex_low + step)
        if isinstance(ex_high, (int, float)):
            high = min(high, ex_high - step)
        if low == -math.inf:
            low = min(0.0, high - 100) if high != math.inf else 0.0
        if high == math.inf:
            high = low + 100
        return float(low), float(max(low, high))

    def _integer(self, schema: Schema) -> int:
        low, high = self._bounds(schema, 1)
        lo, hi = math.ceil(low), math.floor(high)
        mult = schema.get("multipleOf")
        if isinstance(mult, (int, float)) and mult > 0:
            k_lo, k_hi = math.ceil(lo / mult), math.floor(hi / mult)
            if k_lo <= k_hi:
                return int(self.rng.randint(k_lo, k_hi) * mult)
        return self.rng.randint(lo, max(lo, hi))

    def _number(self, schema: Schema) -> float:
        low, high = self._bounds(schema, 1e-6)
        mult = schema.get("multipleOf")
        if isinstance(mult, (int, float)) and mult > 0:
            k_lo, k_hi = math.ceil(low / mult), math.floor(high / mult)
            if k_lo <= k_hi:
                return float(round(self.rng.randint(k_lo, k_hi) * mult, 10))
        value = round(self.rng.uniform(low, high), 2)
        return float(min(max(value, low), high))


def fake_json(schema: Schema, rng: random.Random) -> Any:
    return SchemaFaker(schema, rng).value()


def plain_text(rng: random.Random) -> str:
    return sentence(rng)


def small_json(rng: random.Random) -> dict[str, Any]:
    return {"answer": sentence(rng, 4, 8), "confidence": round(rng.uniform(0.5, 1.0), 2)}


def break_schema(value: Any, schema: Schema) -> Any:
    """Valid JSON that a validator of ``schema`` must reject (for the schema_invalid fault)."""
    faker = SchemaFaker(schema, random.Random(0))
    node = faker.resolve(schema["$ref"]) if "$ref" in schema else schema
    if isinstance(value, dict) and isinstance(node, dict):
        broken = dict(value)
        required = [k for k in node.get("required") or () if k in broken]
        if required:
            del broken[required[0]]
            return broken
        props = node.get("properties") or {}
        for name, sub in props.items():
            wrong = _wrong_value(faker.resolve(sub["$ref"]) if isinstance(sub, dict) and "$ref" in sub else sub)
            if wrong is not _NO_WRONG:
                broken[name] = wrong
                return broken
        if node.get("additionalProperties") is False:
            broken["unexpected_field"] = True
            return broken
    return ["unexpected", "array"] if not isinstance(value, list) else {"unexpected": "object"}


_NO_WRONG = object()
_TYPE_OF_PROBE: tuple[tuple[Any, set[str]], ...] = (
    ({"not": "a list"}, {"object"}),
    (12345, {"integer", "number"}),
    ("not-a-number", {"string"}),
    (["x"], {"array"}),
)


def _wrong_value(sub: Any) -> Any:
    if not isinstance(sub, dict) or not ("type" in sub or "enum" in sub):
        return _NO_WRONG
    if "enum" in sub and "type" not in sub:
        return "__not_in_enum__"
    kinds = sub["type"] if isinstance(sub["type"], list) else [sub["type"]]
    for probe, probe_kinds in _TYPE_OF_PROBE:
        if not probe_kinds & set(kinds):
            return probe
    return _NO_WRONG


class SchemaFinder:
    """Finds the JSON Schema a client embedded in its prompt (json_object mode), with a cache.

    The client writes the schema into the system or user message as a JSON object; the first
    balanced ``{...}`` that parses and looks like a schema wins. The same system prompt repeats
    across a batch, so results are cached by message text.
    """

    def __init__(self, limit: int = 256) -> None:
        self._cache: OrderedDict[str, Schema | None] = OrderedDict()
        self._limit = limit

    def find(self, messages: list[Any]) -> Schema | None:
        ordered = sorted((m for m in messages if isinstance(m, dict)), key=lambda m: m.get("role") != "system")
        for message in ordered:
            for text in _texts(message.get("content")):
                found = self._lookup(text)
                if found is not None:
                    return found
        return None

    def _lookup(self, text: str) -> Schema | None:
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text]
        found = scan_for_schema(text)
        self._cache[text] = found
        if len(self._cache) > self._limit:
            self._cache.popitem(last=False)
        return found


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    return []


def scan_for_schema(text: str) -> Schema | None:
    start = text.find("{")
    tried = 0
    while start != -1 and tried < _MAX_BRACES_TRIED:
        tried += 1
        end = _balanced_end(text, start)
        if end is not None:
            try:
                candidate = orjson.loads(text[start:end])
            except orjson.JSONDecodeError:
                candidate = None
            if isinstance(candidate, dict) and any(k in candidate for k in _SCHEMA_HINT_KEYS):
                return candidate
        start = text.find("{", start + 1)
    return None


def _balanced_end(text: str, start: int) -> int | None:
    depth = 0
    in_string = False
    escaped = False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None
