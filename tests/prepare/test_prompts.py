from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, RowError
from pipeline.models.catalog import context_window
from pipeline.prepare.prompts import RenderedRow, Renderer
from pipeline.prepare.request import request_key
from pipeline.vocab import canonical

ORIGIN = ("/data/in.jsonl", 7)


def make_cfg(prompt: dict[str, Any] | None = None, params: dict[str, Any] | None = None, **sections: Any) -> Config:
    raw: dict[str, Any] = {
        "input": {"path": "in.jsonl"},
        "prompt": prompt or {"user": "Review: {{ text }}"},
        "output": {"dir": "out"},
        **sections,
    }
    if params is not None:
        raw["params"] = params
    return load_config(raw)


def render(cfg: Config, row: dict[str, Any], **kw: Any) -> RenderedRow:
    return Renderer(cfg, **kw).render(row, ORIGIN)


def test_body_has_only_configured_params() -> None:
    draft = render(make_cfg(), {"text": "good"})
    # prompt_cache_key: prompt.cache is on by default and an OpenAI model on OpenRouter takes it (one per job).
    assert draft.body == {"model": "openai/gpt-4-turbo", "messages": [{"role": "user", "content": "Review: good"}],
                          "prompt_cache_key": f"pipeline-{make_cfg().request_fingerprint()}"}
    assert draft.max_tokens is None
    cfg = make_cfg({"system": "Be brief.", "user": "{{ text }}"},
                   {"temperature": 0, "max_tokens": 200, "seed": 7, "stop": ["\n"]})
    draft = render(cfg, {"text": "t"})
    assert set(draft.body) == {"model", "messages", "temperature", "max_tokens", "seed", "stop", "prompt_cache_key"}
    assert draft.body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "t"}]
    assert (draft.body["temperature"], draft.max_tokens) == (0, 200)


def test_openrouter_fields_extra_and_logit_bias() -> None:
    cfg = make_cfg(params={
        "models": ["a/b", "c/d"], "provider": {"order": ["openai"], "allow_fallbacks": False},
        "extra": {"transforms": [], "reasoning": {"effort": "low"}}, "logit_bias": {50256: -100},
    })
    body = render(cfg, {"text": "x"}).body
    assert body["models"] == ["a/b", "c/d"]
    assert body["provider"] == {"order": ["openai"], "allow_fallbacks": False}
    assert body["transforms"] == [] and body["reasoning"] == {"effort": "low"}
    assert body["logit_bias"] == {"50256": -100}
    assert "extra" not in body and "from_columns" not in body and "stream" not in body
    canonical(body)  # serializable as is


def test_extra_conflicts_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="params.extra.temperature"):
        Renderer(make_cfg(params={"temperature": 0, "extra": {"temperature": 1}}))
    with pytest.raises(ConfigError, match="endpoint.model"):
        Renderer(make_cfg(params={"extra": {"model": "x"}}))


def test_stream_adds_stream_options() -> None:
    body = render(make_cfg(params={"stream": True}), {"text": "x"}).body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_per_row_params_from_columns() -> None:
    cfg = make_cfg(params={"seed": 1, "from_columns": {"seed": "row_seed", "max_tokens": "budget"}})
    r = Renderer(cfg)
    draft = r.render({"text": "x", "row_seed": 42, "budget": 64.0}, ORIGIN)
    assert (draft.body["seed"], draft.body["max_tokens"], draft.max_tokens) == (42, 64, 64)
    draft = r.render({"text": "x", "row_seed": None, "budget": None}, ORIGIN)
    assert draft.body["seed"] == 1 and "max_tokens" not in draft.body
    with pytest.raises(RowError, match="max_tokens='lots'; it must be an integer"):
        r.render({"text": "x", "row_seed": 1, "budget": "lots"}, ORIGIN)


def test_undefined_and_null_are_row_errors() -> None:
    r = Renderer(make_cfg({"user": "{{ text }} {% if note %}({{ note }}){% endif %}"}))
    with pytest.raises(RowError) as info:
        r.render({"note": "n"}, ORIGIN)
    assert (info.value.file, info.value.row) == ORIGIN and "'text' is undefined" in str(info.value)
    with pytest.raises(RowError, match="null in column 'text'") as info:
        r.render({"text": None, "note": None}, ORIGIN)
    assert (info.value.file, info.value.row) == ORIGIN
    assert r.render({"text": "ok", "note": None}, ORIGIN).body["messages"][0]["content"] == "ok "


