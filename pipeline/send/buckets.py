"""The primitives the limiter is made of: a leaky bucket per limit, a resizable concurrency gate, and a
pacer for when the server's remaining budget runs low. All time is the running loop's clock
(`loop.time()`, as aiolimiter uses), so tests drive them with a virtual-time loop and never sleep.
"""
from __future__ import annotations

import asyncio
import collections
import math

from aiolimiter import AsyncLimiter

_MINUTE = 60.0


class Bucket(AsyncLimiter):
    """A leaky bucket of `burst_s` seconds of quota whose refill keeps every sliding minute in the limit.

    Capacity b and refill r admit at most b + r*W in any W seconds, so r = (limit - b) / 60. A request
    larger than b (a big token estimate) grows b to its size and lowers r to match, rather than failing
    or overshooting the minute; b is capped at half the limit so the refill never stalls.
    """

    def __init__(self, per_minute: float, burst_s: float) -> None:
        super().__init__(max_rate=1.0, time_period=_MINUTE)
        self.burst_s = burst_s
        self.largest = 0.0
        self._apply(per_minute)

    def _apply(self, per_minute: float) -> None:
        self.per_minute = per_minute
        burst = max(1.0, per_minute * self.burst_s / _MINUTE, self.largest)
        self.max_rate = min(burst, max(1.0, per_minute / 2))
        self._rate_per_sec = max(per_minute - self.max_rate, per_minute / 2) / _MINUTE
        self.time_period = self.max_rate / self._rate_per_sec

    @property
    def rate_per_s(self) -> float:
        return self._rate_per_sec

    def set_rate(self, per_minute: float) -> None:
        self._leak()
        self._apply(per_minute)
        self._wake_next()

    async def take(self, amount: float) -> None:
        """Acquire `amount` (at most the per-minute limit; the caller checks)."""
        if amount > self.max_rate:
            self.largest = amount
            self.set_rate(self.per_minute)
        await self.acquire(min(amount, self.max_rate))
        if amount > self.max_rate:  # only past half the limit: owed, so the minute is still respected
            self._level += amount - self.max_rate

    def adjust(self, delta: float) -> None:
        """Add (debt) or remove (refund) capacity already taken, e.g. real tokens vs the estimate."""
        self._leak()
        self._level = max(0.0, self._level + delta)
        self._wake_next()

    def open(self) -> None:
        """No limit any more: every waiter goes at once (used when dispatch stops)."""
        self.max_rate = math.inf
        self._wake_next()

    def drain(self) -> None:
        """Spend the burst allowance, so the next dispatches go out at the steady rate."""
        self._leak()
        self._level = max(self._level, self.max_rate)
        self._wake_next()


class Gate:
    """A concurrency cap that can be resized while tasks wait on it (AIMD after 429s).

    A release wakes one waiter per free slot, counting the woken ones until they run, so a release
    wakes one task rather than every waiter that might fit. A task that asks again right after its own
    release (a retry) may take the slot first; the waiter it overtook keeps its place at the front.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._woken = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        front = False
        while self.in_flight >= self.limit:
            fut = asyncio.get_running_loop().create_future()
            if front:
                self._waiters.appendleft(fut)
            else:
                self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._woken -= 1
                    self._wake()  # pass the wake-up we will not use to the next waiter
                else:
                    try:
                        self._waiters.remove(fut)
                    except ValueError:
                        pass
                raise
            self._woken -= 1
            front = True
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight + self._woken < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._woken += 1
                fut.set_result(None)


class Pacer(AsyncLimiter):
    """Spaces dispatches at `rate` units per second while the server's remaining budget is low.

    Active from `pace()` until the server's reset (a timer lifts it then, waking whoever waits), or
    until an answer shows the budget recovered. Its burst is one request (or the largest token
    estimate), so what is left is spread over the time to reset instead of spent at once.
    """

    def __init__(self) -> None:
        super().__init__(max_rate=1.0, time_period=1.0)
        self.active = False
        self._timer: asyncio.TimerHandle | None = None

    def pace(self, rate: float, seconds: float) -> None:
        self._leak()
        self._rate_per_sec = rate
        self.time_period = self.max_rate / rate
        self.active = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(seconds, self.lift)
        self._wake_next()

    def lift(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.active = False
        self._level = 0.0
        self._rate_per_sec = 1e12  # whoever still waits goes now
        self._wake_next()

    async def take(self, amount: float) -> None:
        self.max_rate = max(self.max_rate, amount)
        await self.acquire(amount)
