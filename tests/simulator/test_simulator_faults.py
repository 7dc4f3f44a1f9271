"""Injected faults: every scripted fault name, random rates, hangs and resets, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest

from pipeline_simulator import FaultRule, SimConfig, Simulator
from tests.simclient import serve

AUTH = {"Authorization": "Bearer sk-test"}
SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["a", "b"]},
                                           "score": {"type": "number", "minimum": 0, "maximum": 1}},
          "required": ["label", "score"], "additionalProperties": False}
BODY = {"model": "openai/gpt-4o", "max_tokens": 300,
        "messages": [{"role": "system", "content": "Label it."}, {"role": "user", "content": "A fine product."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": SCHEMA}}}



async def post(s: aiohttp.ClientSession, url: str, payload: Any = BODY) -> tuple[int, Any, Any]:
    async with s.post(url + "/chat/completions", data=orjson.dumps(payload), headers=AUTH) as resp:
        raw = await resp.read()
        try:
            return resp.status, orjson.loads(raw), resp.headers
        except orjson.JSONDecodeError:
            return resp.status, raw, resp.headers


async def until(pred: Callable[[], bool], timeout: float = 60) -> None:
    """Wait for what the simulator reports, not for a guessed time (the timeout is a hang guard)."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.005)


def one_fault(flavor: str, fault: str, **rule: Any) -> tuple[int, Any, Any]:
    """Send two requests with the fault scripted on the second; returns the second's outcome."""
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> tuple[int, Any, Any]:
        assert (await post(s, url))[0] == 200
        outcome = await post(s, url)
        assert sim.stats["by_fault"] == {fault: 1}
        return outcome
    return serve(SimConfig(flavor=flavor, fault_plan=[FaultRule(requests="2", fault=fault, **rule)]), check)


STATUS_FAULTS = {"400": 400, "401": 401, "402": 402, "402_afford": 402, "403": 403, "403_key": 403, "404": 404,
                 "408": 408,
                 "413": 413, "422": 422, "429": 429, "429_quota": 429, "429_too_large": 429, "429_capacity": 429,
                 "500": 500, "502": 502, "503": 503, "503_unavailable": 503, "503_slow_down": 503, "504": 504,
                 "524": 524,
                 "529": 529}


@pytest.mark.parametrize("flavor", ["openrouter", "openai", "vllm", "llamacpp"])
@pytest.mark.parametrize("fault", sorted(STATUS_FAULTS))
def test_status_faults_have_flavor_envelopes(flavor: str, fault: str) -> None:
    status, data, _ = one_fault(flavor, fault)
    assert status == STATUS_FAULTS[fault]
    err = data["error"]
    if flavor == "openrouter":
        assert "user_id" in data and isinstance(err["message"], str)
        if fault in ("429_capacity", "503_unavailable"):
            assert "code" not in err and err["http_status"] == status and err["availability"]["retryable"] is True
        else:
            assert err["code"] == status
    elif flavor == "openai":
        assert set(err) == {"message", "type", "param", "code"}
    elif flavor == "vllm":
        assert err == "Unauthorized" if fault == "401" else (err["code"] == status and "type" in err)
    else:
        assert err["code"] == status and isinstance(err["type"], str)


