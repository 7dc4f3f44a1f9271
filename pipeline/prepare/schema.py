"""JSON Schema utilities: check a labelling schema, adapt it to strict mode, and map it to Arrow types.

The schema is the user's contract for one row of output. It is checked once at start-up (every error
names the JSON pointer of the problem, pointers.py), rewritten for OpenAI strict mode when needed, and
mapped to an Arrow type so that each property becomes a typed column (that mapping is the write stage's:
write/schema_arrow.py).
"""
from __future__ import annotations

import copy
import difflib
from collections.abc import Iterator
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from ..errors import ConfigError
from .pointers import join_pointer, pointer, resolve_ref

__all__ = ["SCHEMA_KEY", "check_schema", "from_pydantic", "pointer", "resolve_ref", "strict_normalise",
           "tolerant_schema"]

SCHEMA_KEY = "structured.schema"
_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")

# Keywords whose value is a schema, a list of schemas, or a name -> schema map (Draft 2020-12 plus the
# draft-07 spellings that pydantic and older tools still emit).
_ONE = ("items", "additionalProperties", "contains", "not", "if", "then", "else", "propertyNames",
        "unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema")
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# OpenAI rejects these under strict: true; we say so up front instead of letting the first request fail.
_STRICT_UNSUPPORTED = ("allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas",
                       "patternProperties")

_META = Draft202012Validator(Draft202012Validator.META_SCHEMA)


