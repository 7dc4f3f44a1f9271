"""End-to-end tests of the simulator over real loopback HTTP (aiohttp client, no mocks)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest
from PIL import Image

from pipeline_simulator import (
    FaultRule,
    Price,
    SimConfig,
    Simulator,
    SimulatorThread,
    add_arguments,
    config_from_args,
)
from tests.simclient import serve

KEY = "sk-test-secret-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCHEMA = {"type": "object",
          "properties": {"label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                         "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                         "aspects": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                         "summary": {"type": ["string", "null"]}},
          "required": ["label", "stars", "aspects", "summary"], "additionalProperties": False}
ROOT = Path(__file__).resolve().parents[2]


def body(text: str = "The battery died after a week.", model: str = "openai/gpt-4o", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "system", "content": "Classify the review."},
                                         {"role": "user", "content": text}], **extra}


def schema_body(text: str = "Great screen.", strict: bool = True, **extra: Any) -> dict[str, Any]:
    fmt = {"type": "json_schema", "json_schema": {"name": "review", "strict": strict, "schema": SCHEMA}}
    return body(text, response_format=fmt, **extra)




async def post(session: aiohttp.ClientSession, url: str, payload: Any, headers: dict[str, str] | None = AUTH,
               path: str = "/chat/completions") -> tuple[int, Any, Any]:
    async with session.post(url + path, data=orjson.dumps(payload), headers=headers) as resp:
        raw = await resp.read()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = raw
        return resp.status, data, resp.headers


def content_of(data: dict[str, Any]) -> Any:
    return data["choices"][0]["message"]["content"]


# -- routes, auth, shapes --------------------------------------------------------------------------

def test_both_routes_and_base_url() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        assert url.endswith("/api/v1")
        root = url[: -len("/api/v1")]
        for prefix in ("/api/v1", "/v1"):
            status, data, _ = await post(s, root + prefix, body())
            assert status == 200 and data["object"] == "chat.completion"
        assert sim.stats["by_status"] == {"200": 2}
    serve(SimConfig(), check)

    async def openai_root(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url)
    serve(SimConfig(flavor="openai"), openai_root)


def test_start_rejects_non_loopback_host() -> None:
    with pytest.raises(ValueError):
        asyncio.run(Simulator().start(host="0.0.0.0"))


@pytest.mark.parametrize("flavor", ["openrouter", "openai", "vllm", "llamacpp"])
def test_auth_failures_per_flavor(flavor: str) -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
            status, data, _ = await post(s, url, body(), headers)
            assert status == 401
            if flavor == "vllm":
                assert data == {"error": "Unauthorized"}
            elif flavor == "openrouter":
                assert data["error"]["code"] == 401 and data["error"]["message"] in ("No auth credentials found",
                                                                                      "User not found.")
                assert "user_id" in data
            elif flavor == "openai":
                assert set(data["error"]) == {"message", "type", "param", "code"}
            else:
                assert data["error"]["code"] == 401 and data["error"]["type"] == "authentication_error"
            assert "wrong" not in json.dumps(data)
        status, _, _ = await post(s, url, body(), AUTH)
        assert status == 200
    serve(SimConfig(flavor=flavor, api_key=KEY), check)


def test_any_key_accepted_without_configured_key() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        assert (await post(s, url, body(), {"Authorization": "Bearer anything"}))[0] == 200
        assert (await post(s, url, body(), {"Authorization": "Bearer "}))[0] == 401
    serve(SimConfig(), check)


def test_openrouter_success_shape_and_cost() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, headers = await post(s, url, schema_body(provider={"require_parameters": True},
                                                               transforms=["middle-out"], route="fallback",
                                                               usage={"include": True}, plugins=[], reasoning={},
                                                               models=["a/b"], stream_options={}))
        assert status == 200
        assert data["id"].startswith("gen-") and headers["X-Generation-Id"] == data["id"]
        assert data["provider"] == "OpenAI" and data["model"] == "openai/gpt-4o"
        assert not [h for h in headers if h.lower().startswith("x-ratelimit")]
        choice = data["choices"][0]
        assert choice["native_finish_reason"] == "stop" and choice["message"]["refusal"] is None
        u = data["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        # Each model its own list price: gpt-4o at $2.50 / $10 per million.
        assert u["cost"] == pytest.approx(u["prompt_tokens"] * 2.5e-6 + u["completion_tokens"] * 10e-6)
        assert u["is_byok"] is False and "cached_tokens" in u["prompt_tokens_details"]
        assert "reasoning_tokens" in u["completion_tokens_details"] and "upstream_inference_cost" in u["cost_details"]
        assert sim.stats["cost_usd"] == pytest.approx(u["cost"])
    serve(SimConfig(), check)


def test_openai_shape_and_rate_limit_headers() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, headers = await post(s, url, body(model="gpt-4o"))
        assert status == 200 and data["id"].startswith("chatcmpl-")
        msg = data["choices"][0]["message"]
        assert msg["refusal"] is None and msg["annotations"] == []
        assert data["service_tier"] and data["system_fingerprint"] and "cost" not in data["usage"]
        for kind in ("requests", "tokens"):
            assert headers[f"x-ratelimit-limit-{kind}"].isdigit()
            assert headers[f"x-ratelimit-remaining-{kind}"].isdigit()
            assert re.fullmatch(r"(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)", headers[f"x-ratelimit-reset-{kind}"])
        assert headers["x-ratelimit-limit-requests"] == "100"
        assert headers["x-ratelimit-remaining-requests"] == "99"
        assert headers["x-request-id"].startswith("req_")
        status, _, headers = await post(s, url, body(model="gpt-4o"), {})
        assert status == 401 and "x-ratelimit-limit-requests" in headers
    serve(SimConfig(flavor="openai", rpm=100), check)


def test_vllm_request_id_echo() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        _, _, headers = await post(s, url, body(), {**AUTH, "X-Request-Id": "abc-123"})
        assert headers["X-Request-Id"] == "abc-123"
        _, _, headers = await post(s, url, body())
        assert headers["X-Request-Id"]
    serve(SimConfig(flavor="vllm"), check)


# -- content ---------------------------------------------------------------------------------------

def test_json_schema_content_conforms_and_is_deterministic() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> list[str]:
        out = []
        for i in range(12):
            status, data, _ = await post(s, url, schema_body(f"review number {i}"))
            assert status == 200
            jsonschema.validate(json.loads(content_of(data)), SCHEMA)
            out.append(content_of(data))
        again = await post(s, url, schema_body("review number 3"))
        assert content_of(again[1]) == out[3]
        assert len(set(out)) > 6
        return out
    first = serve(SimConfig(seed=1), check)
    assert serve(SimConfig(seed=1), check) == first
    assert serve(SimConfig(seed=2), check) != first


def test_tool_call_arguments_conform() -> None:
    tool = {"type": "function", "function": {"name": "record_label", "parameters": SCHEMA, "strict": True}}
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        for choice in ({"type": "function", "function": {"name": "record_label"}}, "required"):
            status, data, _ = await post(s, url, body(tools=[tool], tool_choice=choice))
            assert status == 200
            c = data["choices"][0]
            assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None
            call = c["message"]["tool_calls"][0]
            assert call["type"] == "function" and call["function"]["name"] == "record_label" and call["id"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA)
        status, data, _ = await post(s, url, body(tools=[tool], tool_choice={"type": "function",
                                                                            "function": {"name": "nope"}}))
        assert status == 400
    serve(SimConfig(flavor="openai"), check)


def test_json_object_uses_schema_from_prompt() -> None:
    system = "Return JSON matching this schema: " + json.dumps(SCHEMA) + " and nothing else."
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        req = {"model": "openai/gpt-4-turbo", "response_format": {"type": "json_object"},
               "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Nice {product}"}]}
        status, data, _ = await post(s, url, req)
        assert status == 200
        jsonschema.validate(json.loads(content_of(data)), SCHEMA)
        req["messages"] = [{"role": "user", "content": "Answer in json please"}]
        status, data, _ = await post(s, url, req)
        assert status == 200 and isinstance(json.loads(content_of(data)), dict)
    serve(SimConfig(), check)


def test_plain_text_answer() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, _ = await post(s, url, body())
        text = content_of(data)
        assert status == 200 and isinstance(text, str) and text.endswith(".") and len(text.split()) >= 8
        assert data["choices"][0]["finish_reason"] == "stop"
    serve(SimConfig(), check)


def test_length_truncation() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, _ = await post(s, url, schema_body(max_tokens=5))
        assert status == 200
        assert data["choices"][0]["finish_reason"] == "length"
        assert data["usage"]["completion_tokens"] == 5 and len(content_of(data)) == 20
        with pytest.raises(json.JSONDecodeError):
            json.loads(content_of(data))
    serve(SimConfig(), check)


def _png_data_url(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_tokens_in_usage() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        text_only = await post(s, url, {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "describe"}]}]})
        base = text_only[1]["usage"]["prompt_tokens"]
        for image, extra in (({"url": _png_data_url(2048, 4096), "detail": "high"}, 1105),
                             ({"url": "https://example.com/x.jpg"}, 765),
                             ({"url": _png_data_url(1000, 600), "detail": "low"}, 85)):
            status, data, _ = await post(s, url, {"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "describe"}, {"type": "image_url", "image_url": image}]}]})
            assert status == 200 and data["usage"]["prompt_tokens"] == base + extra
    serve(SimConfig(), check)


# -- validation ------------------------------------------------------------------------------------

def test_json_schema_unsupported_on_gpt4_turbo() -> None:
    msg = "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model."
    async def openai(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, _ = await post(s, url, schema_body(model="gpt-4-turbo"))
        assert status == 400 and data["error"]["message"] == msg and data["error"]["param"] == "response_format"
        assert data["error"]["type"] == "invalid_request_error" and data["error"]["code"] is None
    serve(SimConfig(flavor="openai"), openai)

    async def openrouter(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, _ = await post(s, url, schema_body(model="openai/gpt-4-turbo",
                                                         provider={"require_parameters": True}))
        assert status == 404
        assert data["error"] == {"code": 404, "message": "No endpoints found that can handle the requested parameters.",
                                 "metadata": {"error_type": "not_found"}}
        status, data, _ = await post(s, url, schema_body(model="openai/gpt-4-turbo"))
        assert status == 400 and data["error"]["message"] == "Provider returned error"
        assert json.loads(data["error"]["metadata"]["raw"])["error"]["message"] == msg
        assert data["error"]["metadata"]["provider_name"] == "OpenAI"
    serve(SimConfig(), openrouter)


def test_strict_schema_and_json_word_rules() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        loose = {k: v for k, v in SCHEMA.items() if k != "additionalProperties"}
        fmt = {"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": loose}}
        status, data, _ = await post(s, url, body(response_format=fmt))
        assert status == 400
        assert data["error"]["message"] == ("Invalid schema for response_format 'r': In context=(), "
                                            "'additionalProperties' is required to be supplied and to be false.")
        fmt["json_schema"]["strict"] = False
        assert (await post(s, url, body(response_format=fmt)))[0] == 200
        fmt = {"type": "json_schema", "json_schema": {"name": "r", "strict": True,
                                                      "schema": {**SCHEMA, "required": ["label"]}}}
        status, data, _ = await post(s, url, body(response_format=fmt))
        assert status == 400 and "Missing 'stars'" in data["error"]["message"]
        status, data, _ = await post(s, url, {"model": "gpt-4-turbo", "response_format": {"type": "json_object"},
                                              "messages": [{"role": "user", "content": "Classify this."}]})
        assert status == 400 and "must contain the word 'json'" in data["error"]["message"]
        status, _, _ = await post(s, url, {"model": "gpt-4-turbo", "response_format": {"type": "json_object"},
                                           "messages": [{"role": "user", "content": "Reply in JSON."}]})
        assert status == 200
    serve(SimConfig(flavor="openai"), check)


def test_context_and_max_tokens_limits() -> None:
    async def openai(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, _ = await post(s, url, body("word " * 120_000, model="gpt-4o"))
        assert status == 400 and data["error"]["code"] == "context_length_exceeded"
        status, data, _ = await post(s, url, body(model="gpt-4-turbo", max_tokens=5000))
        assert status == 400 and data["error"]["message"].startswith("max_tokens is too large: 5000.")
        assert (await post(s, url, body(model="gpt-4-turbo", max_tokens=4096)))[0] == 200
        status, data, _ = await post(s, url, {"model": "gpt-4o", "messages": []})
        assert status == 400 and data["error"]["param"] == "messages"
        status, data, _ = await post(s, url, {"messages": [{"role": "user", "content": "x"}]})
        assert status == 400
    serve(SimConfig(flavor="openai"), openai)

    async def openrouter(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, _ = await post(s, url, body("word " * 120_000))
        assert status == 400 and data["error"]["metadata"]["error_type"] == "context_length_exceeded"
        async with s.post(url + "/chat/completions", data=b"{not json", headers=AUTH) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == 400
    serve(SimConfig(), openrouter)

    async def llamacpp(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, _ = await post(s, url, body("word " * 120_000))
        assert status == 400 and data["error"]["type"] == "exceed_context_size_error"
        assert data["error"]["n_ctx"] == 128_000
    serve(SimConfig(flavor="llamacpp"), llamacpp)


# -- limits ----------------------------------------------------------------------------------------

def test_rpm_limit_openrouter() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        results = [await post(s, url, body(f"r{i}")) for i in range(5)]
        assert [r[0] for r in results] == [200, 200, 200, 429, 429]
        _, data, headers = results[3]
        assert headers["X-RateLimit-Limit"] == "3" and headers["X-RateLimit-Remaining"] == "0"
        reset_ms = int(headers["X-RateLimit-Reset"])
        assert time.time() * 1000 < reset_ms < (time.time() + 25) * 1000
        assert float(headers["Retry-After"]) > 0
        assert data["error"]["code"] == 429
        assert data["error"]["metadata"]["headers"]["X-RateLimit-Reset"] == headers["X-RateLimit-Reset"]
        assert sim.stats["by_status"] == {"200": 3, "429": 2} and sim.stats["peak_rpm"] == 5
    serve(SimConfig(rpm=3), check)


def test_rpm_and_tpm_limits_openai() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        assert (await post(s, url, body(model="gpt-4o")))[0] == 200
        status, data, headers = await post(s, url, body(model="gpt-4o"))
        assert status == 429 and data["error"]["code"] == "rate_limit_exceeded"
        assert data["error"]["type"] == "requests" and "Please try again in" in data["error"]["message"]
        assert headers["x-ratelimit-remaining-requests"] == "0" and headers["retry-after-ms"].isdigit()
    serve(SimConfig(flavor="openai", rpm=1), check)

    async def tokens(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, _ = await post(s, url, body("x" * 1000, model="gpt-4o"))
        assert status == 429 and data["error"]["message"].startswith("Request too large for gpt-4o")
        assert (await post(s, url, body("short", model="gpt-4o")))[0] == 200
        status, data, _ = await post(s, url, body("short", model="gpt-4o"))
        assert status == 429 and data["error"]["type"] == "tokens"
        assert "Please try again in" in data["error"]["message"]
    serve(SimConfig(flavor="openai", tpm=60), tokens)


def test_credits_run_out_with_402() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        async with s.get(url + "/key", headers=AUTH) as resp:
            key = (await resp.json())["data"]
        assert key["limit"] == 0.002 and key["limit_remaining"] == 0.002 and key["usage"] == 0
        statuses = [(await post(s, url, body(f"review {i}")))[0] for i in range(6)]
        assert 402 in statuses and statuses[0] == 200
        first_402 = statuses.index(402)
        assert all(code == 402 for code in statuses[first_402:])
        async with s.get(url + "/key", headers=AUTH) as resp:
            key = (await resp.json())["data"]
        assert key["limit_remaining"] == 0 and key["usage"] >= 0.002
        status, data, _ = await post(s, url, body())
        assert status == 402 and data["error"]["metadata"]["limit_source"] == "openrouter_credits"
        async with s.get(url + "/key") as resp:
            assert resp.status == 401
    serve(SimConfig(credits_usd=0.002, default_price=Price()), check)  # every model at $10 / $30

    async def afford(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, _ = await post(s, url, body(max_tokens=4000))
        assert status == 402 and "can only afford" in data["error"]["message"]
        assert (await post(s, url, body(max_tokens=50)))[0] == 200
    serve(SimConfig(credits_usd=0.01), afford)


# -- accounting, side endpoints --------------------------------------------------------------------

def test_stats_log_and_reset() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        payloads = [orjson.dumps(body("same")), orjson.dumps(body("same")), orjson.dumps(body("other"))]
        for raw in payloads:
            async with s.post(url + "/chat/completions", data=raw, headers=AUTH) as resp:
                assert resp.status == 200
        await post(s, url, body(), {})
        root = url.rsplit("/api/v1", 1)[0]
        async with s.get(root + "/_sim/stats") as resp:
            stats = await resp.json()
        assert stats == {**sim.stats, "max_concurrency": stats["max_concurrency"]}
        assert stats["requests"] == 4 and stats["by_status"] == {"200": 3, "401": 1}
        served = stats["served_by_body"]
        assert served[hashlib.sha256(payloads[0]).hexdigest()] == 2
        assert served[hashlib.sha256(payloads[2]).hexdigest()] == 1
        assert stats["tokens"]["total"] == stats["tokens"]["prompt"] + stats["tokens"]["completion"] > 0
        async with s.get(root + "/_sim/requests") as resp:
            log = await resp.json()
        assert [e["n"] for e in log] == [1, 2, 3, 4] and [e["status"] for e in log] == [200, 200, 200, 401]
        assert log[0]["headers"]["Authorization"] == "present" and log[3]["headers"]["Authorization"] == "absent"
        assert log[0]["body"]["messages"][1]["content"] == "same"
        assert log[0]["body_sha256"] == hashlib.sha256(payloads[0]).hexdigest()
        assert KEY not in json.dumps(log) and KEY not in json.dumps(sim.log)
        async with s.get(root + "/_sim/requests?since=2&limit=1") as resp:
            assert [e["n"] for e in await resp.json()] == [4]
        async with s.post(root + "/_sim/reset", json={"fault_plan": [{"requests": "1", "fault": "503"}]}) as resp:
            assert resp.status == 200
        assert sim.stats["requests"] == 0
        assert (await post(s, url, body()))[0] == 503
        async with s.post(root + "/_sim/reset", json={"rate_500": 3}) as resp:
            assert resp.status == 400
    serve(SimConfig(), check)


def test_concurrency_latency_and_log_bound() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        start = time.perf_counter()
        results = await asyncio.gather(*(post(s, url, body(f"c{i}")) for i in range(8)))
        elapsed = time.perf_counter() - start
        assert all(r[0] == 200 for r in results)
        assert elapsed >= 0.13  # the latency (150 +- 20 ms) was served...
        assert sim.stats["max_concurrency"] == 8 and sim.stats["in_flight"] == 0  # ...to all 8 at once
        assert len(sim.log) == 5 and sim.log[-1]["n"] == 8
    serve(SimConfig(latency_ms=150, latency_jitter_ms=20, log_limit=5), check)


def test_latency_knobs() -> None:
    from pipeline_simulator.timing import Timing

    def planned(cfg: SimConfig, tokens: int = 10) -> list[float]:
        timing = Timing(cfg, asyncio.Event())
        return [timing.latency(tokens, payload) for payload in (schema_body("a"), schema_body("b"), body("c"))]

    # A new json_schema costs extra once; the same schema again, or none, costs nothing.
    assert planned(SimConfig(new_schema_latency_ms=300)) == pytest.approx([0.3, 0.0, 0.0])
    assert planned(SimConfig(latency_ms=40, latency_tail_prob=1.0,
                             latency_tail_multiplier=4)) == pytest.approx([0.16] * 3)
    assert planned(SimConfig(latency_per_output_token_ms=10), tokens=12) == pytest.approx([0.12] * 3)

    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> list[float]:
        took = []
        for payload in (schema_body("a"), schema_body("b")):
            start = time.perf_counter()
            assert (await post(s, url, payload))[0] == 200
            took.append(time.perf_counter() - start)
        return took
    assert serve(SimConfig(new_schema_latency_ms=300), check)[0] >= 0.3  # and the server waits it out


def test_unknown_routes() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        async with s.get(url + "/chat/completions", headers=AUTH) as resp:
            assert resp.status == 405
        async with s.post(url + "/completions", headers=AUTH) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == 404
        assert sim.stats["requests"] == 0
    serve(SimConfig(), check)


def test_edge_timeout() -> None:
    for flavor, expected in (("openrouter", 524), ("openai", 408)):
        async def check(sim: Simulator, url: str, s: aiohttp.ClientSession, expected: int = expected) -> None:
            status, _, _ = await post(s, url, body())
            assert status == expected
            assert sim.stats["by_fault"] == {"edge_timeout": 1}
        serve(SimConfig(flavor=flavor, latency_ms=400, edge_timeout_s=0.05), check)


def test_generation_endpoint() -> None:
    async def not_ready(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        _, data, _ = await post(s, url, body())
        async with s.get(url + "/generation", params={"id": data["id"]}, headers=AUTH) as resp:
            assert resp.status == 404  # stats are not ready until generation_delay_s has passed

    async def ready(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        _, data, _ = await post(s, url, body())
        async with s.get(url + "/generation", params={"id": data["id"]}, headers=AUTH) as resp:
            gen = (await resp.json())["data"]
        assert gen["id"] == data["id"] and gen["total_cost"] == pytest.approx(data["usage"]["cost"])
        assert gen["tokens_prompt"] == data["usage"]["prompt_tokens"] and gen["streamed"] is False
        assert gen["provider_name"] == "OpenAI" and gen["finish_reason"] == "stop"
    # Two simulators, not one and a sleep: a delay no run reaches, and none at all.
    serve(SimConfig(generation_delay_s=3600), not_ready)
    serve(SimConfig(generation_delay_s=0), ready)


def test_model_fallback_serves_next_model() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, _ = await post(s, url, body(model="openai/gpt-4-turbo",
                                                  models=["openai/gpt-4-turbo", "anthropic/claude-3-haiku"]))
        assert status == 200 and data["model"] == "anthropic/claude-3-haiku"
        status, data, _ = await post(s, url, body(model="openai/gpt-4-turbo"))
        assert status == 502 and data["error"]["message"] == "Provider returned error"
        status, data, _ = await post(s, url, body(model="openai/gpt-4-turbo"))
        assert status == 200 and data["model"] == "openai/gpt-4-turbo"
    serve(SimConfig(fault_plan=[FaultRule(requests="1-2", fault="model_down")]), check)


# -- thread, CLI -----------------------------------------------------------------------------------

def _urllib_post(url: str, payload: Any) -> tuple[int, Any]:
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(payload).encode(),
                                 headers={**AUTH, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_simulator_thread_for_sync_code() -> None:
    with SimulatorThread(SimConfig(flavor="openai", fault_plan=[FaultRule(requests="2", fault="500")])) as thread_url:
        assert thread_url.endswith("/v1")
        assert _urllib_post(thread_url, body())[0] == 200
        status, data = _urllib_post(thread_url, body())
        assert status == 500 and data["error"]["type"] == "server_error"
    thread = SimulatorThread(SimConfig())
    url = thread.start()
    try:
        assert _urllib_post(url, body())[0] == 200
        assert thread.stats()["requests"] == 1 and thread.sim.stats["requests"] == 1
        thread.reset(rate_503=1.0)
        assert _urllib_post(url, body())[0] == 503
    finally:
        thread.stop()


def test_cli_config_from_args(tmp_path: Path) -> None:
    import argparse
    plan = tmp_path / "plan.yaml"
    plan.write_text("- {requests: '2-3', fault: '503', retry_after: 2}\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--flavor", "openai", "--seed", "7", "--latency-ms", "20", "--rate-503", "0.1",
                              "--rate-schema-invalid", "0.05", "--rpm", "100", "--credits-usd", "5",
                              "--fault-plan", str(plan), "--stream-split-writes", "--port", "0"])
    cfg = config_from_args(args)
    assert (cfg.flavor, cfg.seed, cfg.latency_ms, cfg.rate_503, cfg.rate_schema_invalid, cfg.rpm) == \
        ("openai", 7, 20.0, 0.1, 0.05, 100)
    assert cfg.credits_usd == 5 and cfg.stream_split_writes is True and cfg.fault_plan[0].retry_after == 2
    assert args.port == 0 and config_from_args(parser.parse_args([])) == SimConfig()
    settings = tmp_path / "sim.yaml"
    settings.write_text("flavor: vllm\nrate_500: 0.2\nfault_plan:\n  - {requests: '1', fault: reset}\n")
    cfg = config_from_args(parser.parse_args(["--config", str(settings), "--rate-500", "0.1"]))
    assert (cfg.flavor, cfg.rate_500, cfg.fault_plan[0].fault) == ("vllm", 0.1, "reset")
    with pytest.raises(SystemExit):
        parser.parse_args(["--host", "0.0.0.0"])
    with pytest.raises(ValueError, match="fault rates"):
        config_from_args(parser.parse_args(["--rate-500", "0.8", "--rate-502", "0.8"]))


def test_cli_serves_in_subprocess_until_interrupted() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "SIM_KEY": KEY}
    with subprocess.Popen([sys.executable, "-m", "pipeline_simulator", "--port", "0", "--flavor", "openai",
                           "--api-key-env", "SIM_KEY"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url)
            assert _urllib_post(url, body())[0] == 200
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    bad = subprocess.run([sys.executable, "-m", "pipeline_simulator", "--rate-500", "2"], check=False, cwd=ROOT,
                         env=env,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "rate_500" in bad.stderr


def test_zero_latency_answers_every_concurrent_request_without_waiting() -> None:
    """How fast is for benchmarks/latency.py; here: 32 at a time, all answered, and no knob means no sleep."""
    from pipeline_simulator.timing import Timing

    assert Timing(SimConfig(), asyncio.Event()).latency(500, schema_body()) == 0.0

    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        sem = asyncio.Semaphore(32)
        payloads = [orjson.dumps(schema_body(f"row {i}")) for i in range(300)]

        async def one(raw: bytes) -> int:
            async with sem, s.post(url + "/chat/completions", data=raw, headers=AUTH) as resp:
                await resp.read()
                return resp.status
        statuses = await asyncio.gather(*(one(raw) for raw in payloads))
        assert set(statuses) == {200} and sim.stats["requests"] == 300 and sim.stats["in_flight"] == 0
        assert sum(sim.stats["served_by_body"].values()) == 300
    serve(SimConfig(), check)
