"""How fast requests may go out: requests/min, tokens/min, concurrency, and what the server teaches.

Buckets. Each configured limit is a leaky bucket (aiolimiter) that holds `burst_s` seconds of quota and
refills at `(limit - burst) / 60` per second. Any window of W seconds then admits at most
`burst + rate * W`, so no sliding minute ever sees more than the limit (the simulator measures exactly
that), and dispatch is smooth within the minute instead of a minute's quota in the first second. Token
use is estimated before sending (prompt estimate + max_tokens) and settled against the real usage after.

Learning (`observe`, on every reply, `limits.adaptive`):
- OpenAI `x-ratelimit-limit-{requests,tokens}` lower our rate to 99% of the server's (never raise it:
  configured limits are hard ceilings; a limit the config left open is filled in from the server).
- OpenAI `x-ratelimit-remaining-*` / `x-ratelimit-reset-*` (Go durations): when under half the budget
  is left, requests are paced at `remaining / reset`, so we slow down before a 429 rather than after.
  With a continuously refilling server that pace equals the server's rate at half the budget, which is
  where it settles; with a fixed window it spends exactly what is left by the reset.
- OpenRouter `X-RateLimit-Limit/-Reset` (epoch ms) on its 429s: a limit whose window resets within a
  minute is taken as requests per minute (the free tier's 20/min).
- Anthropic `anthropic-ratelimit-{requests,input-tokens,output-tokens}-*` (every reply, resets as RFC
  3339 times): the same rules for requests, input tokens and output tokens per minute, each against
  its own bucket (output reserved at max_tokens, so pacing by output is conservative).

429s. A rate-limit answer pauses the whole client until the server's reset (`pause`, called by the
retry loop with the server's wait); after the pause the requests bucket restarts empty, so traffic comes
back at the steady rate, not as a burst. A 429 that says nothing about when (no Retry-After, no reset
header, no "try again in") halves concurrency instead (multiplicative decrease, once per episode:
answers to requests sent before the last cut do not cut again), and every `limit` successes add one
slot back up to the configured ceiling (additive increase). That AIMD loop is what adapts when the
server sends no rate-limit headers at all; with headers, the pause and the learned rate do the job, and
a stray 429 does not cost half the concurrency.

The bucket, gate and pacer themselves are in buckets.py. All time comes from the running loop's clock
(`loop.time()`, as aiolimiter uses), so tests drive these
classes with a virtual-time loop and never sleep.
"""
from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Protocol

from ..config import LimitsConfig
from ..errors import PermanentError
from ..models.headers import rate_windows
from .buckets import Bucket, Gate, Pacer

log = logging.getLogger("pipeline")

HEADROOM = 0.99  # share of a learned limit we use: estimate errors and arrival jitter stay under the server's
LOW_REMAINING = 0.5  # pace from remaining/reset only below this share of the limit
MIN_PACE = 0.1  # never pace slower than this share of the limit's own rate (stale remaining=0)
_MINUTE = 60.0


class Permit:
    """One dispatched request's share of the limits; `settle` corrects the token estimates."""

    __slots__ = ("input", "limits", "output", "sent_at", "tokens")

    def __init__(self, tokens: float, limits: Limits, sent_at: float = 0.0, input_tokens: float = 0.0,
                 output_tokens: float = 0.0) -> None:
        self.tokens = tokens
        self.limits = limits
        self.sent_at = sent_at
        self.input = input_tokens
        self.output = output_tokens

    def settle(self, actual_tokens: int | None, input_tokens: int | None = None,
               output_tokens: int | None = None) -> None:
        """What the request really used (None: keep the estimate; 0: refused, all of it back). Input is
        what counts against input tokens/minute (cached reads left out where the provider exempts them);
        output was reserved at max_tokens and the unused part comes back here."""
        lim = self.limits
        if actual_tokens is not None and lim.tokens is not None:
            # Usage is checked where it is read; a negative count must still never refill the bucket.
            actual_tokens = max(0, actual_tokens)
            lim.tokens.adjust(actual_tokens - self.tokens)
            self.tokens = actual_tokens
        if actual_tokens == 0:
            input_tokens = output_tokens = 0
        if input_tokens is not None and lim.input_tokens is not None:
            input_tokens = max(0, input_tokens)
            lim.input_tokens.adjust(input_tokens - self.input)
            self.input = input_tokens
        if output_tokens is not None and lim.output_tokens is not None:
            output_tokens = max(0, output_tokens)
            lim.output_tokens.adjust(output_tokens - self.output)
            self.output = output_tokens


