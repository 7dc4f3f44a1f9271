from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from pipeline.config import StructuredConfig
from pipeline.errors import BadContentError, ConfigError
from pipeline.models.catalog import (
    BUILTIN_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    capabilities,
)
from pipeline.prepare.schema import strict_normalise
from pipeline.prepare.structured import TOOL_DESCRIPTION, StructuredPlan

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "topic": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["sentiment", "stars"],
}
GOOD = {"sentiment": "positive", "stars": 5, "topic": "food", "tags": ["a"]}
BODY: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "system", "content": "You label reviews."}, {"role": "user", "content": "Great!"}],
    "temperature": 0,
}


def plan(mode: str = "auto", model: str = "some/local-model", **kw: Any) -> StructuredPlan:
    return StructuredPlan(StructuredConfig(schema=SCHEMA, mode=mode, **kw), model)


def tool_message(args: Any, name: str = "output") -> dict[str, Any]:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}]}


# ---------------------------------------------------------------------------------------------------
# construction and capabilities


def test_capability_resolution() -> None:
    assert capabilities("openai/gpt-4-turbo") == ["tool", "json_object"]
    assert capabilities("gpt-4-turbo-2024-04-09") == ["tool", "json_object"]
    assert capabilities("GPT-4-1106-preview") == ["tool", "json_object"]
    assert capabilities("openai/gpt-4o-2024-05-13") == ["tool", "json_object"]
    assert capabilities("openai/gpt-4o-mini")[0] == "json_schema"
    assert capabilities("gpt-5-nano")[0] == "json_schema"
    assert capabilities("qwen2.5-7b-instruct") == DEFAULT_CAPABILITIES
    assert capabilities("openai/gpt-4-turbo", {"openai/gpt-4-turbo": ["json_object"]}) == ["json_object"]
    assert capabilities("my-vllm", {"my-*": ["tool"]}) == ["tool"]
    for glob, modes in BUILTIN_CAPABILITIES.items():
        if "gpt-4-turbo" in glob or "1106" in glob or "0125" in glob:
            assert modes[0] != "json_schema" and "json_schema" not in modes


def test_auto_mode_per_model_and_config_wins() -> None:
    assert plan(model="openai/gpt-4-turbo").mode == "tool"
    assert plan(model="openai/gpt-4o").mode == "json_schema"
    assert plan(model="llama-3").mode == "json_schema"
    cfg = StructuredConfig(schema=SCHEMA, capabilities={"openai/gpt-4-turbo": ["json_object", "tool"]})
    assert StructuredPlan(cfg, "openai/gpt-4-turbo").mode == "json_object"
    explicit = plan("json_schema", model="openai/gpt-4-turbo")
    assert explicit.mode == "json_schema"
    assert any("not known to support" in n for n in explicit.notes)


def test_schema_argument_overrides_config_and_is_checked() -> None:
    other = {"type": "object", "properties": {"x": {"type": "integer"}}}
    p = StructuredPlan(StructuredConfig(schema=SCHEMA), "m", schema=other)
    assert p.schema is other
    with pytest.raises(ConfigError, match="/properties/x/type"):
        StructuredPlan(StructuredConfig(), "m", schema={"type": "object", "properties": {"x": {"type": "int"}}})
    with pytest.raises(ConfigError, match="structured.schema"):
        StructuredPlan(StructuredConfig(), "m")


def test_strict_notes_and_sent_schema() -> None:
    p = plan(model="openai/gpt-4o")
    assert p.sent_schema == strict_normalise(SCHEMA)[0]
    assert "strict: /properties/topic: made required and nullable" in p.notes
    assert plan(model="openai/gpt-4o", strict=False).sent_schema == SCHEMA
    assert plan(model="openai/gpt-4-turbo").notes == []


# ---------------------------------------------------------------------------------------------------
# shape()


def test_shape_json_schema() -> None:
    body = copy.deepcopy(BODY)
    out = plan(model="openai/gpt-4o").shape(body)
    assert body == BODY
    assert out == {**BODY, "response_format": {"type": "json_schema", "json_schema": {
        "name": "output", "schema": strict_normalise(SCHEMA)[0], "strict": True}}}
    out = plan("json_schema", strict=False, name="review").shape(body)
    assert out["response_format"]["json_schema"] == {"name": "review", "schema": SCHEMA, "strict": False}


