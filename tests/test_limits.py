"""Limiter behaviour under a virtual clock: no test here sleeps for real."""
from __future__ import annotations

import asyncio

import pytest

from pipeline.config import LimitsConfig
from pipeline.errors import PermanentError
from pipeline.limits import Gate, Limits, parse_go_duration
from tests.vclock import run_virtual


def limits(**kw: object) -> Limits:
    base = {"requests_per_minute": None, "tokens_per_minute": None, "max_concurrency": 1000}
    return Limits(LimitsConfig(**{**base, **kw}))


async def dispatch_times(lim: Limits, n: int, tokens: float = 0, hold: float = 0.0) -> list[float]:
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def one() -> None:
        async with lim.slot(tokens):
            times.append(loop.time())
            if hold:
                await asyncio.sleep(hold)

    await asyncio.gather(*(one() for _ in range(n)))
    return sorted(times)


def max_in_window(times: list[float], window: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_requests_per_minute_is_smooth_and_never_exceeded() -> None:
    times = run_virtual(dispatch_times(limits(requests_per_minute=600, burst_s=1.0), 300))
    # Bucket starts full with one second of quota (10), then 10/s.
    assert times[9] == pytest.approx(0.0, abs=1e-3)
    assert times[10] > 0.05
    assert max_in_window(times, 60.0) <= 600 + 10
    assert max_in_window(times, 1.0) <= 21  # burst of 10 + 10 refilled within a second at most
    assert times[-1] == pytest.approx(29.0, abs=0.2)  # 290 after the burst at 10/s


def test_rate_over_a_minute_uses_the_whole_budget() -> None:
    times = run_virtual(dispatch_times(limits(requests_per_minute=120), 240))
    sent_in_first_minute = sum(1 for t in times if t < 60.0)
    assert 118 <= sent_in_first_minute <= 122


def test_tokens_per_minute_and_settle_refunds_unused_estimate() -> None:
    async def scenario() -> tuple[float, float]:
        lim = limits(tokens_per_minute=6000)
        loop = asyncio.get_running_loop()
        # Three requests estimated at 2000 tokens take the whole bucket...
        for _ in range(3):
            async with lim.slot(2000) as permit:
                permit.settle(500)  # ...but each used only 500: 4500 tokens come back.
        t0 = loop.time()
        for _ in range(2):
            async with lim.slot(2000):
                pass
        without_refund = limits(tokens_per_minute=6000)
        for _ in range(3):
            async with without_refund.slot(2000):
                pass
        t1 = loop.time()
        async with without_refund.slot(2000):
            pass
        return loop.time() - t0 - (loop.time() - t1), loop.time() - t1

    refunded_wait, unrefunded_wait = run_virtual(scenario())
    assert refunded_wait == pytest.approx(0.0, abs=1e-3)
    assert unrefunded_wait == pytest.approx(20.0, abs=0.1)  # 2000 tokens at 100 tokens/s


def test_request_larger_than_tokens_per_minute_is_permanent() -> None:
    async def scenario() -> None:
        async with limits(tokens_per_minute=1000).slot(1500):
            pass

    with pytest.raises(PermanentError, match="tokens_per_minute"):
        run_virtual(scenario())


def test_pause_holds_every_request_until_the_reset() -> None:
    async def scenario() -> list[float]:
        lim = limits(requests_per_minute=6000)
        loop = asyncio.get_running_loop()
        lim.pause(5.0)
        times = await dispatch_times(lim, 20)
        assert loop.time() >= 5.0
        return times

    times = run_virtual(scenario())
    assert min(times) >= 5.0


def test_concurrency_cap_and_aimd_after_429() -> None:
    async def scenario() -> tuple[int, int, int]:
        lim = limits(max_concurrency=8)
        peak = 0

        async def one() -> None:
            nonlocal peak
            async with lim.slot(0):
                peak = max(peak, lim.gate.in_flight)
                await asyncio.sleep(1.0)

        await asyncio.gather(*(one() for _ in range(40)))
        lim.pause(1.0)
        halved = lim.gate.limit
        for _ in range(200):
            lim.on_success()
        return peak, halved, lim.gate.limit

    peak, halved, recovered = run_virtual(scenario())
    assert peak == 8
    assert halved == 4
    assert recovered == 8  # additive increase back to, never above, the configured ceiling


def test_learned_limits_only_lower_the_rate() -> None:
    async def scenario() -> tuple[float, float]:
        lim = limits(requests_per_minute=1000)
        lim.observe({"x-ratelimit-limit-requests": "60"})
        lowered = lim.requests.per_minute  # type: ignore[union-attr]
        lim.observe({"x-ratelimit-limit-requests": "100000"})
        return lowered, lim.requests.per_minute  # type: ignore[union-attr]

    lowered, after = run_virtual(scenario())
    assert lowered == pytest.approx(58.8)
    assert after == pytest.approx(58.8)


def test_gate_resize_wakes_waiters() -> None:
    async def scenario() -> int:
        gate = Gate(1)
        await gate.acquire()
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert not waiter.done()
        gate.resize(2)
        await asyncio.sleep(0)
        await waiter
        return gate.in_flight

    assert run_virtual(scenario()) == 2


@pytest.mark.parametrize("text,seconds", [("1s", 1.0), ("6m0s", 360.0), ("12ms", 0.012), ("9.816s", 9.816),
                                          ("1h2m3s", 3723.0), ("", None), ("abc", None), ("5x", None)])
def test_go_durations(text: str, seconds: float | None) -> None:
    assert parse_go_duration(text) == (pytest.approx(seconds) if seconds is not None else None)