class Slot:
    """`async with limits.slot(tokens) as permit`: every limit waited for, a concurrency slot held.

    A class rather than @asynccontextmanager: this runs once per request, and the fast path (free slot,
    no pause, no pacing) costs no generator frames.
    """

    __slots__ = ("est", "est_in", "est_out", "limits", "permit")

    def __init__(self, limits: Limits, est: float, est_in: float = 0.0, est_out: float = 0.0) -> None:
        self.limits = limits
        self.est = est
        self.est_in, self.est_out = est_in, est_out
        self.permit: Permit | None = None

    async def __aenter__(self) -> Permit:
        lim, est = self.limits, self.est
        await lim.gate.acquire()
        try:
            if lim._resume_at:
                await lim._wait_pause()
            if lim.requests is not None:
                await lim.requests.acquire(1)
            if lim.tokens is not None:
                await lim.tokens.take(est)
            if lim.input_tokens is not None:
                await lim.input_tokens.take(self.est_in)
            if lim.output_tokens is not None:
                await lim.output_tokens.take(self.est_out)
            if lim._pacing:
                await lim._wait_pace(est, self.est_in, self.est_out)
            if lim._resume_at:
                await lim._wait_pause()  # a pause may have started while we waited for the buckets
        except BaseException:
            lim.gate.release()
            raise
        self.permit = Permit(est, lim, asyncio.get_running_loop().time(), self.est_in, self.est_out)
        return self.permit

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.limits.gate.release()


