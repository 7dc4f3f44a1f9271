"""Limiter behaviour under a virtual clock: no test here sleeps for real."""
from __future__ import annotations

import asyncio
import time

import pytest

from pipeline.config import LimitsConfig
from pipeline.errors import PermanentError, RateLimited
from pipeline.models.headers import parse_go_duration
from pipeline.send.buckets import Gate
from pipeline.send.limits import Limits
from pipeline_simulator.limits import go_duration
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


def max_in_window(times: list[float], window: float, weights: list[float] | None = None) -> float:
    """Largest count (or weight sum) of events in any half-open window [t, t + window)."""
    w = weights or [1.0] * len(times)
    best, total, j = 0.0, 0.0, 0
    for i, t in enumerate(times):
        total += w[i]
        while times[j] <= t - window:
            total -= w[j]
            j += 1
        best = max(best, total)
    return best


# -- buckets: smooth, hard ceilings --------------------------------------------------------------

def test_requests_per_minute_is_smooth_and_no_sliding_minute_exceeds_it() -> None:
    times = run_virtual(dispatch_times(limits(requests_per_minute=600, burst_s=1.0), 1500))
    assert times[9] == pytest.approx(0.0, abs=1e-3)  # one second of quota (10) may go at once...
    assert times[10] > 0.05  # ...and no more: not a minute's quota in the first second
    assert max_in_window(times, 1.0) <= 20
    assert max_in_window(times, 60.0) <= 600  # every sliding minute, as the simulator measures it
    assert max_in_window(times, 120.0) <= 1200


def test_rate_over_a_minute_uses_the_whole_budget() -> None:
    times = run_virtual(dispatch_times(limits(requests_per_minute=120), 400))
    sent_in_first_minute = sum(1 for t in times if t < 60.0)
    assert 118 <= sent_in_first_minute <= 120
    assert max_in_window(times, 60.0) <= 120


def test_tokens_per_minute_is_smooth_and_a_hard_ceiling() -> None:
    est = [float(300 + 37 * (i % 11)) for i in range(120)]  # 300..670 tokens, ~58k in all

    async def scenario() -> list[tuple[float, float]]:
        lim = limits(tokens_per_minute=12_000, burst_s=1.0)
        loop = asyncio.get_running_loop()
        sent: list[tuple[float, float]] = []

        async def one(tokens: float) -> None:
            async with lim.slot(tokens):
                sent.append((loop.time(), tokens))

        await asyncio.gather(*(one(t) for t in est))
        return sorted(sent)

    sent = run_virtual(scenario())
    times, weights = [t for t, _ in sent], [w for _, w in sent]
    assert max_in_window(times, 60.0, weights) <= 12_000
    assert max_in_window(times, 1.0, weights) <= 2 * 670 + 200  # the burst is seconds, not a minute
    assert times[-1] > 4 * 60 * 0.95  # ~58k tokens at 12k/min take about five minutes


def test_settle_refunds_the_unused_token_estimate() -> None:
    async def wait_for_second(refund_to: int | None) -> float:
        lim = limits(tokens_per_minute=6000)
        loop = asyncio.get_running_loop()
        async with lim.slot(2000) as permit:
            permit.settle(refund_to)
        t0 = loop.time()
        async with lim.slot(2000):
            pass
        return loop.time() - t0

    refunded = run_virtual(wait_for_second(500))
    unrefunded = run_virtual(wait_for_second(None))
    # The bucket grew to hold 2000 and refills at (6000 - 2000) / 60 per second.
    assert unrefunded == pytest.approx(2000 / (4000 / 60), rel=0.01)
    assert refunded == pytest.approx(500 / (4000 / 60), rel=0.01)


def test_request_larger_than_tokens_per_minute_is_permanent() -> None:
    async def scenario() -> None:
        async with limits(tokens_per_minute=1000).slot(1500):
            pass

    with pytest.raises(PermanentError, match="tokens_per_minute"):
        run_virtual(scenario())


# -- pauses and AIMD -----------------------------------------------------------------------------

def test_pause_holds_every_request_then_resumes_at_the_steady_rate() -> None:
    async def scenario() -> list[float]:
        lim = limits(requests_per_minute=600)
        lim.pause(5.0)
        return await dispatch_times(lim, 30)

    times = run_virtual(scenario())
    assert min(times) >= 5.0
    assert max_in_window(times, 1.0) <= 11  # no burst of the refilled bucket after the pause
    assert times[-1] == pytest.approx(5.0 + 30 / (590 / 60), abs=0.05)


async def _burst_of_429s(lim: Limits, n: int, retry_after: float | None = None) -> None:
    async def one() -> None:
        try:
            async with lim.slot(0) as permit:
                await asyncio.sleep(0.5)
                if retry_after is None:  # no word on when: the dispatcher cuts concurrency (AIMD)
                    lim.decrease(permit.sent_at)
                raise RateLimited("slow down", status=429, retry_after=retry_after)
        except RateLimited:
            pass

    await asyncio.gather(*(one() for _ in range(n)))