def test_shape_json_object_appends_to_system_or_inserts_one() -> None:
    p = plan("json_object")
    body = copy.deepcopy(BODY)
    out = p.shape(body)
    assert body == BODY
    assert out["response_format"] == {"type": "json_object"}
    system = out["messages"][0]["content"]
    assert system.startswith("You label reviews.\n\nRespond with a single JSON object that conforms to this JSON")
    assert orjson.dumps(SCHEMA).decode() in system and "json" in system.lower()
    assert out["messages"][1] == BODY["messages"][1]
    assert {k: v for k, v in out.items() if k not in ("messages", "response_format")} == {
        k: v for k, v in BODY.items() if k != "messages"}

    bare = {"model": "m", "messages": [{"role": "user", "content": "Great!"}]}
    out = p.shape(bare)
    assert out["messages"][0]["role"] == "system" and "JSON Schema" in out["messages"][0]["content"]
    assert out["messages"][1:] == bare["messages"] and len(bare["messages"]) == 1

    parts = {"messages": [{"role": "system", "content": [{"type": "text", "text": "Hi"}]}]}
    out = p.shape(parts)
    assert out["messages"][0]["content"][0] == {"type": "text", "text": "Hi"}
    assert "JSON" in out["messages"][0]["content"][1]["text"]
    assert p.shape(out) == out


def test_shape_tool_keeps_user_tools() -> None:
    user_tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    body = {**copy.deepcopy(BODY), "tools": [user_tool], "tool_choice": "auto"}
    snapshot = copy.deepcopy(body)
    out = plan("tool").shape(body)
    assert body == snapshot
    assert out["tools"] == [user_tool, {"type": "function", "function": {
        "name": "output", "description": TOOL_DESCRIPTION, "parameters": SCHEMA}}]
    assert TOOL_DESCRIPTION == "Record the answer. Call this function exactly once; its arguments are the answer."
    assert out["tool_choice"] == {"type": "function", "function": {"name": "output"}}
    assert "response_format" not in out and out["messages"] == BODY["messages"]


@pytest.mark.parametrize("mode", ["json_schema", "json_object", "tool"])
def test_shape_is_idempotent(mode: str) -> None:
    p = plan(mode)
    once = p.shape(BODY)
    assert p.shape(once) == once
    assert p.shape(p.shape(once)) == once
    assert p.mode_of(once) == mode


def test_reshape_after_fallback_removes_the_old_mode() -> None:
    p = plan()
    first = p.shape(BODY)
    assert p.fallback(*UNSUPPORTED_JSON_SCHEMA[0])
    assert p.mode == "json_object"
    second = p.shape(first)
    assert second == p.shape(BODY)
    assert p.fallback(400, "response_format json_object is not supported")
    third = p.shape(second)
    assert third == p.shape(BODY)
    assert "response_format" not in third and third["messages"] == BODY["messages"]


# ---------------------------------------------------------------------------------------------------
# fallback()

UNSUPPORTED_JSON_SCHEMA = [
    (400, "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."),
    (404, "No endpoints found that can handle the requested parameters."),
    (400, 'Provider returned error {"error":{"message":"Invalid parameter: \'response_format\' of type '
          '\'json_schema\' is not supported with this model.","type":"invalid_request_error"}}'),
    (400, 'response_format type must be one of "text" or "json_object", but got: json_schema'),
    (400, "Invalid schema for response_format 'output': In context=(), 'allOf' is not permitted."),
]


@pytest.mark.parametrize(("status", "message"), UNSUPPORTED_JSON_SCHEMA)
def test_fallback_from_json_schema(status: int, message: str) -> None:
    p = plan()
    assert p.fallback(status, message)
    assert p.mode == "json_object"
    short = message if len(message) <= 200 else message[:197] + "..."
    assert p.fallbacks == [{"from": "json_schema", "to": "json_object", "status": status, "message": short}]
    assert p.notes[-1] == (f"json_schema not supported by some/local-model (HTTP {status}: {short}); "
                           "falling back to json_object for the rest of the run")


