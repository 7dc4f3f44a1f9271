"""The limits the simulator enforces: RPM/TPM token buckets and a credit balance.

OpenAI replenishes limits continuously rather than per fixed window, so a bucket that starts full
and refills at ``limit/60`` per second gives bursts of 429s with realistic remaining/reset values.
A bucket may hold less than a minute (``burst_s``): OpenAI says it may enforce 60,000/min as 1,000/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Reported when a limit is not configured, so OpenAI-flavor headers are always present. Far above what a
# loopback run can send: a client that learns limits from headers must not be slowed by these.
UNLIMITED_RPM = 1_000_000
UNLIMITED_TPM = 1_000_000_000


def go_duration(seconds: float) -> str:
    """Go's time.Duration.String() at millisecond precision: ``12ms``, ``1s``, ``6m0s``, ``9.816s``."""
    ms = max(0, round(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rem = divmod(ms, 3_600_000)
    minutes, rem = divmod(rem, 60_000)
    secs = f"{rem / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def seconds_text(seconds: float) -> str:
    """Retry-After value: whole seconds when integral, else a short decimal (``0.25``)."""
    if seconds == int(seconds):
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0")


class TokenBucket:
    """``limit`` per minute, refilled continuously at ``limit / 60`` per second, starting full.

    The bucket holds ``burst_s`` seconds of the limit (a whole minute by default). ``remaining`` is on
    the minute's scale either way: the limit less what the bucket is missing.
    """

    def __init__(self, limit: int, now: float, burst_s: float = 60.0) -> None:
        self.limit = limit
        self.rate = limit / 60.0
        self.capacity = max(1.0, limit * min(burst_s, 60.0) / 60.0)
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is available (inf when it never fits)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def reset_in(self) -> float:
        """Seconds until the bucket is full again (OpenAI's ``x-ratelimit-reset-*`` meaning)."""
        return (self.capacity - self.level) / self.rate

    @property
    def remaining(self) -> int:
        return max(0, int(self.limit - (self.capacity - self.level)))


@dataclass(slots=True)
class Refusal:
    """Why a request was not admitted by the buckets."""

    kind: str  # "requests" | "tokens" | "too_large"
    limit: int
    used: int
    requested: int
    retry_after: float  # seconds until it would fit (0 for too_large: it never will)


class RateLimits:
    def __init__(self, rpm: int | None, tpm: int | None, now: float, burst_s: float = 60.0) -> None:
        self.rpm = TokenBucket(rpm, now, burst_s) if rpm else None
        self.tpm = TokenBucket(tpm, now, burst_s) if tpm else None

    def admit(self, tokens: int, now: float) -> Refusal | None:
        """Take one request and ``tokens`` from the buckets, or say why not (taking nothing)."""
        for bucket in (self.rpm, self.tpm):
            if bucket is not None:
                bucket.refill(now)
        if self.tpm is not None and tokens > self.tpm.capacity:
            return Refusal("too_large", self.tpm.limit, 0, tokens, 0.0)
        if self.rpm is not None and self.rpm.level < 1:
            used = self.rpm.limit - self.rpm.remaining
            return Refusal("requests", self.rpm.limit, used, 1, self.rpm.wait_for(1))
        if self.tpm is not None and self.tpm.level < tokens:
            used = self.tpm.limit - self.tpm.remaining
            return Refusal("tokens", self.tpm.limit, used, tokens, self.tpm.wait_for(tokens))
        if self.rpm is not None:
            self.rpm.level -= 1
        if self.tpm is not None:
            self.tpm.level -= tokens
        return None

    def openai_headers(self, now: float) -> dict[str, str]:
        """``x-ratelimit-*`` as OpenAI sends them on every response."""
        headers: dict[str, str] = {}
        for suffix, bucket, default in (("requests", self.rpm, UNLIMITED_RPM), ("tokens", self.tpm, UNLIMITED_TPM)):
            if bucket is None:
                limit, remaining, reset = default, default, 0.0
            else:
                bucket.refill(now)
                limit, remaining, reset = bucket.limit, bucket.remaining, bucket.reset_in()
            headers[f"x-ratelimit-limit-{suffix}"] = str(limit)
            headers[f"x-ratelimit-remaining-{suffix}"] = str(remaining)
            headers[f"x-ratelimit-reset-{suffix}"] = go_duration(reset)
        return headers

    def openrouter_headers(self, now_epoch: float, retry_after: float) -> dict[str, str]:
        """``X-RateLimit-*`` as OpenRouter sends them on its own (platform) 429s, reset in epoch ms.

        Only a configured rpm is a platform limit: without one, a 429 stands for an upstream provider's
        and carries no X-RateLimit-* at all (OpenRouter sends them for its own limits only).
        """
        if self.rpm is None:
            return {}
        remaining = self.rpm.remaining if self.rpm.level >= 1 else 0
        return {
            "X-RateLimit-Limit": str(self.rpm.limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(int((now_epoch + max(retry_after, 0.001)) * 1000)),
        }


class Credits:
    """A prepaid balance: cost accrues per billed response; 402 once it is used up."""

    def __init__(self, limit_usd: float | None) -> None:
        self.limit = limit_usd
        self.usage = 0.0

    @property
    def remaining(self) -> float | None:
        return None if self.limit is None else max(0.0, self.limit - self.usage)

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.usage >= self.limit

    def charge(self, usd: float) -> None:
        self.usage += usd

    def affordable_tokens(self, prompt_usd: float, out_per_token: float) -> int | None:
        """Completion tokens the remaining balance still pays for (None when unlimited)."""
        remaining = self.remaining
        if remaining is None:
            return None
        if out_per_token <= 0:
            return 1 << 30
        return max(0, int((remaining - prompt_usd) / out_per_token))
