"""How fast requests may go out: requests/min, tokens/min, concurrency, and server-ordered pauses.

The buckets are aiolimiter leaky buckets. They start full. The requests bucket holds `burst_s` seconds
of quota, so dispatch is smooth within the minute rather than a minute's quota in the first second; the
tokens bucket holds a full minute, because one request may need a large share of it. Token use is
estimated before sending (prompt estimate + max_tokens) and reconciled with the real usage after.

A 429 pauses the whole client until the server's reset, then concurrency ramps back up (AIMD) when the
server gave no rate-limit headers to learn from. Configured limits are hard ceilings: what the server
teaches can only lower them.

All time comes from the running loop's clock (`loop.time()`, as aiolimiter uses), so tests drive these
classes with a virtual-time loop and never sleep.
"""
from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from .config import LimitsConfig
from .errors import PermanentError


class Bucket(AsyncLimiter):
    """An aiolimiter bucket whose level can be corrected after the fact and whose rate can be lowered."""

    def __init__(self, per_minute: float, capacity: float) -> None:
        capacity = max(1.0, capacity)
        super().__init__(max_rate=capacity, time_period=capacity / (per_minute / 60.0))
        self.per_minute = per_minute

    def adjust(self, delta: float) -> None:
        """Add (debt) or remove (refund) capacity already taken, e.g. real tokens vs the estimate."""
        self._leak()
        self._level = max(0.0, self._level + delta)
        self._wake_next()

    def set_rate(self, per_minute: float) -> None:
        self._leak()
        self.per_minute = per_minute
        self._rate_per_sec = per_minute / 60.0
        self.time_period = self.max_rate / self._rate_per_sec
        self._wake_next()


class Gate:
    """A concurrency cap that can be resized while tasks wait on it (AIMD after 429s)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        while self.in_flight >= self.limit:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake()  # pass the wake-up we consumed to someone else
                raise
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self.in_flight
        while free > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                free -= 1


@dataclass(slots=True)
class Permit:
    """One dispatched request's share of the limits; `settle` corrects the token estimate."""

    tokens: float
    limits: "Limits"

    def settle(self, actual_tokens: int | None) -> None:
        if actual_tokens is not None and self.limits.tokens is not None:
            self.limits.tokens.adjust(actual_tokens - self.tokens)
            self.tokens = actual_tokens


class Limits:
    def __init__(self, cfg: LimitsConfig) -> None:
        self.cfg = cfg
        rpm, tpm = cfg.requests_per_minute, cfg.tokens_per_minute
        self.requests = Bucket(rpm, rpm * cfg.burst_s / 60.0) if rpm else None
        self.tokens = Bucket(tpm, tpm) if tpm else None
        self.gate = Gate(cfg.max_concurrency)
        self._resume_at = 0.0
        self._successes_since_cut = 0
        self.pauses = 0
        self.learned: dict[str, float] = {}

    @asynccontextmanager
    async def slot(self, est_tokens: float) -> AsyncIterator[Permit]:
        """Wait for every limit, then hold a concurrency slot for the duration of one attempt."""
        if self.tokens is not None and est_tokens > self.tokens.max_rate:
            raise PermanentError(
                f"this request needs about {int(est_tokens)} tokens, more than limits.tokens_per_minute "
                f"({int(self.tokens.max_rate)}); lower params.max_tokens or shorten the prompt"
            )
        await self.gate.acquire()
        try:
            await self._wait_pause()
            if self.requests is not None:
                await self.requests.acquire(1)
            if self.tokens is not None:
                await self.tokens.acquire(est_tokens)
            # A pause may have started while we waited for the buckets.
            await self._wait_pause()
            yield Permit(est_tokens, self)
        finally:
            self.gate.release()

    async def _wait_pause(self) -> None:
        loop = asyncio.get_running_loop()
        while (delay := self._resume_at - loop.time()) > 0:
            await asyncio.sleep(delay)

    def pause(self, seconds: float) -> None:
        """The server said wait: nobody dispatches until then. Concurrency is cut in half (AIMD)."""
        now = asyncio.get_running_loop().time()
        if now + seconds > self._resume_at:
            self._resume_at = now + seconds
            self.pauses += 1
        if self.cfg.adaptive and not self.learned:
            self.gate.resize(max(1, self.gate.limit // 2))
            self._successes_since_cut = 0

    @property
    def paused_until(self) -> float:
        return self._resume_at

    def on_success(self) -> None:
        """Additive increase back towards the configured ceiling after a cut."""
        if self.gate.limit >= self.cfg.max_concurrency:
            return
        self._successes_since_cut += 1
        if self._successes_since_cut >= self.gate.limit:
            self._successes_since_cut = 0
            self.gate.resize(min(self.cfg.max_concurrency, self.gate.limit + 1))

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn the server's real limits from OpenAI-style x-ratelimit-limit-* headers (lower only)."""
        if not self.cfg.adaptive:
            return
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            raw = headers.get(f"x-ratelimit-limit-{kind}")
            if raw is None:
                continue
            try:
                limit = float(raw)
            except ValueError:
                continue
            if limit <= 0:
                continue
            self.learned[kind] = limit
            # Stay a hair under the server's limit so our estimate errors don't trip it.
            target = limit * 0.98
            if bucket is not None and target < bucket.per_minute:
                bucket.set_rate(target)


_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_go_duration(text: str) -> float | None:
    """OpenAI reset headers: '1s', '6m0s', '12ms', '9.816s' -> seconds."""
    total, pos = 0.0, 0
    for m in _GO_DURATION.finditer(text.strip()):
        if m.start() != pos:
            return None
        pos = m.end()
        value, unit = float(m.group(1)), m.group(2)
        total += value * {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}[unit]
    return total if pos and pos == len(text.strip()) else None
