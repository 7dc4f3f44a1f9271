"""Unit tests of the simulator's pure parts: schema faker, tokens, limits, strict rules, config."""

from __future__ import annotations

import base64
import io
import random
import re

import jsonschema
import pytest
from PIL import Image

from pipeline_simulator import FaultRule, SimConfig, load_fault_plan
from pipeline_simulator.content import (
    SchemaFinder,
    break_schema,
    fake_json,
    scan_for_schema,
)
from pipeline_simulator.limits import RateLimits, TokenBucket, go_duration
from pipeline_simulator.strings import from_pattern
from pipeline_simulator.tokens import ImageSizer, image_tokens, prompt_tokens
from pipeline_simulator.validation import strict_problem

FORMAT_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER

SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"label": {"type": "string", "enum": ["pos", "neg", "mixed"]},
                                      "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
     "required": ["label", "stars"], "additionalProperties": False},
    {"type": "object", "properties": {
        "items": {"type": "array", "minItems": 2, "maxItems": 4,
                  "items": {"type": "object",
                            "properties": {"name": {"type": "string", "minLength": 3, "maxLength": 10},
                                                             "price": {"type": "number", "exclusiveMinimum": 0,
                                                                       "maximum": 9.5}},
                            "required": ["name", "price"], "additionalProperties": False}},
        "note": {"type": ["string", "null"]}},
     "required": ["items", "note"], "additionalProperties": False},
    {"$defs": {"tag": {"type": "object", "properties": {"k": {"type": "string"}, "v": {"type": "boolean"}},
                       "required": ["k", "v"]}},
     "type": "object", "properties": {"tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}},
                                      "main": {"$ref": "#/$defs/tag"}}, "required": ["tags", "main"]},
    {"type": "object", "properties": {
        "when": {"type": "string", "format": "date-time"}, "day": {"type": "string", "format": "date"},
        "mail": {"type": "string", "format": "email"}, "id": {"type": "string", "format": "uuid"},
        "ip": {"type": "string", "format": "ipv4"}, "site": {"type": "string", "format": "uri"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{4}$"}},
     "required": ["when", "day", "mail", "id", "ip", "site", "code"]},
    {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "integer", "multipleOf": 5, "minimum": 10, "maximum": 50}, {"type": "null"}]},
        "choice": {"oneOf": [{"const": "a"}, {"type": "boolean"}]},
        "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
        "uniq": {"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True, "minItems": 2}},
     "required": ["value", "choice", "pair", "uniq"]},
    {"$defs": {"node": {"type": "object", "properties": {"name": {"type": "string"},
                                                         "children": {"type": "array",
                                                                      "items": {"$ref": "#/$defs/node"}}},
                        "required": ["name", "children"], "additionalProperties": False}},
     "$ref": "#/$defs/node"},
    {"type": "object", "allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]},
                                 {"properties": {"b": {"type": "string"}}, "required": ["b"]}]},
    {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}, "minItems": 1},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_fake_json_conforms(schema: dict) -> None:
    for seed in range(40):
        value = fake_json(schema, random.Random(seed))
        jsonschema.validate(value, schema, format_checker=FORMAT_CHECKER)


@pytest.mark.parametrize("schema", SCHEMAS)
def test_break_schema_violates(schema: dict) -> None:
    for seed in range(10):
        value = fake_json(schema, random.Random(seed))
        broken = break_schema(value, schema)
        assert not jsonschema.Draft202012Validator(schema).is_valid(broken)


def test_pattern_generation() -> None:
    rng = random.Random(1)
    for pattern in (r"^[A-Z]{3}-\d{4}$", r"^(foo|bar)+_[a-f0-9]{2,5}$", r"\w+@\w+\.com", r"^[^abc]x?$"):
        for _ in range(20):
            text = from_pattern(pattern, rng)
            assert text is not None and re.search(pattern, text)


def test_schema_finder_picks_first_schema_like_object() -> None:
    text = ('Answer in JSON. Example {"not": "schema"}. Schema: {"type": "object", "properties": {"a": '
            '{"type": "string"}}} end')
    assert scan_for_schema(text) == {"type": "object", "properties": {"a": {"type": "string"}}}
    finder = SchemaFinder()
    msgs = [{"role": "user", "content": [{"type": "text", "text": "no schema here {"}]},
            {"role": "system", "content": text}]
    assert finder.find(msgs) == {"type": "object", "properties": {"a": {"type": "string"}}}
    assert finder.find([{"role": "user", "content": "plain {broken json}"}]) is None


@pytest.mark.parametrize(("size", "detail", "upscale", "expected"), [
    ((1024, 1024), "high", False, 765), ((2048, 4096), "high", False, 1105), ((4096, 8192), "low", False, 85),
    ((512, 512), "auto", False, 255), ((512, 512), "auto", True, 765), ((100, 3000), "high", False, 85 + 170 * 4),
])
def test_image_tokens(size: tuple[int, int], detail: str, upscale: bool, expected: int) -> None:
    assert image_tokens(size[0], size[1], detail, upscale) == expected