def test_aimd_halves_once_per_episode_and_ramps_back_to_the_ceiling() -> None:
    async def scenario() -> tuple[int, int, int, int, int]:
        lim = limits(max_concurrency=8)
        peak = 0

        async def busy() -> None:
            nonlocal peak
            async with lim.slot(0):
                peak = max(peak, lim.gate.in_flight)
                await asyncio.sleep(1.0)

        await asyncio.gather(*(busy() for _ in range(40)))
        await _burst_of_429s(lim, 8, retry_after=1.0)  # the server said when: pause, no cut
        assert lim.gate.limit == 8
        await _burst_of_429s(lim, 8)  # eight answers to requests sent together: one cut, not three
        once = lim.gate.limit
        await _burst_of_429s(lim, 4)  # sent after the cut: a new episode
        twice = lim.gate.limit
        for _ in range(20):
            lim.on_success()
        partly = lim.gate.limit
        for _ in range(500):
            lim.on_success()
        return peak, once, twice, partly, lim.gate.limit

    peak, once, twice, partly, recovered = run_virtual(scenario())
    assert peak == 8
    assert (once, twice) == (4, 2)
    assert 2 < partly < 8  # additive: one slot per `limit` successes
    assert recovered == 8  # back to, never above, the configured ceiling


def test_non_adaptive_limits_do_not_cut_or_learn() -> None:
    async def scenario() -> tuple[int, float]:
        lim = limits(max_concurrency=8, requests_per_minute=1000, adaptive=False)
        await _burst_of_429s(lim, 8)
        lim.observe({"x-ratelimit-limit-requests": "60"})
        return lim.gate.limit, lim.requests.per_minute  # type: ignore[union-attr]

    assert run_virtual(scenario()) == (8, 1000)


def test_stop_lets_every_waiter_through_at_once() -> None:
    async def scenario() -> tuple[float, int]:
        lim = limits(requests_per_minute=60, max_concurrency=4)  # 1/s: 200 queued would take minutes
        loop = asyncio.get_running_loop()
        lim.pause(30.0)
        entered = 0

        async def one() -> None:
            nonlocal entered
            async with lim.slot(0):
                entered += 1
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(one()) for _ in range(200)]
        await asyncio.sleep(2.0)
        lim.stop()
        await asyncio.gather(*tasks)
        return loop.time(), entered

    finished_at, entered = run_virtual(scenario())
    assert entered == 200 and finished_at < 2.5  # the caller sees its stop flag inside the slot and leaves


# -- learning from headers -----------------------------------------------------------------------

def test_learned_limits_only_lower_the_rate() -> None:
    async def scenario() -> tuple[float, float]:
        lim = limits(requests_per_minute=1000)
        lim.observe({"x-ratelimit-limit-requests": "60"})
        lowered = lim.requests.per_minute  # type: ignore[union-attr]
        lim.observe({"X-RateLimit-Limit-Requests": "100000"})
        return lowered, lim.requests.per_minute  # type: ignore[union-attr]

    lowered, after = run_virtual(scenario())
    assert lowered == pytest.approx(59.4)
    assert after == pytest.approx(59.4)


