"""The one classifier: every reply, wherever its error arrived, becomes a body or a `RequestError`.

`classify(reply)` returns the completion body when it is a usable answer and raises a `RequestError`
subclass otherwise (see errors.py for the tree). The rules follow docs/wire.md §3.2: the body decides
before the status does (a 429 can be a quota error that will never clear; a 200 can carry an error).
An error that arrived in the middle of a stream is in the assembled body (`error`) as it would be in a
200's body, so the same code means the same thing however it came: a mid-stream 401 stops the run as
an HTTP 401 does. A stream cut off without its end (`Reply.cut_off`) is transient. A 200 without
choices (or with choices that are not objects) was billed and answered nothing: bad content, with that
class's small retry budget, never the transient budget that would pay for it seven times.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from ..errors import (
    AuthError,
    BadContentError,
    CreditsError,
    PermanentError,
    RateLimited,
    RequestError,
    TransientError,
)
from ..models.headers import retry_after
from .transport import Reply

TRANSIENT_STATUS = frozenset({408, 409, 425, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
QUOTA_CODES = frozenset({
    "insufficient_quota", "credit_balance_exhausted", "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded", "organization_usage_limit_exceeded", "billing_hard_limit_reached",
})
_TOO_LARGE = re.compile(r"request too large|Limit (\d+), Requested (\d+)", re.IGNORECASE)
_AFFORD = re.compile(r"fewer max_tokens|can only afford", re.IGNORECASE)
_AFFORD_N = re.compile(r"can only afford (\d+)", re.IGNORECASE)
_SLOW_DOWN = re.compile(r"\bslow down\b", re.IGNORECASE)
# OpenAI Flex processing without capacity: "429 Resource Unavailable" (not billed). It says nothing about
# our rate, so it is retried with backoff like a 503, never a quota stop or a client-wide slow-down.
_UNAVAILABLE = re.compile(r"resource[ _]unavailable|resource not available", re.IGNORECASE)
# String error codes (OpenRouter's streaming docs, OpenAI's `code`) and OpenRouter's metadata.error_type,
# as the HTTP status they stand for, so a 200 or an SSE event carrying them is classified like one.
NAMED_STATUS = {
    "server_error": 500, "internal_error": 500, "server": 500, "unmapped": 500, "rate_limit_exceeded": 429,
    "insufficient_quota": 429, "timeout": 504, "provider_overloaded": 503, "overloaded": 503,
    "provider_unavailable": 502, "bad_gateway": 502, "service_unavailable": 503, "payment_required": 402,
    "authentication": 401, "invalid_api_key": 401, "permission_denied": 403, "not_found": 404,
    "invalid_request": 400, "invalid_prompt": 400, "context_length_exceeded": 400, "max_tokens_exceeded": 400,
    "token_limit_exceeded": 400, "string_too_long": 400, "payload_too_large": 413, "unprocessable": 422,
}


def classify(reply: Reply) -> dict[str, Any]:
    """The completion body if the reply is a usable answer; otherwise raise what kind of failure it is."""
    try:
        body = orjson.loads(reply.body) if reply.body else None
    except orjson.JSONDecodeError:
        body = None
    if reply.status == 200:
        if not isinstance(body, dict):
            raise TransientError("HTTP 200 with a body that is not JSON", status=200, code="malformed")
        return _answer(body, reply)
    err = body.get("error") if isinstance(body, dict) else None
    if err is None and isinstance(body, dict) and body.get("object") == "error":
        err = body  # legacy flat vLLM body
    if err is None:
        text = reply.body[:200].decode("utf-8", "replace").strip()
        err = {"message": text or f"HTTP {reply.status} with an empty body"}
    elif isinstance(err, str):
        err = {"message": err}  # vLLM: {"error": "Unauthorized"}
    raise _from_error(reply.status, err, reply.headers, in_body=False)


def _answer(body: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """A 200's body (or an assembled stream): the answer, or the error it carries."""
    err: Any = body.get("error")
    if isinstance(err, str):
        err = {"message": err}
    choices = body.get("choices")
    where = "error in the middle of the stream: " if reply.stream else ""
    if err and not choices:
        raise _billed(_from_error(_status_of(err, 502), err, reply.headers, in_body=True, where=where), body)
    if reply.cut_off:
        raise _billed(TransientError("the stream ended without a finish_reason or [DONE] (cut off)",
                                     code="stream_truncated"), body)
    if not choices:
        # Billed, and no network fault: asking again is a bad answer's small budget, not a transient's seven.
        raise _billed(BadContentError("the answer has no choices (billed, but nothing answered)", reason="no_choices",
                                      status=200, code="no_choices"), body)
    first = choices[0] if isinstance(choices, list) else None
    if not isinstance(first, dict):
        raise _billed(BadContentError("the answer's choices are not a list of objects", reason="malformed",
                                      status=200, code="malformed"), body)
    if first.get("finish_reason") == "error" or err:
        cerr = first.get("error") or err or {"message": "the provider ended the answer with an error"}
        raise _billed(_from_error(_status_of(cerr, 502), cerr, reply.headers, in_body=True, where=where), body)
    return body


