"""The records an attempt ends in, built in one place for every way a request is sent.

The sync dispatcher (dispatch.py), batch mode's collector (batch/collect.py) and the Ray workers (through
the dispatcher) store an answer or a final failure through these two functions, so a field added to
`Record` is filled the same way in every mode: one place to change.
"""
from __future__ import annotations

from typing import Any

import orjson

from ..errors import RequestError
from ..vocab import Record
from .budget import Paid
from .parse import Parsed


def answer_record(key: str, parsed: Parsed, paid: Paid, *, attempts: int, status: int, raw: bytes | None,
                  latency_s: float | None = None, ttft_s: float | None = None) -> Record:
    """A usable answer: what the parser made of it, and what every attempt of the request was billed."""
    return Record(
        key=key, state="ok", attempts=attempts, status=status, content=parsed.content,
        output_json=_dumps(parsed.output), finish_reason=parsed.finish_reason, model=parsed.model,
        provider=parsed.provider, prompt_tokens=paid.prompt_tokens, completion_tokens=paid.completion_tokens,
        cost_usd=paid.cost_usd, cached_tokens=paid.cached_tokens, cache_write_tokens=paid.cache_write_tokens,
        latency_s=latency_s, ttft_s=ttft_s, tool_calls_json=parsed.tool_calls_json,
        logprobs_json=parsed.logprobs_json, raw=raw, usage_note=paid.note, confidence=parsed.confidence,
        confidence_json=parsed.confidence_json,
    )


def failure_record(key: str, state: str, exc: RequestError, paid: Paid, *, attempts: int,
                   raw: bytes | None = None) -> Record:
    """A request that failed for good (`state`: transient, permanent or bad_content), as retry.decide said."""
    reason = getattr(exc, "reason", None)
    message = (exc.message if not reason else f"{reason}: {exc.message}")[:1000]
    return Record(
        key=key, state=state, attempts=attempts, status=exc.status, error_class=exc.error_class,
        message=message, content=exc.content, prompt_tokens=paid.prompt_tokens,
        completion_tokens=paid.completion_tokens, cost_usd=paid.cost_usd, cached_tokens=paid.cached_tokens,
        cache_write_tokens=paid.cache_write_tokens, raw=raw, usage_note=paid.note,
    )


def _dumps(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()