class FakeOpenAI:
    """OpenAI's limiter as the simulator models it: a continuous bucket of `limit`/min that starts full,
    answering with x-ratelimit-* headers (reset = time until full, as a Go duration)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.rate = limit, limit / 60.0
        self.level, self.stamp = float(limit), 0.0
        self.refused = 0

    def take(self, now: float, ours: bool = True) -> bool:
        self.level = min(self.limit, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level < 1:
            self.refused += ours
            return False
        self.level -= 1
        return True

    def headers(self) -> dict[str, str]:
        return {"x-ratelimit-limit-requests": str(self.limit), "x-ratelimit-remaining-requests": str(int(self.level)),
                "x-ratelimit-reset-requests": go_duration((self.limit - self.level) / self.rate)}


async def drive(lim: Limits, server: FakeOpenAI, until: float, *, workers: int = 20, latency: float = 0.2,
                other_client_per_s: float = 0.0) -> int:
    """Requests through `lim` against `server` until `until`; another client may share the budget."""
    loop = asyncio.get_running_loop()
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while loop.time() < until:
            async with lim.slot(0):
                server.take(loop.time())
                sent += 1
                headers = server.headers()
                await asyncio.sleep(latency)
                lim.observe(headers)

    async def other() -> None:
        while loop.time() < until:
            await asyncio.sleep(1 / other_client_per_s)
            server.take(loop.time(), ours=False)

    tasks = [worker() for _ in range(workers)] + ([other()] if other_client_per_s else [])
    await asyncio.gather(*tasks)
    return sent


def test_learns_the_real_limit_from_the_first_answers_and_never_trips_it() -> None:
    async def scenario() -> tuple[int, int, float]:
        lim = limits(requests_per_minute=6000)  # ten times what the server allows
        server = FakeOpenAI(600)
        sent = await drive(lim, server, until=180.0)
        return sent, server.refused, lim.requests.per_minute  # type: ignore[union-attr]

    sent, refused, learned = run_virtual(scenario())
    assert refused == 0
    assert learned == pytest.approx(594)
    assert sent > 0.9 * (600 + 594 * 2)  # the whole budget is used: the full bucket plus the rate


@pytest.mark.parametrize("adaptive", [True, False])
def test_low_remaining_paces_before_a_429(adaptive: bool) -> None:
    async def scenario() -> tuple[int, int]:
        lim = limits(requests_per_minute=600, adaptive=adaptive)
        server = FakeOpenAI(600)  # our limit is right, but another client takes 6 of its 10 per second
        sent = await drive(lim, server, until=240.0, other_client_per_s=6.0)
        return sent, server.refused

    sent, refused = run_virtual(scenario())
    if adaptive:
        assert refused == 0
        assert sent > 0.8 * (600 + 4 * 240 - 6 * 0)  # ~4/s is what the other client leaves us
    else:
        assert refused > 100  # the same run without remaining/reset pacing keeps hitting the wall


def test_pacing_spreads_what_is_left_over_the_time_to_reset() -> None:
    async def scenario() -> list[float]:
        lim = limits(requests_per_minute=600)
        lim.observe({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "30",
                     "x-ratelimit-reset-requests": "10s"})
        return await dispatch_times(lim, 60)

    times = run_virtual(scenario())
    # 30 left for 10 s: 3/s (slower than the bucket's 9.6/s) until the reset, then the bucket alone.
    before_reset = [t for t in times if t < 10.0]
    assert 28 <= len(before_reset) <= 31
    assert max_in_window(before_reset, 1.0) <= 4
    assert times[-1] < 10.0 + 30 / 9.6 + 1.0


def test_openrouter_429_headers_teach_a_per_minute_limit_and_the_pause() -> None:
    from pipeline.send.classify import classify
    from pipeline.send.transport import Reply

    reset_ms = str(int((time.time() + 8) * 1000))
    headers = {"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset_ms}
    body = b'{"error":{"code":429,"message":"Rate limit exceeded: limit_rpm/openai/gpt-4-turbo"},"user_id":"u"}'

    async def scenario() -> tuple[float, list[float]]:
        lim = limits()  # no requests_per_minute configured: the server's becomes the ceiling
        reply = Reply(429, headers, body, 0.1)
        lim.observe(reply.headers)
        with pytest.raises(RateLimited) as info:
            classify(reply)
        assert info.value.retry_after == pytest.approx(8, abs=1)
        lim.pause(info.value.retry_after)
        return lim.requests.per_minute, await dispatch_times(lim, 12)  # type: ignore[union-attr]

    per_minute, times = run_virtual(scenario())
    assert per_minute == pytest.approx(19.8)
    assert min(times) >= 7.0
    assert max_in_window(times, 60.0) <= 20

    async def daily() -> dict[str, float]:
        lim = limits()
        day_ms = str(int((time.time() + 6 * 3600) * 1000))  # free-models-per-day: not a per-minute limit
        lim.observe({"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": day_ms})
        return lim.learned

    assert run_virtual(daily()) == {}


# -- gate and durations --------------------------------------------------------------------------

def test_gate_resize_wakes_waiters_and_hands_slots_over() -> None:
    async def scenario() -> tuple[int, int]:
        gate = Gate(1)
        await gate.acquire()
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert not waiter.done()
        gate.resize(2)
        await asyncio.sleep(0)
        await waiter
        both = gate.in_flight
        # A waiter cancelled after being handed a slot passes it on instead of leaking it.
        third, fourth = asyncio.create_task(gate.acquire()), asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        gate.release()
        third.cancel()
        await asyncio.sleep(0)
        await fourth
        return both, gate.in_flight

    assert run_virtual(scenario()) == (2, 2)


@pytest.mark.parametrize("text,seconds", [("1s", 1.0), ("6m0s", 360.0), ("12ms", 0.012), ("9.816s", 9.816),
                                          ("1h2m3s", 3723.0), ("1m30.5s", 90.5), ("250us", 0.00025),
                                          ("", None), ("abc", None), ("5x", None), ("1s2", None)])
def test_go_durations(text: str, seconds: float | None) -> None:
    assert parse_go_duration(text) == (pytest.approx(seconds) if seconds is not None else None)
