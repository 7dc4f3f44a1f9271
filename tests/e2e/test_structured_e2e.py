"""Structured extraction end to end: each mode over real HTTP to the simulator, fallback, strict
normalisation, bad content, typed columns through Parquet into polars, and the notebook API.

The simulator enforces docs/wire.md §1.5 (structured outputs) (json_schema refused for gpt-4-turbo, the json
word rule for json_object, OpenAI's strict-schema rules), so a run that succeeds here sent what a real
endpoint accepts. Its request log shows what went over the wire. It never returns logprobs, and it
always answers a request carrying tools with a tool call; those paths use a scripted transport instead.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow.parquet as pq
import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel

import pipeline
from pipeline.config import EndpointConfig, ParamsConfig, StructuredConfig, load_config
from pipeline.errors import JobChangedError
from pipeline.prepare.mode_support import routes_via_openrouter
from pipeline.prepare.schema import strict_normalise, tolerant_schema
from pipeline.prepare.structured import StructuredPlan
from pipeline.write.schema_arrow import arrow_type
from pipeline_simulator import SimConfig
from pipeline_simulator.thread import SimulatorThread
from tests.conftest import SCHEMA, job
from tests.fakes import Scripted, completion
from tests.support import cli_in_process

KEY_ENV = "STRUCTURED_E2E_KEY"


@contextmanager
def simulator(monkeypatch: pytest.MonkeyPatch, **options: Any) -> Iterator[tuple[SimulatorThread, dict[str, Any]]]:
    """A simulator in a thread (its request log is readable) and the endpoint section that reaches it."""
    monkeypatch.setenv(KEY_ENV, "sk-test")
    thread = SimulatorThread(SimConfig(**options))
    url = thread.start()
    try:
        yield thread, {"base_url": url, "api_key_env": KEY_ENV}
    finally:
        thread.stop()


def wire(thread: SimulatorThread) -> list[dict[str, Any]]:
    """The chat requests the simulator received, in arrival order (each with its body and status)."""
    log = thread.call(lambda: thread.sim.log)
    return [e for e in log if e["path"].endswith("/chat/completions")]


def outputs(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out / "results.parquet", columns=["output"]).column("output").to_pylist()


def assert_typed_and_valid(out: Path, schema: dict[str, Any]) -> None:
    """`output` is the struct the schema maps to (not a JSON string) and every row validates."""
    assert pq.read_schema(out / "results.parquet").field("output").type == arrow_type(schema)
    assert isinstance(pl.read_parquet(out / "results.parquet").schema["output"], pl.Struct)
    validator = Draft202012Validator(tolerant_schema(schema))  # a struct has every field; absent ones are null
    for value in outputs(out):
        assert validator.is_valid(value), value


# ---------------------------------------------------------------------------------------------------
# A scripted endpoint (tests/fakes.py), for what the simulator does not do (logprobs, prose, content plus
# tool calls)


GOOD = {"sentiment": "positive", "score": 4, "tags": ["fast"]}


def run_scripted(cfg: dict[str, Any], transport: Scripted, monkeypatch: pytest.MonkeyPatch,
                 base_url: str = "http://scripted.invalid/v1") -> pipeline.Summary:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    cfg["endpoint"] = {**cfg["endpoint"], "base_url": base_url, "api_key_env": KEY_ENV}
    return asyncio.run(pipeline.run_async(load_config(cfg), transport=transport, quiet=True))


# ---------------------------------------------------------------------------------------------------
# 1. Each mode, end to end


@pytest.mark.parametrize("model,mode,expected", [
    ("openai/gpt-4o", "json_schema", "json_schema"),
    ("openai/gpt-4-turbo", "json_object", "json_object"),
    ("openai/gpt-4-turbo", "tool", "tool"),
    ("openai/gpt-4-turbo", "auto", "tool"),  # the built-in table: no json_schema on gpt-4-turbo
    ("openai/gpt-4o", "auto", "json_schema"),
])
def test_each_mode_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, mode: str,
                              expected: str) -> None:
    with simulator(monkeypatch) as (thread, endpoint):
        s = pipeline.run(job(tmp_path, 12, endpoint={**endpoint, "model": model}, structured={"mode": mode}))
        sent = [e["body"] for e in wire(thread)]
    assert (s.exit_code, s.succeeded, s.requests_sent, s.structured["mode"]) == (0, 12, 12, expected)
    assert_typed_and_valid(tmp_path / "out", SCHEMA)
    for body in sent:
        if expected == "tool":
            assert body["tool_choice"] == {"type": "function", "function": {"name": "output"}}
            assert "response_format" not in body
        else:
            assert body["response_format"]["type"] == expected and "tools" not in body
        if expected == "json_object":
            assert "json" in body["messages"][0]["content"].lower() and '"sentiment"' in body["messages"][0]["content"]


# ---------------------------------------------------------------------------------------------------
# 2. Auto fallback: a capability entry claiming json_schema for gpt-4-turbo meets the real refusal


@pytest.mark.parametrize("flavor,model,provider,status", [
    ("openrouter", "openai/gpt-4-turbo", {"require_parameters": True}, 404),
    ("openrouter", "openai/gpt-4-turbo", None, 404),  # require_parameters set by the pipeline (OpenRouter)
    ("openrouter", "openai/gpt-4-turbo", {"require_parameters": False}, 400),  # "Provider returned error"
    ("openai", "gpt-4-turbo", None, 400),
])
def test_auto_falls_back_once_for_the_rest_of_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flavor: str, model: str, provider: Any,
        status: int) -> None:
    rows, conc = 40, 8
    with simulator(monkeypatch, flavor=flavor, latency_ms=15) as (thread, endpoint):
        if flavor == "openrouter" and provider is None:
            # The pipeline sets require_parameters only where it knows it talks to OpenRouter: openrouter.ai,
            # or the built-in simulator in its OpenRouter flavor (not a loopback URL).
            endpoint = {"base_url": "simulator", "simulator": {"flavor": "openrouter", "latency_ms": 15}}
        params = {"provider": provider} if provider else {}
        cfg = job(tmp_path, rows, endpoint={**endpoint, "model": model}, params=params,
                  structured={"capabilities": {model: ["json_schema", "tool", "json_object"]}},
                  limits={"max_concurrency": conc})
        s = pipeline.run(cfg)
        log = wire(thread)
    assert (s.exit_code, s.succeeded, s.failed) == (0, rows, 0)
    [fb] = s.structured["fallbacks"]
    assert (fb["from"], fb["to"], fb["status"]) == ("json_schema", "tool", status)
    assert s.structured["mode"] == "tool"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["structured"]["fallbacks"] == [fb]
    if log:  # the thread's log; the in-process simulator case proves the 404 by the summary alone
        refused = [e for e in log if e["body"].get("response_format")]
        assert all(e["status"] == status for e in refused)
        # Only requests already in flight went out in the old mode; everything queued was re-shaped.
        assert 1 <= len(refused) <= conc and s.requests_sent == rows + len(refused) == len(log)
    else:
        assert rows < s.requests_sent <= rows + conc
    assert_typed_and_valid(tmp_path / "out", SCHEMA)


def test_resume_after_a_fallback_starts_in_the_learned_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = "gpt-4-turbo"
    with simulator(monkeypatch, flavor="openai", latency_ms=5,
                   fault_plan=[{"requests": "20-", "fault": "401"}]) as (thread, endpoint):
        cfg = job(tmp_path, 40, endpoint={**endpoint, "model": model}, limits={"max_concurrency": 4},
                  structured={"capabilities": {model: ["json_schema", "tool", "json_object"]}})
        first = pipeline.run(cfg)
        assert first.exit_code == 3 and first.pending > 0 and first.structured["fallbacks"]
        thread.reset(fault_plan=[])
        second = pipeline.run(cfg)
        resumed = wire(thread)
        thread.reset()
        third = pipeline.run(cfg)
        assert wire(thread) == []
    assert (second.exit_code, second.succeeded) == (0, 40)
    assert second.requests_sent == len(resumed) == 40 - first.succeeded
    assert all("response_format" not in e["body"] and e["body"]["tool_choice"] for e in resumed)
    assert second.structured["fallbacks"] == [] and second.structured["mode"] == "tool"
    assert any(n.startswith("starting in tool: an earlier run") for n in second.structured["notes"])
    assert (third.requests_sent, third.succeeded) == (0, 40)


# ---------------------------------------------------------------------------------------------------
# Auto mode on OpenRouter: provider.require_parameters, so an ignored response_format is a free 404


def openrouter_that_ignores_response_format(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """No provider of this model supports response_format: OpenRouter routes anyway unless told not to."""
    if body.get("response_format") and (body.get("provider") or {}).get("require_parameters"):
        return 404, {"error": {"code": 404, "message": "No endpoints found that can handle the requested parameters."}}
    if body.get("tool_choice"):
        return completion({"tool_calls": [{"id": "c1", "type": "function",
                                           "function": {"name": "output", "arguments": json.dumps(GOOD)}}]},
                          finish="tool_calls")
    if "JSON Schema" in body["messages"][0]["content"]:  # json_object mode's instruction: the model follows it
        return completion({"content": json.dumps(GOOD)})
    return completion({"content": "The customer sounds happy overall, though delivery was slow."})


@pytest.mark.parametrize("user_setting", [None, False])
def test_openrouter_require_parameters_turns_an_ignored_schema_into_a_fallback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_setting: bool | None) -> None:
    fake = Scripted(openrouter_that_ignores_response_format)
    params = {"provider": {"require_parameters": user_setting}} if user_setting is not None else {}
    cfg = job(tmp_path, 6, endpoint={"model": "some/new-model"}, params=params, limits={"max_concurrency": 1})
    s = run_scripted(cfg, fake, monkeypatch, base_url="https://openrouter.ai/api/v1")
    if user_setting is None:  # ours: json_schema gets a free 404, auto steps to json_object, every row succeeds
        assert (s.succeeded, s.requests_sent) == (6, 7)
        assert fake.bodies[0]["provider"] == {"require_parameters": True}
        assert all("provider" not in b for b in fake.bodies[1:])  # json_object's schema is in the prompt
        assert [(f["from"], f["to"], f["status"]) for f in s.structured["fallbacks"]] == [
            ("json_schema", "json_object", 404)]
        assert any("require_parameters" in n for n in s.structured["notes"])
    else:  # the user's explicit false is kept: every answer is prose, paid for three times, and fails
        assert (s.succeeded, s.failed, s.requests_sent) == (0, 6, 18)
        assert all(b["provider"] == {"require_parameters": False} for b in fake.bodies)
        fail = pl.read_parquet(tmp_path / "out" / "failures.parquet")
        assert set(fail["error_class"]) == {"bad_content"} and fail["message"].str.starts_with("not_json").all()


def guarded_plan(base_url: str, model: str = "openai/gpt-4o", **params: Any) -> StructuredPlan:
    endpoint = EndpointConfig(base_url=base_url, model=model)
    return StructuredPlan(StructuredConfig(schema=SCHEMA), model, endpoint=endpoint, params=ParamsConfig(**params))


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "provider": {"order": ["OpenAI"]}}


def test_require_parameters_only_where_the_schema_lives_in_a_parameter() -> None:
    plan = guarded_plan("https://openrouter.ai/api/v1")
    assert plan.require_parameters
    shaped = plan.shape(BODY)
    assert shaped["provider"] == {"order": ["OpenAI"], "require_parameters": True}
    assert BODY["provider"] == {"order": ["OpenAI"]}  # the shared preferences are never mutated
    assert plan.shape(shaped) == shaped  # re-shaping is idempotent
    plan.mode = "tool"
    assert plan.shape(shaped)["provider"]["require_parameters"] is True
    plan.mode = "json_object"  # the schema is in the prompt too: an ignored response_format still works
    assert plan.shape(shaped)["provider"] == {"order": ["OpenAI"]}
    assert "provider" not in plan.shape({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize("base_url,params,expected", [
    ("https://openrouter.ai/api/v1/", {}, True),
    ("simulator", {}, True),  # the simulator plays OpenRouter unless told otherwise
    ("https://api.openai.com/v1", {}, False),
    ("http://127.0.0.1:8000/v1", {}, False),
    ("https://openrouter.ai/api/v1", {"provider": {"require_parameters": False}}, False),
    ("https://openrouter.ai/api/v1", {"extra": {"provider": {"require_parameters": False}}}, False),
])
def test_require_parameters_is_never_set_over_the_user_or_off_openrouter(
        base_url: str, params: dict[str, Any], expected: bool) -> None:
    plan = guarded_plan(base_url, **params)
    assert plan.require_parameters is expected
    body = plan.shape({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert body.get("provider") == ({"require_parameters": True} if expected else None)


def test_simulator_in_openai_flavor_is_not_openrouter() -> None:
    assert not routes_via_openrouter(EndpointConfig(base_url="simulator", simulator={"flavor": "openai"}))


# ---------------------------------------------------------------------------------------------------
# 3. Strict normalisation


OPTIONAL = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative"]},
        "reason": {"type": "string"},
        "detail": {"type": "object", "properties": {"topic": {"type": "string"}, "severity": {"type": "integer"}},
                   "required": ["topic"]},
    },
    "required": ["sentiment"],
}


def test_strict_normalises_the_wire_schema_and_optional_nulls_land_as_nulls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with simulator(monkeypatch, flavor="openai") as (thread, endpoint):
        s = pipeline.run(job(tmp_path, 30, endpoint={**endpoint, "model": "gpt-4o"},
                             structured={"schema": OPTIONAL, "mode": "json_schema", "strict": True}))
        sent = [e["body"]["response_format"]["json_schema"] for e in wire(thread)]
    assert (s.exit_code, s.succeeded) == (0, 30)
    normalised = strict_normalise(OPTIONAL)[0]
    assert all(spec == {"name": "output", "strict": True, "schema": normalised} for spec in sent)
    wire_schema = sent[0]["schema"]
    assert wire_schema["required"] == ["sentiment", "reason", "detail"] and wire_schema["additionalProperties"] is False
    detail = wire_schema["properties"]["detail"]
    assert detail["type"] == ["object", "null"] and detail["required"] == ["topic", "severity"]
    assert detail["additionalProperties"] is False
    notes = s.structured["notes"]
    for what in ("/properties/reason: made required and nullable", "/properties/detail: made required and nullable",
                 "/properties/detail/properties/severity: made required and nullable",
                 "/additionalProperties: set to false"):
        assert f"strict: {what}" in notes
    values = outputs(tmp_path / "out")
    reasons = [v["reason"] for v in values]
    assert None in reasons and any(isinstance(r, str) for r in reasons)  # strict "absent" is a null
    assert any(v["detail"] is None for v in values) and any(v["detail"] for v in values)
    assert_typed_and_valid(tmp_path / "out", OPTIONAL)


# ---------------------------------------------------------------------------------------------------
# 4. Bad content


def failures(out: Path) -> list[dict[str, Any]]:
    return pl.read_parquet(out / "failures.parquet").to_dicts()


@pytest.mark.parametrize("fault,reason,attempts", [
    ("schema_invalid", "schema", 3), ("refusal", "refusal", 3), ("empty", "empty", 3), ("length", "length", 1),
])
def test_bad_content_fails_with_reason_and_raw_content(tmp_path: Path, fault: str, reason: str,
                                                       attempts: int) -> None:
    s = pipeline.run(job(tmp_path, 2, sim={"fault_plan": [{"requests": "*", "fault": fault}]},
                         limits={"max_concurrency": 1}))
    assert (s.exit_code, s.failed, s.requests_sent) == (1, 2, 2 * attempts)
    # Every attempt but the last of each row was a retry; the last is the failure.
    assert s.retries == ({"bad_content": 2 * (attempts - 1)} if attempts > 1 else {})
    for row in failures(tmp_path / "out"):
        assert (row["error_class"], row["attempts"]) == ("bad_content", attempts)
        assert row["message"].startswith(f"{reason}: ")
        assert row["content"] is not None
    raw = failures(tmp_path / "out")[0]["content"]
    if fault == "refusal":
        assert raw.startswith("I'm sorry")
    elif fault == "length":
        with pytest.raises(json.JSONDecodeError):
            json.loads(raw)  # the truncated JSON, kept as it came
    elif fault == "schema_invalid":
        assert isinstance(json.loads(raw), dict)


def test_not_json_is_bad_content_with_the_raw_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Scripted(lambda body: completion({"content": "Sure! The review is positive."}))
    s = run_scripted(job(tmp_path, 1, structured={"mode": "json_object"}), fake, monkeypatch)
    assert (s.failed, s.requests_sent) == (1, 3)
    [row] = failures(tmp_path / "out")
    assert row["message"].startswith("not_json: ") and row["content"] == "Sure! The review is positive."


def test_length_retries_once_with_the_raised_max_tokens_on_the_wire(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # max_tokens too small for the answer: the simulator cuts it off (finish_reason: length).
    with simulator(monkeypatch) as (thread, endpoint):
        s = pipeline.run(job(tmp_path, 3, endpoint=endpoint, params={"max_tokens": 6},
                             structured={"length_max_tokens": 400}, limits={"max_concurrency": 1}))
        sent = [e["body"] for e in wire(thread)]
    assert (s.exit_code, s.succeeded, s.requests_sent) == (0, 3, 6)
    assert [b["max_tokens"] for b in sent] == [6, 400] * 3
    for short, raised in zip(sent[::2], sent[1::2]):
        assert {**short, "max_tokens": 400} == raised  # nothing else changed
    assert pl.read_parquet(tmp_path / "out" / "results.parquet")["attempts"].to_list() == [2, 2, 2]


@pytest.mark.parametrize("raise_to", [None, 6])
def test_length_without_a_higher_max_tokens_is_not_retried(tmp_path: Path, raise_to: int | None) -> None:
    s = pipeline.run(job(tmp_path, 3, params={"max_tokens": 6}, structured={"length_max_tokens": raise_to}))
    assert (s.failed, s.requests_sent) == (3, 3)  # the same truncation is never paid for twice


def test_length_twice_fails_after_one_raise(tmp_path: Path) -> None:
    # No answer to the schema fits in 5 tokens (the shortest is ~31 characters).
    s = pipeline.run(job(tmp_path, 2, params={"max_tokens": 3}, structured={"length_max_tokens": 5}))
    assert (s.failed, s.requests_sent) == (2, 4)
    assert {r["attempts"] for r in failures(tmp_path / "out")} == {2}


@pytest.mark.parametrize("plan,budget,ok,attempts", [
    ([("1-6", "503"), ("7-8", "schema_invalid")], 2, True, 9),   # 6 transient retries + 2 bad: both within
    ([("1-6", "503"), ("7-9", "schema_invalid")], 2, False, 9),  # the third bad answer ends it
    ([("1", "schema_invalid")], 0, False, 1),                    # structured.bad_content_retries: 0
])
def test_bad_content_budget_is_separate_from_transient_retries(
        tmp_path: Path, plan: list[tuple[str, str]], budget: int, ok: bool, attempts: int) -> None:
    rules = [{"requests": r, "fault": f} for r, f in plan]
    s = pipeline.run(job(tmp_path, 1, sim={"fault_plan": rules}, limits={"max_retries": 6},
                         structured={"bad_content_retries": budget}))
    assert (s.succeeded, s.requests_sent) == (int(ok), attempts)
    table = pl.read_parquet(tmp_path / "out" / ("results.parquet" if ok else "failures.parquet"))
    assert table["attempts"].to_list() == [attempts]


# ---------------------------------------------------------------------------------------------------
# 5. Typed columns: a schema table through a real run, Parquet and polars


RICH = {
    "type": "object",
    "$defs": {"Aspect": {"type": "object", "properties": {
        "name": {"type": "string"}, "polarity": {"enum": ["pos", "neg", "neutral"]},
        "confidence": {"type": ["number", "null"]}}, "required": ["name", "polarity"]}},
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]},         # enum
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": ["string", "null"]},                                           # nullable
        "aspects": {"type": "array", "items": {"$ref": "#/$defs/Aspect"}},                 # objects in arrays, $ref
        "shipping": {"type": "object", "properties": {"late": {"type": "boolean"}, "days": {"type": "integer"}},
                     "required": ["late"]},                                                # nested object
        "value": {"anyOf": [{"type": "string"}, {"type": "integer"}]},                     # union -> JSON text
        "labels": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}},
        "model": {"type": "string"},                                                       # one of our columns
    },
    "required": ["sentiment", "score", "aspects", "shipping", "value"],
}
EXPECTED_DTYPES = {
    "sentiment": pl.Categorical, "output_score": pl.Int64, "summary": pl.String,
    "aspects": pl.List(pl.Struct({"name": pl.String, "polarity": pl.Categorical, "confidence": pl.Float64})),
    "shipping": pl.Struct({"late": pl.Boolean, "days": pl.Int64}), "value": pl.String,
    "labels": pl.List(pl.Categorical), "output_model": pl.String,
}


def write_colliding_input(path: Path, n: int) -> None:
    """Input columns named like an output field (score) and like our own columns (content, model, tool_calls)."""
    path.write_text("".join(json.dumps({"rid": f"r{i:03d}", "text": f"review {i}", "score": i % 5, "content": f"in-{i}",
                                        "model": "input-model", "tool_calls": "none"}) + "\n" for i in range(n)))


@pytest.mark.parametrize("model,mode,strict", [("openai/gpt-4o", "json_schema", True),
                                               ("openai/gpt-4o", "json_schema", False),
                                               ("openai/gpt-4-turbo", "tool", True),
                                               ("openai/gpt-4-turbo", "json_object", True)])
def test_schema_table_lands_as_typed_columns(tmp_path: Path, model: str, mode: str, strict: bool) -> None:
    write_colliding_input(tmp_path / "in.jsonl", 24)
    cfg = job(tmp_path, endpoint={"model": model}, structured={"schema": RICH, "mode": mode, "strict": strict})
    cfg["input"].update(columns=["score", "content", "model", "tool_calls"], batch_size=7)  # several parts
    s = pipeline.run(cfg)
    assert (s.exit_code, s.succeeded) == (0, 24)
    out = tmp_path / "out"
    assert_typed_and_valid(out, RICH)
    res = pl.read_parquet(out / "results.parquet")
    # results.parquet keeps the input columns; carried ones named like ours get an "input." prefix.
    assert {"rid", "score", "input.content", "input.model", "input.tool_calls"} <= set(res.columns)
    assert res["input.model"].unique().to_list() == ["input-model"] and res["model"][0] == model
    df = pipeline.load(out)
    for name, dtype in EXPECTED_DTYPES.items():
        assert df.schema[name] == dtype, name
    assert df["score"].to_list() == [i % 5 for i in range(24)]  # the input's score, untouched
    assert df["output_score"].is_between(1, 5).all()
    for row, raw in zip(df.iter_rows(named=True), res["content"]):
        answer = json.loads(raw)
        assert row["sentiment"] == answer["sentiment"] and row["output_score"] == answer["score"]
        assert json.loads(row["value"]) == answer["value"]  # the union kept as JSON text, never guessed
        assert row["summary"] == answer.get("summary")
        assert row["aspects"] == [{"confidence": None, **a} for a in answer["aspects"]]
        assert row["shipping"] == {"days": None, **answer["shipping"]}
    assert df.group_by("sentiment").len()["len"].sum() == 24


def test_load_options_include_failures_and_keep_the_struct(tmp_path: Path) -> None:
    s = pipeline.run(job(tmp_path, 6, sim={"fault_plan": [{"requests": "2", "fault": "422"}]},
                         limits={"max_concurrency": 1}))
    assert (s.succeeded, s.failed) == (5, 1)
    df = pipeline.load(tmp_path / "out")
    assert df.height == 5 and "error_class" not in df.columns and df.schema["sentiment"] == pl.Categorical
    both = pipeline.load(tmp_path / "out", include_failures=True)
    assert both.height == 6 and both.filter(pl.col("error_class") == "permanent")["sentiment"].to_list() == [None]
    nested = pipeline.load(tmp_path / "out", unnest=False)
    assert isinstance(nested.schema["output"], pl.Struct)


# ---------------------------------------------------------------------------------------------------
# 6. Notebook use


class Polarity(str, Enum):  # noqa: UP042 - the (str, Enum) mix users write is what is tested
    positive = "positive"
    negative = "negative"


class Aspect(BaseModel):
    name: str
    polarity: Polarity


class Review(BaseModel):
    sentiment: Literal["positive", "negative", "mixed"]
    aspects: list[Aspect]
    summary: str | None = None


def test_run_with_a_pydantic_schema_and_load(tmp_path: Path) -> None:
    cfg = job(tmp_path, 10, endpoint={"model": "openai/gpt-4o"})
    del cfg["structured"]
    s = pipeline.run(cfg, schema=Review)
    assert (s.exit_code, s.succeeded, s.structured["mode"]) == (0, 10, "json_schema")
    df = pipeline.load(s.out_dir)
    assert df.schema["sentiment"] == pl.Categorical and df.schema["summary"] == pl.String
    assert df.schema["aspects"] == pl.List(pl.Struct({"name": pl.String, "polarity": pl.Categorical}))
    for row in df.iter_rows(named=True):
        Review.model_validate({k: row[k] for k in ("sentiment", "aspects", "summary")})


def test_a_changed_pydantic_schema_is_a_different_job(tmp_path: Path) -> None:
    class Shorter(BaseModel):
        sentiment: Literal["positive", "negative"]

    cfg = job(tmp_path, 4)  # has a structured section: the schema argument must still reach the fingerprint
    assert pipeline.run(cfg, schema=Review).succeeded == 4
    with pytest.raises(JobChangedError):
        pipeline.run(cfg, schema=Shorter)


def test_run_with_a_schema_inside_a_running_event_loop(tmp_path: Path) -> None:
    async def notebook_cell() -> pipeline.Summary:
        return pipeline.run(job(tmp_path, 5), schema=Review)

    s = asyncio.run(notebook_cell())
    assert (s.succeeded, pipeline.load(s.out_dir).schema["sentiment"]) == (5, pl.Categorical)


def test_notebook_doc_example_runs(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = (repo / "docs" / "notebook.md").read_text()
    code = "\n".join(block.split("\n", 1)[1] for block in doc.split("```")[1::2] if block.startswith("python"))
    monkeypatch.chdir(repo)
    code = code.replace('"data/out/notebook"', repr(str(tmp_path / "nb")))
    namespace: dict[str, Any] = {"__name__": "notebook"}
    # dont_inherit: this module's `from __future__ import annotations` would hide the types from pydantic.
    exec(compile(code, "docs/notebook.md", "exec", dont_inherit=True), namespace)  # noqa: S102 - our own docs
    assert namespace["summary"].exit_code == 0 and namespace["by_sentiment"].height >= 2


# ---------------------------------------------------------------------------------------------------
# 7. Beyond the text: logprobs and the user's own tools


def test_logprobs_land_as_a_list_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = [{"token": "{", "logprob": -0.01, "bytes": [123],
               "top_logprobs": [{"token": "{", "logprob": -0.01, "bytes": [123]},
                                {"token": "```", "logprob": -4.6, "bytes": None}]}]
    fake = Scripted(lambda body: completion({"content": json.dumps(GOOD)}, logprobs={"content": tokens}))
    s = run_scripted(job(tmp_path, 3, params={"logprobs": True, "top_logprobs": 2}), fake, monkeypatch)
    assert s.succeeded == 3
    assert all(b["logprobs"] is True and b["top_logprobs"] == 2 for b in fake.bodies)
    df = pipeline.load(tmp_path / "out")
    assert df.schema["logprobs"] == pl.List(pl.Struct({
        "token": pl.String, "logprob": pl.Float64,
        "top_logprobs": pl.List(pl.Struct({"token": pl.String, "logprob": pl.Float64}))}))
    first = df["logprobs"][0].to_list()
    assert first[0]["token"] == "{" and [t["logprob"] for t in first[0]["top_logprobs"]] == [-0.01, -4.6]
    assert df["sentiment"].to_list() == ["positive"] * 3


LOOKUP = {"type": "function", "function": {"name": "lookup_order", "description": "Find an order.",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


def test_user_tools_land_as_a_tool_calls_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without a schema, against the simulator: the model calls the user's tool. The input also has a
    # tool_calls column, carried as input.tool_calls next to ours.
    write_colliding_input(tmp_path / "in.jsonl", 4)
    cfg = job(tmp_path, params={"tools": [LOOKUP]})
    cfg["input"]["columns"] = ["tool_calls"]
    cfg["structured"] = None
    s = pipeline.run(cfg)
    assert s.succeeded == 4
    res = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert res["input.tool_calls"].to_list() == ["none"] * 4
    assert all(json.loads(c)[0]["function"]["name"] == "lookup_order" for c in res["tool_calls"])

    # With a schema in json_schema mode: the output and the calls side by side.
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    call = {"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"q": "A1"}'}}
    both = Scripted(lambda body: completion({"content": json.dumps(GOOD), "tool_calls": [call]}))
    s = run_scripted(job(tmp_path / "b", 2, endpoint={"model": "gpt-4o"}, params={"tools": [LOOKUP]},
                         output={"dir": str(tmp_path / "b" / "out")}), both, monkeypatch)
    assert s.succeeded == 2 and both.bodies[0]["response_format"]["type"] == "json_schema"
    assert both.bodies[0]["tools"] == [LOOKUP]
    df = pipeline.load(tmp_path / "b" / "out")
    assert df["sentiment"].to_list() == ["positive"] * 2
    assert [json.loads(c) for c in df["tool_calls"]] == [[call]] * 2

    # A tool call instead of the JSON answer: bad content, with the calls kept as the raw content.
    only = Scripted(lambda body: completion({"tool_calls": [call]}, finish="tool_calls"))
    s = run_scripted(job(tmp_path / "c", 1, endpoint={"model": "gpt-4o"}, params={"tools": [LOOKUP]},
                         output={"dir": str(tmp_path / "c" / "out")}), only, monkeypatch)
    [row] = failures(tmp_path / "c" / "out")
    assert row["message"].startswith("tool_call: the model called lookup_order")
    assert json.loads(row["content"]) == [call]


# ---------------------------------------------------------------------------------------------------
# 8. The nested demo config


@pytest.mark.parametrize("model,mode", [("openai/gpt-4o", "json_schema"), ("openai/gpt-4-turbo", "tool")])
def test_nested_demo_config_produces_a_typed_struct(tmp_path: Path, repo: Path, model: str, mode: str) -> None:
    out = tmp_path / "nested"
    p = cli_in_process("run", str(repo / "configs/nested-demo.yaml"), "-q", "--set", f"output.dir={out}",
                       "--set", "endpoint.simulator.latency_ms=0", "--set", f"endpoint.model={model}", cwd=repo)
    assert p.returncode == 0, p.stderr
    schema = json.loads((repo / "configs/schemas/review-nested.json").read_text())
    assert_typed_and_valid(out, schema)
    assert json.loads((out / "summary.json").read_text())["structured"]["mode"] == mode
    df = pipeline.load(out)
    assert df.height == 240 and {"review_id", "product", "stars", "sentiment", "aspects", "purchase"} <= set(df.columns)
    assert df.schema["aspects"] == pl.List(pl.Struct({"aspect": pl.Categorical, "polarity": pl.Categorical,
                                                      "quote": pl.String}))
    assert df.schema["purchase"] == pl.Struct({"purpose": pl.Categorical, "would_buy_again": pl.Boolean})
    assert df["purchase"].struct.field("purpose").null_count() > 0  # nullable enum: some nulls, typed
