"""The Ray engine's shared limiter without Ray: LimiterActor and RayLimits on one virtual-clock loop,
the actor reached through a stand-in handle (`handle.method.remote(...)` -> awaitable), as in Ray."""
from __future__ import annotations

import asyncio
from typing import Any

from pipeline.config import LimitsConfig
from pipeline.engines.ray.limiter import LimiterActor, RayLimits
from tests.vclock import run_virtual


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> Any:
        result = self.fn(*args)
        if asyncio.iscoroutine(result):
            return asyncio.ensure_future(result)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(result)
        return fut


class Handle:
    def __init__(self, actor: LimiterActor) -> None:
        self.actor = actor

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.actor, name))


async def _send(limits: RayLimits, n: int, times: list[float]) -> None:
    loop = asyncio.get_running_loop()

    async def one() -> None:
        async with limits.slot(100):
            times.append(loop.time())
            await asyncio.sleep(0.05)

    await asyncio.gather(*(one() for _ in range(n)))


def test_four_workers_share_one_rate_leased_in_chunks() -> None:
    rpm, workers, per_worker = 60_000, 4, 2000

    async def main() -> tuple[list[float], LimiterActor]:
        loop = asyncio.get_running_loop()
        actor = LimiterActor(rpm, None, 0.5, clock=loop.time)
        cfg = LimitsConfig(requests_per_minute=rpm, max_concurrency=256)
        times: list[float] = []
        fleet = [RayLimits(cfg, Handle(actor), workers, clock=loop.time) for _ in range(workers)]
        start = loop.time()
        await asyncio.gather(*(_send(lim, per_worker, times) for lim in fleet))
        return [t - start for t in times], actor

    times, actor = run_virtual(main())
    total = workers * per_worker
    rate = rpm / 60
    burst = 0.5 * rate
    span = max(times)
    # One job-wide rate, not one per worker: 8,000 requests at 1,000/s after a half-second burst ...
    assert span >= (total - burst - rate * 0.1 * workers) / rate
    # ... and the limit is used (>= 95%), with a lease per ~25 requests, not one per request.
    assert span <= (total - burst) / rate / 0.95
    assert actor.leases <= total / 10
    for t in range(int(span)):  # no second ever carries more than the burst plus one second of rate
        assert sum(1 for x in times if t <= x < t + 1) <= burst + rate + 1


def test_a_pause_told_by_one_worker_holds_every_worker() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        actor = LimiterActor(6000, None, 0.5, clock=loop.time)
        cfg = LimitsConfig(requests_per_minute=6000, max_concurrency=8)
        a, b = (RayLimits(cfg, Handle(actor), 2, clock=loop.time) for _ in range(2))
        b.start()
        async with a.slot(1):
            pass
        told = loop.time()
        a.pause(5.0)  # a 429 with Retry-After: 5 heard by worker a only
        await asyncio.sleep(0.5)  # b's poll hears of it
        async with b.slot(1):
            sent = loop.time()
        b.stop()
        return told, sent

    told, sent = run_virtual(main())
    assert sent >= told + 5.0