@pytest.mark.parametrize("message", [
    "registry.ollama.ai/library/gemma:2b does not support tools",
    "tool use is not supported for this model",
    "Invalid parameter: 'tool_choice' is not supported with this model",
])
def test_fallback_from_tool(message: str) -> None:
    p = plan(model="openai/gpt-4-turbo")
    assert p.fallback(400, message)
    assert p.mode == "json_object"


@pytest.mark.parametrize(("status", "message"), [
    (400, "'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'."),
    (400, "This model's maximum context length is 8192 tokens."),
    (400, "Invalid value for 'temperature': must be between 0 and 2"),
    (404, "No endpoints found for openai/gpt-5-ultra."),
    (500, "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."),
    (429, "Rate limit exceeded"),
    (400, "does not support tools"),  # about tools, but json_schema was sent
])
def test_no_fallback_on_unrelated_errors(status: int, message: str) -> None:
    p = plan()
    assert not p.fallback(status, message)
    assert p.mode == "json_schema" and p.fallbacks == []


def test_fallback_only_in_auto_mode() -> None:
    p = plan("json_schema")
    assert not p.fallback(404, "No endpoints found that can handle the requested parameters.")
    assert p.mode == "json_schema" and p.fallbacks == []


def test_fallback_once_per_mode_and_exhaustion() -> None:
    p = plan()  # json_schema, json_object, tool
    no_endpoints = "No endpoints found that can handle the requested parameters."
    assert p.fallback(404, no_endpoints)
    assert p.mode == "json_object"
    # A late 404 to a request shaped as json_schema before the switch: resend, do not step down again.
    assert p.fallback(404, no_endpoints, mode="json_schema")
    assert p.mode == "json_object" and len(p.fallbacks) == 1
    # Without `mode`, a late answer naming the abandoned mode is still recognised.
    assert p.fallback(400, UNSUPPORTED_JSON_SCHEMA[0][1])
    assert p.mode == "json_object" and len(p.fallbacks) == 1
    assert p.fallback(404, no_endpoints, mode="json_object")
    assert p.mode == "tool"
    assert not p.fallback(404, no_endpoints, mode="tool")  # nothing left: the row fails as permanent
    assert p.mode == "tool"
    assert [(f["from"], f["to"]) for f in p.fallbacks] == [("json_schema", "json_object"), ("json_object", "tool")]


def test_restored_mode_never_steps_back() -> None:
    p = plan()  # json_schema, json_object, tool
    p.mode = "json_object"  # what an earlier run of the same job learned
    assert p.shape(BODY)["response_format"] == {"type": "json_object"}
    assert p.fallback(400, "response_format json_object is not supported")
    assert p.mode == "tool"
    with pytest.raises(ValueError):
        p.mode = "grammar"


def test_gpt4_turbo_walkthrough() -> None:
    p = plan(model="openai/gpt-4-turbo")
    assert p.mode == "tool" and "response_format" not in p.shape(BODY)
    assert not p.fallback(400, UNSUPPORTED_JSON_SCHEMA[0][1], mode="tool")


# ---------------------------------------------------------------------------------------------------
# extract()


def test_extract_content_and_fences() -> None:
    p = plan()
    raw = orjson.dumps(GOOD).decode()
    assert p.extract({"role": "assistant", "content": raw}, "stop") == (GOOD, raw)
    fenced = f"  ```json\n{raw}\n```\n"
    assert p.extract({"content": fenced}, "stop") == (GOOD, fenced)
    chatty = f"Here you go:\n```\n{raw}\n```"
    assert p.extract({"content": chatty}, "stop")[0] == GOOD
    parts = [{"type": "text", "text": raw}]
    assert p.extract({"content": parts}, "stop")[0] == GOOD


