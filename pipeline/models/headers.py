"""What a provider's rate-limit headers say, read in one place (docs/wire.md §3.1).

- OpenAI: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, resets as Go durations ('6m0s').
- OpenRouter: `X-RateLimit-Limit` / `-Remaining` / `-Reset`, the reset in epoch milliseconds.
- Anthropic: `anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining,reset}`, per
  minute, the reset an RFC 3339 time at which the bucket is full again. Its `-tokens-*` family is the
  most restrictive of the input and output limits now in effect, not a limit of its own: not read.
- Anyone: `Retry-After` (seconds or an HTTP date), `retry-after-ms`, an error's
  `metadata.headers` (OpenRouter relays the upstream's) or `availability.retry_after`, and
  "try again in 9.8s" in the message text.

`rate_windows(headers)` is what the limiter learns from; `retry_after(...)` is how long the server
asked us to wait, which the classifier attaches to the error it raises. Both take `now` (epoch seconds)
for the headers that give a time rather than a duration; tests pass their own clock.
"""
from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

_MINUTE = 60.0
_TRY_AGAIN = re.compile(r"try again in (\d+(?:\.\d+)?)\s*(ms|s)", re.IGNORECASE)
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_ANTHROPIC = "anthropic-ratelimit-"
# Anthropic's windows by the limiter's names (limits.requests/input_tokens/output_tokens_per_minute).
_PREFIXES = ("x-ratelimit-", _ANTHROPIC)
_ANTHROPIC_KINDS = {"requests": "requests", "input-tokens": "input_tokens", "output-tokens": "output_tokens"}


@dataclass(frozen=True, slots=True)
class RateWindow:
    """One server-side limit as a reply reports it: `kind` is requests, tokens, input_tokens or
    output_tokens (per minute)."""

    kind: str
    limit: float | None
    remaining: float | None = None
    reset_s: float | None = None
    source: str = "openai"


def rate_windows(headers: Mapping[str, str], now: float | None = None) -> list[RateWindow]:
    """The limits a reply's headers report; empty (and cheap) when it has none."""
    # One short lowered slice per header (most replies carry none of these): prefixes up to 20 characters.
    h = {k.lower(): v for k, v in headers.items() if k[:20].lower().startswith(_PREFIXES)}
    if not h:
        return []
    out = _anthropic_windows(h, time.time() if now is None else now) if any(
        k.startswith(_ANTHROPIC) for k in h) else []
    for kind in ("requests", "tokens"):
        limit = _number(h.get(f"x-ratelimit-limit-{kind}"))
        remaining = _number(h.get(f"x-ratelimit-remaining-{kind}"))
        reset = parse_go_duration(h.get(f"x-ratelimit-reset-{kind}", ""))
        if limit or (remaining is not None and reset):
            out.append(RateWindow(kind, limit, remaining, reset))
    limit = _number(h.get("x-ratelimit-limit"))
    reset_ms = _number(h.get("x-ratelimit-reset"))
    if limit and reset_ms and 0 < reset_ms / 1000 - (time.time() if now is None else now) <= _MINUTE:
        # OpenRouter reports a reset in epoch milliseconds; a window within a minute is requests/min.
        out.append(RateWindow("requests", limit, source="openrouter"))
    return out


def _anthropic_windows(h: Mapping[str, str], now: float) -> list[RateWindow]:
    out = []
    for name, kind in _ANTHROPIC_KINDS.items():
        limit = _number(h.get(f"{_ANTHROPIC}{name}-limit"))
        remaining = _number(h.get(f"{_ANTHROPIC}{name}-remaining"))
        at = parse_rfc3339(h.get(f"{_ANTHROPIC}{name}-reset", ""))
        reset = max(0.0, at - now) if at is not None else None
        if limit or (remaining is not None and reset):
            out.append(RateWindow(kind, limit, remaining, reset, source="anthropic"))
    return out


def retry_after(headers: Mapping[str, str], err: Mapping[str, Any] | None = None, message: str = "",
                now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from whichever signal it gave; None if it gave none."""
    now = time.time() if now is None else now
    h = {k.lower(): v for k, v in headers.items()}
    raw_meta = err.get("metadata") if err else None
    meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    if isinstance(meta.get("headers"), dict):
        h = {**{k.lower(): str(v) for k, v in meta["headers"].items()}, **h}
    explicit = _explicit_wait(h, now)
    if explicit is not None:
        return explicit
    avail = err.get("availability") if err else None
    if isinstance(avail, dict) and isinstance(avail.get("retry_after"), (int, float)):
        return float(avail["retry_after"])
    reset = _reset_wait(h, now)
    if reset is not None:
        return reset
    m = _TRY_AGAIN.search(message)
    if m:
        return float(m.group(1)) / (1000 if m.group(2).lower() == "ms" else 1)
    return None


def _explicit_wait(h: Mapping[str, str], now: float) -> float | None:
    """Retry-After (seconds or an HTTP date) and retry-after-ms, the latter first."""
    if "retry-after-ms" in h:
        try:
            return max(0.0, float(h["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    if "retry-after" in h:
        value = h["retry-after"].strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(value) if value else None
            if parsed is not None:
                return max(0.0, parsed.timestamp() - now)
    return None


def _reset_wait(h: Mapping[str, str], now: float) -> float | None:
    """An exhausted window's reset: OpenRouter's epoch milliseconds, else the longest of OpenAI's Go
    durations and Anthropic's RFC 3339 times."""
    if h.get("x-ratelimit-remaining") == "0" and "x-ratelimit-reset" in h:
        try:
            return max(0.0, float(h["x-ratelimit-reset"]) / 1000 - now)
        except ValueError:
            pass
    waits = []
    for kind in ("requests", "tokens"):
        if h.get(f"x-ratelimit-remaining-{kind}") == "0" and f"x-ratelimit-reset-{kind}" in h:
            d = parse_go_duration(h[f"x-ratelimit-reset-{kind}"])
            if d is not None:
                waits.append(d)
    for name in _ANTHROPIC_KINDS:
        if h.get(f"{_ANTHROPIC}{name}-remaining") == "0":
            at = parse_rfc3339(h.get(f"{_ANTHROPIC}{name}-reset", ""))
            if at is not None:
                waits.append(max(0.0, at - now))
    return max(waits) if waits else None


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def parse_go_duration(text: str) -> float | None:
    """OpenAI reset headers: '1s', '6m0s', '12ms', '9.816s' -> seconds; None if not a Go duration."""
    text = text.strip()
    total, pos = 0.0, 0
    for m in _GO_DURATION.finditer(text):
        if m.start() != pos:
            return None
        pos = m.end()
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
    return total if pos and pos == len(text) else None


def parse_rfc3339(text: str) -> float | None:
    """Anthropic reset headers: '2025-08-21T12:40:59Z' (fractions and offsets too) -> epoch seconds; a time
    without an offset is UTC; None if not such a time."""
    text = text.strip()
    if not text or not text[0].isdigit():
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
