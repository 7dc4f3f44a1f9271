"""A labelling schema as Arrow: the column type of one output value, and parsed values as a typed array.

Anything Arrow cannot type faithfully (unions of different types, free-form maps, `const`, untyped
values, recursion) is kept as JSON text rather than guessed at, so no answer is ever lost to a lossy
conversion. Re-exported by schema.py, where callers import it from.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pyarrow as pa

from ..prepare.pointers import resolve_ref

_INT64 = (-(2**63), 2**63 - 1)


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
