"""Every outcome class from real-shaped bodies (docs/wire.md §2 and §3)."""
from __future__ import annotations

import random
import time

import orjson
import pytest

from pipeline.errors import (
    AuthError,
    BadContentError,
    CreditsError,
    PermanentError,
    RateLimited,
    RequestError,
    TransientError,
)
from pipeline.models.headers import retry_after
from pipeline.send.classify import classify
from pipeline.send.retry import Backoff
from pipeline.send.transport import Reply

OK = {"id": "gen-1", "model": "openai/gpt-4-turbo",
      "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}


def reply(status: int, body: object, headers: dict[str, str] | None = None) -> Reply:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return Reply(status, headers or {}, raw, 0.1)


def or_err(code: int, message: str, **metadata: object) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "metadata": metadata}, "user_id": "u1"}


def oa_err(message: str, type_: str, code: str | None) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def test_success_returns_the_body() -> None:
    assert classify(reply(200, OK))["choices"][0]["message"]["content"] == "hi"


CASES: list[tuple[int, object, dict[str, str], type[RequestError]]] = [
    # OpenRouter
    (401, or_err(401, "No auth credentials found"), {}, AuthError),
    (401, or_err(401, "User not found."), {}, AuthError),
    (403, or_err(403, "Key lacks permission"), {}, AuthError),
    (403, or_err(403, "Input flagged", reasons=["violence"], flagged_input="..."), {}, PermanentError),
    (402, or_err(402, "Insufficient credits"), {}, CreditsError),
    (402, or_err(402, "in-flight budget", limit_source="openrouter_in_flight_budget"), {"Retry-After": "3"},
     TransientError),
    (404, or_err(404, "No endpoints found that can handle the requested parameters."), {}, PermanentError),
    (400, or_err(400, "Provider returned error", raw="{...}"), {}, PermanentError),
    (408, or_err(408, "Request timed out"), {}, TransientError),
    (413, or_err(413, "Payload too large"), {}, PermanentError),
    (422, or_err(422, "Unprocessable"), {}, PermanentError),
    (429, or_err(429, "Rate limit exceeded: free-models-per-day"), {}, RateLimited),
    (500, or_err(500, "Internal Server Error"), {}, TransientError),
    (502, or_err(502, "Provider returned error", raw="upstream down", provider_name="OpenAI"), {}, TransientError),
    (503, or_err(503, "No provider available"), {}, TransientError),
    (524, b"<html>cloudflare timeout</html>", {}, TransientError),
    (529, or_err(529, "Provider overloaded"), {}, TransientError),
    # OpenAI
    (429, oa_err("Rate limit reached for gpt-4 in organization org-x on tokens per min (TPM): Limit 10000, Used "
                 "8554, Requested 3082. Please try again in 9.816s.", "tokens", "rate_limit_exceeded"), {},
     RateLimited),
    (429, oa_err("Request too large for gpt-4 in organization org-x on tokens per min (TPM): Limit 30000, "
                 "Requested 31538. The input or output tokens must be reduced.", "tokens", "rate_limit_exceeded"), {},
     PermanentError),
    (429, oa_err("You exceeded your current quota, please check your plan and billing details.", "insufficient_quota",
                 "insufficient_quota"), {}, CreditsError),
    (429, oa_err("Credit balance exhausted", "insufficient_quota", "credit_balance_exhausted"), {}, CreditsError),
    (429, oa_err("Spend limit", "insufficient_quota", "project_spend_limit_exceeded"), {}, CreditsError),
    (400, oa_err("Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
                 "invalid_request_error", None), {}, PermanentError),
    (503, oa_err("The engine is currently overloaded, please try again later", "server_error", None), {},
     TransientError),
    # vLLM / llama.cpp
    (401, {"error": "Unauthorized"}, {}, AuthError),
    (400, {"error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}}, {}, PermanentError),
    (400, {"object": "error", "message": "legacy flat", "type": "BadRequestError", "param": None, "code": 400}, {},
     PermanentError),
    (503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, {}, TransientError),
    # 200s that are not answers
    (200, b"not json at all", {}, TransientError),
    (200, {"error": {"message": "Provider returned error", "code": 429, "metadata": {}}, "user_id": "u"}, {},
     RateLimited),
    (200, {"error": {"message": "Provider returned error", "code": 502}}, {}, TransientError),
    (200, {"id": "x", "choices": None}, {}, BadContentError),  # billed, nothing answered: bad content (issue 19)
    (200, {"id": "x", "choices": [{"message": {"content": "part"}, "finish_reason": "error",
                                   "error": {"code": 502, "message": "disconnect"}}]}, {}, TransientError),
    (200, {"id": "x", "error": {"code": "server_error", "message": "stream died"},
           "choices": [{"message": {"content": ""}, "finish_reason": "error"}]}, {}, TransientError),
    (200, {"id": "x", "error": {"code": "rate_limit_exceeded", "message": "slow"},
           "choices": [{"delta": {}, "finish_reason": "error"}]}, {}, RateLimited),
    (200, {"error": {"message": "upstream", "metadata": {"error_type": "provider_overloaded"}}}, {}, TransientError),
    (200, {"error": "Unauthorized"}, {}, TransientError),
    # the availability variant: no error.code, the HTTP status (or http_status) decides
    (429, {"error": {"message": "Provider capacity exhausted", "error_type": "rate_limit_exceeded", "http_status": 429,
                     "availability": {"code": "capacity_exhausted", "retryable": True, "retry_after": 2}}}, {},
     RateLimited),
    (503, {"error": {"message": "Model temporarily unavailable", "error_type": "provider_overloaded",
                     "http_status": 503,
                     "availability": {"code": "temporarily_unavailable", "retryable": True}}}, {}, TransientError),
    (404, {"error": {"message": "No endpoints", "error_type": "not_found", "http_status": 404,
                     "availability": {"code": "no_endpoints", "retryable": False}}}, {}, PermanentError),
    (200, {"error": {"message": "No endpoints", "http_status": 404, "availability": {"code": "no_endpoints",
                                                                                  "retryable": False}}}, {},
     PermanentError),
    # OpenAI 503 "Slow Down": the request rate is the problem, so the whole client backs off
    (503, oa_err("Slow Down: a sudden increase in your request rate is impacting service reliability.", "server_error",
                 None), {}, RateLimited),
    # OpenRouter 402s: credits (run-fatal), the max_tokens pre-flight (run-fatal), the in-flight budget (wait)
    (402, or_err(402, "This request requires more credits, or fewer max_tokens. You requested up to 4096 tokens, "
                      "but can only afford 812."), {}, CreditsError),
    (402, or_err(402, "Insufficient credits", limit_source="openrouter_in_flight_budget"), {"Retry-After": "2"},
     TransientError),
]


@pytest.mark.parametrize("status,body,headers,expected", CASES)
def test_classification(status: int, body: object, headers: dict[str, str], expected: type[RequestError]) -> None:
    with pytest.raises(RequestError) as info:
        classify(reply(status, body, headers))
    assert type(info.value) is expected, str(info.value)


def test_provider_raw_is_in_the_message() -> None:
    with pytest.raises(PermanentError, match="json_schema not supported"):
        classify(reply(400, or_err(400, "Provider returned error", raw="json_schema not supported")))


def test_retry_after_sources() -> None:
    assert retry_after({"Retry-After": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after({}, None, "Please try again in 9.816s.") == pytest.approx(9.816)
    assert retry_after({}, None, "try again in 120ms") == pytest.approx(0.12)
    reset_ms = str(int((time.time() + 4) * 1000))
    assert retry_after({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset_ms}) == pytest.approx(4, abs=0.5)
    meta = {"metadata": {"headers": {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset_ms}}}
    assert retry_after({}, meta) == pytest.approx(4, abs=0.5)
    oa = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s",
          "x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "1s"}
    assert retry_after(oa) == 360.0
    assert retry_after({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "6m0s"}) is None
    assert retry_after({}, {"availability": {"retry_after": 7}}) == 7.0
    assert retry_after({}) is None


def test_rate_limited_carries_the_wait() -> None:
    with pytest.raises(RateLimited) as info:
        classify(reply(429, or_err(429, "slow down"), {"Retry-After": "5"}))
    assert info.value.retry_after == 5.0


def test_backoff_is_capped_full_jitter_and_honours_the_server() -> None:
    b = Backoff(base_s=1.0, max_s=8.0, rng=random.Random(1))
    delays = [b.delay(n) for n in range(1, 12) for _ in range(50)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert max(b.delay(1) for _ in range(200)) <= 1.0
    assert max(b.delay(10) for _ in range(200)) > 4.0  # capped at 8, jittered over the whole range
    assert 5.0 <= b.delay(1, server_wait=5.0) <= 6.0


def test_error_messages_never_echo_request_headers() -> None:
    with pytest.raises(AuthError) as info:
        classify(reply(401, or_err(401, "No auth credentials found"), {"authorization": "Bearer sk-secret"}))
    assert "sk-secret" not in str(info.value)


def test_openrouter_wrapped_upstream_errors_are_classified_by_the_upstream_body() -> None:
    quota = orjson.dumps({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                                    "param": None, "code": "insufficient_quota"}}).decode()
    with pytest.raises(CreditsError):
        classify(reply(429, or_err(429, "Provider returned error", raw=quota, provider_name="OpenAI")))
    big = orjson.dumps({"error": {"message": "Request too large for gpt-4 on tokens per min (TPM): Limit 30000, "
                                  "Requested 31538.", "type": "tokens", "code": "rate_limit_exceeded"}}).decode()
    with pytest.raises(PermanentError):
        classify(reply(429, or_err(429, "Provider returned error", raw=big)))


def test_402_that_fewer_max_tokens_would_clear_says_so_in_the_next_step() -> None:
    body = or_err(402, "This request requires more credits, or fewer max_tokens. You requested up to 4096 tokens, "
                       "but can only afford 812. To increase, visit https://openrouter.ai/settings/credits")
    with pytest.raises(CreditsError) as info:
        classify(reply(402, body))
    assert "lower params.max_tokens (the key can only afford 812 tokens now)" in info.value.hint
    with pytest.raises(CreditsError) as plain:
        classify(reply(402, or_err(402, "Insufficient credits", limit_source="openrouter_credits")))
    assert plain.value.hint == CreditsError.hint  # the generic next step: add credits


@pytest.mark.parametrize("raw_as", ["string", "object"])
def test_wrapped_quota_and_too_large_never_retry_whatever_the_wrapping(raw_as: str) -> None:
    def wrapped(status: int, upstream: dict[str, object]) -> Reply:
        raw: object = orjson.dumps(upstream).decode() if raw_as == "string" else upstream
        return reply(status, or_err(status, "Provider returned error", raw=raw, provider_name="OpenAI"))

    for code in ("insufficient_quota", "credit_balance_exhausted", "organization_spend_limit_exceeded",
                 "project_spend_limit_exceeded", "organization_usage_limit_exceeded"):
        with pytest.raises(CreditsError):
            classify(wrapped(429, {"error": {"message": "quota", "type": "insufficient_quota", "code": code}}))
        with pytest.raises(CreditsError):
            classify(reply(429, oa_err("quota", "insufficient_quota", code)))
    big = {"error": {"message": "Request too large for gpt-4-turbo in organization org-x on tokens per min (TPM): "
                                "Limit 30000, Requested 31538.", "type": "tokens", "code": "rate_limit_exceeded"}}
    with pytest.raises(PermanentError):
        classify(wrapped(429, big))
    ok_limit = {"error": {"message": "Rate limit reached for gpt-4 on tokens per min (TPM): Limit 10000, Used 9000, "
                                     "Requested 3082. Please try again in 1.5s.", "type": "tokens",
                          "code": "rate_limit_exceeded"}}
    with pytest.raises(RateLimited) as info:
        classify(wrapped(429, ok_limit))
    assert info.value.retry_after == pytest.approx(1.5)


def test_string_codes_mid_stream_map_to_the_status_they_name() -> None:
    def chunk(code: object) -> Reply:
        return reply(200, {"id": "x", "error": {"code": code, "message": "m"},
                           "choices": [{"index": 0, "message": {"content": "par"}, "finish_reason": "error"}]})

    for code, kind in (("server_error", TransientError), (502, TransientError), ("502", TransientError),
                       ("rate_limit_exceeded", RateLimited), ("timeout", TransientError),
                       ("insufficient_quota", CreditsError), ("authentication", AuthError)):
        with pytest.raises(RequestError) as info:
            classify(chunk(code))
        assert type(info.value) is kind, code