class Limits:
    def __init__(self, cfg: LimitsConfig, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.wall_clock = wall_clock  # epoch seconds, for headers that give a time (Anthropic's resets)
        rpm, tpm = cfg.requests_per_minute, cfg.tokens_per_minute
        self.requests = Bucket(rpm, cfg.burst_s) if rpm else None
        self.tokens = Bucket(tpm, cfg.burst_s) if tpm else None
        itpm, otpm = cfg.input_tokens_per_minute, cfg.output_tokens_per_minute
        self.input_tokens = Bucket(itpm, cfg.burst_s) if itpm else None
        self.output_tokens = Bucket(otpm, cfg.burst_s) if otpm else None
        self.gate = Gate(cfg.max_concurrency)
        self._resume_at = 0.0
        self._drain_on_resume = False
        self._last_cut = -math.inf
        self._successes_since_cut = 0
        self._pacers: dict[str, Pacer] = {}
        self._pacing = False
        self.stopped = False
        self._stop = asyncio.Event()
        self.pauses = 0
        self.cuts = 0
        self.learned: dict[str, float] = {}

    def slot(self, est_tokens: float, *, input_tokens: float = 0.0, output_tokens: float = 0.0) -> Slot:
        """Wait for every limit, then hold a concurrency slot for the duration of one attempt. `est_tokens`
        counts against tokens/minute; `input_tokens` (the prompt) and `output_tokens` (max_tokens,
        reserved in full and refunded on the answer) against the input and output limits.

        Raises PermanentError at once for a request that could never fit a minute's tokens."""
        if self.tokens is not None and est_tokens > self.tokens.per_minute:
            raise _too_large(est_tokens, "tokens_per_minute", self.tokens,
                             "lower params.max_tokens or shorten the prompt")
        if self.input_tokens is not None and input_tokens > self.input_tokens.per_minute:
            raise _too_large(input_tokens, "input_tokens_per_minute", self.input_tokens, "shorten the prompt")
        if self.output_tokens is not None and output_tokens > self.output_tokens.per_minute:
            raise _too_large(output_tokens, "output_tokens_per_minute", self.output_tokens, "lower params.max_tokens")
        return Slot(self, est_tokens, input_tokens, output_tokens)

    # -- server-ordered pauses and AIMD ------------------------------------------------------------

    async def _wait_pause(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopped and (delay := self._resume_at - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except TimeoutError:
                pass
        self._resume_at = 0.0
        if self._drain_on_resume and not self.stopped:
            self._drain_on_resume = False
            if self.requests is not None:
                self.requests.drain()

    def paused_for(self) -> float:
        """Seconds left of a server-ordered pause, 0 when none (what the progress bar shows)."""
        return max(0.0, self._resume_at - asyncio.get_running_loop().time()) if self._resume_at else 0.0

    def pause(self, seconds: float) -> None:
        """The server said wait: nobody dispatches until then, and then not as a burst."""
        if seconds <= 0:
            return
        now = asyncio.get_running_loop().time()
        if now + seconds > self._resume_at:
            self._resume_at = now + seconds
            self._drain_on_resume = True
            self.pauses += 1
            log.info("rate limited: pausing all requests for %.1fs", seconds,
                     extra={"event": "rate_pause", "seconds": round(seconds, 3)})

    def stop(self) -> None:
        """Dispatch is over (run-fatal, budget, Ctrl-C): whoever waits on a limit goes now, to find
        the stop and leave without sending, instead of draining the queue at the rate limit."""
        self.stopped = True
        self._stop.set()
        self.gate.resize(sys.maxsize)
        for bucket in (self.requests, self.tokens, self.input_tokens, self.output_tokens):
            if bucket is not None:
                bucket.open()
        for pacer in self._pacers.values():
            pacer.lift()
        self._pacing = False

    def decrease(self, sent_at: float) -> None:
        """A 429: halve concurrency, once per episode (a request sent before the last cut does not cut)."""
        if not self.cfg.adaptive or sent_at < self._last_cut:
            return
        self._last_cut = asyncio.get_running_loop().time()
        self.gate.resize(self.gate.limit // 2)
        self._successes_since_cut = 0
        self.cuts += 1

    def on_success(self) -> None:
        """Additive increase: one slot back per `limit` successes, up to the configured ceiling."""
        if self.gate.limit >= self.cfg.max_concurrency:
            return
        self._successes_since_cut += 1
        if self._successes_since_cut >= self.gate.limit:
            self._successes_since_cut = 0
            self.gate.resize(min(self.cfg.max_concurrency, self.gate.limit + 1))

    # -- learning from headers ---------------------------------------------------------------------

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn the server's budget from OpenAI- or OpenRouter-style rate-limit headers (see module doc)."""
        if not self.cfg.adaptive or self.stopped:
            return
        for w in rate_windows(headers, self.wall_clock()):
            if w.limit:
                self._learn(w.kind, w.limit, w.source)
            if w.remaining is not None and w.reset_s:
                self._pace_from(w.kind, w.remaining, w.reset_s, w.limit or self.learned.get(w.kind))

    def _bucket(self, kind: str) -> Bucket | None:
        return {"requests": self.requests, "tokens": self.tokens, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens}.get(kind)

    def _learn(self, kind: str, limit: float, source: str) -> None:
        if self.learned.get(kind) != limit:
            log.info("learned %s/min limit %g from %s headers", kind, limit, source,
                     extra={"event": "limit_learned", "limit": f"{kind}_per_minute", "value": limit, "source": source})
        self.learned[kind] = limit
        target = limit * HEADROOM
        bucket = self._bucket(kind)
        if bucket is None:
            # The config left this limit open: the server's own is the ceiling now.
            bucket = Bucket(target, self.cfg.burst_s)
            setattr(self, kind, bucket)  # requests, tokens, input_tokens or output_tokens
        elif limit < bucket.per_minute:
            # Only a server limit below our own ceiling matters; at or above it our bucket already holds.
            bucket.set_rate(target)

    def _pace_from(self, kind: str, remaining: float, reset_s: float, limit: float | None) -> None:
        bucket = self._bucket(kind)
        ours = bucket.rate_per_s if bucket is not None else math.inf
        rate = max(remaining / reset_s, MIN_PACE * limit / _MINUTE) if limit else math.inf
        pacer = self._pacers.get(kind)
        if limit is None or remaining >= LOW_REMAINING * limit or rate >= ours:
            if pacer is not None and pacer.active:
                pacer.lift()  # the budget recovered: the buckets alone again
        else:
            if pacer is None:
                pacer = self._pacers[kind] = Pacer()
            pacer.pace(rate, reset_s)
        self._pacing = any(p.active for p in self._pacers.values())

    async def _wait_pace(self, est_tokens: float, est_in: float = 0.0, est_out: float = 0.0) -> None:
        for kind, amount in (("requests", 1.0), ("tokens", est_tokens), ("input_tokens", est_in),
                             ("output_tokens", est_out)):
            pacer = self._pacers.get(kind)
            if pacer is not None and pacer.active:
                await pacer.take(amount)
        self._pacing = any(p.active for p in self._pacers.values())


def _too_large(need: float, key: str, bucket: Bucket, fix: str) -> PermanentError:
    return PermanentError(f"this request needs about {int(need)} tokens, more than limits.{key} "
                          f"({int(bucket.per_minute)}); {fix}")


class Limiter(Protocol):
    """What the dispatcher needs of a limiter; `Limits` is the one-process implementation (a driver
    on several machines injects one whose buckets are shared)."""

    def slot(self, est_tokens: float, *, input_tokens: float = 0.0,
             output_tokens: float = 0.0) -> AbstractAsyncContextManager[Permit]:
        """Wait for every limit, then hold a concurrency slot while the block runs (PermanentError at
        once when the request can never fit)."""
        ...

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn from a reply's rate-limit headers."""
        ...

    def pause(self, seconds: float) -> None:
        """The server said wait: nobody dispatches for `seconds`."""
        ...

    def decrease(self, sent_at: float) -> None:
        """A 429 with no word on when: cut concurrency (once per episode)."""
        ...

    def on_success(self) -> None:
        """An answer arrived: room to grow concurrency back."""
        ...

    def stop(self) -> None:
        """Dispatch is over: release every waiter."""
        ...
