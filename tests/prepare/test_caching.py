"""Prompt caching hints: shared text first and marked where it ends, row content last and never marked;
the hints change no request key."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.config import Config, load_config
from pipeline.prepare import caching
from pipeline.prepare.prompts import Renderer
from pipeline.prepare.request import RequestBuilder, request_key
from pipeline.prepare.structured import plan_for
from tests.conftest import SCHEMA

ORIGIN = ("in.jsonl", 0)
INSTRUCTIONS = "Label the sentiment of the review. Examples: 'great' -> positive; 'awful' -> negative.\n\n"
ROW = "the hinge broke after a week"


def cfg(model: str, *, base_url: str = "https://openrouter.ai/api/v1", cache: str = "auto", system: str | None = None,
        user: str = INSTRUCTIONS + "Review: {{ text }}", structured: bool = True, **prompt: Any) -> Config:
    data: dict[str, Any] = {
        "input": {"path": "in.jsonl"}, "output": {"dir": "out"},
        "endpoint": {"base_url": base_url, "model": model},
        "prompt": {"user": user, "cache": cache, **({"system": system} if system else {}), **prompt},
        "params": {"max_tokens": 20},
    }
    if structured:
        data["structured"] = {"schema": SCHEMA}
    return load_config(data)


def built(c: Config, text: str = ROW) -> dict[str, Any]:
    renderer = Renderer(c)
    request = RequestBuilder(c.endpoint.base_url, plan_for(c), renderer.tokens).build(renderer.render({"text": text},
                                                                                                     ORIGIN))
    return dict(orjson.loads(request.payload))


def marks(value: Any, path: str = "") -> list[str]:
    """Where cache_control appears in a body (JSON paths)."""
    found = []
    if isinstance(value, dict):
        if "cache_control" in value:
            found.append(path)
        for k, v in value.items():
            found += marks(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += marks(v, f"{path}[{i}]")
    return found


@pytest.mark.parametrize("model", ["anthropic/claude-3.5-sonnet", "google/gemini-2.5-flash"])
def test_breakpoint_models_mark_the_end_of_the_shared_part_and_never_row_content(model: str) -> None:
    body = built(cfg(model, system="You label reviews."))
    assert marks(body) == [".messages[1].content[0]"]
    shared, row = body["messages"][1]["content"]
    assert shared == {"type": "text", "text": INSTRUCTIONS + "Review: ", "cache_control": {"type": "ephemeral"}}
    assert row == {"type": "text", "text": ROW}  # the row's own text comes last, unmarked
    assert body["messages"][0] == {"role": "system", "content": "You label reviews."}  # before the mark: cached too
    assert "prompt_cache_key" not in body
    # Every row's request has the same bytes up to and including the mark.
    other = built(cfg(model, system="You label reviews."), "a completely different review")
    assert other["messages"][:1] == body["messages"][:1] and other["messages"][1]["content"][0] == shared


def test_a_user_template_that_starts_with_the_row_marks_the_fixed_system_prompt() -> None:
    body = built(cfg("anthropic/claude-3.5-sonnet", system="You label reviews. " * 20, user="{{ text }}"))
    assert marks(body) == [".messages[0].content[0]"]
    assert body["messages"][1]["content"] == ROW


def test_nothing_shared_nothing_marked_and_the_dry_run_says_why(tmp_path: Path) -> None:
    c = cfg("anthropic/claude-3.5-sonnet", system="Row {{ text }} first", user="{{ text }}" + " fixed" * 100)
    assert marks(built(c)) == []
    notes = Renderer(c).cache_notes()
    assert any("prompt.user puts row content before 600 characters of fixed text" in n for n in notes)
    assert any("prompt.system uses row values" in n for n in notes)


def test_images_stay_after_the_mark(tmp_path: Path) -> None:
    c = cfg("anthropic/claude-3.5-sonnet", images=["photo"])
    renderer = Renderer(c)
    row = {"text": ROW, "photo": "https://example.org/a.png"}
    body = renderer.render(row, (str(tmp_path / "in.jsonl"), 0)).body
    parts = body["messages"][-1]["content"]
    assert [("cache_control" in p, p["type"]) for p in parts] == [(True, "text"), (False, "text"), (False, "image_url")]


def test_openai_models_get_one_prompt_cache_key_per_job_where_the_endpoint_takes_it() -> None:
    a, b = built(cfg("openai/gpt-4o-mini")), built(cfg("openai/gpt-4o-mini"), "another row")
    assert a["prompt_cache_key"] == b["prompt_cache_key"] == \
        f"pipeline-{cfg('openai/gpt-4o-mini').request_fingerprint()}"
    assert marks(a) == [] and a["messages"][-1]["content"] == INSTRUCTIONS + "Review: " + ROW
    # A server that may not know the field (vLLM, llama.cpp on loopback) does not get it.
    assert "prompt_cache_key" not in built(cfg("openai/gpt-4o-mini", base_url="http://127.0.0.1:8080/v1"))
    assert "prompt_cache_key" not in built(cfg("openai/gpt-4o-mini", cache="off"))
    assert "prompt_cache_key" in built(cfg("gpt-4o-mini", base_url="https://api.openai.com/v1"))


@pytest.mark.parametrize("model", ["anthropic/claude-3.5-sonnet", "openai/gpt-4o-mini"])
@pytest.mark.parametrize("system", [None, "You label reviews."])
def test_the_hints_change_no_request_key(model: str, system: str | None) -> None:
    on, off = cfg(model, system=system), cfg(model, system=system, cache="off")
    assert on.request_fingerprint() == off.request_fingerprint()  # not part of the job's identity either
    keys = []
    for c in (on, off):
        renderer = Renderer(c)
        keys.append(RequestBuilder(c.endpoint.base_url, plan_for(c), renderer.tokens)
                    .build(renderer.render({"text": ROW}, ORIGIN)).key)
    assert keys[0] == keys[1]
    body = built(on)
    assert request_key(body, on.endpoint.base_url) == keys[0]  # the body as sent proves its key
    assert caching.plain(body) == built(off)


def test_a_different_question_is_still_a_different_key() -> None:
    c = cfg("anthropic/claude-3.5-sonnet", system="You label reviews.")
    body = built(c)
    shared, row = body["messages"][1]["content"]
    changed = {**body, "messages": [body["messages"][0], {**body["messages"][1], "content": [
        {**shared, "text": INSTRUCTIONS}, row]}]}
    assert request_key(changed, "x") != request_key(body, "x")
    # Where the mark sits does not change the question (the text is the same): the same key.
    moved = {**body, "messages": [body["messages"][0], {**body["messages"][1], "content": [
        {**shared, "text": INSTRUCTIONS}, {"type": "text", "text": "Review: " + ROW}]}]}
    assert request_key(moved, "x") == request_key(body, "x")
    assert request_key({**body, "prompt_cache_key": "other"}, "x") == request_key(body, "x")


def test_json_object_shaping_keeps_the_shared_part_first() -> None:
    c = load_config({"input": {"path": "in.jsonl"}, "output": {"dir": "out"},
                     "endpoint": {"model": "anthropic/claude-3.5-sonnet"},
                     "prompt": {"system": "You label reviews.", "user": INSTRUCTIONS + "{{ text }}"},
                     "structured": {"schema": SCHEMA, "mode": "json_object"}})
    body = built(c)
    assert marks(body) == [".messages[1].content[0]"]
    assert "JSON Schema" in body["messages"][0]["content"]  # the instruction sits in the (shared) system prompt
    assert body["messages"][1]["content"][-1] == {"type": "text", "text": ROW}


def test_the_builder_counts_the_shared_prefix() -> None:
    c = cfg("openai/gpt-4o-mini", system="You label reviews.")
    renderer = Renderer(c)
    builder = RequestBuilder(c.endpoint.base_url, plan_for(c), renderer.tokens)
    request = builder.build(renderer.render({"text": ROW * 10}, ORIGIN))
    shared = builder.shared_prefix
    assert shared is not None and 0 < shared < request.est_prompt
    row_only = renderer.tokens.text(ROW * 10)
    assert request.est_prompt - shared == pytest.approx(row_only, abs=4)