def _data_url(width: int, height: int, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buf, format=fmt)
    mime = "png" if fmt == "PNG" else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def test_prompt_tokens_reads_data_url_sizes() -> None:
    sizer = ImageSizer((1024, 1024))
    assert sizer.size(_data_url(2048, 4096)) == (2048, 4096)
    assert sizer.size(_data_url(300, 200, "JPEG")) == (300, 200)
    assert sizer.size("https://example.com/cat.png") == (1024, 1024)
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x" * 40},
        {"type": "image_url", "image_url": {"url": _data_url(2048, 4096), "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}}]}]}
    tokens, images = prompt_tokens(body, sizer, upscale=False)
    assert images == 2
    assert tokens == 3 + 4 + 10 + 1105 + 85


def test_go_duration() -> None:
    assert go_duration(0.012) == "12ms"
    assert go_duration(1) == "1s"
    assert go_duration(360) == "6m0s"
    assert go_duration(9.816) == "9.816s"
    assert go_duration(3723.5) == "1h2m3.5s"


def test_token_bucket_refills_continuously() -> None:
    bucket = TokenBucket(60, now=0.0)
    bucket.level = 0
    bucket.refill(0.5)
    assert bucket.level == pytest.approx(0.5)
    limits = RateLimits(rpm=2, tpm=None, now=0.0)
    assert limits.admit(1, 0.0) is None and limits.admit(1, 0.0) is None
    refused = limits.admit(1, 0.0)
    assert refused is not None and refused.kind == "requests" and refused.retry_after == pytest.approx(30.0)
    assert limits.admit(1, 30.0) is None
    tpm = RateLimits(rpm=None, tpm=100, now=0.0)
    too_large = tpm.admit(101, 0.0)
    assert too_large is not None and too_large.kind == "too_large"


def test_strict_rules() -> None:
    ok = {"type": "object", "properties": {"a": {"type": ["string", "null"]}}, "required": ["a"],
          "additionalProperties": False}
    assert strict_problem(ok, "X") is None
    missing_ap = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    assert "'additionalProperties' is required to be supplied and to be false" in strict_problem(missing_ap, "X")
    missing_req = {**ok, "required": []}
    assert "Missing 'a'" in strict_problem(missing_req, "X")
    nested = {**ok, "properties": {"a": {"type": "object", "properties": {}, "additionalProperties": True}}}
    assert "context=('properties', 'a')" in strict_problem(nested, "X")
    assert "anyOf" in strict_problem({"anyOf": [ok]}, "X")
    assert "'allOf' is not permitted" in strict_problem({**ok, "allOf": []}, "X")
    assert "type: \"array\"" in strict_problem({"type": "array"}, "X")


def test_fault_rule_ranges_and_plan_file(tmp_path) -> None:
    rule = FaultRule(requests="3,5-7,10-", fault="503")
    assert [n for n in range(1, 13) if rule.matches(n)] == [3, 5, 6, 7, 10, 11, 12]
    assert FaultRule(requests=17, fault="hang").matches(17)
    with pytest.raises(ValueError):
        FaultRule(requests="1", fault="teapot")
    with pytest.raises(ValueError):
        FaultRule(requests="5-2", fault="500")
    plan = tmp_path / "plan.yaml"
    plan.write_text("- {requests: '1-2', fault: '429', retry_after: 0.5}\n"
                    "- {requests: 3, fault: stream_error, after_chunks: 1}\n")
    rules = load_fault_plan(plan)
    assert [r.fault for r in rules] == ["429", "stream_error"] and rules[0].retry_after == 0.5
    as_json = tmp_path / "plan.json"
    as_json.write_text('{"fault_plan": [{"requests": "4", "fault": "reset"}]}')
    assert load_fault_plan(as_json)[0].fault == "reset"


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SimConfig(rate_500=0.7, rate_503=0.5)
    with pytest.raises(ValueError):
        SimConfig(flavor="anthropic")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SimConfig(unknown_knob=1)  # type: ignore[call-arg]
    assert SimConfig().api_root_path() == "/api/v1" and SimConfig(flavor="vllm").api_root_path() == "/v1"


def test_the_product_starts_the_simulator_with_its_own_default_flavor() -> None:
    from pipeline.config.endpoint import SIMULATOR_FLAVOR, EndpointConfig
    from pipeline_simulator import SimConfig

    assert SimConfig.model_fields["flavor"].default == SIMULATOR_FLAVOR
    assert EndpointConfig(base_url="simulator").simulator_options()["flavor"] == SIMULATOR_FLAVOR
    assert EndpointConfig(base_url="simulator",
                          simulator={"flavor": "openai"}).simulator_options()["flavor"] == "openai"