def test_openrouter_fault_details() -> None:
    status, data, headers = one_fault("openrouter", "429", retry_after=2.5)
    assert headers["Retry-After"] == "2.5"
    assert "X-RateLimit-Limit" not in headers  # no platform limit configured: an upstream provider's 429

    async def platform(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        await post(s, url)
        _, data, headers = await post(s, url)
        assert {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(headers)
        assert headers["X-RateLimit-Limit"] == "100" and int(headers["X-RateLimit-Reset"]) > time.time() * 1000
        assert data["error"]["metadata"]["headers"]["X-RateLimit-Remaining"] == headers["X-RateLimit-Remaining"]
    serve(SimConfig(rpm=100, fault_plan=[FaultRule(requests="2", fault="429", retry_after=2.5)]), platform)

    _, data, _ = one_fault("openrouter", "502")
    meta = data["error"]["metadata"]
    assert data["error"]["message"] == "Provider returned error" and meta["provider_name"] == "OpenAI"
    assert json.loads(meta["raw"])["error"]["message"]

    _, data, _ = one_fault("openrouter", "429_quota")
    assert json.loads(data["error"]["metadata"]["raw"])["error"]["code"] == "insufficient_quota"
    _, data, _ = one_fault("openrouter", "429_too_large")
    assert "Request too large" in data["error"]["metadata"]["raw"]

    _, data, headers = one_fault("openrouter", "429_capacity", retry_after=3)
    assert data["error"]["availability"]["code"] == "capacity_exhausted" and headers["Retry-After"] == "3"
    assert data["error"]["availability"]["retry_after"] == 3

    _, data, headers = one_fault("openrouter", "402")
    assert data["error"]["metadata"]["limit_source"] == "openrouter_credits" and "Retry-After" not in headers
    _, data, headers = one_fault("openrouter", "402", retry_after=1)
    assert data["error"]["metadata"]["limit_source"] == "openrouter_in_flight_budget" and headers["Retry-After"] == "1"
    _, data, _ = one_fault("openrouter", "402_afford")
    assert "You requested up to 300 tokens, but can only afford 75" in data["error"]["message"]

    _, data, _ = one_fault("openrouter", "403")
    meta = data["error"]["metadata"]
    assert meta["reasons"] and meta["provider_name"] == "OpenAI" and meta["model_slug"] == "openai/gpt-4o"
    assert meta["flagged_input"] and len(meta["flagged_input"]) <= 100

    status, data, headers = one_fault("openrouter", "503", retry_after=4, message="Overloaded, try later")
    assert status == 503 and headers["Retry-After"] == "4" and data["error"]["message"] == "Overloaded, try later"


def test_openai_fault_details() -> None:
    _, data, headers = one_fault("openai", "429", retry_after=0.25)
    err = data["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
    assert "Please try again in 250ms" in err["message"]
    assert headers["retry-after"] == "0.25" and headers["retry-after-ms"] == "250"
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-request-id"]
    _, data, _ = one_fault("openai", "429_quota")
    assert data["error"]["type"] == "insufficient_quota" and data["error"]["code"] == "insufficient_quota"
    _, data, _ = one_fault("openai", "429_too_large")
    assert data["error"]["message"].startswith("Request too large for openai/gpt-4o")
    assert data["error"]["type"] == "tokens" and data["error"]["code"] == "rate_limit_exceeded"
    _, data, _ = one_fault("openai", "401")
    assert data["error"]["code"] == "invalid_api_key"
    _, data, _ = one_fault("openai", "500")
    assert data["error"]["type"] == "server_error"


@pytest.mark.parametrize("flavor", ["openrouter", "openai"])
def test_body_faults(flavor: str) -> None:
    status, raw, headers = one_fault(flavor, "malformed")
    assert status == 200 and isinstance(raw, bytes) and headers["Content-Type"].startswith("application/json")
    with pytest.raises(ValueError):
        json.loads(raw)

    status, data, _ = one_fault(flavor, "schema_invalid")
    assert status == 200
    content = json.loads(data["choices"][0]["message"]["content"])
    assert not jsonschema.Draft202012Validator(SCHEMA).is_valid(content)

    _, data, _ = one_fault(flavor, "length")
    assert data["choices"][0]["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(data["choices"][0]["message"]["content"])

    _, data, _ = one_fault(flavor, "refusal")
    msg = data["choices"][0]["message"]
    assert msg["content"] is None and msg["refusal"] == "I'm sorry, I can't help with that."

    _, data, _ = one_fault(flavor, "empty")
    assert data["choices"][0]["message"]["content"] == "" and data["choices"][0]["finish_reason"] == "stop"


def test_openrouter_200_with_error() -> None:
    status, data, _ = one_fault("openrouter", "error_200", status=429)
    assert status == 200 and "choices" not in data and data["error"]["code"] == 429

    status, data, _ = one_fault("openrouter", "error_200_partial")
    choice = data["choices"][0]
    assert status == 200 and choice["finish_reason"] == "error" and choice["error"]["code"] == 502
    assert choice["message"]["content"] and data["usage"]["completion_tokens"] > 0


def test_non_stream_truncate_and_reset() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        with pytest.raises(aiohttp.ClientPayloadError):
            await post(s, url)
        with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
            await post(s, url)
        assert (await post(s, url))[0] == 200
        assert sim.stats["by_status"] == {"200": 2, "reset": 1}
        assert sim.stats["by_fault"] == {"stream_truncate": 1, "reset": 1}
    serve(SimConfig(fault_plan=[FaultRule(requests="1", fault="stream_truncate"),
                                FaultRule(requests="2", fault="reset")]), check)


def test_hang_times_out_client_and_stop_is_prompt() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(url + "/chat/completions", json=BODY, headers=AUTH,
                              timeout=aiohttp.ClientTimeout(total=0.3)):
                pass
        assert (await post(s, url))[0] == 200  # the retry is a new arrival, not hung
        await until(lambda: sim.stats["by_status"].get("cancelled") == 1)  # the disconnect ended the handler
        pending = asyncio.create_task(post(s, url))  # arrival 3 hangs too; stop must not wait an hour
        await until(lambda: sim.stats["in_flight"] == 1)
        await asyncio.wait_for(sim.stop(), timeout=60)  # a hang guard, far below the hour
        with pytest.raises(aiohttp.ClientError):
            await pending
    serve(SimConfig(hang_s=3600, fault_plan=[FaultRule(requests="1,3", fault="hang")]), check)


def test_short_hang_then_answers() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        assert (await post(s, url))[0] == 200
        assert time.perf_counter() - started >= 0.2
    serve(SimConfig(hang_s=0.2, rate_hang=1.0), check)


def test_random_rates_are_seeded_and_retries_can_succeed() -> None:
    async def run(sim: Simulator, url: str, s: aiohttp.ClientSession) -> list[int]:
        statuses = [(await post(s, url))[0] for _ in range(60)]
        return statuses
    first = serve(SimConfig(seed=3, rate_503=0.3, rate_500=0.2), run)
    assert serve(SimConfig(seed=3, rate_503=0.3, rate_500=0.2), run) == first
    assert serve(SimConfig(seed=4, rate_503=0.3, rate_500=0.2), run) != first
    assert 10 < first.count(200) < 50 and first.count(503) > 5 and first.count(500) > 3


def test_random_503_carries_retry_after() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, _, headers = await post(s, url)
        assert status == 503 and headers["Retry-After"] == "1.5"
    serve(SimConfig(rate_503=1.0, retry_after_s=1.5), check)


def test_scripted_plan_wins_and_counts() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        statuses = [(await post(s, url))[0] for _ in range(8)]
        assert statuses == [200, 503, 503, 503, 200, 429, 200, 200]
        stats = sim.stats
        assert stats["by_fault"] == {"503": 3, "429": 1} and stats["by_status"]["200"] == 4
        assert sum(stats["served_by_body"].values()) == 4
    serve(SimConfig(fault_plan=[FaultRule(requests="2-4", fault="503"), FaultRule(requests="6", fault="429")]), check)


def test_a_misspelt_fault_is_refused_and_any_other_status_code_is_injected_as_is() -> None:
    with pytest.raises(ValueError, match="unknown fault 'stream_eror'; known: 400, 401, 402"):
        FaultRule(requests="1", fault="stream_eror")

    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, _ = await post(s, url)
        assert status == 418 and data["error"]["code"] == 418
        assert sim.stats["by_fault"] == {"418": 1}
    serve(SimConfig(fault_plan=[FaultRule(requests="1", fault="418")]), check)


def test_slow_down_and_legacy_vllm_bodies_classify_like_the_real_ones() -> None:
    from pipeline.errors import PermanentError, RateLimited, TransientError
    from pipeline.send.classify import classify
    from pipeline.send.transport import Reply

    def classified(flavor: str, fault: str, **cfg: Any) -> type[Exception]:
        async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> type[Exception]:
            async with s.post(url + "/chat/completions", data=orjson.dumps(BODY), headers=AUTH) as resp:
                reply = Reply(resp.status, resp.headers, await resp.read(), 0.0)
            with pytest.raises(Exception) as info:
                classify(reply)
            return type(info.value)
        return serve(SimConfig(flavor=flavor, fault_plan=[FaultRule(requests="1", fault=fault)], **cfg), check)

    _, data, _ = one_fault("openai", "503_slow_down", retry_after=2)
    assert data["error"]["message"].startswith("Slow Down") and data["error"]["type"] == "server_error"
    _, data, headers = one_fault("openrouter", "503_slow_down")
    assert data["error"]["message"] == "Provider returned error" and "Slow Down" in data["error"]["metadata"]["raw"]
    assert classified("openai", "503_slow_down") is RateLimited
    assert classified("openrouter", "503_slow_down") is RateLimited

    status, data, _ = one_fault("vllm", "422")
    assert status == 422 and data["error"]["code"] == 422
    async def legacy(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        status, data, _ = await post(s, url)
        assert status == 400
        assert data == {"object": "error", "message": "Invalid request.", "type": "BadRequestError", "param": None,
                        "code": 400}
    serve(SimConfig(flavor="vllm", vllm_legacy_errors=True, fault_plan=[FaultRule(requests="1", fault="400")]), legacy)
    assert classified("vllm", "400", vllm_legacy_errors=True) is PermanentError
    assert classified("vllm", "503", vllm_legacy_errors=True) is TransientError


def test_quantized_limits_refuse_bursts_beyond_the_quantum() -> None:
    async def check(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        statuses = [(await post(s, url))[0] for _ in range(12)]
        assert statuses[:10] == [200] * 10 and 429 in statuses[10:]  # 600/min quantized to 10 per second
        await asyncio.sleep(0.25)
        assert (await post(s, url))[0] == 200
    serve(SimConfig(rpm=600, limit_burst_s=1.0), check)

    async def openai(sim: Simulator, url: str, s: aiohttp.ClientSession) -> None:
        _, _, headers = await post(s, url)
        assert headers["x-ratelimit-limit-requests"] == "600"
        assert int(headers["x-ratelimit-remaining-requests"]) == 599  # on the minute's scale
    serve(SimConfig(flavor="openai", rpm=600, limit_burst_s=1.0), openai)


def test_injected_openrouter_429_without_an_rpm_has_no_platform_headers() -> None:
    _, data, headers = one_fault("openrouter", "429", retry_after=0.5)
    assert "X-RateLimit-Limit" not in headers and "headers" not in data["error"].get("metadata", {})
