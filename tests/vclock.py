"""An asyncio loop whose clock jumps forward instead of sleeping (for limiter and retry tests).

When the loop would block waiting for its next timer and no I/O is ready, the virtual clock advances
to that timer instead. aiolimiter and asyncio.sleep both read `loop.time()`, so they run instantly
and deterministically.
"""
from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
TICK = 1e-6


class _FastForwardSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualClockLoop | None = None

    def select(self, timeout: float | None = None):  # type: ignore[no-untyped-def]
        ready = super().select(0)
        if self.loop is None:
            return ready
        # Every iteration of a real loop takes a little time; without it, a timer that float rounding
        # puts at "now" (aiolimiter's waker does this) would be rescheduled at "now" forever.
        self.loop.now += TICK
        if ready or timeout is None:
            return ready if ready or timeout == 0 else super().select(timeout)
        if timeout > 0:
            self.loop.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        selector = _FastForwardSelector()
        super().__init__(selector)
        selector.loop = self

    def time(self) -> float:
        return self.now


def run_virtual(coro: Coroutine[Any, Any, T]) -> T:
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
