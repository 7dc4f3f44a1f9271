"""`notify.webhook`: POST the run record as JSON when a run ends (on failure, success or both).

A timeout per attempt and a few retries with a growing delay on no answer, a 5xx, 408 or 429; any
other answer is final. A webhook that cannot be reached is logged and never changes the run's exit
code. The record holds figures and messages only: never the API key or a secret header (which are
not in it), and the webhook URL (often a token itself) is not logged, only its host.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from ..common import redact

log = logging.getLogger("pipeline")

RETRY_BASE_S = 1.0


def shape(record: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The body for the receiver (`notify.format`): the record as it is (json), or one line of it as
    Slack's `{text}` or a Teams MessageCard (their incoming webhooks show nothing else)."""
    if fmt == "json":
        return record
    title = f"pipeline job {record.get('job')}: {record.get('outcome')} (exit {record.get('exit_code')})"
    text = (f"{record.get('succeeded', 0):,} succeeded, {record.get('failed', 0):,} failed, "
            f"{record.get('pending', 0):,} pending of {record.get('rows_total', 0):,} rows; "
            f"{record.get('requests', 0):,} requests, ${float(record.get('cost_usd') or 0):.4f} this run; "
            f"on {record.get('host')}, run {record.get('run_id')}")
    if record.get("stop_reason"):
        text += f"; stopped ({record['stop_reason']}): {str(record.get('message') or '')[:300]}"
    if fmt == "slack":
        return {"text": f"*{title}*\n{text}"}
    return {"@type": "MessageCard", "@context": "https://schema.org/extensions", "summary": title, "title": title,
            "themeColor": "2EB886" if record.get("outcome") == "success" else "D70000", "text": text}


async def post(url: str, payload: dict[str, Any], *, timeout_s: float, retries: int) -> bool:
    """True once the receiver answered 2xx; False (logged) when it never did."""
    body = redact.scrub_bytes(orjson.dumps(payload))  # leaves the machine: never a secret in it
    host = urlsplit(url).hostname or "?"
    why = ""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        for attempt in range(retries + 1):
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"},
                                        allow_redirects=False) as resp:
                    if resp.status < 300:
                        return True
                    why = f"HTTP {resp.status}"
                    if resp.status < 500 and resp.status not in (408, 429):
                        break
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                why = type(exc).__name__
            if attempt < retries:
                await asyncio.sleep(RETRY_BASE_S * 2**attempt)
    log.warning("the webhook on %s did not take the run record (%s)", host, why,
                extra={"event": "notify_failed", "host": host, "error": why})
    return False
