"""Run one async test body against a fresh simulator on loopback, with an aiohttp client session."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from pipeline_simulator import SimConfig, Simulator

Test = Callable[[Simulator, str, aiohttp.ClientSession], Awaitable[Any]]


def serve(cfg: SimConfig, test: Test) -> Any:
    async def main() -> Any:
        sim = Simulator(cfg)
        url = await sim.start()
        try:
            async with aiohttp.ClientSession() as session:
                return await test(sim, url, session)
        finally:
            await sim.stop()
    return asyncio.run(main())