@pytest.mark.parametrize("key", ["system", "user"])
def test_template_syntax_error_names_key_and_line(key: str) -> None:
    prompt = {"system": "fine", "user": "fine {{ text }}"}
    prompt[key] = "line one\n{{ text }\n"
    with pytest.raises(ConfigError) as info:
        Renderer(make_cfg(prompt))
    assert info.value.key == f"prompt.{key}" and "line 2" in str(info.value)


def test_check_columns() -> None:
    cfg = make_cfg({"system": "{{ lang }}", "user": "{{ text }}", "images": ["photo"]})
    r = Renderer(cfg)
    r.check_columns(["lang", "text", "photo"])
    with pytest.raises(ConfigError) as info:
        r.check_columns(["text", "photo"])
    assert info.value.key == "prompt.system" and "'lang'" in str(info.value)
    with pytest.raises(ConfigError, match="prompt.images"):
        Renderer(cfg, columns=["lang", "text"])


def test_messages_column() -> None:
    cfg = make_cfg({"system": "Sys", "messages_column": "chat"})
    r = Renderer(cfg)
    chat = [{"role": "user", "content": "hi", "name": None}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "and?"}]
    msgs = r.render({"chat": chat}, ORIGIN).body["messages"]
    assert msgs == [{"role": "system", "content": "Sys"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"}]
    own = [{"role": "system", "content": "Mine"}, {"role": "user", "content": "q"}]
    assert r.render({"chat": orjson.dumps(own).decode()}, ORIGIN).body["messages"] == own
    for bad in (None, [], ["hi"], [{"role": "user"}], [{"role": "user", "content": 5}]):
        with pytest.raises(RowError, match="column 'chat'"):
            r.render({"chat": bad}, ORIGIN)
    both = Renderer(make_cfg({"messages_column": "chat", "user": "Now: {{ q }}"}))
    assert both.render({"chat": own, "q": "x"}, ORIGIN).body["messages"][-1] == {"role": "user", "content": "Now: x"}


def test_images_make_content_parts() -> None:
    cfg = make_cfg({"user": "Describe {{ name }}", "images": ["photo"], "image_detail": "high"})
    draft = render(cfg, {"name": "it", "photo": "https://example.com/a.png"})
    content = draft.body["messages"][-1]["content"]
    assert content == [{"type": "text", "text": "Describe it"},
                       {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}}]
    assert draft.image_tokens == 765
    no_image = render(cfg, {"name": "it", "photo": None})
    assert no_image.body["messages"][-1]["content"] == "Describe it"
    with pytest.raises(RowError) as info:
        render(cfg, {"name": "it", "photo": "nope.png"})
    assert (info.value.file, info.value.row) == ORIGIN and "/data/nope.png" in str(info.value)


def test_images_go_to_last_user_message_of_column() -> None:
    cfg = make_cfg({"messages_column": "chat", "images": ["photo"], "image_detail": "low"})
    chat = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "look"}]
    draft = render(cfg, {"chat": chat, "photo": ["http://a/1.png", "http://a/2.png"]})
    assert draft.body["messages"][0]["content"] == "first"
    parts = draft.body["messages"][2]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    assert draft.image_tokens == 170
    assert chat[2]["content"] == "look"  # the row's own value is not mutated


def test_context_window() -> None:
    assert context_window("openai/gpt-4-turbo") == 128_000
    assert context_window("gpt-4-0613") == 8_192
    assert context_window("some/unknown-model") == 128_000
    cfg = make_cfg(endpoint={"model": "openai/gpt-4"})
    with pytest.raises(RowError, match="context window") as info:
        render(cfg, {"text": "word " * 40_000})
    assert (info.value.file, info.value.row) == ORIGIN


def test_payload_and_key_deterministic_and_sensitive() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    reordered = {"temperature": 0, "messages": [{"content": "x", "role": "user"}], "model": "m"}
    payload, key = canonical(body), request_key(body, "https://a/v1")
    assert (canonical(reordered), request_key(reordered, "https://a/v1")) == (payload, key)
    assert orjson.loads(payload) == body and len(key) == 64
    variants = [
        dict(body, model="n"), dict(body, temperature=0.1), dict(body, seed=1),
        dict(body, messages=[{"role": "user", "content": "y"}]),
        dict(body, messages=[{"role": "system", "content": "x"}]),
    ]
    keys = {request_key(v, "https://a/v1") for v in variants} | {request_key(body, "https://b/v1"), key}
    assert len(keys) == len(variants) + 2


def test_payload_and_key_same_key_in_another_process(tmp_path: Path) -> None:
    code = ("from pipeline.prepare.request import request_key; "
            "print(request_key({'b': [1, {'y': 2, 'x': 1}], 'a': 'é'}, 'https://h'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert out == request_key({"a": "é", "b": [1, {"x": 1, "y": 2}]}, "https://h")