def test_extract_tool_call_arguments() -> None:
    p = plan("tool")
    raw = orjson.dumps(GOOD).decode()
    msg = tool_message(raw)
    msg["tool_calls"].insert(0, {"id": "c0", "type": "function", "function": {"name": "lookup", "arguments": "{}"}})
    assert p.extract(msg, "stop") == (GOOD, raw)
    assert p.extract(tool_message(GOOD), "tool_calls")[0] == GOOD  # servers that send decoded arguments
    # No tool call but JSON content: accepted.
    assert p.extract({"content": raw}, "stop") == (GOOD, raw)
    with pytest.raises(BadContentError) as info:
        p.extract({"content": "I think it is positive."}, "stop")
    assert info.value.reason == "no_tool_call" and info.value.content == "I think it is positive."
    with pytest.raises(BadContentError) as info:
        p.extract(tool_message(raw, name="lookup"), "tool_calls")
    assert info.value.reason == "no_tool_call"


def test_extract_strict_nulls_are_accepted() -> None:
    p = plan(model="openai/gpt-4o")
    raw = '{"sentiment":"neutral","stars":3,"topic":null,"tags":null}'
    value, text = p.extract({"content": raw, "refusal": None}, "stop")
    assert value == {"sentiment": "neutral", "stars": 3, "topic": None, "tags": None} and text == raw
    with pytest.raises(BadContentError) as info:
        p.extract({"content": '{"sentiment":null,"stars":3}'}, "stop")
    assert info.value.reason == "schema" and "/sentiment" in str(info.value)


@pytest.mark.parametrize(("mode", "message", "finish", "reason", "content"), [
    ("auto", {"content": None, "refusal": "I can't help with that."}, "stop", "refusal", "I can't help with that."),
    ("tool", {"content": None, "refusal": "No."}, "stop", "refusal", "No."),
    ("auto", {"content": ""}, "stop", "empty", ""),
    ("auto", {"content": "  \n"}, "stop", "empty", "  \n"),
    ("auto", {"content": None}, None, "empty", ""),
    ("tool", tool_message(""), "stop", "empty", ""),
    ("auto", {"content": '{"sentiment": "posi'}, "length", "length", '{"sentiment": "posi'),
    ("auto", {"content": ""}, "length", "length", ""),
    ("tool", tool_message('{"sentiment": "posi'), "length", "length", '{"sentiment": "posi'),
    ("auto", {"content": "positive"}, "stop", "not_json", "positive"),
    ("auto", {"content": '{"sentiment": "positive",}'}, "stop", "not_json", '{"sentiment": "positive",}'),
    ("auto", {"content": '{"sentiment": "great", "stars": 5}'}, "stop", "schema", '{"sentiment": "great", "stars": 5}'),
    ("auto", {"content": '{"sentiment": "positive"}'}, "stop", "schema", '{"sentiment": "positive"}'),
    ("auto", {"content": "[1, 2]"}, "stop", "schema", "[1, 2]"),
    ("tool", tool_message('{"sentiment": "positive", "stars": 9}'), "stop", "schema",
     '{"sentiment": "positive", "stars": 9}'),
])
def test_extract_bad_content(mode: str, message: dict[str, Any], finish: str | None, reason: str,
                             content: str) -> None:
    with pytest.raises(BadContentError) as info:
        plan(mode).extract(message, finish)
    err = info.value
    assert err.reason == reason and err.content == content and err.error_class == "bad_content"
    assert len(err.message) <= 300


def test_schema_error_names_the_path() -> None:
    p = plan()
    with pytest.raises(BadContentError) as info:
        p.extract({"content": '{"sentiment": "positive", "stars": 9, "tags": ["a", 3]}'}, "stop")
    assert "/stars" in info.value.message or "/tags/1" in info.value.message
    with pytest.raises(BadContentError) as info:
        p.extract({"content": '{"sentiment": "positive", "stars": 2, "tags": ["a", 3]}'}, "stop")
    assert info.value.message.startswith("the answer does not match the schema at /tags/1:")
    with pytest.raises(BadContentError) as info:
        p.extract({"content": orjson.dumps({"sentiment": "x" * 1000, "stars": 2}).decode()}, "stop")
    assert len(info.value.message) <= 300 and info.value.message.endswith("...")
