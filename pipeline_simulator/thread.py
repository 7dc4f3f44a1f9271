"""Run the simulator on its own event loop in a background thread (sync tests, subprocesses)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

from .config import SimConfig
from .server import LOOPBACK, Simulator


class SimulatorThread:
    """``with SimulatorThread(cfg) as base_url: ...``; ``.sim`` is the running Simulator."""

    def __init__(self, cfg: SimConfig | None = None, host: str = LOOPBACK, port: int = 0) -> None:
        self.sim = Simulator(cfg)
        self.host = host
        self.port = port
        self.base_url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        if self._thread is not None:
            raise RuntimeError("simulator thread already started")
        started: Future[str] = Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="simulator", daemon=True)
        self._thread.start()
        self.base_url = started.result(timeout=30)
        return self.base_url

    def _run(self, started: Future[str]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            started.set_result(loop.run_until_complete(self.sim.start(self.host, self.port)))
        except BaseException as exc:  # noqa: BLE001 - bind errors etc. belong to the caller's thread
            started.set_exception(exc)
            loop.close()
            return
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the simulator's loop (thread-safe access to its state); returns its result."""
        loop = self._require_loop()

        async def invoke() -> Any:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(invoke(), loop).result(timeout=30)

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.call(lambda: self.sim.stats)
        return stats

    def reset(self, **overrides: Any) -> None:
        self.call(self.sim.reset, **overrides)

    def stop(self) -> None:
        if self._thread is None:
            return
        loop = self._require_loop()
        try:
            asyncio.run_coroutine_threadsafe(self.sim.stop(), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=30)
            self._thread = None

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("simulator thread is not running")
        return self._loop

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