def _billed(exc: RequestError, body: dict[str, Any]) -> RequestError:
    """A 200 that carries an error may still have been billed: keep its usage and partial output."""
    choices = body.get("choices")
    if isinstance(body.get("usage"), dict) or (isinstance(choices, list) and choices):
        exc.billed = body
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str) and exc.content is None:
            exc.content = message["content"]
    return exc


def _status_of(err: Any, default: int) -> int:
    """The HTTP status an error object inside a 200 (or an SSE event) stands for: int or string code,
    then the availability variant's http_status, then metadata.error_type."""
    if not isinstance(err, dict):
        return default
    code = err.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(code, str) and code.isdigit():
        return int(code)
    if isinstance(code, str) and code in NAMED_STATUS:
        return NAMED_STATUS[code]
    http = err.get("http_status")
    if isinstance(http, int):
        return http
    meta = err.get("metadata")
    etype = meta.get("error_type") if isinstance(meta, dict) else err.get("error_type")
    return NAMED_STATUS.get(etype, default) if isinstance(etype, str) else default


def _from_error(status: int, err: dict[str, Any], headers: Mapping[str, str], *, in_body: bool,
                where: str = "") -> RequestError:
    message = str(err.get("message") or "")[:500]
    if where:
        message = where + (message or "no message")
    raw_meta = err.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    raw = meta.get("raw")
    if isinstance(raw, dict):  # some relays give the upstream body as an object, not a JSON string
        raw = orjson.dumps(raw).decode()
    if isinstance(raw, str) and raw:
        message = f"{message}: {raw[:300]}"
    code = err.get("code")
    etype = err.get("type")
    inner = _upstream_error(raw)
    if inner:  # OpenRouter's "Provider returned error": the upstream body decides (quota vs rate limit)
        etype = inner.get("type") or etype
        code = inner.get("code") if isinstance(inner.get("code"), str) else code
    code_s = str(code) if code is not None else None
    wait = retry_after(headers, err, message)
    if in_body and status < 400:
        status = 502
    if status in (401, 403):
        if status == 403 and (meta.get("reasons") or meta.get("flagged_input") or "blocked" in message.lower()):
            # Moderation or guardrail on this row's content, not on the key: only this row fails.
            return PermanentError(message or "blocked by moderation", status=status, code=code_s)
        return AuthError(message or "not authorised", status=status, code=code_s)
    avail = err.get("availability")
    if isinstance(avail, dict) and avail.get("retryable") is False:
        return PermanentError(message or f"HTTP {status}", status=status, code=str(avail.get("code") or code_s))
    if status == 402:
        if wait is not None:  # OpenRouter's in-flight budget: wait-and-retry, unlike every other 402
            return TransientError(message, status=402, code=code_s, retry_after=wait)
        return _credits(message, code_s)
    if status == 429:
        if etype == "insufficient_quota" or code_s in QUOTA_CODES:
            return CreditsError(message or "quota exhausted", status=429, code=code_s or etype)
        if code_s == "resource_unavailable" or etype == "resource_unavailable" or _UNAVAILABLE.search(message):
            return TransientError(message or "resource unavailable (flex)", status=429, code="resource_unavailable",
                                  retry_after=wait)
        m = _TOO_LARGE.search(message)
        if m and (m.group(1) is None or int(m.group(2)) > int(m.group(1))):
            return PermanentError(message, status=429, code="request_too_large")
        return RateLimited(message or "rate limited", status=429, code=code_s, retry_after=wait)
    if status == 503 and _SLOW_DOWN.search(message):
        # OpenAI's "Slow Down": our request rate itself is the problem, so the whole client backs off.
        return RateLimited(message, status=503, code="slow_down", retry_after=wait)
    if status in TRANSIENT_STATUS or status >= 500:
        return TransientError(message or f"server error {status}", status=status, code=code_s, retry_after=wait)
    return PermanentError(message or f"HTTP {status}", status=status, code=code_s)


def _credits(message: str, code: str | None) -> CreditsError:
    """A 402: no credits. When the body says fewer max_tokens would do, say so in the next step."""
    err = CreditsError(message or "insufficient credits", status=402, code=code)
    if _AFFORD.search(message):
        n = _AFFORD_N.search(message)
        afford = f" (the key can only afford {n.group(1)} tokens now)" if n else ""
        err.hint = (f"lower params.max_tokens{afford}, e.g. --set params.max_tokens=N, or add credits, "
                    "then re-run to resume")
    return err


def _upstream_error(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, str) or not raw.startswith("{"):
        return None
    try:
        inner = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    err = inner.get("error") if isinstance(inner, dict) else None
    return err if isinstance(err, dict) else None
