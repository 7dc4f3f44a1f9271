from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from pipeline.errors import ConfigError
from pipeline.prepare.schema import check_schema, from_pydantic, strict_normalise, tolerant_schema
from pipeline.write.schema_arrow import arrow_type, to_arrow

DICT = pa.dictionary(pa.int32(), pa.string())


def obj(props: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, **kw}


def struct(**fields: pa.DataType) -> pa.DataType:
    return pa.struct([pa.field(k, v, nullable=True) for k, v in fields.items()])


# ---------------------------------------------------------------------------------------------------
# check_schema


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        (obj({"sentiment": {"type": "strin"}}), ["/properties/sentiment/type", "unknown type 'strin'"]),
        (obj({"a": {"type": "string"}}, required="a"), ["/required", "is not of type 'array'"]),
        (obj({"n": {"type": "integer", "minimum": "zero"}}), ["/properties/n/minimum", "'number'"]),
        (obj({"x": {"$ref": "#/$defs/Missing"}}), ["/properties/x/$ref", "#/$defs/Missing"]),
        (obj({"x": {"$ref": "https://example.com/s.json"}}), ["/properties/x/$ref", "only local references"]),
        (obj({"a": {"type": "string"}}, required=["b"]), ["/required/0", "'b' is required but is not a property"]),
        (obj({"sentiment": {"type": "string"}}, required=["sentimnt"]), ["did you mean 'sentiment'"]),
        ({"type": "array", "items": {"type": "string"}}, ["root must be", "'array'"]),
        ({"properties": {"a": {"type": "string"}}}, ["root must be", "None"]),
    ],
)
def test_check_schema_errors_name_the_pointer(schema: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        check_schema(schema)
    assert info.value.key == "structured.schema"
    for part in expected:
        assert part in str(info.value)


def test_check_schema_accepts_refs_and_pydantic() -> None:
    check_schema(obj({"a": {"$ref": "#/$defs/A"}, "b": {"$ref": "#/definitions/B"}, "c": {"$ref": "#"}},
                     **{"$defs": {"A": {"type": "string"}}, "definitions": {"B": {"type": "integer"}}}))

    class Item(BaseModel):
        name: str

    class Out(BaseModel):
        """Labels for one review."""

        items: list[Item]
        note: str | None = None

    schema = from_pydantic(Out)
    check_schema(schema)
    assert schema["properties"]["items"]["items"] == {"$ref": "#/$defs/Item"}
    assert arrow_type(schema) == struct(items=pa.list_(struct(name=pa.string())), note=pa.string())
    with pytest.raises(ConfigError):
        from_pydantic(dict)


# ---------------------------------------------------------------------------------------------------
# strict_normalise


def test_strict_normalise_nested_arrays_and_defs() -> None:
    schema = obj(
        {
            "label": {"type": "string", "enum": ["pos", "neg"]},
            "topic": {"type": "string"},
            "meta": obj({"lang": {"type": "string"}, "score": {"type": "number"}}, required=["score"]),
            "tags": {"type": "array", "items": obj({"t": {"type": "string"}})},
            "owner": {"$ref": "#/$defs/Person"},
            "maybe": {"type": ["integer", "null"]},
        },
        required=["label"],
        **{"$defs": {"Person": obj({"name": {"type": "string"}})}},
    )
    before = copy.deepcopy(schema)
    out, notes = strict_normalise(schema)
    assert schema == before  # input untouched

    assert out["required"] == ["label", "topic", "meta", "tags", "owner", "maybe"]
    assert out["additionalProperties"] is False
    assert out["properties"]["label"] == {"type": "string", "enum": ["pos", "neg"]}
    assert out["properties"]["topic"] == {"type": ["string", "null"]}
    meta = out["properties"]["meta"]
    assert meta["type"] == ["object", "null"] and meta["required"] == ["lang", "score"]
    assert meta["properties"]["lang"]["type"] == ["string", "null"]
    assert meta["properties"]["score"] == {"type": "number"}
    item = out["properties"]["tags"]["items"]
    assert item["additionalProperties"] is False and item["required"] == ["t"]
    assert out["properties"]["owner"] == {"anyOf": [{"$ref": "#/$defs/Person"}, {"type": "null"}]}
    assert out["$defs"]["Person"]["additionalProperties"] is False
    assert out["$defs"]["Person"]["properties"]["name"]["type"] == ["string", "null"]
    assert out["properties"]["maybe"] == {"type": ["integer", "null"]}

    assert "/properties/topic: made required and nullable" in notes
    assert "/properties/maybe: made required (already nullable)" in notes
    assert "/properties/meta/properties/lang: made required and nullable" in notes
    assert "/properties/tags/items/properties/t: made required and nullable" in notes
    assert "/$defs/Person/properties/name: made required and nullable" in notes
    assert "(root)/additionalProperties: set to false" not in notes
    assert "/additionalProperties: set to false" in notes
    assert "/properties/tags/items/additionalProperties: set to false" in notes
    Draft202012Validator.check_schema(out)


def test_strict_normalise_enum_and_unsupported_keywords() -> None:
    out, notes = strict_normalise(obj({"mood": {"enum": ["a", "b"]}, "x": {"allOf": [{"type": "string"}]},
                                       "free": {"type": "object"}}))
    assert out["properties"]["mood"] == {"enum": ["a", "b", None]}
    assert out["properties"]["x"] == {"anyOf": [{"allOf": [{"type": "string"}]}, {"type": "null"}]}
    assert any("/properties/x/anyOf/0/allOf: not supported by OpenAI strict mode" in n for n in notes)
    assert any(n.startswith("/properties/free/additionalProperties: set to false; strict mode allows no")
               for n in notes)


def test_tolerant_schema_accepts_null_for_optional_only() -> None:
    schema = obj({"a": {"type": "string"}, "b": {"type": "string", "enum": ["x"]}}, required=["a"])
    v = Draft202012Validator(tolerant_schema(schema))
    assert v.is_valid({"a": "s", "b": None})
    assert v.is_valid({"a": "s"})
    assert not v.is_valid({"a": None})
    assert not v.is_valid({"a": "s", "b": "y"})


# ---------------------------------------------------------------------------------------------------
# arrow_type: one row per schema feature

DEFS = {"Tag": obj({"name": {"type": "string"}, "weight": {"type": "number"}})}
NODE = obj({"value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}})

ARROW_CASES: list[tuple[str, dict[str, Any], pa.DataType]] = [
    ("string", {"type": "string"}, pa.string()),
    ("integer", {"type": "integer"}, pa.int64()),
    ("number", {"type": "number"}, pa.float64()),
    ("boolean", {"type": "boolean"}, pa.bool_()),
    ("enum of strings", {"type": "string", "enum": ["pos", "neg"]}, DICT),
    ("enum without type", {"enum": ["a", "b"]}, DICT),
    ("nullable enum", {"type": ["string", "null"], "enum": ["a", None]}, DICT),
    ("enum of ints", {"enum": [1, 2, 3]}, pa.int64()),
    ("enum of mixed", {"enum": ["a", 1]}, pa.string()),
    ("nullable via type list", {"type": ["integer", "null"]}, pa.int64()),
    ("nullable via anyOf", {"anyOf": [{"type": "number"}, {"type": "null"}]}, pa.float64()),
    ("integer or number", {"type": ["integer", "number"]}, pa.float64()),
    ("anyOf mixed -> json", {"anyOf": [{"type": "string"}, {"type": "integer"}]}, pa.string()),
    ("oneOf mixed -> json", {"oneOf": [{"type": "string"}, obj({"a": {"type": "string"}})]}, pa.string()),
    ("type list mixed -> json", {"type": ["string", "integer"]}, pa.string()),
    ("const -> json", {"const": "x"}, pa.string()),
    ("missing type -> json", {"description": "anything"}, pa.string()),
    ("free-form object", {"type": "object"}, pa.string()),
    ("map object", {"type": "object", "additionalProperties": {"type": "integer"}}, pa.string()),
    ("array of strings", {"type": "array", "items": {"type": "string"}}, pa.list_(pa.string())),
    ("array without items", {"type": "array"}, pa.list_(pa.string())),
    ("tuple -> json", {"type": "array", "prefixItems": [{"type": "string"}]}, pa.string()),
    ("nested object", obj({"inner": obj({"x": {"type": "integer"}})}), struct(inner=struct(x=pa.int64()))),
    ("array of objects", {"type": "array", "items": obj({"k": {"enum": ["a"]}, "v": {"type": "boolean"}})},
     pa.list_(struct(k=DICT, v=pa.bool_()))),
    ("$ref into $defs", {"$ref": "#/$defs/Tag"}, struct(name=pa.string(), weight=pa.float64())),
    ("recursive $ref", {"$ref": "#/$defs/Node"}, struct(value=pa.int64(), children=pa.list_(pa.string()))),
    ("allOf of one", {"allOf": [{"$ref": "#/$defs/Tag"}]}, struct(name=pa.string(), weight=pa.float64())),
]


@pytest.mark.parametrize(("name", "prop", "expected"), ARROW_CASES, ids=[c[0] for c in ARROW_CASES])
def test_arrow_type_table(name: str, prop: dict[str, Any], expected: pa.DataType) -> None:
    schema = obj({"f": prop}, **{"$defs": {**DEFS, "Node": NODE}})
    typ = arrow_type(schema)
    assert typ == struct(f=expected)
    assert all(typ.field(i).nullable for i in range(typ.num_fields))


def test_root_recursion_becomes_json() -> None:
    schema = obj({"name": {"type": "string"}, "parent": {"$ref": "#"}})
    assert arrow_type(schema) == struct(name=pa.string(), parent=pa.string())


# ---------------------------------------------------------------------------------------------------
# to_arrow and the round trip through Parquet and polars

FULL = obj(
    {
        "label": {"type": "string", "enum": ["pos", "neg", "mixed"]},
        "score": {"type": "number"},
        "count": {"type": ["integer", "null"]},
        "ok": {"type": "boolean"},
        "topic": {"type": "string"},
        "meta": obj({"lang": {"type": "string"}}),
        "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}},
        "extra": {"type": "object"},
        "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    },
    required=["label", "score"],
    **{"$defs": DEFS},
)


def test_to_arrow_values_and_round_trip(tmp_path: Path) -> None:
    values = [
        {"label": "pos", "score": 1, "count": 3, "ok": True, "topic": "food", "meta": {"lang": "en"},
         "tags": [{"name": "a", "weight": 2}], "extra": {"k": [1, 2]}, "either": 5},
        {"label": "neg", "score": 0.5, "count": None, "ok": False, "topic": None, "tags": [], "either": "s"},
        None,
        # Does not fit (validation would have rejected it): nulls, never an exception.
        {"label": 7, "score": "high", "count": 2.0, "ok": 1, "meta": "x", "tags": [None, "x"], "extra": None},
    ]
    arr = to_arrow(values, FULL)
    assert arr.type == arrow_type(FULL)
    rows = arr.to_pylist()
    assert rows[0]["score"] == 1.0 and isinstance(rows[0]["score"], float)
    assert rows[0]["extra"] == '{"k":[1,2]}' and rows[0]["either"] == "5"
    assert rows[0]["tags"] == [{"name": "a", "weight": 2.0}]
    assert rows[1]["count"] is None and rows[1]["topic"] is None and rows[1]["meta"] is None
    assert rows[1]["either"] == '"s"'
    assert rows[2] is None
    assert rows[3]["label"] is None and rows[3]["score"] is None and rows[3]["ok"] is None
    assert rows[3]["count"] == 2 and rows[3]["meta"] is None
    assert rows[3]["tags"] == [None, None]

    path = tmp_path / "out.parquet"
    pq.write_table(pa.table({"output": arr}), path)
    df = pl.read_parquet(path)
    dtype = df.schema["output"]
    assert isinstance(dtype, pl.Struct)
    got = {f.name: f.dtype for f in dtype.fields}
    assert got["label"] in (pl.Categorical, pl.String)
    assert got["score"] == pl.Float64 and got["count"] == pl.Int64 and got["ok"] == pl.Boolean
    assert got["topic"] == pl.String and got["extra"] == pl.String and got["either"] == pl.String
    assert got["meta"] == pl.Struct({"lang": pl.String})
    assert got["tags"] == pl.List(pl.Struct({"name": pl.String, "weight": pl.Float64}))
    flat = df.unnest("output")
    assert flat["label"].cast(pl.String).to_list() == ["pos", "neg", None, None]
    assert flat["count"].to_list() == [3, None, None, 2]


def test_to_arrow_ten_thousand_rows() -> None:
    values = [{"label": "pos", "score": i, "count": i, "ok": True, "topic": "t", "meta": {"lang": "en"},
               "tags": [{"name": "a", "weight": 1.5}], "extra": {"a": 1}, "either": i} for i in range(10_000)]
    arr = to_arrow(values, FULL, arrow_type(FULL))
    assert len(arr) == 10_000 and arr.null_count == 0
    assert arr[9_999].as_py()["count"] == 9_999 and arr[0].as_py()["tags"] == [{"name": "a", "weight": 1.5}]


def test_from_pydantic_literal_and_optional_map_to_typed_columns() -> None:
    class Review(BaseModel):
        sentiment: Literal["pos", "neg"]
        stars: int
        summary: str | None = None

    typ = arrow_type(from_pydantic(Review))
    assert typ == struct(sentiment=DICT, stars=pa.int64(), summary=pa.string())
