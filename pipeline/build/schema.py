"""JSON Schema utilities: check a labelling schema, adapt it to strict mode, and map it to Arrow types.

The schema is the user's contract for one row of output. It is checked once at start-up (every error
names the JSON pointer of the problem), rewritten for OpenAI strict mode when needed, and mapped to an
Arrow type so that each property becomes a typed column. Anything Arrow cannot type faithfully (unions
of different types, free-form maps, `const`, untyped values, recursion) is kept as JSON text rather
than guessed at, so no answer is ever lost to a lossy conversion.
"""
from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import orjson
import pyarrow as pa
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from ..errors import ConfigError

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
_INT64 = (-(2**63), 2**63 - 1)

_META = Draft202012Validator(Draft202012Validator.META_SCHEMA)


# ---------------------------------------------------------------------------------------------------
# Pointers and references


def pointer(parts: Any) -> str:
    """A JSON pointer (RFC 6901) from path segments; the root is shown as "(root)" for readability."""
    text = "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)
    return text or "(root)"


def _join(ptr: str, *parts: Any) -> str:
    base = "" if ptr == "(root)" else ptr
    return base + pointer(parts)


def resolve_ref(root: dict[str, Any], ref: str) -> Any:
    """Follow a local reference ("#", "#/$defs/x", "#/definitions/x"); KeyError when it leads nowhere."""
    if not ref.startswith("#"):
        raise KeyError(ref)
    node: Any = root
    frag = ref[1:]
    if frag and not frag.startswith("/"):
        raise KeyError(ref)  # plain-name fragments ($anchor) are not supported
    for raw in frag.split("/")[1:]:
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(ref)
    return node


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
                yield child, _join(ptr, kw) if key is None else _join(ptr, kw, key)


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
                    f"$ref {ref!r} at {_join(ptr, '$ref')} does not resolve to a schema; only local references "
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
            raise ConfigError(f"{_join(ptr, 'required', i)}: {name!r} is required but is not a property{hint}",
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
                    notes.append(f"{_join(ptr, kw)}: not supported by OpenAI strict mode; the request may be "
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
                    notes.append(f"{_join(ptr, 'properties', name)}: {how}")
            if strict:
                if props:
                    node["required"] = list(props)
                extra = node.get("additionalProperties")
                if extra is not False:
                    where = _join(ptr, "additionalProperties")
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


# ---------------------------------------------------------------------------------------------------
# Arrow mapping
#
# A plan is a small tuple tree shared by arrow_type and to_arrow, so both always agree on which
# positions are typed and which hold JSON text: ("json",) ("str",) ("dict",) ("int",) ("float",)
# ("bool",) ("list", item) ("struct", ((name, plan), ...)).

Plan = tuple[Any, ...]
_JSON: Plan = ("json",)
_SCALARS: dict[str, Plan] = {"string": ("str",), "integer": ("int",), "number": ("float",), "boolean": ("bool",)}


def _plan(node: Any, root: dict[str, Any], refs: tuple[str, ...] = ()) -> Plan:
    if not isinstance(node, dict):
        return _JSON
    ref = node.get("$ref")
    if isinstance(ref, str):
        if ref in refs:
            return _JSON  # a recursive type has no finite Arrow type
        try:
            return _plan(resolve_ref(root, ref), root, (*refs, ref))
        except KeyError:
            return _JSON
    if "const" in node:
        return _JSON
    if "enum" in node:
        return _enum_plan([v for v in node["enum"] if v is not None])
    for kw in ("anyOf", "oneOf"):
        if kw in node:
            branches = [b for b in node[kw] if not _is_null_only(b)]
            return _merge({_plan(b, root, refs) for b in branches})
    if "allOf" in node:
        return _plan(node["allOf"][0], root, refs) if len(node["allOf"]) == 1 else _JSON
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = {k for k in kind if k != "null"}
        if kinds == {"integer", "number"}:
            return ("float",)
        if len(kinds) != 1:
            return _JSON
        kind = kinds.pop()
    if kind == "object":
        props = node.get("properties")
        if not isinstance(props, dict) or not props or isinstance(node.get("additionalProperties"), dict):
            return _JSON
        return ("struct", tuple((name, _plan(p, root, refs)) for name, p in props.items()))
    if kind == "array":
        items = node.get("items")
        if "prefixItems" in node or isinstance(items, list):
            return _JSON
        return ("list", _plan(items, root, refs) if isinstance(items, dict) else _JSON)
    return _SCALARS.get(kind, _JSON) if isinstance(kind, str) else _JSON


def _is_null_only(node: Any) -> bool:
    return isinstance(node, dict) and (node.get("type") == "null" or node.get("type") == ["null"])


def _enum_plan(values: list[Any]) -> Plan:
    kinds = {type(v) for v in values}  # type(), not isinstance(): True must not count as an int
    if kinds in ({str}, {bool}, {int}):
        return {str: ("dict",), bool: ("bool",), int: ("int",)}[kinds.pop()]
    return ("float",) if kinds and kinds <= {int, float} else _JSON


def _merge(plans: set[Plan]) -> Plan:
    if len(plans) == 1:
        return plans.pop()
    if plans == {("int",), ("float",)}:
        return ("float",)
    return _JSON


_LEAVES = {"json": pa.string(), "str": pa.string(), "dict": pa.dictionary(pa.int32(), pa.string()),
           "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def _arrow(plan: Plan) -> pa.DataType:
    kind = plan[0]
    if kind == "struct":
        return pa.struct([pa.field(name, _arrow(sub), nullable=True) for name, sub in plan[1]])
    if kind == "list":
        return pa.list_(pa.field("item", _arrow(plan[1]), nullable=True))
    return _LEAVES[kind]


def arrow_type(schema: dict[str, Any]) -> pa.DataType:
    """The Arrow type one output value maps to (a struct for an object schema)."""
    return _arrow(_plan(schema, schema, ("#",)))


# ---------------------------------------------------------------------------------------------------
# Values to Arrow


def _converter(plan: Plan) -> Callable[[Any], Any]:
    """A function turning one parsed JSON value into what pa.array expects for the plan's type.

    Anything that does not fit becomes None: validation should have caught it already, and one odd
    value must never sink a whole batch of paid-for answers.
    """
    kind = plan[0]
    if kind == "json":
        return lambda v: None if v is None else orjson.dumps(v).decode()
    if kind in ("str", "dict"):
        return lambda v: v if type(v) is str else None
    if kind == "bool":
        return lambda v: v if type(v) is bool else None
    if kind == "float":
        return lambda v: v if type(v) is float else float(v) if type(v) is int else None
    if kind == "int":
        lo, hi = _INT64

        def to_int(v: Any) -> Any:
            if type(v) is float and v.is_integer():
                v = int(v)  # JSON Schema counts 3.0 as an integer
            return v if type(v) is int and lo <= v <= hi else None

        return to_int
    if kind == "list":
        item = _converter(plan[1])
        return lambda v: [item(x) for x in v] if type(v) is list else None
    fields = [(name, _converter(sub)) for name, sub in plan[1]]

    def to_struct(v: Any) -> Any:
        if type(v) is not dict:
            return None
        return {name: conv(v.get(name)) for name, conv in fields}

    return to_struct


def to_arrow(values: list[Any], schema: dict[str, Any], typ: pa.DataType | None = None) -> pa.Array:
    """Parsed outputs (or None for rows without one) as one typed array of arrow_type(schema).

    `typ` lets a caller that already computed arrow_type(schema) skip doing it again.
    """
    plan = _plan(schema, schema, ("#",))
    conv = _converter(plan)
    return pa.array([conv(v) for v in values], type=typ if typ is not None else _arrow(plan))


def from_pydantic(model: type) -> dict[str, Any]:
    """The JSON Schema of a pydantic BaseModel class, for pipeline.run(..., schema=MyModel)."""
    from pydantic import BaseModel

    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ConfigError(f"expected a pydantic BaseModel class, got {model!r}", key=SCHEMA_KEY)
    return model.model_json_schema()