def _children(node: dict[str, Any], ptr: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Every direct subschema with its pointer; data keywords (enum, const, default) are not walked."""
    for kw in (*_ONE, *_MANY, *_MAP):
        sub = node.get(kw)
        if isinstance(sub, list):  # anyOf & co, and draft-07's tuple form of items
            pairs: Any = enumerate(sub)
        elif kw in _MAP and isinstance(sub, dict):
            pairs = sub.items()
        else:
            pairs = [(None, sub)]
        for key, child in pairs:
            if isinstance(child, dict):
                yield child, join_pointer(ptr, kw) if key is None else join_pointer(ptr, kw, key)


def _walk(node: dict[str, Any], ptr: str = "(root)") -> Iterator[tuple[dict[str, Any], str]]:
    yield node, ptr
    for sub, sub_ptr in _children(node, ptr):
        yield from _walk(sub, sub_ptr)


# ---------------------------------------------------------------------------------------------------
# Checking


def check_schema(schema: dict[str, Any]) -> None:
    """Raise ConfigError(key="structured.schema") naming the JSON pointer of the first problem."""
    if not isinstance(schema, dict):
        raise ConfigError(f"must be a JSON Schema object, got {type(schema).__name__}", key=SCHEMA_KEY)
    err = best_match(_META.iter_errors(schema))
    if err is not None:
        where = pointer(err.absolute_path)
        what = err.message
        if err.absolute_path and err.absolute_path[-1] == "type" and err.validator == "anyOf":
            what = f"unknown type {err.instance!r}; use one of {', '.join(_TYPES)}"
        raise ConfigError(f"invalid JSON Schema at {where}: {_clip(what, 200)}", key=SCHEMA_KEY)
    for node, ptr in _walk(schema):
        _check_required(node, ptr)
        ref = node.get("$ref")
        if isinstance(ref, str):
            try:
                target = resolve_ref(schema, ref)
            except KeyError:
                target = None
            if not isinstance(target, (dict, bool)):
                raise ConfigError(
                    f"$ref {ref!r} at {join_pointer(ptr, '$ref')} does not resolve to a schema; only local references "
                    "such as #/$defs/Name or #/definitions/Name are supported",
                    key=SCHEMA_KEY,
                )
    root = resolve_ref(schema, schema["$ref"]) if isinstance(schema.get("$ref"), str) else schema
    kind = root.get("type") if isinstance(root, dict) else None
    if kind != "object" and kind != ["object"]:
        raise ConfigError(
            'the root must be {"type": "object", "properties": {...}}: each property becomes an output '
            f"column (got type {kind!r}); to label a single value wrap it, e.g. "
            '{"type": "object", "properties": {"value": <your schema>}, "required": ["value"]}',
            key=SCHEMA_KEY,
        )


def _check_required(node: dict[str, Any], ptr: str) -> None:
    # Legal JSON Schema, but a name in `required` that is no property is nearly always a typo, and it
    # would make every answer fail validation after money was spent on it.
    props = node.get("properties")
    if not isinstance(props, dict):
        return
    for i, name in enumerate(node.get("required") or ()):
        if name not in props:
            close = difflib.get_close_matches(name, list(props), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; properties are {', '.join(map(repr, props))}"
            raise ConfigError(f"{join_pointer(ptr, 'required', i)}: {name!r} is required but is not a property{hint}",
                              key=SCHEMA_KEY)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------
# Strict mode


def strict_normalise(schema: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The schema as OpenAI strict mode wants it, plus one human-readable note per change."""
    out = copy.deepcopy(schema)
    notes: list[str] = []
    _normalise(out, notes, strict=True)
    return out, notes


def tolerant_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with every optional property also accepting null (strict mode's way to say "absent")."""
    out = copy.deepcopy(schema)
    _normalise(out, [], strict=False)
    return out


def _normalise(schema: dict[str, Any], notes: list[str], *, strict: bool) -> None:
    # Edits happen in place on a private copy; each node is edited before its children are listed, so
    # wrappers introduced for nullability are walked too (their pointers then include /anyOf/0).
    stack = [(schema, "(root)")]
    while stack:
        node, ptr = stack.pop()
        if strict:
            for kw in _STRICT_UNSUPPORTED:
                if kw in node:
                    notes.append(f"{join_pointer(ptr, kw)}: not supported by OpenAI strict mode; the request may be "
                                 "rejected (set structured.strict: false)")
        if _is_object(node):
            props = node.get("properties")
            props = props if isinstance(props, dict) else {}
            required = set(node.get("required") or ())
            for name in list(props):
                if name in required:
                    continue
                new, changed = _nullable(props[name])
                props[name] = new
                if strict:
                    how = "made required and nullable" if changed else "made required (already nullable)"
                    notes.append(f"{join_pointer(ptr, 'properties', name)}: {how}")
            if strict:
                if props:
                    node["required"] = list(props)
                extra = node.get("additionalProperties")
                if extra is not False:
                    where = join_pointer(ptr, "additionalProperties")
                    if not props or (isinstance(extra, dict) and extra):
                        left = "its listed properties" if props else "{}"
                        notes.append(f"{where}: set to false; strict mode allows no free-form keys, so the model can "
                                     f"only answer {left} here (structured.strict: false keeps them)")
                    else:
                        notes.append(f"{where}: set to false")
                    node["additionalProperties"] = False
        stack.extend(reversed(list(_children(node, ptr))))


def _is_object(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or (kind is None and "properties" in node)


def _accepts_null(node: Any) -> bool:
    if node is True or node == {}:
        return True
    if not isinstance(node, dict):
        return False
    kind = node.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return "enum" not in node or None in node["enum"]
    if "enum" in node and kind is None:
        return None in node["enum"]
    for kw in ("anyOf", "oneOf"):
        if any(_accepts_null(b) for b in node.get(kw) or ()):
            return True
    return False


def _nullable(node: Any) -> tuple[Any, bool]:
    """(node also accepting null, whether it changed)."""
    if _accepts_null(node):
        return node, False
    if not isinstance(node, dict):
        return {"anyOf": [node, {"type": "null"}]}, True
    kind = node.get("type")
    simple = not any(k in node for k in ("$ref", "const", "allOf", "anyOf", "oneOf"))
    if simple and (isinstance(kind, (str, list)) or (kind is None and "enum" in node)):
        new = dict(node)
        if isinstance(kind, str):
            new["type"] = [kind, "null"]
        elif isinstance(kind, list):
            new["type"] = [*kind, "null"]
        if "enum" in new:
            new["enum"] = [*new["enum"], None]  # otherwise enum still rejects the null the type allows
        return new, True
    if "anyOf" in node and len(node) == 1:
        return {"anyOf": [*node["anyOf"], {"type": "null"}]}, True
    return {"anyOf": [node, {"type": "null"}]}, True


def from_pydantic(model: type) -> dict[str, Any]:
    """The JSON Schema of a pydantic BaseModel class, for pipeline.run(..., schema=MyModel)."""
    from pydantic import BaseModel

    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigError(f"expected a pydantic BaseModel class, got {model!r}", key=SCHEMA_KEY)
    return model.model_json_schema()
